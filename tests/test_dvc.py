"""dvc.yaml, for real: `dvc repro` in a temporary git repo on a tiny family, twice (the second a no-op), a forced
rebuild that reproduces the locked bytes, a params change that re-runs only what depends on it, and an experiment
(`dvc exp run -S`) that sweeps one candidate's parameter.

The family stage itself is not run here: training even the smallest family through `alloy demo-family` takes
minutes (it has no flag for base steps or model size), so the test trains a smaller one in-process and records it
as the family stage's output with `dvc commit`, as a teammate would after building it elsewhere.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "flows"))
from pipeline_env import isolate_env  # noqa: E402

isolate_env()
pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "name": "dvc-test",
    "models": {},
    "family": {"kind": "tiny", "out": "models/tiny", "seed": 0, "steps": 4, "n_eval": 4, "source": "",
               "skills": ["facts"]},
    "candidates": {
        "soup": {"method": "linear", "models": ["base", "facts"], "parameters": {"weight": 1.0}},
        "ta": {"method": "task_arithmetic", "base_model": "base", "models": ["facts"],
               "parameters": {"weight": 1.0, "lambda": 0.5}},
        # RegMean reads Gram matrices the grams stage computes (the specialist on its skill, the base on it too)
        "rm": {"method": "regmean", "models": ["base", "facts"],
               "grams": {"examples": 8, "data": {"base": "skill:facts"}}},
    },
    "merge": {"seed": 0, "shard_size": "2GB", "device": "cpu"},
    "eval": {"tasks": "facts_mc,heldout_ppl", "limit": 2, "batch_size": 8},
    "quant": {"max_tokens": 96, "thresholds": {"int8_kl_max": 0.05, "int8_top1_min": 0.8, "int8_ppl_ratio_max": 1.2,
                                               "int4_kl_max": 1.0, "int4_top1_min": 0.3, "int4_ppl_ratio_max": 3.0}},
    "champion": {"metric": "heldout_ppl", "higher_is_better": False},
    "paths": {"models": "models", "merges": "merges", "results": "results", "configs": "configs"},
}


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def manifests(repo: Path) -> dict[str, str]:
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((repo / "merges").glob("*/*/alloy_manifest.json"))}


def test_dvc_repro_noop_rebuild_and_params_change(tmp_path):
    from alloy.demo.tiny import TEST_SIZE, build_tiny_family

    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "config", "user.name", "test"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    build_tiny_family(repo / "models" / "tiny", seed=0, base_steps=10, specialist_steps=4, skills=("facts",),
                      size=TEST_SIZE, n_eval=4)
    run(["git", "add", "dvc.yaml", "params.yaml", ".dvc"], repo)
    run(["git", "commit", "-qm", "pipeline"], repo)
    run([sys.executable, "-m", "dvc", "commit", "-f", "family"], repo)
    dvc = [sys.executable, "-m", "dvc"]

    # 1. first repro: every stage downstream of the family
    out1 = run(dvc + ["repro"], repo)
    assert ran(out1) == {"configs", "grams", "merge@soup", "merge@ta", "merge@rm", "quant-baseline", "quant@soup",
                         "quant@ta", "quant@rm", "eval-parents", "eval@soup", "eval@ta", "eval@rm", "summary"}
    lock1 = (repo / "dvc.lock").read_text()
    digests1 = manifests(repo)
    assert set(digests1) == {"merges/soup/soup/alloy_manifest.json", "merges/ta/ta/alloy_manifest.json",
                             "merges/rm/rm/alloy_manifest.json"}
    rm = json.loads((repo / "merges/rm/rm/alloy_manifest.json").read_text())
    assert sorted(Path(s["file"]).name for s in rm["side_inputs"]) == ["base.safetensors", "facts.safetensors"]
    assert set(json.loads((repo / "models/grams/grams.json").read_text())) == {"base", "facts"}
    summary = json.loads((repo / "results" / "summary.json").read_text())
    assert set(summary["candidates"]) == {"soup", "ta", "rm"}
    assert all(c["quant_passed"] for c in summary["candidates"].values())
    # linear(base, facts) at equal weights and base + 0.5 (facts - base) are the same model
    assert summary["candidates"]["soup"]["heldout_ppl"] == pytest.approx(summary["candidates"]["ta"]["heldout_ppl"], rel=1e-4)
    shown = json.loads(run(dvc + ["metrics", "show", "--json"], repo))
    assert "candidates" in json.dumps(shown) and "heldout_ppl" in json.dumps(shown)

    # 2. again: nothing to do, same lock, same manifests
    out2 = run(dvc + ["repro"], repo)
    assert not ran(out2) and "up to date" in out2
    assert (repo / "dvc.lock").read_text() == lock1 and manifests(repo) == digests1

    # 3. a merge rebuilt from scratch (a fresh clone's `dvc repro`) gives the bytes the lock recorded
    shutil.rmtree(repo / "merges" / "ta")
    out3 = run(dvc + ["repro", "--force", "--single-item", "merge@ta"], repo)
    assert ran(out3) == {"merge@ta"}
    assert (repo / "dvc.lock").read_text() == lock1 and manifests(repo) == digests1
    assert "up to date" in run(dvc + ["status"], repo)

    # 4. a params change re-runs only what depends on it: the other candidate and the parents are untouched
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["candidates"]["ta"]["parameters"]["lambda"] = 0.8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out4 = run(dvc + ["repro"], repo)
    assert ran(out4) == {"configs", "merge@ta", "quant@ta", "eval@ta", "summary"}
    digests4 = manifests(repo)
    assert digests4["merges/soup/soup/alloy_manifest.json"] == digests1["merges/soup/soup/alloy_manifest.json"]
    assert digests4["merges/ta/ta/alloy_manifest.json"] != digests1["merges/ta/ta/alloy_manifest.json"]
    diff = run(dvc + ["metrics", "diff", "--json"], repo)
    assert "candidates.ta.heldout_ppl" in diff

    # 5. an experiment: `dvc exp run -S` sets one parameter, re-runs what depends on it, and is listed with its
    #    parameter and metrics beside the committed baseline
    run(["git", "add", "-A"], repo)  # dvc.lock, params and the uncached outputs; cached ones are git-ignored
    run(["git", "commit", "-qm", "lambda 0.8"], repo)
    out5 = run(dvc + ["exp", "run", "-n", "ta-lambda-0.3", "-S", "candidates.ta.parameters.lambda=0.3"], repo)
    assert ran(out5) == {"configs", "merge@ta", "quant@ta", "eval@ta", "summary"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["candidates"]["ta"]["parameters"]["lambda"] == 0.3
    digests5 = manifests(repo)
    assert digests5["merges/soup/soup/alloy_manifest.json"] == digests1["merges/soup/soup/alloy_manifest.json"]
    assert digests5["merges/ta/ta/alloy_manifest.json"] not in (digests1["merges/ta/ta/alloy_manifest.json"],
                                                                digests4["merges/ta/ta/alloy_manifest.json"])
    shown = json.loads(run(dvc + ["exp", "show", "--json"], repo))
    text = json.dumps(shown)
    assert "ta-lambda-0.3" in text and "heldout_ppl" in text
