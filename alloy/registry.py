"""Everything the pipeline says to MLflow: runs, their params/metrics/artifacts, and the model registry.

Plain functions over `MlflowClient` with explicit run ids, never the fluent `mlflow.start_run` API: the fluent API
keeps the active run in thread-local state, and the pipeline logs from thread-pool and Dask workers.

Registration (`register_candidate`) creates a model version with `create_model_version(source="runs:/<id>/model")`
(`mlflow.register_model` fails for plain logged folders and leaves an empty registered model behind), tags it with its
lineage, and moves the alias `champion` only when the candidate beats the current champion on the chosen metric.
A failed quantisation check blocks registration, and the reason is written on the run.
"""

from __future__ import annotations

import json
import math
import os
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
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client(tracking_uri).create_run(experiment_id, run_name=name, tags=tags).info.run_id


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
    mv = c.create_model_version(name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags,
                                description=f"{(lineage or {}).get('run_name', '')}".strip() or None)  # fmt: skip
    if score is None or not math.isfinite(score):
        reason = f"registered as version {mv.version}; no {metric} score, so the champion stays"
        won = False
    elif _beats(score, before["score"] if before else None, higher_is_better):
        c.set_registered_model_alias(name, CHAMPION, mv.version)
        was = (f"version {before['version']} ({metric} {before['score']:.4g})" if before and before["score"] is not None
               else f"version {before['version']}" if before else "no champion")  # fmt: skip
        reason = f"registered as version {mv.version} and made {CHAMPION}: {metric} {score:.4g} beats {was}"
        won = True
    else:
        reason = (f"registered as version {mv.version}; {CHAMPION} stays version {before['version']} "
                  f"({metric} {score:.4g} does not beat {before['score']:.4g})")  # fmt: skip
        won = False
    c.set_tag(run_id, "alloy.registration", reason)
    c.set_tag(run_id, "alloy.model_version", str(mv.version))
    return Registration(True, version=str(mv.version), champion=won, reason=reason, previous_champion=before or {})
