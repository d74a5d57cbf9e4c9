"""The recipe search as a Prefect flow: trials in parallel batches through the pipeline's task runner.

    params.yaml ── models (demo family / downloads, as the pipeline resolves them) ── tune data beside the held-out
    study (Optuna, sqlite) ─ ask a batch of `search.parallelism` trials ─> search_trial each (task runner: threads,
                             a Dask LocalCluster, or a scheduler address) ─> tell their tune objectives ─> next batch
    best trial ─> results/search/<study>/best.yml (mergekit YAML), trials.md, summary.json
    optional: the best recipe through the pipeline (merge -> quant-check -> evaluate -> register) as `search-best`

The study is the MLflow parent run: its id is kept in the study, so a resumed study adds its new trials as child runs
of the same parent. Trials are asked and told here, in the flow's process; workers only merge and evaluate.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from alloy import registry
from alloy import search as S
from alloy.pipeline_params import Params, flat_params, load_params
from eval.skills import data_file
from flows.pipeline import _outcome, task_runner
from merging.errors import ConfigError
from tasks.download import download
from tasks.family import demo_family
from tasks.gram import gram
from tasks.search import search_trial

PROMOTED = "search-best"


def _resolve_models(params: Params, names: list[str]) -> tuple[dict[str, dict], dict | None]:
    """{name: download info} for the searched models, building the demo family first when they come from it."""
    known = params.all_models()
    spec = lambda n: known[n].model_dump(exclude_none=True)  # noqa: E731
    root, models_dir = str(params.root), str(params.path(params.paths.models))
    family = None
    members = None
    if params.family and any(known[n].family for n in names):
        fam = params.family
        base = download.submit(fam.base, spec(fam.base), root, models_dir).result() if fam.base else None
        family = demo_family.submit(fam.kind, str(params.family_dir()), fam.seed, fam.builder_kwargs(), base).result()
        members = {"base": family["base"], **family["specialists"]}
    futs = {n: download.submit(n, spec(n), root, models_dir, members) for n in names}
    return {n: f.result() for n, f in futs.items()}, family


def _parent_run(study, uri: str, exp_id: str, params: Params, params_file: Path) -> tuple[str, bool]:
    """(run id, new): the study's MLflow parent run, the one an earlier run of this study made (reopened), else a
    new one."""
    prev = study.user_attrs.get("mlflow")
    c = registry.client(uri)
    if prev and prev.get("uri") == uri:
        try:
            run = c.get_run(prev["run_id"])
            if run.info.lifecycle_stage == "active" and run.info.experiment_id == exp_id:
                c.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, False
        except Exception:  # deleted, or another store: start afresh
            pass
    run_id = registry.start_run(uri, exp_id, f"search {study.study_name}", tags={
        "alloy.role": "search", "alloy.study": study.study_name, "alloy.storage": S.storage_url(params),
        "alloy.params_file": str(params_file)})  # fmt: skip
    study.set_user_attr("mlflow", {"uri": uri, "run_id": run_id})
    return run_id, True


def _reference(uri: str, exp_id: str, weights: dict[str, float], how: str = "mean") -> dict | None:
    """The best hand-written candidate of the latest finished pipeline run in this experiment, by the search's
    objective on the held-out split (its eval scores), for comparison. None without one."""
    from eval.skills import PRIMARY_METRIC

    c = registry.client(uri)
    runs = c.search_runs([exp_id], "tags.`alloy.role` = 'pipeline' and attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if not runs:
        return None
    parent = runs[0].info.run_id
    kids = c.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}' and tags.`alloy.role` = 'candidate'",
                         max_results=500)  # fmt: skip
    best = None
    for r in kids:
        m = r.data.metrics
        keys = {t: f"eval.{t}.{PRIMARY_METRIC[t]}" for t in weights}
        if r.data.tags.get("alloy.candidate") == PROMOTED or not all(k in m for k in keys.values()):
            continue
        score = S.aggregate({t: m[k] for t, k in keys.items()}, weights, how)
        if best is None or score > best["heldout_objective"]:
            best = {"candidate": r.data.tags.get("alloy.candidate"), "run_name": r.info.run_name,
                    "heldout_objective": score, "pipeline_run_id": parent}  # fmt: skip
    return best


@flow(name="merge-search", log_prints=True)
def merge_search(params_path: str = "params.yaml", overrides: list[str] | None = None,
                 trials: int | None = None) -> dict:
    t0 = time.perf_counter()
    log = get_run_logger()
    params_file = Path(params_path).resolve()
    params = load_params(params_file, overrides)
    spec = S.spec_of(params)
    space = S.space_of(params)
    target = trials or spec.trials
    weights = S.objective_weights(params)
    results = params.path(params.paths.results)

    # the inputs first: their content is part of the study's identity
    models, family = _resolve_models(params, [space.base, *space.models])
    paths = {n: m["path"] for n, m in models.items()}
    # RegMean's Gram matrices, each model's once, before any trial reads them (the pipeline's files: shared)
    for fut in [gram.submit(m, models[m], g, str(params.root)) for m, g in S.gram_specs(params).items()]:
        fut.result()
    data = params.path(params.eval.data_dir) if params.eval.data_dir else (
        Path(family["data_dir"]) if family else None)  # fmt: skip
    if data is None:
        raise ConfigError(f"{params_file}: search: no skills data (set eval.data_dir, or a family)")
    tune_dir = S.tune_data_dir(data, results / "search" / "tune-data") if spec.tune_split == "tune" else data
    tune = {"tasks": S.tune_tasks(params), "data_dir": str(tune_dir), "limit": spec.limit}
    heldout_limit = spec.heldout_limit or params.eval.limit
    heldout = {"tasks": list(weights), "data_dir": str(data), "limit": heldout_limit} if spec.heldout else None
    tune_files = sorted({data_file(t, Path(tune_dir)).name for t in tune["tasks"]})
    inputs = {**{n: m["digest"] for n, m in models.items()}, "tune_data": S.data_digest(tune_dir, tune_files)}

    uri = params.tracking_uri()
    exp_id = registry.ensure_experiment(uri, params.mlflow.experiment, params.path(params.mlflow.artifact_location))
    study, stale = S.open_study(params, inputs)
    parent, new_parent = _parent_run(study, uri, exp_id, params, params_file)
    for t in stale:  # a killed run's trials: their runs say so
        if t.user_attrs.get("mlflow_run_id"):
            registry.client(uri).set_tag(t.user_attrs["mlflow_run_id"], "alloy.error", "interrupted")
            registry.end_run(uri, t.user_attrs["mlflow_run_id"], failed=True)
    failed = True
    try:
        # MLflow params cannot change: the study's identity is fixed by its name; runtime knobs go in tags
        registry.log(uri, parent, params={
            "study": study.study_name, "storage": S.storage_url(params), "methods": ",".join(space.methods),
            "base_model": space.base, "models": ",".join(space.models), "ranges": space.ranges,
            "fixed": space.parameters, "layer_groups": space.layer_groups, "objective": weights,
            "tune_split": spec.tune_split, "tune_limit": spec.limit, "seed": spec.seed,
            "startup_trials": spec.startup_trials,
        } if new_parent else None, tags={
            "alloy.heldout_limit": heldout_limit, "alloy.parallelism": spec.parallelism, "alloy.trials": target,
            **{f"alloy.model.{n}.digest": m["digest"] for n, m in models.items()}})  # fmt: skip

        done_before = len(S.finished(study))
        todo = max(0, target - done_before)
        print(f"study {study.study_name} ({S.storage_url(params)}): {done_before} trials done, "
              f"{todo} to run, {spec.parallelism} at a time")  # fmt: skip
        run = {"paths": paths, "tune": tune, "heldout": heldout, "weights": weights, "seed": params.merge.seed,
               "merge_device": params.merge.device, "eval_device": params.eval.device, "dtype": params.merge.dtype,
               "batch_size": params.eval.batch_size, "how": spec.aggregate}  # fmt: skip
        ran: list[int] = []
        while todo > 0:
            batch = [_start_trial(study, space, run, uri, exp_id, parent) for _ in range(min(spec.parallelism, todo))]
            for trial, run_id, fut in batch:
                _end_trial(study, trial, run_id, fut, uri, log)
                ran.append(trial.number)
            todo -= len(batch)

        summary = _finish(study, params, params_file, models, weights, results, uri, exp_id, parent, ran, t0)
        failed = False
        return summary
    finally:
        registry.end_run(uri, parent, failed=failed)


def _start_trial(study, space: S.Space, run: dict, uri: str, exp_id: str, parent: str) -> tuple:
    """Ask the study for a trial, open its MLflow child run, submit it to the task runner."""
    trial = study.ask()
    cfg = S.suggest_config(trial, space)
    method = cfg["merge_method"]
    tags = {"alloy.role": "trial", "alloy.study": study.study_name, "alloy.trial": trial.number, "alloy.method": method}
    run_id = registry.start_run(uri, exp_id, f"trial {trial.number}: {method}", parent_run_id=parent, tags=tags)
    registry.log(uri, run_id, params={"merge_method": method, "trial": trial.number, **flat_params(cfg)})
    registry.log_artifacts(uri, run_id, texts={"config.yml": S.recipe_yaml(cfg, {})})
    trial.set_user_attr("config", cfg)
    trial.set_user_attr("mlflow_run_id", run_id)
    paths = run["paths"]
    kw = {k: v for k, v in run.items() if k != "paths"}
    fut = search_trial.submit(trial.number, cfg, paths, **kw, tracking={"uri": uri, "run_id": run_id})
    return trial, run_id, fut


def _end_trial(study, trial, run_id: str, fut, uri: str, log) -> None:
    """Tell the study the trial's tune objective (or that it failed, and why), and close its run."""
    from optuna.trial import TrialState

    res, err = _outcome(fut)
    if err:
        trial.set_user_attr("error", err[:2000])  # a failed trial counts towards the budget; an interrupted one not
        study.tell(trial, state=TrialState.FAIL)
        registry.client(uri).set_tag(run_id, "alloy.error", err[:5000])
        registry.end_run(uri, run_id, failed=True)
        log.error(f"trial {trial.number}: {err}")
        return
    for key in ("heldout_objective", "merge_seconds", "eval_seconds", "seconds", "tune", "heldout"):
        if key in res:
            trial.set_user_attr(key, res[key])
    study.tell(trial, res["objective"])
    registry.end_run(uri, run_id)


def _finish(study, params: Params, params_file: Path, models: dict, weights: dict, results: Path, uri: str,
            exp_id: str, parent: str, ran: list[int], t0: float) -> dict:
    best = S.best_trial(study)
    rows = S.trial_rows(study)
    table = S.render_table(rows, best.number if best else None)
    out_dir = results / "search" / study.study_name
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "study": study.study_name, "storage": S.storage_url(params), "tracking_uri": uri, "experiment_id": exp_id,
        "parent_run_id": parent, "trials": rows, "ran": ran, "objective": weights, "table": table,
    }  # fmt: skip
    if best is not None:
        cfg = best.user_attrs["config"]
        refs = S.model_refs(params, {n: m["path"] for n, m in models.items()})
        held = best.user_attrs.get("heldout_objective")
        note = (f"alloy search: study {study.study_name}, trial {best.number} of {len(rows)}\n"
                f"tune objective {best.value:.4f}" + (f", held-out {held:.4f}" if held is not None else "")
                + f"\nobjective: weighted mean of {json.dumps(weights)}; params {params_file}")  # fmt: skip
        recipe = S.write_recipe(out_dir / S.RECIPE_FILE, cfg, refs, note)
        summary["best"] = {"trial": best.number, "objective": best.value, "heldout_objective": held, "config": cfg,
                           "recipe": str(recipe), "run_id": best.user_attrs.get("mlflow_run_id")}  # fmt: skip
        registry.log(uri, parent, metrics={"best.objective": best.value,
                                           **({"best.heldout_objective": held} if held is not None else {})},
                     tags={"alloy.best_trial": best.number, "alloy.best_recipe": str(recipe)})  # fmt: skip
    ref = _reference(uri, exp_id, weights, S.spec_of(params).aggregate)
    if ref:
        summary["reference"] = ref
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "trials.md").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    registry.log(uri, parent, metrics={"search.seconds": summary["seconds"], "search.trials": len(rows),
                                       "search.ran": len(ran)})  # fmt: skip
    registry.log_artifacts(uri, parent, files=[out_dir / S.RECIPE_FILE, params_file], texts={"trials.md": table + "\n"},
                           dicts={"summary.json": json.loads(json.dumps(summary, default=str))})  # fmt: skip
    return summary


def run_search(params_path: str | os.PathLike = "params.yaml", overrides: list[str] | None = None, *,
               trials: int | None = None, runner: str | None = None, address: str | None = None,
               register: bool | None = None) -> dict:
    """Run the search flow with params.yaml's task runner (or the caller's); then, when asked (search.register_best
    or `register`), the best recipe through the pipeline as the candidate `search-best`."""
    params = load_params(params_path, overrides)
    fl = merge_search.with_options(task_runner=task_runner(params, runner, address))
    summary = fl(params_path=str(Path(params_path).resolve()), overrides=list(overrides or []), trials=trials)
    if (S.spec_of(params).register_best if register is None else register) and summary.get("best"):
        summary["promoted"] = promote(params_path, overrides, summary["best"]["config"], runner=runner,
                                      address=address)  # fmt: skip
    return summary


def promote(params_path: str | os.PathLike, overrides: list[str] | None, config: dict, *, runner: str | None = None,
            address: str | None = None) -> dict:
    """The pipeline on params.yaml with its candidates replaced by the one recipe, named `search-best`."""
    from flows.pipeline import run_pipeline

    only = f"candidates={json.dumps({PROMOTED: {'config': config}})}"
    res = run_pipeline(params_path, [*(overrides or []), only], runner=runner, address=address)
    entry = res["candidates"].get(PROMOTED, {})
    keep = ("run_id", "metrics", "registration", "error")
    return {"pipeline_run_id": res["parent_run_id"], **{k: v for k, v in entry.items() if k in keep}}
