"""Everything the pipeline says to MLflow: runs, their params/metrics/artifacts, and the model registry.

Plain functions over `MlflowClient` with explicit run ids, never the fluent `mlflow.start_run` API: the fluent API
keeps the active run in thread-local state, and the pipeline logs from thread-pool and Dask workers.

Registration (`register_candidate`) creates a model version with `create_model_version(source="runs:/<id>/model")`
(`mlflow.register_model` fails for plain logged folders and leaves an empty registered model behind), tags it with its
lineage, and moves the alias `champion` only when the candidate beats the current champion on the chosen metric.
A failed quantisation check blocks registration, and the reason is written on the run.

After a kill: every run is tagged with the process that opened it (`alloy.process`, host:pid:start time), so the next
pipeline run marks runs left RUNNING by a dead process KILLED (`mark_dead_runs`); and a version of the same merge
(tag `alloy.manifest_sha256`) registered by a run that was killed or failed, or whose pipeline run was, is reused,
not registered again.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from merging.errors import AlloyError

CHAMPION = "champion"
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000


def client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | Path | None = None) -> str:
    """The experiment's id, created with an absolute artifact location (else artifacts land in ./mlruns)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise AlloyError(f"mlflow.experiment: {name!r} is deleted in {tracking_uri}; restore it or pick another name")
        return exp.experiment_id
    loc = None
    if artifact_location is not None:
        loc = str(artifact_location)
        if "://" not in loc:
            loc = Path(loc).resolve().as_uri()
    try:
        return c.create_experiment(name, artifact_location=loc)
    except Exception:  # another process created it between our look-up and create: use theirs
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(tracking_uri: str, experiment_id: str, name: str, *, parent_run_id: str | None = None,
              tags: dict[str, Any] | None = None) -> str:
    tags = {k: _tag(v) for k, v in (tags or {}).items()}
    tags[PROCESS_TAG] = process_id()
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client(tracking_uri).create_run(experiment_id, run_name=name, tags=tags).info.run_id


# ----------------------------------------------------------------------------------- runs of dead processes

PROCESS_TAG = "alloy.process"


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), None when there is no such live process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else fields[19]  # state is field 3, starttime field 22


def process_id(pid: int | None = None) -> str:
    """host:pid:start. The start time tells a reused pid apart from the process that opened the run."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_proc_start(pid) or ''}"


def process_gone(tag: str) -> bool:
    """True only when the process named by `tag` is known to be dead: it ran on this host, and its pid is free, a
    zombie, or now another process's. A run from another host cannot be judged from here: False."""
    host, _, rest = tag.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_s.isdigit():
        return False
    pid = int(pid_s)
    if Path("/proc/self/stat").is_file():
        now = _proc_start(pid)
        return now is None or (bool(start) and now != start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, under another user
        return False
    return False


def mark_dead_runs(tracking_uri: str, experiment_id: str) -> list[str]:
    """Runs of the experiment still RUNNING although their process is dead (kill -9, power loss): set KILLED, with
    a tag saying why. A report or a search for running work then never waits on them. Returns their ids."""
    c = client(tracking_uri)
    dead, token = [], None
    while True:
        page = c.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token)
        for r in page:
            tag = r.data.tags.get(PROCESS_TAG)
            if tag and process_gone(tag):
                c.set_tag(r.info.run_id, "alloy.killed", f"its process {tag} was gone when {process_id()} looked")
                c.set_terminated(r.info.run_id, status="KILLED")
                dead.append(r.info.run_id)
        token = page.token
        if not token:
            return dead


def end_run(tracking_uri: str, run_id: str, failed: bool = False) -> None:
    client(tracking_uri).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _tag(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s[:MAX_TAG_LEN]


def _param(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:MAX_PARAM_LEN]


def log(tracking_uri: str, run_id: str, *, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None) -> None:
    """One batch of metrics (non-finite values dropped: MLflow's SQL store rejects NaN), params and tags."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]  # fmt: skip
    ps = [Param(k, _param(v)) for k, v in (params or {}).items()]
    ts = [RunTag(k, _tag(v)) for k, v in (tags or {}).items()]
    c = client(tracking_uri)
    # MLflow caps one batch at 1000 metrics, 100 params and 100 tags.
    for i in range(0, len(ms), 1000):
        c.log_batch(run_id, metrics=ms[i : i + 1000])
    for i in range(0, len(ps), 100):
        c.log_batch(run_id, params=ps[i : i + 100])
    for i in range(0, len(ts), 100):
        c.log_batch(run_id, tags=ts[i : i + 100])


def log_artifacts(tracking_uri: str, run_id: str, files: list[str | Path] | None = None,
                  texts: dict[str, str] | None = None, dicts: dict[str, Any] | None = None,
                  folders: dict[str, str | Path] | None = None) -> None:
    """files: local files (at the artifact root, missing ones skipped), texts/dicts: {artifact file: content},
    folders: {artifact dir: local dir}."""
    c = client(tracking_uri)
    for path in files or []:
        if Path(path).is_file():
            c.log_artifact(run_id, str(path))
    for art_file, text in (texts or {}).items():
        c.log_text(run_id, text, art_file)
    for art_file, obj in (dicts or {}).items():
        c.log_dict(run_id, obj, art_file)
    for art_dir, path in (folders or {}).items():
        c.log_artifacts(run_id, str(path), art_dir)


# ------------------------------------------------------------------------------------------------ registry


@dataclass
class Registration:
    registered: bool
    version: str | None = None
    champion: bool = False  # this version holds the alias now
    reason: str = ""
    previous_champion: dict[str, Any] = field(default_factory=dict)  # {version, score} before this call

    def to_dict(self) -> dict:
        return asdict(self)


def _score_tag(metric: str) -> str:
    return f"alloy.score.{metric}"


def current_champion(tracking_uri: str, name: str, metric: str) -> dict[str, Any] | None:
    """{version, score, run_id} of the version holding the alias, or None when there is none."""
    c = client(tracking_uri)
    try:
        mv = c.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no registered model, or no alias yet
        return None
    score = mv.tags.get(_score_tag(metric))
    if score is None and mv.run_id:  # versions registered before this metric was chosen: read their run
        score = c.get_run(mv.run_id).data.metrics.get(metric)
    return {"version": str(mv.version), "score": float(score) if score is not None else None, "run_id": mv.run_id}


def _beats(new: float, old: float | None, higher_is_better: bool) -> bool:
    if old is None or not math.isfinite(old):
        return True
    return new > old if higher_is_better else new < old


def register_candidate(tracking_uri: str, name: str, run_id: str, *, metric: str, score: float | None,
                       higher_is_better: bool = True, lineage: dict[str, Any] | None = None,
                       quant_passed: bool | None = True, quant_reasons: list[str] | None = None,
                       block_on_quant: bool = True, artifact_path: str = "model") -> Registration:
    """A new version of registered model `name` from run `run_id`, alias `champion` moved if it wins.

    Blocked (nothing registered, the reason tagged on the run) when the quantisation check failed.
    The run must have logged the model folder under `artifact_path` (the version's source).
    """
    c = client(tracking_uri)
    if block_on_quant and quant_passed is False:
        why = "; ".join(quant_reasons or []) or "no reason given"
        reason = f"not registered: quantisation check failed: {why}"
        c.set_tag(run_id, "alloy.registration", reason[:MAX_TAG_LEN])
        return Registration(False, reason=reason)

    try:
        c.create_registered_model(name, description="Merges produced by the alloy pipeline.")
    except Exception as e:  # already there (maybe created by a concurrent run): fine
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    before = current_champion(tracking_uri, name, metric)
    tags = {f"alloy.{k}": _tag(v) for k, v in (lineage or {}).items()}
    if score is not None:
        tags[_score_tag(metric)] = repr(float(score))
    key = (lineage or {}).get("manifest_sha256")
    mv = _left_by_unfinished_run(c, name, str(key)) if key else None
    if mv is not None:  # these bytes, registered by a run that died before it finished: finish that registration
        whose = "which" if c.get_run(mv.run_id).info.status != "FINISHED" else "whose pipeline run"
        what = f"version {mv.version} of this merge (registered by run {mv.run_id}, {whose} did not finish) reused"
        if score is not None:
            c.set_model_version_tag(name, mv.version, _score_tag(metric), repr(float(score)))
        c.set_model_version_tag(name, mv.version, "alloy.reused_by_run", run_id)
        if whose == "which":  # a finished run keeps what it said about its registration
            c.set_tag(mv.run_id, "alloy.registration", f"finished by run {run_id}")
    else:
        mv = c.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                    description=f"{(lineage or {}).get('run_name', '')}".strip() or None)  # fmt: skip
        what = f"registered as version {mv.version}"
        time.sleep(float(os.environ.get("ALLOY_TEST_SLOW_REGISTER", 0)))  # the fault tests kill the process here
    if before and before["version"] == str(mv.version):  # a reused version that got the alias before the kill
        reason = f"{what}; it is {CHAMPION} already"
        won = True
    elif score is None or not math.isfinite(score):
        reason = f"{what}; no {metric} score, so the champion stays"
        won = False
    elif _beats(score, before["score"] if before else None, higher_is_better):
        c.set_registered_model_alias(name, CHAMPION, mv.version)
        was = (f"version {before['version']} ({metric} {before['score']:.4g})" if before and before["score"] is not None
               else f"version {before['version']}" if before else "no champion")  # fmt: skip
        reason = f"{what} and made {CHAMPION}: {metric} {score:.4g} beats {was}"
        won = True
    else:
        reason = (f"{what}; {CHAMPION} stays version {before['version']} "
                  f"({metric} {score:.4g} does not beat {before['score']:.4g})")  # fmt: skip
        won = False
    c.set_tag(run_id, "alloy.registration", reason)
    c.set_tag(run_id, "alloy.model_version", str(mv.version))
    return Registration(True, version=str(mv.version), champion=won, reason=reason, previous_champion=before or {})


def _left_by_unfinished_run(c, name: str, manifest_sha256: str):
    """The oldest version of `name` holding these merge bytes left by a run that did not finish, else None.

    Such a version is complete (its artifacts were logged before it was created), but the run that created it (or the
    run that last took it over) was killed or failed, or its pipeline run was: the candidates of a killed pipeline run
    that finished before the kill (registration goes candidate by candidate) belong to a run that did not, and the
    rerun would list the same weights twice. A version of a finished pipeline run is not reused: each pipeline run
    records its own versions."""
    found = c.search_model_versions(f"name = '{name}' and tags.`alloy.manifest_sha256` = '{manifest_sha256}'")
    for mv in sorted(found, key=lambda v: int(v.version)):
        owner = mv.tags.get("alloy.reused_by_run") or mv.run_id
        try:
            run = c.get_run(owner) if owner else None
            parent = run.data.tags.get("mlflow.parentRunId") if run else None
            statuses = [run.info.status if run else None, c.get_run(parent).info.status if parent else None]
        except Exception:  # the run was deleted
            continue
        if any(s in ("KILLED", "FAILED") for s in statuses):
            return mv
    return None
