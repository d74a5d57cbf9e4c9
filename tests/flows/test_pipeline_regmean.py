"""A RegMean candidate through the real flow: Gram matrices computed once per model and cached by model bytes and
data, the merge reading them (manifest), MLflow run and registry version; a change of data recomputes and re-merges."""

import json
from pathlib import Path

import pytest
import yaml

from test_pipeline import write_params

pytestmark = pytest.mark.timeout(600)


def test_regmean_candidate_grams_cached_and_invalidated(tmp_path, tiny_family_dir):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import run_pipeline

    cands = [{"name": "rm", "method": "regmean", "base_model": "base", "models": ["facts", "words"],
              "parameters": {"alpha": 0.9}, "grams": {"examples": 16}}]
    params = write_params(tmp_path, tiny_family_dir, candidates=cands,
                          eval={"tasks": ["facts_mc", "heldout_ppl"], "limit": 4, "batch_size": 8, "parents": False,
                                "data_dir": str(tiny_family_dir / "data")})  # fmt: skip
    summary = run_pipeline(params)
    rm = summary["candidates"]["rm"]
    assert "error" not in rm, rm.get("error")
    grams = {m: tmp_path / "models" / "grams" / f"{m}.safetensors" for m in ("facts", "words")}
    assert all(p.is_file() for p in grams.values())
    manifest = json.loads((tmp_path / "merges" / "rm" / "rm" / "alloy_manifest.json").read_text())
    # as the config names them (relative to the project), so a clone elsewhere writes the same manifest
    assert [s["file"] for s in manifest["side_inputs"]] == [f"models/grams/{m}.safetensors" for m in ("facts", "words")]
    assert manifest["config"]["models"][0]["parameters"]["gram"] == "models/grams/facts.safetensors"
    c = MlflowClient(tracking_uri=summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    run = c.get_run(rm["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "regmean alpha=0.9"
    assert "heldout_ppl" in run.data.metrics and run.data.metrics["quant.passed"] == 1.0
    assert [v.run_id for v in c.search_model_versions("name='tiny-merge'")] == [rm["run_id"]]
    stamps = {m: p.stat().st_mtime_ns for m, p in grams.items()}

    # again: Gram files and merge reused
    summary2 = run_pipeline(params)
    assert summary2["candidates"]["rm"]["merge"]["reused"] is True
    assert {m: p.stat().st_mtime_ns for m, p in grams.items()} == stamps

    # other data for the Grams: recomputed, and the merge that read the old ones is not reused
    data = yaml.safe_load(params.read_text())
    data["candidates"][0]["grams"]["examples"] = 8
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    summary3 = run_pipeline(params)
    assert summary3["candidates"]["rm"]["merge"]["reused"] is False
    assert all(p.stat().st_mtime_ns != stamps[m] for m, p in grams.items())
