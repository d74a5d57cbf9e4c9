"""The real flow, end to end, on a tiny trained family: Prefect (temporary server), a real sqlite MLflow store,
real merges, quantisation checks, lm-eval and the model registry."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)

TASKS = ["facts_mc", "words_em", "heldout_ppl"]


def write_params(tmp: Path, family: Path, **extra) -> Path:
    params = {
        "name": "tiny-e2e",
        "models": {
            "base": {"path": str(family / "base")},
            "facts": {"path": str(family / "facts"), "skill": "facts"},
            "words": {"path": str(family / "words"), "skill": "words"},
        },
        "candidates": [
            {"name": "ta", "method": "task_arithmetic", "base_model": "base", "models": ["facts", "words"],
             "parameters": {"weight": 1.0}, "grid": {"lambda": [0.5, 1.0]}},
            # One MLP block scaled by 1e4: the weights scan (and fp16) must catch it and block registration.
            {"name": "broken", "method": "linear", "models": ["facts", "words"],
             "parameters": {"normalize": False, "weight": [{"filter": "layers.0.mlp", "value": 1.0e4}, {"value": 0.5}]}},
        ],
        "eval": {"tasks": TASKS, "limit": 4, "batch_size": 8, "data_dir": str(family / "data")},
        "quant": {"texts": str(family / "data" / "heldout.txt"), "max_tokens": 192,
                  # an undertrained tiny model is far noisier under int4 than a real one: loose quantisation bounds,
                  # the weight-scale and fp16 checks at their defaults
                  "thresholds": {"int8_kl_max": 0.05, "int8_top1_min": 0.8, "int8_ppl_ratio_max": 1.2,
                                 "int4_kl_max": 1.0, "int4_top1_min": 0.3, "int4_ppl_ratio_max": 3.0}},
        "mlflow": {"experiment": "e2e", "registry_name": "tiny-merge"},
        # perplexity differs between any two merges, so there is a strict winner to find
        "champion": {"metric": "heldout_ppl", "higher_is_better": False},
        "runner": {"kind": "thread", "max_workers": 2},
    }
    params.update(extra)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_flow_end_to_end_and_rerun(tmp_path, tiny_family_dir):
    from flows.pipeline import run_pipeline

    params = write_params(tmp_path, tiny_family_dir)
    summary = run_pipeline(params)
    uri = summary["tracking_uri"]
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (tmp_path / "mlflow.db").is_file()
    c = _client(uri)

    # --- runs: one parent, a child per candidate and per evaluated parent model
    parent = c.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    exp = c.get_experiment(summary["experiment_id"])
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    runs = c.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cands = {r.data.tags["alloy.candidate"]: r for r in children if r.data.tags.get("alloy.role") == "candidate"}
    parents = {r.data.tags["alloy.model"]: r for r in children if r.data.tags.get("alloy.role") == "parent"}
    assert set(cands) == {"ta-lambda0.5", "ta-lambda1", "broken"}
    assert set(parents) == {"base", "facts", "words"}
    assert all(r.info.status == "FINISHED" for r in children)

    ta = cands["ta-lambda0.5"]
    assert ta.info.run_name == "task_arithmetic lambda=0.5 weight=1"
    assert ta.data.params["lambda"] == "0.5" and ta.data.params["merge_method"] == "task_arithmetic"
    m = ta.data.metrics
    for key in ("merge.seconds", "merge.gb_per_s", "merge.peak_rss_gb", "quant.int8_kl", "quant.int4_kl",
                "quant.int8_top1", "heldout_ppl", "facts_mc", "words_em", "eval.heldout_ppl.word_perplexity"):
        assert key in m, key
    assert m["merge.peak_rss_gb"] > 0 and m["merge.seconds"] > 0 and m["quant.passed"] == 1.0
    arts = {a.path for a in c.list_artifacts(ta.info.run_id)}
    assert {"config.yml", "README.md", "alloy_manifest.json", "eval.json", "quant_report.json", "model"} <= arts
    merged = tmp_path / "merges" / "ta" / "ta-lambda0.5"  # merges/<group>/<name>, as dvc.yaml lays them out
    assert ta.data.tags["alloy.manifest_sha256"] == hashlib.sha256((merged / "alloy_manifest.json").read_bytes()).hexdigest()
    # the scores in MLflow are the harness's, not a copy that could drift
    logged = json.loads(Path(c.download_artifacts(ta.info.run_id, "eval.json", str(tmp_path))).read_text())
    assert logged["scores"]["heldout_ppl"]["word_perplexity"] == pytest.approx(m["heldout_ppl"])

    # --- the broken merge: quantisation check failed, so it was evaluated but not registered, and says why
    broken = cands["broken"]
    assert broken.data.metrics["quant.passed"] == 0.0
    why = broken.data.tags["alloy.registration"]
    assert why.startswith("not registered: quantisation check failed") and "layers.0.mlp" in why
    assert "model" not in {a.path for a in c.list_artifacts(broken.info.run_id)}

    # --- registry: a version per healthy candidate, lineage tags, champion = the best heldout perplexity
    versions = c.search_model_versions("name='tiny-merge'")
    by_run = {v.run_id: v for v in versions}
    assert set(by_run) == {cands["ta-lambda0.5"].info.run_id, cands["ta-lambda1"].info.run_id}
    v = by_run[ta.info.run_id]
    assert v.source == f"runs:/{ta.info.run_id}/model"
    assert v.tags["alloy.method"] == "task_arithmetic"
    assert v.tags["alloy.manifest_sha256"] == ta.data.tags["alloy.manifest_sha256"]
    lineage = json.loads(v.tags["alloy.parents"])
    assert set(lineage) == {"base", "facts", "words"} and all(len(p["digest"]) == 64 for p in lineage.values())
    ppl = {r.info.run_id: r.data.metrics["heldout_ppl"] for n, r in cands.items() if n != "broken"}
    best = min(ppl, key=ppl.get)
    champ = c.get_model_version_by_alias("tiny-merge", "champion")
    assert champ.run_id == best
    assert summary["champion"]["version"] == str(champ.version)

    # --- comparison table: printed and logged on the parent run
    table = Path(c.download_artifacts(parent.info.run_id, "comparison.md", str(tmp_path))).read_text()
    for name in ("base", "facts", "words", "ta-lambda0.5", "ta-lambda1", "broken", "blocked (quant)", "champion"):
        assert name in table

    # --- a second run: merges reused, scores cached, new versions, and the champion stays (equal is not better)
    summary2 = run_pipeline(params)
    c2 = {n: c.get_run(e["run_id"]) for n, e in summary2["candidates"].items()}
    assert all(r.data.metrics["merge.reused"] == 1.0 for r in c2.values())
    assert c.get_model_version_by_alias("tiny-merge", "champion").version == champ.version
    assert len(c.search_model_versions("name='tiny-merge'")) == 4
    assert "does not beat" in c2["ta-lambda1"].data.tags["alloy.registration"] or \
        "does not beat" in c2["ta-lambda0.5"].data.tags["alloy.registration"]
    print(f"first run {summary['seconds']} s, second {summary2['seconds']} s")


def test_flow_on_a_dask_local_cluster(tmp_path, tiny_family_dir):
    """The same flow through prefect-dask's DaskTaskRunner. Threaded workers keep it to seconds here; process
    workers (the default, runner.processes) were measured by hand: 151 s for two candidates, each worker starting
    its own temporary Prefect server."""
    from prefect_dask import DaskTaskRunner

    from alloy.pipeline_params import load_params
    from flows.pipeline import run_pipeline, task_runner

    params = write_params(tmp_path, tiny_family_dir,
                          runner={"kind": "dask", "n_workers": 2, "threads_per_worker": 1, "processes": False},
                          candidates={"soup": {"method": "linear", "models": ["facts", "words"],
                                               "parameters": {"weight": 1.0}}},
                          eval={"tasks": "heldout_ppl", "limit": 2, "batch_size": 8, "parents": False,
                                "data_dir": str(tiny_family_dir / "data")})  # fmt: skip
    runner = task_runner(load_params(params))
    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["processes"] is False
    summary = run_pipeline(params)
    c = _client(summary["tracking_uri"])
    soup = summary["candidates"]["soup"]
    assert "error" not in soup and soup["registration"]["registered"] and soup["registration"]["champion"]
    run = c.get_run(soup["run_id"])
    assert run.data.metrics["quant.passed"] == 1.0 and "heldout_ppl" in run.data.metrics
    assert str(c.get_model_version_by_alias("tiny-merge", "champion").version) == soup["registration"]["version"]
    # a scheduler address selects Dask too (production), without starting a cluster here
    assert task_runner(load_params(params), address="tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
