"""quant_check: does the merge survive int8/int4 round-to-nearest? (eval.quant.quant_check), logged to MLflow.

The report is kept beside the merge, keyed by the model's content, the held-out texts and the thresholds, so a
re-run of an unchanged candidate does not redo the forward passes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

# The metrics a comparison table shows; the rest go to MLflow only.
HEADLINE = ("int8_kl", "int4_kl", "int8_top1", "int4_top1", "int4_ppl_ratio", "max_scale_ratio", "max_outlier_ratio")


def _key(model_digest: str, texts: list[str], thresholds: dict, max_tokens: int, baseline: dict | None) -> str:
    base = (baseline or {}).get("metrics")
    blob = json.dumps([model_digest, texts, thresholds, max_tokens, base], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_model(model_dir: str | Path, texts_file: str | Path, thresholds: dict | None = None, *,
                max_tokens: int = 1024, model_digest: str | None = None, cache_file: str | Path | None = None,
                baseline: dict | None = None) -> dict:
    """QuantReport.to_dict() plus `cached`; cached in `cache_file` when the model digest is known.
    `baseline`: another model's report on the same texts (the merge's base): adds the *_vs_baseline checks."""
    from eval.quant import quant_check, read_texts

    texts = read_texts([texts_file])  # as `alloy quant-check --text` reads it: the flow and dvc.yaml measure the same
    key = _key(model_digest, texts, thresholds or {}, max_tokens, baseline) if model_digest else None
    if cache_file and key:
        try:
            hit = json.loads(Path(cache_file).read_text())
            if hit.get("key") == key:
                return {**hit["report"], "cached": True}
        except (OSError, ValueError, KeyError):
            pass
    report = quant_check(model_dir, texts, thresholds or {}, max_tokens=max_tokens, baseline=baseline).to_dict()
    if cache_file and key:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_file).with_name(f".{Path(cache_file).name}.{os.getpid()}.tmp")  # a kill leaves no half file
        tmp.write_text(json.dumps({"key": key, "report": report}, indent=1, default=str) + "\n")
        os.replace(tmp, cache_file)
    return {**report, "cached": False}


@task(name="quant-check", cache_policy=NO_CACHE)
def quant(merged: dict, texts_file: str, thresholds: dict, *, max_tokens: int = 1024, cache_dir: str | None = None,
          baseline: dict | None = None, tracking: dict | None = None) -> dict:
    """`merged`: a merge task's result, or a downloaded model ({name, path, digest}) for a baseline report."""
    from prefect import get_run_logger

    stem = merged["name"] if "out_dir" in merged else f"model-{merged['name']}"  # a merge, or an input model
    cache = Path(cache_dir) / f"{stem}.quant.json" if cache_dir else None
    rep = check_model(merged.get("out_dir") or merged["path"], texts_file, thresholds, max_tokens=max_tokens,
                      model_digest=merged.get("weights_sha256") or merged.get("digest"), cache_file=cache,
                      baseline=baseline)  # fmt: skip
    log = get_run_logger()
    how = " (cached)" if rep.get("cached") else ""
    if rep["passed"]:
        log.info(f"{merged['name']}: quantisation check passed (int8 KL {rep['metrics'].get('int8_kl', float('nan')):.3g}, "
                 f"int4 KL {rep['metrics'].get('int4_kl', float('nan')):.3g}){how}")  # fmt: skip
    else:
        log.warning(f"{merged['name']}: quantisation check FAILED{how}: " + "; ".join(rep["reasons"]))
    if tracking:
        from alloy import registry

        registry.log(tracking["uri"], tracking["run_id"],
                     metrics={"quant.passed": float(rep["passed"]), **{f"quant.{k}": v for k, v in rep["metrics"].items()}},
                     tags={"alloy.quant": "passed" if rep["passed"] else "FAILED: " + "; ".join(rep["reasons"])})  # fmt: skip
        registry.log_artifacts(tracking["uri"], tracking["run_id"], dicts={"quant_report.json": rep})
    return rep
