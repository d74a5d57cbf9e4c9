"""`alloy run` / `alloy serve` plumbing, the configs dvc.yaml reads, and prefect.yaml's deployment."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alloy.cli import main as cli
from alloy.cmd_pipeline import write_configs

ROOT = Path(__file__).resolve().parents[2]


def test_write_configs_are_runnable_mergekit_yaml(tmp_path):
    from merging.config import load_config

    written = write_configs(str(ROOT / "params.yaml"), [], str(tmp_path / "configs"))
    names = {p.relative_to(tmp_path / "configs").as_posix() for p in written}
    assert "ta/ta-lambda0.8.yml" in names and "dare_ties/dare_ties.yml" in names
    cfg = load_config(tmp_path / "configs" / "ties" / "ties.yml")
    # models are paths relative to the project root, where dvc runs `alloy merge`
    assert str(cfg.base_model) == "models/smol/base"
    assert [str(m.model) for m in cfg.models] == ["models/smol/facts", "models/smol/words", "models/smol/addition"]
    args = (tmp_path / "configs" / "quant.args").read_text().split()
    assert args[:4] == ["--text", "models/smol/data/heldout.jsonl", "--max-tokens", "1024"]
    assert (tmp_path / "configs" / "quant-baseline.dir").read_text().strip() == ""


def test_write_configs_carry_thresholds_and_baseline(tmp_path):
    p = tmp_path / "params.yaml"
    data = yaml.safe_load((ROOT / "params-tiny.yaml").read_text())
    data["quant"]["baseline"] = "base"
    p.write_text(yaml.safe_dump(data))
    write_configs(str(p), ["quant.thresholds.int8_kl_max=0.01"], str(tmp_path / "c"))
    args = (tmp_path / "c" / "quant.args").read_text()
    assert "int8_kl_max=0.01" in args and "int4_kl_max=0.5" in args
    assert args.strip().endswith("--baseline results/quant/baseline.json")
    assert (tmp_path / "c" / "quant-baseline.dir").read_text().strip() == "models/tiny/base"


def test_bad_params_is_one_line_and_exit_2(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("candidates:\n  ta: {method: ties, models: [a]}\nmodles: {}\n")
    assert cli(["run", "--params", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alloy: error: ") and "modles: unknown key (did you mean 'models'?)" in err
    assert err.count("\n") == 1
    assert cli(["run", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_needs_a_server(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert cli(["serve", "--params", str(ROOT / "params-tiny.yaml")]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_serve_schedules_the_flow_with_the_params(monkeypatch):
    from flows import pipeline

    calls = {}
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(pipeline.merge_pipeline, "serve", lambda **kw: calls.update(kw))
    assert cli(["serve", "--params", str(ROOT / "params-tiny.yaml"), "--cron", "*/5 * * * *", "--name", "n",
                "--set", "eval.limit=5"]) == 0
    (schedule,) = calls["schedules"]
    assert schedule.cron == "*/5 * * * *" and calls["name"] == "n"
    assert calls["parameters"] == {"params_path": str(ROOT / "params-tiny.yaml"), "overrides": ["eval.limit=5"]}


def test_prefect_yaml_deployment_matches_the_flow():
    from prefect.schedules import Cron

    from flows.pipeline import merge_pipeline

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = doc["deployments"]
    path, _, name = dep["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and name == "merge_pipeline"
    assert set(dep["parameters"]) <= set(inspect.signature(merge_pipeline.fn).parameters)
    assert (ROOT / dep["parameters"]["params_path"]).is_file()
    Cron(dep["schedules"][0]["cron"])  # a valid cron expression
    assert doc["prefect-version"] == __import__("prefect").__version__


def test_help_lists_run_and_serve():
    out = subprocess.run([sys.executable, "-m", "alloy", "run", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--params" in out.stdout and "--write-configs" in out.stdout
