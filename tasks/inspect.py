"""inspect: task-vector statistics of one candidate's models (merging.inspect), logged on the pipeline run.

One report per distinct base and set of models: similarity and sign conflicts depend on the models alone, so the
report (issue 8's heat map and conflict-per-layer plots) is drawn once for every candidate that merges them.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


def inspect_candidate(config: dict, models: dict[str, dict]) -> dict:
    """merging.inspect.inspect_merge of a candidate's config; `models`: {name: download info with "path"}."""
    from merging.config import parse_config
    from merging.inspect import inspect_merge

    return inspect_merge(parse_config(config, "candidate"), model_paths={m: Path(i["path"]) for m, i in models.items()})


@task(name="inspect", cache_policy=NO_CACHE)
def inspect(name: str, config: dict, models: dict[str, dict], *, tracking: dict | None = None) -> dict:
    from prefect import get_run_logger

    from merging.inspect import format_table

    report = inspect_candidate(config, models)
    get_run_logger().info(f"{name}: task vectors of {', '.join(models)}\n{format_table(report)}")
    if tracking:
        from alloy import registry

        registry.log_artifacts(tracking["uri"], tracking["run_id"], dicts={f"inspect/{name}.json": report})
    return report
