"""gram: a model's Gram matrices for RegMean (alloy.cmd_gram.ensure_grams), reused while model and data are the same."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="gram", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def gram(name: str, model: dict, spec: dict, root: str) -> dict:
    from prefect import get_run_logger

    from alloy.cmd_gram import ensure_grams

    out = Path(root) / spec["file"]
    res = ensure_grams(model["path"], spec["data"], out, examples=spec["examples"], seed=spec["seed"])
    how = "reused" if res["reused"] else f"{res['seconds']:.1f} s"
    get_run_logger().info(f"{name}: Gram matrices on {spec['data']} ({res['tokens']} tokens) in {out} ({how})")
    return res
