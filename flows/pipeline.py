"""The merge pipeline as a Prefect flow: download -> merge -> quant-check -> evaluate -> register.

    params.yaml ─┬─ download (each model; a GGUF source is imported)  ─┐
                 └─ demo-family (optional: base + specialists)  ───────┤
                                                                       ├─ evaluate (parents, cached by content)
                    for each candidate, in parallel (task runner):     │
                        merge -> quant-check -> evaluate  ─────────────┘
                    then, one at a time:  register (champion moves only on a win)
                    comparison table -> stdout, MLflow parent run, Prefect artifact

One MLflow parent run per flow run, one child run per candidate (and per evaluated parent). Registration runs one
candidate after another on purpose: each compares itself with the champion the previous one may just have set.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from alloy import registry
from alloy.pipeline_params import (Candidate, Params, derived_metrics, expand_candidates, flat_params, load_params,
                                   needed_grams, primary_scores)
from flows.table import build_rows, render
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.family import demo_family
from tasks.gram import gram
from tasks.inspect import inspect
from tasks.merge import merge
from tasks.quant import quant
from tasks.register import register


# ------------------------------------------------------------------------------------------- small helpers


def _outcome(future) -> tuple[Any, str | None]:
    """(result, None) when the task completed, else (None, why): its error, or the upstream failure."""
    future.wait()
    state = future.state
    if state.is_completed():
        return future.result(), None
    if state.is_failed() or state.is_crashed():
        exc = state.result(raise_on_failure=False)
        msg = " ".join(str(exc).split()) if isinstance(exc, BaseException) else (state.message or state.name)
        return None, msg
    return None, f"not run ({state.message or state.name})"


def _git_revision(root: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dvc_revision(root: Path) -> str:
    """sha256 of dvc.lock: which committed DVC outputs this run sits beside ('none' without one)."""
    lock = root / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else "none"


def task_runner(params: Params, kind: str | None = None, address: str | None = None):
    """ThreadPool by default; prefect-dask's DaskTaskRunner (a scheduler address, or a LocalCluster) on request."""
    kind = kind or params.runner.kind
    address = address or params.runner.address
    if kind == "dask" or address:
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": params.runner.n_workers,
                                              "processes": params.runner.processes,
                                              "threads_per_worker": params.runner.threads_per_worker})  # fmt: skip
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=params.runner.max_workers)


def _used_models(candidates: list[Candidate]) -> list[str]:
    return list(dict.fromkeys(p for c in candidates for p in c.parents()))


def _lineage(c: Candidate, merged: dict, models: dict[str, dict], params_file: Path, root: Path, run_name: str) -> dict:
    return {
        "candidate": c.name,
        "run_name": run_name,
        "method": c.method,
        "parents": {m: {"source": models[m]["source"], "revision": models[m].get("revision"),
                        "digest": models[m]["digest"],
                        **({"lora": {k: models[m]["lora"][k] for k in ("source", "revision", "digest")}}
                           if models[m].get("lora") else {})}
                    for m in c.parents() if m in models},  # fmt: skip
        "config_sha256": merged["config_sha256"],
        "manifest_sha256": merged["manifest_sha256"],
        "weights_sha256": merged.get("weights_sha256"),
        "params_sha256": hashlib.sha256(params_file.read_bytes()).hexdigest()[:16],
        "git_revision": _git_revision(root),
        "dvc_revision": _dvc_revision(root),
    }


# ----------------------------------------------------------------------------------------------- the flow


@flow(name="merge-pipeline", log_prints=True)
def merge_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    log = get_run_logger()
    params_file = Path(params_path).resolve()
    params = load_params(params_file, overrides)
    candidates = expand_candidates(params, source=str(params_file))
    root = params.root
    models_dir, merges_dir, results_dir = (params.path(p) for p in (params.paths.models, params.paths.merges,
                                                                    params.paths.results))  # fmt: skip
    eval_cache = str(results_dir / "eval-cache")
    uri = params.tracking_uri()
    exp_id = registry.ensure_experiment(uri, params.mlflow.experiment, params.path(params.mlflow.artifact_location))
    # runs a killed pipeline left RUNNING: KILLED now (their merges resume, their evaluations come from the cache)
    if dead := registry.mark_dead_runs(uri, exp_id):
        log.warning(f"MLflow: {len(dead)} run(s) of a pipeline that was killed marked KILLED: {', '.join(dead)}")
    parent_run = registry.start_run(uri, exp_id, f"{params.name} pipeline", tags={
        "alloy.role": "pipeline", "alloy.params_file": str(params_file), "alloy.git_revision": _git_revision(root),
        "alloy.candidates": ", ".join(c.name for c in candidates)})  # fmt: skip
    registry.log_artifacts(uri, parent_run, files=[params_file])
    log.info(f"MLflow: {uri}, experiment {params.mlflow.experiment!r}, parent run {parent_run}")
    summary: dict[str, Any] = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent_run,
                               "registry_name": params.mlflow.registry_name, "parents": {}, "candidates": {}}  # fmt: skip
    failed = True
    try:
        all_models = params.all_models()
        spec = lambda n: all_models[n].model_dump(exclude_none=True)  # noqa: E731
        track = {"uri": uri, "run_id": parent_run}

        # 1. download: every model that is not built by the demo family
        direct = {n: download.submit(n, spec(n), str(root), str(models_dir)) for n, s in all_models.items()
                  if not s.family}  # fmt: skip
        models: dict[str, dict] = {}
        for n, fut in direct.items():
            info, err = _outcome(fut)
            if err:
                raise_error(f"models.{n}: {err}")
            models[n] = info

        # 2. the demo family (its base may be a model downloaded above), then its members as models
        family = None
        if params.family:
            fam = params.family
            family = demo_family.submit(fam.kind, str(params.family_dir()), fam.seed, fam.builder_kwargs(),
                                        models.get(fam.base) if fam.base else None, tracking=track).result()  # fmt: skip
            members = {"base": family["base"], **family["specialists"]}
            for n, s in all_models.items():
                if s.family:
                    models[n] = download.submit(n, spec(n), str(root), str(models_dir), members).result()
        registry.log(uri, parent_run, params={f"model.{n}": f"{m['source']}" + (f"@{m['revision']}" if m.get("revision") else "")
                                              for n, m in models.items()},
                     tags={f"alloy.model.{n}.digest": m["digest"] for n, m in models.items()})  # fmt: skip

        data_dir = params.path(params.eval.data_dir) if params.eval.data_dir else (
            Path(family["data_dir"]) if family else None)  # fmt: skip
        texts_file = params.path(params.quant.texts) if params.quant.texts else (
            data_dir / "heldout.jsonl" if data_dir else None)  # fmt: skip
        if params.quant.enabled and (texts_file is None or not texts_file.is_file()):
            raise_error(f"quant.texts: no held-out text file ({texts_file or 'no family and no quant.texts'})")
        ev = {"tasks": params.eval.task_list(), "limit": params.eval.limit, "batch_size": params.eval.batch_size,
              "device": params.eval.device, "data_dir": str(data_dir) if data_dir else None, "cache_dir": eval_cache}

        # 3. parents' scores (each candidate is compared with them), cached by content
        parent_runs: dict[str, str] = {}
        parent_futs = {}
        if params.eval.parents:
            for n in _used_models(candidates):
                if n not in models:
                    continue
                parent_runs[n] = registry.start_run(uri, exp_id, f"parent: {n}", parent_run_id=parent_run, tags={
                    "alloy.role": "parent", "alloy.model": n, "alloy.source": models[n]["source"],
                    "alloy.digest": models[n]["digest"]})  # fmt: skip
                parent_futs[n] = evaluate.submit(n, models[n]["path"], **ev, tracking={"uri": uri, "run_id": parent_runs[n]})

        # the reference each merge's quantisation sensitivity is compared with (optional)
        baseline = None
        if params.quant.enabled and params.quant.baseline:
            b = params.quant.baseline
            baseline, b_err = _outcome(quant.submit(models[b], str(texts_file), params.quant.thresholds,
                                                    max_tokens=params.quant.max_tokens,
                                                    cache_dir=str(results_dir / "quant")))  # fmt: skip
            if b_err:
                raise_error(f"quant.baseline: the check of {b} failed: {b_err}")
            registry.log(uri, parent_run, metrics={f"baseline.{k}": v for k, v in baseline["metrics"].items()})

        # Gram matrices the regmean candidates read: each model's once, before its merges
        gram_futs = {m: gram.submit(m, models[m], g, str(root)) for m, g in needed_grams(candidates).items()
                     if m in models}  # fmt: skip

        # 4. candidates in parallel: merge -> quant-check -> evaluate
        child: dict[str, str] = {}
        chains: dict[str, dict] = {}
        inspected: dict[tuple, Any] = {}  # task-vector statistics, once per base and set of models
        for c in candidates:
            run_name = c.run_name()
            child[c.name] = registry.start_run(uri, exp_id, run_name, parent_run_id=parent_run, tags={
                "alloy.role": "candidate", "alloy.candidate": c.name, "alloy.group": c.group,
                "alloy.method": c.method, "alloy.parents": ", ".join(c.parents())})  # fmt: skip
            registry.log(uri, child[c.name], params={"merge_method": c.method, "seed": c.seed,
                                                     "parents": ",".join(c.parents()), **flat_params(c.config)})  # fmt: skip
            t = {"uri": uri, "run_id": child[c.name]}
            used = {m: models[m] for m in c.parents() if m in models}
            key = (c.config.get("base_model"), tuple(sorted(used)))
            if key[0] and key not in inspected and len(used) > 1:
                inspected[key] = inspect.submit(c.name, c.config, used, tracking={"uri": uri, "run_id": parent_run})
            card = {"Lineage": "\n".join(f"- `{m}`: {i['source']}" + (f" @ {i['revision']}" if i.get("revision") else "")
                                         for m, i in used.items())}  # fmt: skip
            # merges/<group>/<name>: the layout of dvc.yaml's merge stages, so `dvc repro` after `alloy run` rebuilds
            # the same folders (same bytes) instead of deleting a group-named folder the flow wrote
            out_dir = merges_dir / c.group / c.name
            m_fut = merge.submit(c.name, c.config, used, str(out_dir), seed=c.seed,
                                 shard_size=params.merge.shard_size, dtype=params.merge.dtype,
                                 device=params.merge.device, card=card, tracking=t,
                                 side_paths={g["file"]: str(root / g["file"]) for g in c.grams.values()},
                                 wait_for=[gram_futs[m] for m in c.grams if m in gram_futs])  # fmt: skip
            q_fut = (quant.submit(m_fut, str(texts_file), params.quant.thresholds, max_tokens=params.quant.max_tokens,
                                  cache_dir=str(results_dir / "quant"), baseline=baseline, tracking=t)
                     if params.quant.enabled else None)  # fmt: skip
            # evaluate after the quantisation check; the merge folder is known up front
            e_fut = evaluate.submit(c.name, str(out_dir), **ev, tracking=t, wait_for=[q_fut or m_fut])
            chains[c.name] = {"merge": m_fut, "quant": q_fut, "eval": e_fut, "run_name": run_name}

        # parents' results
        own_skill: dict[str, dict[str, float]] = {}
        for n, fut in parent_futs.items():
            res, err = _outcome(fut)
            entry = {"source": models[n]["source"], "skill": models[n].get("skill"), "run_id": parent_runs[n]}
            if err:
                entry["error"] = err
                registry.end_run(uri, parent_runs[n], failed=True)
            else:
                entry["metrics"] = derived_metrics(res["scores"])
                entry["scores"] = res["scores"]
                registry.end_run(uri, parent_runs[n])
                if models[n].get("skill"):
                    own_skill[models[n]["skill"]] = primary_scores(res["scores"])
            summary["parents"][n] = entry

        # 5. register, one candidate after another
        for c in candidates:
            ch = chains[c.name]
            entry: dict[str, Any] = {"run_id": child[c.name], "run_name": ch["run_name"], "group": c.group,
                                     "method": c.method, "config": c.config}  # fmt: skip
            merged, err = _outcome(ch["merge"])
            q, q_err = _outcome(ch["quant"]) if ch["quant"] else (None, None)
            e, e_err = _outcome(ch["eval"])
            err = err or q_err or e_err
            if merged:
                entry["merge"] = {k: v for k, v in merged.items() if k != "config_yaml"}
            entry["quant"] = q
            metrics: dict[str, float] = {}
            if e:
                metrics = derived_metrics(e["scores"], own_skill)
                entry["scores"] = e["scores"]
            if merged:
                from tasks.merge import merge_metrics

                metrics.update(merge_metrics(merged))
            entry["metrics"] = metrics
            if err:
                entry["error"] = err
                registry.client(uri).set_tag(child[c.name], "alloy.error", err[:5000])
                registry.end_run(uri, child[c.name], failed=True)
                log.error(f"{c.name}: {err}")
            else:
                reg = register.submit(merged, q, metrics, registry_name=params.mlflow.registry_name,
                                      metric=params.champion.metric, higher_is_better=params.champion.higher_is_better,
                                      lineage=_lineage(c, merged, models, params_file, root, ch["run_name"]),
                                      block_on_quant=params.quant.block_registration,
                                      log_weights=params.mlflow.log_weights,
                                      tracking={"uri": uri, "run_id": child[c.name]})  # fmt: skip
                entry["registration"], r_err = _outcome(reg)
                if r_err:
                    entry["error"] = r_err
                registry.end_run(uri, child[c.name], failed=bool(r_err))
            summary["candidates"][c.name] = entry

        # 6. the comparison table
        shown = [t for t in _table_tasks(summary)]
        table = render(build_rows(summary["parents"], summary["candidates"], shown))
        summary["table"] = table
        champ = registry.current_champion(uri, params.mlflow.registry_name, params.champion.metric)
        summary["champion"] = champ
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"\n{table}\n")
        registry.log_artifacts(uri, parent_run, texts={"comparison.md": table + "\n"},
                               dicts={"summary.json": _jsonable(summary)})  # fmt: skip
        registry.log(uri, parent_run, metrics={"pipeline.seconds": summary["seconds"],
                                               "pipeline.candidates": len(candidates),
                                               "pipeline.failed": sum(1 for c in summary["candidates"].values()
                                                                      if c.get("error"))})  # fmt: skip
        for fut in inspected.values():  # optional insight: a failure is logged, never fatal
            _, i_err = _outcome(fut)
            if i_err:
                log.warning(f"inspect: {i_err}")
        summary["report"] = _write_report(uri, parent_run, results_dir / "report.html", log)
        _prefect_artifact(table, champ, params)
        failed = False
        return summary
    finally:
        registry.end_run(uri, parent_run, failed=failed)


def _write_report(uri: str, parent_run: str, out: Path, log) -> str | None:
    """The HTML report of this run (alloy.report), also logged on the parent run as report.html."""
    from alloy.report import write_report

    try:
        return str(write_report(parent_run, uri, out))
    except Exception as e:  # noqa: BLE001 - the report is a view of results that are already stored
        log.warning(f"report: {e}")
        return None


def raise_error(msg: str) -> None:
    from merging.errors import AlloyError

    raise AlloyError(msg)


def _table_tasks(summary: dict) -> list[str]:
    from eval.skills import PRIMARY_METRIC

    seen: list[str] = []
    for group in (summary["parents"], summary["candidates"]):
        for entry in group.values():
            for t in (entry.get("scores") or {}):
                if t not in seen:
                    seen.append(t)
    # bundled tasks in their own order (skill by skill), others after
    order = list(PRIMARY_METRIC)
    return sorted(seen, key=lambda t: (order.index(t) if t in order else len(order), t))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _prefect_artifact(table: str, champ: dict | None, params: Params) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact

        who = f"version {champ['version']} ({params.champion.metric} {champ['score']})" if champ else "none"
        create_markdown_artifact(key="merge-comparison", markdown=f"# Merge candidates\n\n{table}\n\nChampion: {who}\n",
                                 description=f"{params.name}: candidates compared")  # fmt: skip
    except Exception as e:  # an artifact is a convenience; never fail a finished run over it
        get_run_logger().warning(f"could not create the Prefect artifact: {e}")


def run_pipeline(params_path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None, *,
                 runner: str | None = None, address: str | None = None) -> dict:
    """Run the flow with the task runner params.yaml (or the caller) asks for."""
    params = load_params(params_path, overrides)
    fl = merge_pipeline.with_options(task_runner=task_runner(params, runner, address))
    return fl(params_path=str(Path(params_path).resolve()), overrides=list(overrides or []))
