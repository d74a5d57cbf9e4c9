"""lm-eval glue: evaluate a local Hugging Face checkpoint on the bundled skills or any lm-eval task.

Bundled tasks (``eval.skills.BUNDLED_TASKS``) are generated YAMLs over local JSONL, loaded with
``TaskManager(include_path=..., include_defaults=False)`` (skipping the index of ~14,700 built-in tasks halves the
start-up). Any other task name goes to lm-eval's own registry, and only then are the defaults indexed.

Results are cached per task in ``cache_dir`` under a key of (model content hash, task fingerprint, limit), so the
parents of many merges are evaluated once. The model hash covers the weight files, config and tokenizer: two
folders with the same bytes share their cache entries wherever they lie.

``evaluate_in_memory`` scores a model held in memory (a transformers model object: a merge that never touched the
disk) through lm-eval's ``HFLM`` and the same task YAMLs; with no file content to key a cache on, it caches nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from eval import skills as bundled
from merging.errors import InputError
from merging.folders import publish_once

CACHE_VERSION = 1
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALLOY_EVAL_CACHE", Path.home() / ".cache" / "alloy" / "eval"))


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the weight files, config and tokenizer files (names and digests), in name order.

    Digests come from ``merging.hashing.file_sha256``, cached by (path, size, mtime, inode): hashing a parent
    again for the next merge's comparison costs nothing.
    """
    from merging.hashing import file_sha256

    root = Path(model_dir)
    wanted = [p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name in _MODEL_FILES]
    files = sorted(p for p in wanted if p.is_file())
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise InputError(f"{root}: no weight files (*.safetensors or *.bin) to evaluate")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def default_data_dir(cache_dir: Path) -> Path:
    """The bundled skills' data for seed 0, written once (deterministic bytes, so writing again is harmless)."""
    from alloy.demo.skills import write_skill_data

    out = cache_dir / "skill-data-seed0"
    if not (out / "heldout.jsonl").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".skill-data-", dir=cache_dir))
        write_skill_data(tmp, seed=0)
        publish_once(tmp, out)  # or another process wrote the same bytes first
    return out


def _make_cache_dir(cache: Path) -> None:
    if cache.exists() and not cache.is_dir():
        raise InputError(f"cache folder {cache} is a file, not a folder (--cache-dir or $ALLOY_EVAL_CACHE)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cache folder {cache}: cannot create it ({e.strerror or e}; --cache-dir or "
                         "$ALLOY_EVAL_CACHE)") from None  # fmt: skip


def _task_key(mhash: str, task: str, fingerprint: str, limit: int | float | None) -> str:
    blob = json.dumps([CACHE_VERSION, mhash, task, fingerprint, limit], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict[str, float] | None:
    try:
        return json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return None


def _write_cache(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _metrics_of(task_result: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out: dict[str, float] = {}
    for key, value in task_result.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name = key.split(",", 1)[0]
        if not math.isnan(float(value)):
            out[name] = float(value)
    return out


def _git_hash_quietly() -> str | None:
    """lm-eval's get_git_commit_hash, without git's "fatal: not a git repository" on our stderr.

    lm-eval records the commit of the working folder in its results (we keep none of it); it runs `git describe`
    with git's stderr left on ours, so every evaluation started outside a git checkout printed that line."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def _quiet_lm_eval_git() -> None:
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = _git_hash_quietly  # the name simple_evaluate calls


def _run_lm_eval(model_dir: Path | Any, tasks: list[str], include_path: Path | None, with_defaults: bool, *,
                 limit, batch_size: int, device: str) -> dict[str, dict[str, float]]:  # fmt: skip
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval_git()
    tm = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=with_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        ours = ", ".join(bundled.BUNDLED_TASKS)
        raise InputError(f"task {unknown[0]!r}: unknown to lm-eval and not a bundled task ({ours})")
    try:
        res = _simple_evaluate(lm_eval, model_dir, tasks, tm, limit=limit, batch_size=batch_size, device=device)
    except ConnectionError as e:
        # lm-eval's own tasks download their datasets from the Hub; this machine may have no way there.
        theirs = [t for t in tasks if t not in bundled.BUNDLED_TASKS]
        raise InputError(f"task {theirs[0] if theirs else tasks[0]!r}: its dataset could not be fetched "
                         f"(offline?): {e}") from None  # fmt: skip
    if res is None:  # only on non-zero ranks of a distributed run
        return {}
    return {t: _metrics_of(res["results"].get(t, {})) for t in tasks}


def _simple_evaluate(lm_eval, model_dir: Path | Any, tasks: list[str], tm, *, limit, batch_size: int, device: str):
    if not isinstance(model_dir, Path):  # an lm-eval LM object (evaluate_in_memory): its own batch size and device
        return lm_eval.simple_evaluate(model=model_dir, tasks=tasks, task_manager=tm, limit=limit, log_samples=False,
                                       bootstrap_iters=0)  # fmt: skip
    from lm_eval.models.huggingface import HFLM

    from merging.hf import quiet_transformers
    from merging.loading import LOAD_LOCK

    # lm-eval's "hf" model, built here so that its loading takes its turn (merging.loading), without transformers'
    # per-tensor "Loading weights" bar (lm-eval's own request bars stay)
    with LOAD_LOCK, quiet_transformers():
        lm = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=batch_size, device=device)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=tm,
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=False,
        bootstrap_iters=0,  # standard errors of means are analytic; bootstrapping perplexity is slow and unused
    )


def evaluate(
    model_dir: str | Path,
    tasks: list[str] | tuple[str, ...] = ("skills",),
    *,
    limit: int | float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> dict[str, dict[str, float]]:
    """Scores of one checkpoint: ``{task: {metric: value}}`` (metric names without lm-eval's filter suffix).

    ``tasks`` may name bundled tasks, the aliases ``skills``/``skills_em``/``skills_mc``, or any lm-eval task.
    ``data_dir`` holds the skills' JSONL (``alloy.demo.skills.write_skill_data``); by default seed-0 data is
    written into the cache folder. Cached tasks are not run again.
    """
    return evaluate_detailed(model_dir, tasks, limit=limit, batch_size=batch_size, device=device, data_dir=data_dir,
                             cache_dir=cache_dir, use_cache=use_cache)["scores"]  # fmt: skip


def evaluate_detailed(
    model_dir: str | Path,
    tasks: list[str] | tuple[str, ...] = ("skills",),
    *,
    limit: int | float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> dict:
    """Like ``evaluate``, plus provenance: ``{"scores", "model_hash", "cached": [task...], "seconds"}``."""
    t0 = time.perf_counter()
    model = Path(model_dir).resolve()
    if not (model / "config.json").is_file():
        raise InputError(f"{model}: not a Hugging Face checkpoint folder (no config.json)")
    if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1)):
        raise InputError(f"--limit {limit}: must be a positive count, or a fraction in (0, 1]")
    names = bundled.expand_tasks(list(tasks))
    if not names:
        raise InputError("tasks: none given")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    _make_cache_dir(cache)
    ours = [t for t in names if t in bundled.BUNDLED_TASKS]
    theirs = [t for t in names if t not in bundled.BUNDLED_TASKS]
    data = Path(data_dir).resolve() if data_dir else (default_data_dir(cache) if ours else None)
    if ours and not data.is_dir():
        raise InputError(f"{data}: data folder not found")

    mhash = model_hash(model)
    fingerprints: dict[str, str] = {}
    for t in ours:
        f = bundled.data_file(t, data)
        if not f.is_file():
            raise InputError(f"{f}: missing data file for task {t!r}")
        fingerprints[t] = bundled.task_fingerprint(t, data)
    # lm-eval's own tasks: the version of lm-eval stands in for the task's content.
    import importlib.metadata

    lm_eval_version = importlib.metadata.version("lm_eval")
    for t in theirs:
        fingerprints[t] = f"lm-eval=={lm_eval_version}"

    keys = {t: _task_key(mhash, t, fingerprints[t], limit) for t in names}
    scores: dict[str, dict[str, float]] = {}
    if use_cache:
        for t in names:
            hit = _read_cache(cache / "results" / f"{keys[t]}.json")
            if hit is not None:
                scores[t] = hit
    todo = [t for t in names if t not in scores]
    if todo:
        from merging.hf import load_tokenizer

        load_tokenizer(model)  # a folder without a usable tokenizer is named in one line, not in lm-eval's traceback
        if not [t for t in todo if t not in bundled.BUNDLED_TASKS]:
            # Local files only: never wait on the network (huggingface_hub and datasets read these at import).
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with tempfile.TemporaryDirectory(prefix="alloy-tasks-") as tdir:
            todo_ours = [t for t in todo if t in bundled.BUNDLED_TASKS]
            include = bundled.write_task_yamls(data, tdir, todo_ours) if todo_ours else None
            t_run = time.perf_counter()
            fresh = _run_lm_eval(model, todo, include, with_defaults=any(t not in bundled.BUNDLED_TASKS for t in todo),
                                 limit=limit, batch_size=batch_size, device=device)  # fmt: skip
            run_seconds = time.perf_counter() - t_run
        for t in todo:
            scores[t] = fresh.get(t, {})
            if scores[t]:
                _write_cache(cache / "results" / f"{keys[t]}.json", {
                    "model": str(model), "model_hash": mhash, "task": t, "fingerprint": fingerprints[t],
                    "limit": limit, "metrics": scores[t], "lm_eval": lm_eval_version,
                    "seconds_for_batch": round(run_seconds, 2), "batch": todo,
                })  # fmt: skip
    return {
        "scores": {t: scores[t] for t in names},
        "model_hash": mhash,
        "cached": [t for t in names if t not in todo],
        "seconds": round(time.perf_counter() - t0, 2),
    }


# lm-eval keeps its task registry in module globals: two evaluations in one process at once are not safe.
_IN_MEMORY_LOCK = threading.Lock()


def evaluate_in_memory(model: Any, tokenizer: Any, tasks: list[str] | tuple[str, ...], *, data_dir: str | Path,
                   limit: int | float | None = None, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Scores of a transformers model object on bundled tasks over ``data_dir``: ``{task: {metric: value}}``.

    Runs on the model's own device and dtype. Nothing is cached (the caller knows what the weights are, this does
    not). Calls in one process take turns; separate processes run side by side.
    """
    from lm_eval.models.huggingface import HFLM

    names = bundled.expand_tasks(list(tasks))
    other = [t for t in names if t not in bundled.BUNDLED_TASKS]
    if other or not names:
        raise InputError(f"task {other[0] if other else '(none)'!r}: in-memory evaluation takes bundled tasks only "
                         f"({', '.join(bundled.BUNDLED_TASKS)})")  # fmt: skip
    if limit is not None and (limit <= 0 or (isinstance(limit, float) and limit > 1)):
        raise InputError(f"limit {limit}: must be a positive count, or a fraction in (0, 1]")
    data = Path(data_dir).resolve()
    for t in names:
        if not bundled.data_file(t, data).is_file():
            raise InputError(f"{bundled.data_file(t, data)}: missing data file for task {t!r}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _IN_MEMORY_LOCK, tempfile.TemporaryDirectory(prefix="alloy-tasks-") as tdir:
        include = bundled.write_task_yamls(data, tdir, names)
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        level = hf_log.level
        hf_log.setLevel(logging.ERROR)  # it warns that a model object ignores its loading arguments: we pass none
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        finally:
            hf_log.setLevel(level)
        return _run_lm_eval(lm, names, include, with_defaults=False, limit=limit, batch_size=batch_size,
                            device=str(model.device))  # fmt: skip
