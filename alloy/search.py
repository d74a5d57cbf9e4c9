"""Recipe search: an Optuna study over merge recipes, each trial merged in memory and scored through lm-eval.

    params.yaml `search:`  ->  Space (methods, parameter ranges, optional per-layer-group gradients)
    trial:  suggest a recipe -> merge_to_state_dict (in RAM, nothing written) -> weights into a transformers model
            -> lm-eval on the tune split (the objective) and on the held-out split (reported, never tuned on) -> drop
    study:  TPE, seeded, in sqlite storage under a name derived from what the search is (space, models, objective,
            tune data), so a re-run with more trials resumes it: finished trials are kept, trials a killed run left
            RUNNING are marked failed, only the missing ones run
    best:   the trial with the highest tune objective, written as a mergekit YAML over the models' folders

A plain library: no Prefect, no MLflow (flows/search.py runs trials in batches through the task runner and logs each
as an MLflow child run). Trials are asked and told in the caller's process, so workers never open the storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alloy.pipeline_params import GramSpec, Params, SearchSpec, gram_spec, model_name_of, primary_scores
from merging.errors import ConfigError, InputError
from merging.folders import publish_once

# Parameters a method declares but does not use: searching them would only add noise dimensions.
_UNUSED = {("task_arithmetic", "density")}
RECIPE_FILE = "best.yml"


@dataclass(frozen=True)
class Space:
    """What a trial may choose: a method, then a value per model (or per model and layer group) for each per-model
    parameter with a range, and one value for each global parameter with a range."""

    methods: tuple[str, ...]
    base: str
    models: tuple[str, ...]
    ranges: dict[str, tuple[float, float]]
    parameters: dict[str, Any]  # fixed values, for the methods that take them
    layer_groups: int = 1
    gradient: tuple[str, ...] = ()
    grams: dict[str, str] = field(default_factory=dict)  # {model: Gram file} when a method reads them (regmean)


def spec_of(params: Params) -> SearchSpec:
    return params.search or SearchSpec()


def space_of(params: Params) -> Space:
    spec = spec_of(params)
    known = params.all_models()
    if spec.base_model not in known:
        have = ", ".join(known) or "none"
        raise ConfigError(f"search.base_model: {spec.base_model!r} is not one of the models ({have})")
    models = spec.models or [n for n, m in known.items() if m.skill and n != spec.base_model]
    if not models:
        raise ConfigError("search.models: no models to merge (list them, or define models with a skill)")
    if spec.base_model in models:
        raise ConfigError(f"search.models: {spec.base_model!r} is the base model")
    grams = {m: str(params.path(g["file"])) for m, g in gram_specs(params, models).items()}
    return Space(methods=tuple(spec.methods), base=spec.base_model, models=tuple(models), ranges=dict(spec.ranges),
                 parameters=dict(spec.parameters), layer_groups=spec.layer_groups,
                 gradient=tuple(spec.gradient) if spec.layer_groups > 1 else (), grams=grams)  # fmt: skip


def gram_specs(params: Params, models: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{model: Gram spec (alloy.pipeline_params.gram_spec)} for the searched models when one of the methods reads
    Gram matrices (regmean), else {}. The files are the pipeline's own (one per model), so the two share them."""
    from merging.methods import REGISTRY

    spec = spec_of(params)
    models = models if models is not None else list(space_of(params).models)
    if not any("gram" in REGISTRY[m].side_inputs for m in spec.methods):
        if spec.grams is not None:
            raise ConfigError(f"search.grams: none of the methods ({', '.join(spec.methods)}) reads Gram matrices")
        return {}
    g = spec.grams or GramSpec()
    unknown = sorted(set(g.data) - set(models))
    if unknown:
        raise ConfigError(f"search.grams.data.{unknown[0]}: not one of the searched models ({', '.join(models)})")
    return {m: gram_spec(params, m, g, "search") for m in models}


def objective_weights(params: Params) -> dict[str, float]:
    """{held-out task: weight}: search.objective, else exact match of each searched model's skill, equally."""
    spec = spec_of(params)
    if spec.objective:
        return {t: float(w) for t, w in spec.objective.items() if w}
    from alloy.demo.skills import SKILLS

    known = params.all_models()
    skills = [known[m].skill for m in space_of(params).models if known[m].skill] or list(SKILLS)
    return {f"{s}_em": 1.0 for s in dict.fromkeys(skills)}


def tune_tasks(params: Params) -> list[str]:
    from eval.skills import TUNE

    suffix = TUNE if spec_of(params).tune_split == "tune" else ""
    return [t + suffix for t in objective_weights(params)]


def aggregate(values: dict[str, float], weights: dict[str, float], how: str = "mean") -> float:
    """{task: score} -> one number: the weighted mean, or (`how="min"`) the smallest weight x score."""
    if how == "min":
        return min(w * values[t] for t, w in weights.items())
    return sum(w * values[t] for t, w in weights.items()) / sum(weights.values())


def weighted_score(scores: dict[str, dict[str, float]], weights: dict[str, float], how: str = "mean") -> float:
    """`aggregate` of the tasks' primary metrics; a task `t` is read as `t` or `t_tune`."""
    from eval.skills import TUNE

    prim = {t.removesuffix(TUNE): v for t, v in primary_scores(scores).items()}
    missing = [t for t in weights if t not in prim]
    if missing:
        got = ", ".join(prim) or "none"
        raise InputError(f"objective: no score for task {missing[0]!r} (evaluation returned {got})")
    return aggregate(prim, weights, how)


# ------------------------------------------------------------------------------------------------ the space


def _round(x: float) -> float:
    return float(f"{x:.4g}")  # readable recipes; the merge uses exactly what the recipe says


def suggest_config(trial: Any, space: Space) -> dict:
    """A mergekit-style config over model names from an Optuna trial (a Trial, or a FrozenTrial to replay).

    Parameter names are shared between methods (`facts.weight`, `lambda`), so what TPE learns about one model's
    weight under one method informs the others: with a few dozen trials, fewer and better-fed dimensions win.
    """
    from merging.methods import REGISTRY

    method = trial.suggest_categorical("method", list(space.methods))
    spec = REGISTRY[method]

    def value(name: str, key: str) -> float | list[float]:
        lo, hi = space.ranges[key]
        if key in space.gradient:
            return [_round(trial.suggest_float(f"{name}.g{g}", lo, hi)) for g in range(space.layer_groups)]
        return _round(trial.suggest_float(name, lo, hi))

    models = []
    for m in space.models:
        entry: dict[str, Any] = {"model": m}
        per = {k: value(f"{m}.{k}", k) for k in space.ranges if k in spec.per_model and (method, k) not in _UNUSED}
        per.update({k: v for k, v in space.parameters.items() if k in spec.per_model and k not in per})
        if per:
            entry["parameters"] = per
        models.append(entry)
    if "gram" in spec.side_inputs:  # each model's Gram file, by absolute path: the recipe merges from anywhere
        for entry in models:
            entry.setdefault("parameters", {})["gram"] = space.grams[entry["model"]]
    if method in ("della", "della_linear") and "epsilon" not in space.ranges and "epsilon" not in space.parameters:
        for entry in models:
            d = (entry.get("parameters") or {}).get("density")
            if d is not None:
                entry["parameters"]["epsilon"] = _della_epsilon(d, spec.per_model["epsilon"])
    top = {k: value(k, k) for k in space.ranges if k in spec.globals}
    top.update({k: v for k, v in space.parameters.items() if k in spec.globals and k not in top})
    cfg: dict[str, Any] = {"merge_method": method, "base_model": space.base, "models": models}
    if top:
        cfg["parameters"] = top
    return cfg


def _della_epsilon(density: float | list[float], default: float) -> float | list[float]:
    """DELLA keeps each element with probability density +/- epsilon, which must stay inside (0, 1): near density
    0 or 1 the default epsilon is narrowed (to 90% of the room left), so every density in the range stays valid."""
    if isinstance(density, list):  # a gradient: one epsilon valid at every interpolated density in between
        return _round(min(default, *(0.9 * min(d, 1 - d) for d in density)))
    return default if density >= 1 else _round(min(default, 0.9 * min(density, 1 - density)))


def describe(config: dict) -> str:
    """One short line: 'lambda 0.8 · weight 0.5/0.9/1.1 · density 0.4/0.7/0.8' (models in config order)."""
    top = config.get("parameters") or {}
    bits = [f"{k} {_short(v)}" for k, v in top.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)]
    keys = list(dict.fromkeys(k for m in config["models"] for k in (m.get("parameters") or {})))
    for k in keys:
        vals = [(m.get("parameters") or {}).get(k) for m in config["models"]]
        if all(isinstance(v, (int, float, list)) and not isinstance(v, bool) for v in vals):
            bits.append(f"{k} " + "/".join(_short(v) for v in vals))
    return " · ".join(bits)


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return f"{v:.2f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------------ the study


def study_name(params: Params, inputs: dict[str, str] | None = None) -> str:
    """`<params.name>-<digest>`: the same search (space, models, objective, tune data, seeds) finds its study again;
    the budget, parallelism and held-out settings are not part of it, so `--trials` can grow a study. `inputs`
    ({model or data: content digest}) makes models retrained in place, or other tune data, a new study."""
    spec = spec_of(params)
    space = space_of(params)
    known = params.all_models()
    ident = {
        "space": {"methods": space.methods, "base": space.base, "models": space.models, "ranges": space.ranges,
                  "parameters": space.parameters, "layer_groups": space.layer_groups, "gradient": space.gradient},
        "objective": objective_weights(params),
        **({"aggregate": spec.aggregate} if spec.aggregate != "mean" else {}),  # old studies keep their names
        **({"grams": gram_specs(params, list(space.models))} if space.grams else {}),
        "tune": [spec.tune_split, spec.limit],
        "seeds": [spec.seed, spec.startup_trials, params.merge.seed],
        "models": {n: known[n].model_dump(exclude_none=True) for n in (space.base, *space.models)},
        "family": params.family.model_dump(exclude={"out"}) if params.family else None,
        "inputs": inputs or {},
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{params.name}-{digest}"


def storage_url(params: Params) -> str:
    """search.storage, else `optuna.db` beside the MLflow sqlite file (or in the project folder)."""
    spec = spec_of(params)
    if spec.storage:
        if "://" in spec.storage:
            return spec.storage
        return f"sqlite:///{params.path(spec.storage).resolve()}"
    uri = params.tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else params.root
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is the caller's to print
    return optuna


def open_study(params: Params, inputs: dict[str, str] | None = None):
    """(study, interrupted): the study, created or loaded to resume, with a sampler seeded by (search.seed, finished
    trials) so a resumed study does not replay its first random trials; trials a killed run left RUNNING are marked
    failed and returned (they do not count towards the budget)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    spec = spec_of(params)
    url = storage_url(params)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    name = study_name(params, inputs)
    study = optuna.create_study(study_name=name, storage=url, direction="maximize", load_if_exists=True)
    stale = study.get_trials(deepcopy=True, states=(TrialState.RUNNING, TrialState.WAITING))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    seed = random.Random(f"{spec.seed}/{len(study.trials)}").randrange(2**31)
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True)
    return study, stale


def finished(study) -> list:
    """Trials that count towards search.trials: completed, or failed with an error (not interrupted)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
            if t.state == TrialState.COMPLETE or "error" in t.user_attrs]  # fmt: skip


def best_trial(study):
    """The completed trial with the highest tune objective (the earliest among equals), or None."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


# ------------------------------------------------------------------------------------------------ data


def data_digest(data_dir: str | Path, files: list[str]) -> str:
    """sha256 over the named files of a data folder (what a study's tune split is)."""
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + (Path(data_dir) / name).read_bytes())
    return h.hexdigest()


def tune_data_dir(data_dir: str | Path, fallback: str | Path) -> Path:
    """Where the tune split lies: beside the held-out files when the family wrote it, else written (once, from the
    held-out files, so it stays disjoint from them) into `fallback/<digest of the held-out files>`."""
    from alloy.demo.skills import SKILLS, TUNE_SUFFIX, write_tune_data

    data = Path(data_dir).resolve()
    if all((data / f"{s}{TUNE_SUFFIX}").is_file() for s in SKILLS):
        return data
    h = hashlib.sha256()
    for s in SKILLS:
        f = data / f"{s}.jsonl"
        if not f.is_file():
            raise InputError(f"{f}: held-out file missing (is {data} the family's data folder?)")
        h.update(f.read_bytes())
    out = Path(fallback).resolve() / h.hexdigest()[:16]  # the tune split follows from the held-out files
    if not all((out / f"{s}{TUNE_SUFFIX}").is_file() for s in SKILLS):
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        write_tune_data(tmp, heldout_dir=data)
        tmp.mkdir(parents=True, exist_ok=True)
        publish_once(tmp, out)  # or another process wrote the same bytes meanwhile
    return out


# ------------------------------------------------------------------------------------------------ one trial

# One model object per (base folder, device) and process: a trial loads its merged weights into it. Trials of one
# process take turns on it (evaluation is serialised anyway); Dask worker processes each have their own.
_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
_MODEL_LOCK = threading.Lock()


def _model_for(base_dir: Path, device: str):
    key = (str(base_dir), device)
    if key not in _MODELS:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from merging.loading import LOAD_LOCK

        with LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device).eval()
            _MODELS[key] = (model, AutoTokenizer.from_pretrained(base_dir))
    return _MODELS[key]


def _load_weights(model, state_dict: dict) -> None:
    """Copy merged tensors into the model (cast to its fp32, as loading a saved merge with dtype=float32 does)."""
    own = model.state_dict()
    unexpected = [k for k in state_dict if k not in own]
    if unexpected:
        raise InputError(f"merged tensor {unexpected[0]!r} is not a parameter of the base's architecture")
    tied = getattr(model.config, "tie_word_embeddings", False)
    persistent = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    missing = [k for k in persistent if k not in state_dict and not (tied and k == "lm_head.weight")]
    if missing:
        raise InputError(f"the merge produced no tensor {missing[0]!r}")
    model.load_state_dict(state_dict, strict=False)


def run_trial(config: dict, model_paths: dict[str, str], *, tune: dict, heldout: dict | None,
              weights: dict[str, float], seed: int = 0, merge_device: str = "cpu", eval_device: str = "cpu",
              dtype: str | None = None, batch_size: int = 16, how: str = "mean") -> dict:
    """Merge `config` (models by name, `model_paths` {name: folder}) in memory and score it (`how`: `aggregate`).

    `tune` / `heldout`: {"tasks", "data_dir", "limit"}. Returns JSON-able results: the objective (tune), the
    held-out objective, per-task primary scores of each split, and timings.
    """
    import torch

    from eval.harness import evaluate_in_memory
    from merging.config import parse_config
    from merging.engine import merge_to_state_dict

    t0 = time.perf_counter()
    cfg = parse_config(config, "search trial")
    paths = {n: Path(p) for n, p in model_paths.items()}
    res = merge_to_state_dict(cfg, seed=seed, device=merge_device, dtype=dtype, model_paths=paths)
    merge_s = time.perf_counter() - t0
    out: dict[str, Any] = {"config": config, "merge_seconds": round(merge_s, 2),
                           "peak_rss_gb": round(res.peak_rss_bytes / 1e9, 3)}  # fmt: skip
    base = paths[model_name_of(config["base_model"])]
    with _MODEL_LOCK, torch.no_grad():
        t1 = time.perf_counter()  # inside the lock: waiting for another trial's evaluation is not this one's cost
        model, tok = _model_for(base, eval_device)
        _load_weights(model, res.state_dict)
        del res  # the merged tensors now live in the model: drop the second copy before evaluating
        splits = {"tune": tune, **({"heldout": heldout} if heldout else {})}
        for split, ev in splits.items():
            scores = evaluate_in_memory(model, tok, ev["tasks"], data_dir=ev["data_dir"], limit=ev.get("limit"),
                                        batch_size=batch_size)  # fmt: skip
            out[split] = primary_scores(scores)
            out[f"{split}_objective"] = weighted_score(scores, weights, how)
    out["objective"] = out.pop("tune_objective")
    out["eval_seconds"] = round(time.perf_counter() - t1, 2)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# ------------------------------------------------------------------------------------------------ results


def model_refs(params: Params, paths: dict[str, str]) -> dict[str, str]:
    """How the written recipe names each model: a hub id at its revision, else the folder (absolute, so the file
    merges from anywhere, with alloy or mergekit)."""
    known = params.all_models()
    out = {}
    for n, p in paths.items():
        spec = known.get(n)
        if spec and spec.hub:
            out[n] = spec.hub + (f"@{spec.revision}" if spec.revision else "")
        else:
            out[n] = str(Path(p).resolve())
    return out


def recipe_yaml(config: dict, refs: dict[str, str], note: str = "") -> str:
    """The config with model names replaced by `refs`, as mergekit YAML (a `# note` header line per line of note)."""

    def swap(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (refs.get(v, v) if k in ("model", "base_model") and isinstance(v, str) else swap(v))
                    for k, v in node.items()}  # fmt: skip
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    head = "".join(f"# {line}\n" for line in note.splitlines())
    return head + yaml.safe_dump(swap(config), sort_keys=False)


def write_recipe(path: str | Path, config: dict, refs: dict[str, str], note: str = "") -> Path:
    """Write the recipe atomically and read it back with merging.config.load_config (a bad one fails here)."""
    from merging.config import load_config

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(recipe_yaml(config, refs, note))
    load_config(tmp)
    tmp.replace(path)
    return path


def trial_rows(study) -> list[dict]:
    """One dict per trial, in trial order: number, state, method, recipe, objective, held-out, timings."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get("config") or {}
        rows.append({
            "trial": t.number, "state": t.state.name, "method": cfg.get("merge_method", t.params.get("method")),
            "recipe": describe(cfg) if cfg else "", "tune": t.value, "heldout": t.user_attrs.get("heldout_objective"),
            "merge_seconds": t.user_attrs.get("merge_seconds"), "eval_seconds": t.user_attrs.get("eval_seconds"),
            "seconds": t.user_attrs.get("seconds"),
            "run_id": t.user_attrs.get("mlflow_run_id"), "error": t.user_attrs.get("error"),
        })  # fmt: skip
    return rows


def render_table(rows: list[dict], best: int | None = None) -> str:
    """Markdown: one line per trial, the best (by tune objective) marked with *."""
    def num(v: Any, nd: int = 3) -> str:
        return "" if v is None else f"{v:.{nd}f}"

    lines = ["| trial | method | recipe | tune | held-out | merge s | eval s |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        mark = " *" if r["trial"] == best else ""
        state = "" if r["state"] == "COMPLETE" else f" ({r['state'].lower()})"
        lines.append(f"| {r['trial']}{mark} | {r['method'] or ''}{state} | {r['recipe']} | {num(r['tune'])} | "
                     f"{num(r['heldout'])} | {num(r['merge_seconds'], 1)} | {num(r['eval_seconds'], 1)} |")  # fmt: skip
    return "\n".join(lines)
