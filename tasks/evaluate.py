"""evaluate: lm-eval scores of one model (eval.harness.evaluate), logged to MLflow.

The harness caches each (model content, task, limit) result, so the parents shared by every candidate, and any
unchanged model on a re-run, are evaluated once.
"""

from __future__ import annotations

import threading
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alloy.pipeline_params import derived_metrics, primary_scores

# lm-eval keeps task registries in module globals: two evaluations in one process at once are not safe.
# Threads of one process take turns; Dask workers are separate processes and run side by side.
_LM_EVAL_LOCK = threading.Lock()


def evaluate_model(model_dir: str | Path, tasks: list[str], *, limit=None, batch_size: int = 16, device: str = "cpu",
                   data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> dict:
    """{"scores": {task: {metric: value}}, "cached": [...], "seconds", "model_hash"}."""
    from eval.harness import evaluate_detailed

    with _LM_EVAL_LOCK:
        return evaluate_detailed(model_dir, tasks, limit=limit, batch_size=batch_size, device=device,
                                 data_dir=data_dir, cache_dir=cache_dir)  # fmt: skip


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(name: str, model_dir: str, tasks: list[str], *, limit=None, batch_size: int = 16, device: str = "cpu",
             data_dir: str | None = None, cache_dir: str | None = None, tracking: dict | None = None) -> dict:
    from prefect import get_run_logger

    res = evaluate_model(model_dir, tasks, limit=limit, batch_size=batch_size, device=device, data_dir=data_dir,
                         cache_dir=cache_dir)  # fmt: skip
    prim = primary_scores(res["scores"])
    get_run_logger().info(f"{name}: " + ", ".join(f"{t} {v:.3g}" for t, v in prim.items())
                          + f" ({res['seconds']:.1f} s, {len(res['cached'])}/{len(res['scores'])} cached)")  # fmt: skip
    if tracking:
        from alloy import registry

        flat = {f"eval.{t}.{m}": v for t, ms in res["scores"].items() for m, v in ms.items()}
        registry.log(tracking["uri"], tracking["run_id"], metrics={**flat, **derived_metrics(res["scores"]),
                                                                   "eval.seconds": res["seconds"]})  # fmt: skip
        registry.log_artifacts(tracking["uri"], tracking["run_id"], dicts={"eval.json": res})
    return {"name": name, **res}

