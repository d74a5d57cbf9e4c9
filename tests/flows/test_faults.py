"""kill -9 of `alloy run` during evaluation and during registration, then a plain rerun (issue 7, "Faults").

Each test starts the real pipeline (`python -m alloy run --params ...`: Prefect, a sqlite MLflow store, real merges,
lm-eval, the model registry) in its own process group, watches the store and the output folders until the stage it
wants to interrupt is under way, SIGKILLs the whole group (the flow and its temporary Prefect server), then runs the
pipeline again and checks that everything is consistent:

- the MLflow store: the sqlite file passes `PRAGMA integrity_check`; no run is left RUNNING (the killed process's runs
  are KILLED, tagged `alloy.killed`); the rerun's pipeline run and its children are FINISHED;
- the registry: one version per merge (tag alloy.manifest_sha256), none registered twice; every version's source holds
  the complete weights of its merge; `champion` names the best candidate's version;
- the outputs: merges/ holds the finished merges only (no .alloy-partial, -lock, -old, no temporary files), every
  JSON file under results/ parses, the evaluations finished before the kill are reused from the cache, not redone.
"""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "faults-merge"
EXPERIMENT = "faults"


def write_params(tmp: Path, family: Path, *, tasks: list[str], limit: int, parents: bool) -> Path:
    params = {
        "name": "faults",
        "models": {
            "base": {"path": str(family / "base")},
            "facts": {"path": str(family / "facts"), "skill": "facts"},
            "words": {"path": str(family / "words"), "skill": "words"},
        },
        # two merges of different bytes: two versions, and a strict winner on perplexity
        "candidates": [{"name": "ta", "method": "task_arithmetic", "base_model": "base", "models": ["facts", "words"],
                        "parameters": {"weight": 1.0}, "grid": {"lambda": [0.5, 1.0]}}],  # fmt: skip
        "eval": {"tasks": tasks, "limit": limit, "batch_size": 8, "parents": parents, "data_dir": str(family / "data")},
        "quant": {"enabled": False},
        "mlflow": {"experiment": EXPERIMENT, "registry_name": REGISTRY, "log_weights": True},
        "champion": {"metric": "heldout_ppl", "higher_is_better": False},
        "runner": {"kind": "thread", "max_workers": 2},
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


CANDIDATES = ["ta-lambda0.5", "ta-lambda1"]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **extra}
    return env


def start(params: Path, log: Path, **env) -> subprocess.Popen:
    # its own session: the kill reaches the flow's temporary Prefect server too, as a kill of the group would
    return subprocess.Popen([sys.executable, "-m", "alloy", "run", "--params", str(params)], cwd=ROOT,
                            env=_env(**env), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300.0) -> float:
    """Poll `ready()` (real state: files, the store) and SIGKILL the process group the moment it holds."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended (rc {proc.returncode}) before the moment to kill it:\n"
                        + log.read_text()[-3000:])  # fmt: skip
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the moment to kill never came:\n" + log.read_text()[-3000:])
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return time.monotonic() - t0


def rerun(params: Path, log: Path) -> float:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "alloy", "run", "--params", str(params)], cwd=ROOT, env=_env(),
                         stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=400)  # fmt: skip
    assert out.returncode == 0, log.read_text()[-3000:]
    return time.monotonic() - t0


def sql(db: Path, query: str, *, polling: bool = False) -> list[tuple]:
    """A read of the store by the test (no MLflow client, no migrations).

    polling (while the pipeline writes the store): read-only, and any error reads as "not yet". After the kill: a
    read-write connection, because a transaction the kill cut short leaves a hot journal that only a writer may roll
    back (a read-only connection fails on it); errors other than a missing table are raised."""
    if not db.is_file():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) if polling else sqlite3.connect(db, timeout=30)
        try:
            return con.execute(query).fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        if polling or "no such table" in str(e):
            return []
        raise


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def cache_entries(tmp: Path) -> dict[str, int]:
    """Finished evaluations: the harness's cache files (one per model content, task and limit) and their mtimes."""
    d = tmp / "results" / "eval-cache" / "results"
    return {p.name: p.stat().st_mtime_ns for p in d.glob("*.json")} if d.is_dir() else {}


def check_consistent(tmp: Path, killed_parent: str, left_running: list[str]) -> dict:
    """Everything the module docstring promises; returns {candidate: its run} of the rerun."""
    from alloy.report import collect, latest_pipeline_run

    db = tmp / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert sql(db, "PRAGMA integrity_check") == [("ok",)]
    c = _client(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    runs = c.search_runs([exp.experiment_id], max_results=1000)

    # --- runs: nothing RUNNING; those the kill left RUNNING are KILLED and say why, the others kept their status
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    of_killed = {r.info.run_id: r for r in runs
                 if r.info.run_id == killed_parent or r.data.tags.get("mlflow.parentRunId") == killed_parent}  # fmt: skip
    assert killed_parent in left_running and set(left_running) <= set(of_killed)
    for run_id, r in of_killed.items():
        if run_id in left_running:
            assert r.info.status == "KILLED" and "was gone" in r.data.tags["alloy.killed"]
        else:
            assert r.info.status == "FINISHED" and "alloy.killed" not in r.data.tags
    latest = latest_pipeline_run(uri, EXPERIMENT)
    assert latest != killed_parent and c.get_run(latest).info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest]
    assert children and all(r.info.status == "FINISHED" for r in children)
    cands = {r.data.tags["alloy.candidate"]: r for r in children if r.data.tags.get("alloy.role") == "candidate"}
    assert sorted(cands) == CANDIDATES

    # --- outputs: the finished merges and nothing else; results JSON whole
    assert [p.name for p in (tmp / "merges").iterdir()] == ["ta"]  # merges/<group>/<name>, dvc.yaml's layout
    merges = tmp / "merges" / "ta"
    assert sorted(p.name for p in merges.iterdir()) == sorted(CANDIDATES + [f".{n}.merge-stats.json" for n in CANDIDATES])
    sha = {n: hashlib.sha256((merges / n / "alloy_manifest.json").read_bytes()).hexdigest() for n in CANDIDATES}
    for f in (tmp / "results").rglob("*"):
        assert not f.name.endswith(".tmp"), f
        if f.suffix == ".json":
            json.loads(f.read_text())

    # --- registry: one version per merge, each with its complete weights; the rerun's candidates name theirs
    versions = c.search_model_versions(f"name='{REGISTRY}'")
    by_sha = {}
    for v in versions:
        by_sha.setdefault(v.tags["alloy.manifest_sha256"], []).append(v.version)
    assert sorted(by_sha) == sorted(sha.values()) and all(len(vs) == 1 for vs in by_sha.values()), by_sha
    for n, r in cands.items():
        (v,) = by_sha[sha[n]]
        assert r.data.tags["alloy.model_version"] == str(v), r.data.tags.get("alloy.registration")
    for v in versions:
        assert v.source == f"runs:/{v.run_id}/model"
        files = {a.path.removeprefix("model/"): a.file_size for a in c.list_artifacts(v.run_id, "model")}
        local = tmp / "dl" / str(v.version)
        local.mkdir(parents=True)
        manifest = Path(c.download_artifacts(v.run_id, "model/alloy_manifest.json", str(local)))
        assert hashlib.sha256(manifest.read_bytes()).hexdigest() == v.tags["alloy.manifest_sha256"]
        for shard in json.loads(manifest.read_text())["outputs"]:
            name = next(n for n in CANDIDATES if sha[n] == v.tags["alloy.manifest_sha256"])
            assert files.get(shard) == (merges / name / shard).stat().st_size, (v.version, shard)

    # --- champion: the best perplexity of the two, a version whose weights were checked above
    ppl = {n: r.data.metrics["heldout_ppl"] for n, r in cands.items()}
    best = min(ppl, key=ppl.get)
    champ = c.get_model_version_by_alias(REGISTRY, "champion")
    assert champ.tags["alloy.manifest_sha256"] == sha[best]
    # the report of the rerun names the same candidate champion
    assert collect(latest, uri).champion["candidate"] == best
    return cands


def test_kill_during_evaluation_then_rerun_finishes(tmp_path, tiny_family_dir):
    params = write_params(tmp_path, tiny_family_dir, tasks=["heldout_ppl", "facts_mc", "words_em"], limit=4,
                          parents=False)  # fmt: skip
    db = tmp_path / "mlflow.db"
    log = tmp_path / "run1.log"
    proc = start(params, log)
    # The harness caches a model's scores when its evaluation ends (one file per task). Kill once the first candidate
    # is scored and lm-eval is running the second one's requests (its progress lines follow in the log).
    mark: list[int] = []

    def second_evaluation_running() -> bool:
        if not mark:
            if len(cache_entries(tmp_path)) >= 3:
                mark.append(log.stat().st_size)
            return False
        return "Running " in log.read_text(errors="replace")[mark[0]:]

    waited = kill_when(proc, second_evaluation_running, log)
    done = cache_entries(tmp_path)
    assert len(done) == 3, done  # one candidate scored on its three tasks, the other's evaluation cut short
    merged = {n for n in CANDIDATES if (tmp_path / "merges" / "ta" / n / "alloy_manifest.json").is_file()}
    assert merged == set(CANDIDATES)  # both merged (the second is being evaluated)
    running = [r for (r,) in sql(db, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]
    (killed_parent,) = sql(db, "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE t.key = 'alloy.role' AND t.value = 'pipeline'")[0]  # fmt: skip
    # The pipeline run and the candidate being evaluated are left RUNNING by the dead process. The scored candidate
    # may have been registered and its run ended meanwhile (registration goes candidate by candidate, while the other
    # evaluates); then its version belongs to a killed pipeline run, and the rerun must reuse it, not register it again.
    finished = [r for (r,) in sql(db, "SELECT run_uuid FROM runs WHERE status = 'FINISHED'")]
    assert killed_parent in running and len(running) + len(finished) == 3 and len(running) >= 2, (running, finished)
    assert sql(db, "SELECT count(*) FROM model_versions") in ([], [(0,)], [(1,)])

    took = rerun(params, tmp_path / "run2.log")
    cands = check_consistent(tmp_path, killed_parent, running)
    after = cache_entries(tmp_path)
    assert len(after) == 2 * 3
    assert all(after[k] == t for k, t in done.items())  # what was scored before the kill was not scored again
    c = _client(f"sqlite:///{db}")
    cached = sum(len(json.loads(Path(c.download_artifacts(r.info.run_id, "eval.json", str(tmp_path / n))).read_text())
                     ["cached"]) for n, r in cands.items())  # fmt: skip
    assert cached == len(done)
    assert {n for n, r in cands.items() if r.data.metrics["merge.reused"] == 1.0} == merged
    print(f"killed {waited:.1f} s in, {len(done)} of 6 scores cached, the second evaluation running; rerun {took:.1f} s")


def test_kill_after_one_candidate_was_registered_then_rerun_registers_it_once(tmp_path, tiny_family_dir):
    """The moment CI once hit by chance: the first candidate registered and its run FINISHED, the pipeline run not."""
    params = write_params(tmp_path, tiny_family_dir, tasks=["heldout_ppl", "facts_mc", "words_em"], limit=4,
                          parents=False)  # fmt: skip
    db = tmp_path / "mlflow.db"
    cand_finished = ("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE r.status = 'FINISHED' "
                     "AND t.key = 'alloy.role' AND t.value = 'candidate'")  # fmt: skip
    # held 3 s after create_model_version: the second candidate cannot finish before the kill
    proc = start(params, tmp_path / "run1.log", ALLOY_TEST_SLOW_REGISTER="3")
    kill_when(proc, lambda: len(sql(db, cand_finished, polling=True)) >= 1, tmp_path / "run1.log")
    finished = {r for (r,) in sql(db, cand_finished)}
    versions = {r for (r,) in sql(db, "SELECT run_id FROM model_versions")}
    # every FINISHED candidate was registered first; the other may have created its version too if the kill came
    # late (the poll is not instantaneous), but has not finished
    assert finished <= versions and len(finished) == 1, (finished, versions)
    running = [r for (r,) in sql(db, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]
    (killed_parent,) = sql(db, "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE t.key = 'alloy.role' AND t.value = 'pipeline'")[0]  # fmt: skip
    assert killed_parent in running and len(running) == 2

    rerun(params, tmp_path / "run2.log")
    cands = check_consistent(tmp_path, killed_parent, running)  # one version per merge: none registered twice
    tags = {n: r.data.tags["alloy.registration"] for n, r in cands.items()}
    assert sum("whose pipeline run did not finish) reused" in t for t in tags.values()) == 1, tags
    assert sum("which did not finish) reused" in t for t in tags.values()) == len(versions) - 1, tags
    c = _client(f"sqlite:///{db}")
    (done_run,) = finished
    assert c.get_run(done_run).data.tags["alloy.registration"].startswith("registered as version")


def test_kill_during_registration_then_rerun_registers_each_merge_once(tmp_path, tiny_family_dir):
    params = write_params(tmp_path, tiny_family_dir, tasks=["heldout_ppl"], limit=2, parents=True)
    db = tmp_path / "mlflow.db"
    # ALLOY_TEST_SLOW_REGISTER holds the process right after create_model_version, before the champion decision
    proc = start(params, tmp_path / "run1.log", ALLOY_TEST_SLOW_REGISTER="120")
    waited = kill_when(proc, lambda: sql(db, "SELECT count(*) FROM model_versions", polling=True) == [(1,)],
                       tmp_path / "run1.log")  # fmt: skip
    # what the kill left: one version, no champion alias, its run RUNNING (the other candidate not registered)
    assert sql(db, "SELECT count(*) FROM model_versions") == [(1,)]
    assert sql(db, "SELECT count(*) FROM registered_model_aliases") == [(0,)]
    ((orphan_run, orphan_version),) = sql(db, "SELECT run_id, version FROM model_versions")
    assert sql(db, f"SELECT status FROM runs WHERE run_uuid = '{orphan_run}'") == [("RUNNING",)]
    running = [r for (r,) in sql(db, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]
    assert len(running) == 3  # the pipeline run and its candidates; the input models' runs had finished
    (killed_parent,) = sql(db, "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE t.key = 'alloy.role' AND t.value = 'pipeline'")[0]  # fmt: skip

    took = rerun(params, tmp_path / "run2.log")
    cands = check_consistent(tmp_path, killed_parent, running)
    c = _client(f"sqlite:///{db}")
    assert len(c.search_model_versions(f"name='{REGISTRY}'")) == 2  # not 3: the killed run's version was reused
    reused = [r for r in cands.values() if "did not finish) reused" in r.data.tags["alloy.registration"]]
    assert len(reused) == 1 and reused[0].data.tags["alloy.model_version"] == str(orphan_version)
    assert c.get_run(orphan_run).data.tags["alloy.registration"] == f"finished by run {reused[0].info.run_id}"
    assert c.get_model_version(REGISTRY, str(orphan_version)).tags["alloy.reused_by_run"] == reused[0].info.run_id
    print(f"killed {waited:.1f} s in, during registration; rerun {took:.1f} s")


def test_dead_runs_are_marked_killed_and_live_ones_left(tmp_path):
    """The rule the rerun applies: a RUNNING run whose process is gone is KILLED; a live process's run, a run from
    another host and a run without the tag are left alone; a pid reused by another process counts as gone."""
    from alloy import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = registry.ensure_experiment(uri, "dead", tmp_path / "art")
    c = registry.client(uri)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = registry.process_id().split(":")[0]
    me = registry.start_run(uri, exp, "me")  # this process: alive
    runs = {n: c.create_run(exp, run_name=n, tags=({"alloy.process": t} if t else {})).info.run_id for n, t in [
        ("dead", f"{host}:{gone.pid}:"),
        ("reused_pid", f"{host}:{os.getpid()}:1"),  # this pid, but another start time: the old process is gone
        ("other_host", f"elsewhere.example:{gone.pid}:"),
        ("untagged", None)]}  # fmt: skip
    finished = registry.start_run(uri, exp, "finished")
    registry.end_run(uri, finished)
    assert sorted(registry.mark_dead_runs(uri, exp)) == sorted([runs["dead"], runs["reused_pid"]])
    status = {n: c.get_run(r).info.status for n, r in {**runs, "me": me, "finished": finished}.items()}
    assert status == {"dead": "KILLED", "reused_pid": "KILLED", "other_host": "RUNNING", "untagged": "RUNNING",
                      "me": "RUNNING", "finished": "FINISHED"}  # fmt: skip
    assert registry.mark_dead_runs(uri, exp) == []


def test_only_an_unfinished_runs_version_is_reused(tmp_path):
    """register_candidate reuses a version of the same merge bytes only when the run that created it was killed or
    failed; a finished run's version stays its own, and the next run registers a new one (each run its record)."""
    from alloy import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = registry.ensure_experiment(uri, "reuse", tmp_path / "art")
    c = registry.client(uri)

    def run_with_model(name):
        run = registry.start_run(uri, exp, name)
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text("{}")
        registry.log_artifacts(uri, run, folders={"model": model})
        return run

    lineage = {"manifest_sha256": "a" * 64}
    first = run_with_model("first")
    r1 = registry.register_candidate(uri, "m", first, metric="ppl", score=5.0, higher_is_better=False, lineage=lineage)
    c.set_terminated(first, status="KILLED")  # died before its pipeline ended the run
    second = run_with_model("second")
    r2 = registry.register_candidate(uri, "m", second, metric="ppl", score=5.0, higher_is_better=False, lineage=lineage)
    assert r2.version == r1.version and r2.champion and r2.reason.endswith("it is champion already")
    registry.end_run(uri, second)
    third = run_with_model("third")
    r3 = registry.register_candidate(uri, "m", third, metric="ppl", score=5.0, higher_is_better=False, lineage=lineage)
    assert r3.version == "2" and not r3.champion  # the killed run's version stays the one reused; a normal rerun
    other = run_with_model("other")  # another merge's bytes: never the killed run's version
    r4 = registry.register_candidate(uri, "m", other, metric="ppl", score=4.0, higher_is_better=False,
                                     lineage={"manifest_sha256": "b" * 64})  # fmt: skip
    assert r4.version == "3" and r4.champion


def test_a_finished_candidate_of_a_killed_pipeline_run_gives_its_version_to_the_rerun(tmp_path):
    """Registration goes candidate by candidate: a kill can come after one candidate's run was registered and FINISHED
    while its pipeline run was not. That version is the killed pipeline's, so the rerun reuses it; a version of a
    finished pipeline run is not reused."""
    from alloy import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = registry.ensure_experiment(uri, "reuse-parent", tmp_path / "art")
    c = registry.client(uri)

    def candidate(pipeline: str, name: str) -> str:
        run = registry.start_run(uri, exp, name, parent_run_id=pipeline)
        model = tmp_path / name
        model.mkdir()
        (model / "config.json").write_text("{}")
        registry.log_artifacts(uri, run, folders={"model": model})
        return run

    lineage = {"manifest_sha256": "c" * 64}
    killed = registry.start_run(uri, exp, "pipeline 1")
    done = candidate(killed, "done")
    r1 = registry.register_candidate(uri, "m", done, metric="ppl", score=3.0, higher_is_better=False, lineage=lineage)
    registry.end_run(uri, done)
    c.set_terminated(killed, status="KILLED")  # the kill: after the candidate's run ended, before its pipeline's

    rerun = registry.start_run(uri, exp, "pipeline 2")
    again = candidate(rerun, "again")
    r2 = registry.register_candidate(uri, "m", again, metric="ppl", score=3.0, higher_is_better=False, lineage=lineage)
    assert r2.version == r1.version and "whose pipeline run did not finish) reused" in r2.reason
    assert c.get_run(done).data.tags["alloy.registration"] == r1.reason  # the finished run's own record stands
    registry.end_run(uri, again)
    registry.end_run(uri, rerun)

    third = registry.start_run(uri, exp, "pipeline 3")  # after a finished pipeline run: a version of its own
    r3 = registry.register_candidate(uri, "m", candidate(third, "new"), metric="ppl", score=3.0,
                                     higher_is_better=False, lineage=lineage)  # fmt: skip
    assert r3.version != r1.version and len(c.search_model_versions("name='m'")) == 2
