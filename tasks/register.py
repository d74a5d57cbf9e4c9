"""register: a model version with its lineage (alloy.registry.register_candidate); `champion` moves only on a win.

The weights are logged as the run's `model` artifact first (the version's source) unless the quantisation check
blocks registration, in which case nothing is copied.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="register", cache_policy=NO_CACHE)
def register(merged: dict, quant: dict | None, metrics: dict[str, float], *, registry_name: str, metric: str,
             higher_is_better: bool, lineage: dict, block_on_quant: bool, log_weights: bool, tracking: dict) -> dict:
    from prefect import get_run_logger

    from alloy import registry

    uri, run_id = tracking["uri"], tracking["run_id"]
    registry.log(uri, run_id, metrics=metrics)
    passed = None if quant is None else bool(quant["passed"])
    blocked = block_on_quant and passed is False
    if not blocked and log_weights:
        registry.log_artifacts(uri, run_id, folders={"model": merged["out_dir"]})
    elif not blocked:
        registry.log_artifacts(uri, run_id, dicts={"model/alloy_pointer.json": {"path": merged["out_dir"]}})
    score = metrics.get(metric)
    reg = registry.register_candidate(uri, registry_name, run_id, metric=metric, score=score,
                                      higher_is_better=higher_is_better, lineage=lineage, quant_passed=passed,
                                      quant_reasons=(quant or {}).get("reasons"), block_on_quant=block_on_quant)  # fmt: skip
    log = get_run_logger()
    (log.info if reg.registered else log.warning)(f"{merged['name']}: {reg.reason}")
    return reg.to_dict()
