"""search_trial: one recipe of a search merged in memory and scored (alloy.search.run_trial), logged to its MLflow run.

Nothing is written to disk: the merged weights live in the worker's memory until the scores are in.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE


def trial_metrics(res: dict) -> dict[str, float]:
    out = {"objective": res["objective"], "merge.seconds": res["merge_seconds"], "eval.seconds": res["eval_seconds"],
           "trial.seconds": res["seconds"], "merge.peak_rss_gb": res["peak_rss_gb"]}  # fmt: skip
    out.update({f"tune.{t}": v for t, v in res["tune"].items()})
    if "heldout" in res:
        out["heldout_objective"] = res["heldout_objective"]
        out.update({f"heldout.{t}": v for t, v in res["heldout"].items()})
    return out


@task(name="search-trial", cache_policy=NO_CACHE)
def search_trial(number: int, config: dict, model_paths: dict[str, str], *, tune: dict, heldout: dict | None,
                 weights: dict[str, float], seed: int = 0, merge_device: str = "cpu", eval_device: str = "cpu",
                 dtype: str | None = None, batch_size: int = 16, how: str = "mean",
                 tracking: dict | None = None) -> dict:
    from prefect import get_run_logger

    from alloy.search import describe, run_trial

    res = run_trial(config, model_paths, tune=tune, heldout=heldout, weights=weights, seed=seed,
                    merge_device=merge_device, eval_device=eval_device, dtype=dtype, batch_size=batch_size,
                    how=how)  # fmt: skip
    held = f", held-out {res['heldout_objective']:.3f}" if "heldout" in res else ""
    get_run_logger().info(f"trial {number}: {config['merge_method']} {describe(config)}: tune {res['objective']:.3f}"
                          f"{held} (merge {res['merge_seconds']:.1f} s, eval {res['eval_seconds']:.1f} s)")  # fmt: skip
    if tracking:
        from alloy import registry

        registry.log(tracking["uri"], tracking["run_id"], metrics=trial_metrics(res))
        registry.log_artifacts(tracking["uri"], tracking["run_id"], dicts={"trial.json": res})
    return res
