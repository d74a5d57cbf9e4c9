"""`alloy eval`: bad arguments and outputs refused in one line before any evaluation; a quiet stderr."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alloy.cli import main as alloy
from eval import harness
from merging.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("alloy: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("bad, said", [(["--device", "foo"], "expected cpu, cuda or cuda:N"),
                                       (["--device", "cuda:x"], "expected cpu, cuda or cuda:N"),
                                       (["--batch-size", "0"], "must be a positive integer"),
                                       (["--batch-size", "-2"], "must be a positive integer")])  # fmt: skip
def test_bad_arguments_are_argparse_errors(tiny_family, capsys, bad, said):
    with pytest.raises(SystemExit) as e:
        alloy(["eval", str(tiny_family.base), *bad])
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_outputs_and_cache_refused_before_any_evaluation(tiny_family, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("evaluated before the output was refused")

    monkeypatch.setattr(harness, "_run_lm_eval", no_work)
    base, facts = tiny_family.base, tiny_family.specialists["facts"]
    before = (base / "config.json").read_bytes()
    (tmp_path / "a_file").write_text("x")
    common = ["--tasks", "facts_mc", "--limit", "2", "--data-dir", str(tiny_family.data_dir),
              "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    cases = [
        (["--out", str(base / "config.json"), "--no-parents"], "lies inside the input model folder"),
        (["--out", str(facts / "r.json"), "--parents", str(facts)], "lies inside the input model folder"),
        (["--out", str(tiny_family.data_dir / "facts.jsonl"), "--no-parents"], "lies inside the input model folder"),
        (["--out", str(tmp_path), "--no-parents"], "is a folder"),
        (["--out", str(tmp_path / "a_file" / "r.json"), "--no-parents"], "is a file, not a folder"),
    ]
    for extra, said in cases:
        assert alloy(["eval", str(base), *common, *extra]) == 2
        assert said in _one_line_error(capsys)
    assert (base / "config.json").read_bytes() == before
    # a cache folder that is a file
    assert alloy(["eval", str(base), "--tasks", "facts_mc", "--cache-dir", str(tmp_path / "a_file"), "--no-parents"]) == 2
    assert f"cache folder {tmp_path / 'a_file'} is a file" in _one_line_error(capsys)


def test_model_without_tokenizer_is_named(tiny_family, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_family.base / name, bare / name)
    with pytest.raises(InputError, match=rf"^{bare}: no tokenizer files"):
        harness.evaluate(bare, ["facts_mc"], limit=2, data_dir=tiny_family.data_dir, cache_dir=tmp_path / "cache")


def test_stderr_has_no_git_or_loading_noise_outside_a_checkout(tiny_family, tmp_path):
    # lm-eval asks git for the working folder's commit (git printed "fatal: not a git repository" outside one) and
    # transformers drew a "Loading weights" bar; run where no git checkout is above the working folder
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    out = tmp_path / "res" / "r.json"
    p = subprocess.run([sys.executable, "-m", "alloy", "eval", str(tiny_family.base), "--tasks", "facts_mc",
                        "--limit", "2", "--data-dir", str(tiny_family.data_dir), "--cache-dir", str(tmp_path / "c"),
                        "--no-parents", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.is_file()
    assert "fatal:" not in p.stderr and "Loading weights" not in p.stderr, p.stderr
