"""merge: one candidate through merging.engine.run_merge, logged to the candidate's MLflow run.

Retries are safe: the engine writes atomically and `resume=True` continues from a killed merge's verified shards.
A folder already holding this exact merge (same config, seed and input bytes, by its manifest) is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


def _same_merge(out_dir: Path, config_sha: str, seed: int, inputs: dict[str, dict[str, str]],
                side_paths: dict[str, str]) -> dict | None:
    try:
        manifest = json.loads((out_dir / "alloy_manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("config_sha256") != config_sha or manifest.get("seed") != seed:
        return None
    had = {i["model"]: i.get("files", {}) for i in manifest.get("inputs", [])}
    for name, files in inputs.items():
        # The manifest lists the files the engine read; each must still have the same bytes.
        if name not in had or any(files.get(f) != s for f, s in had[name].items()):
            return None
    for shard in manifest.get("outputs", {}):
        if not (out_dir / shard).is_file():
            return None
    from merging.hashing import file_sha256

    for side in manifest.get("side_inputs", []):  # Gram matrices recomputed since: merge again
        f = Path(side_paths.get(side["file"], side["file"]))  # the manifest has the name the config gave
        if not f.is_file() or file_sha256(f) != side["sha256"]:
            return None
    return manifest


def merge_candidate(name: str, config: dict, models: dict[str, dict], out_dir: str | Path, *, seed: int = 0,
                    shard_size: int | str = "2GB", dtype: str | None = None, device: str = "cpu",
                    card: dict | None = None, side_paths: dict[str, str] | None = None) -> dict:
    """Merge (or reuse) one candidate. `models`: {name: download info}; `side_paths`: where the files the config
    names for a method's side inputs are (RegMean's Grams). Returns a JSON-able summary."""
    from alloy.cmd_merge import parse_size
    from merging.config import parse_config
    from merging.engine import run_merge

    cfg = parse_config(config, f"candidate {name}")
    out = Path(out_dir).resolve()
    config_sha = hashlib.sha256(cfg.to_yaml().encode()).hexdigest()
    inputs = {m: models[m]["files"] for m in models}
    t0 = time.perf_counter()
    manifest = _same_merge(out, config_sha, seed, inputs, side_paths or {}) if out.is_dir() else None
    stats_file = out.parent / f".{out.name}.merge-stats.json"
    if manifest is not None:
        try:
            stats = json.loads(stats_file.read_text())
        except (OSError, ValueError):
            stats = {}
        stats.update(reused=True, reuse_seconds=round(time.perf_counter() - t0, 3))
    else:
        size = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
        res = run_merge(cfg, out, seed=seed, shard_size=size, dtype=dtype, device=device, resume=True, overwrite=True,
                        progress=False, model_paths={**{m: Path(i["path"]) for m, i in models.items()},
                                                     **{k: Path(v) for k, v in (side_paths or {}).items()}},
                        extra_card=card)  # fmt: skip
        manifest = res.manifest
        stats = {"seconds": res.seconds, "gb_per_s": res.gb_per_s, "peak_rss_bytes": res.peak_rss_bytes,
                 "bytes_in": res.bytes_in, "bytes_out": res.bytes_out, "n_tensors": res.n_tensors}  # fmt: skip
        tmp = stats_file.with_name(f"{stats_file.name}.{os.getpid()}.tmp")  # a kill leaves no half file
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
        os.replace(tmp, stats_file)
        stats["reused"] = False
    return {
        "name": name,
        "out_dir": str(out),
        "config_sha256": config_sha,
        "manifest_sha256": hashlib.sha256((out / "alloy_manifest.json").read_bytes()).hexdigest(),
        "weights_sha256": manifest.get("weights_sha256"),
        "config_yaml": cfg.to_yaml(),
        **stats,
    }


def merge_metrics(res: dict) -> dict[str, float]:
    out = {"merge.reused": float(res.get("reused", False))}
    for key in ("seconds", "gb_per_s", "n_tensors"):
        if key in res:
            out[f"merge.{key}"] = float(res[key])
    if "peak_rss_bytes" in res:
        out["merge.peak_rss_gb"] = res["peak_rss_bytes"] / 1e9
    if "bytes_in" in res:
        out["merge.gb_in"] = res["bytes_in"] / 1e9
        out["merge.gb_out"] = res["bytes_out"] / 1e9
    return out


@task(name="merge", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def merge(name: str, config: dict, models: dict[str, dict], out_dir: str, *, seed: int = 0,
          shard_size: int | str = "2GB", dtype: str | None = None, device: str = "cpu", card: dict | None = None,
          tracking: dict | None = None, side_paths: dict[str, str] | None = None) -> dict:
    from prefect import get_run_logger

    res = merge_candidate(name, config, models, out_dir, seed=seed, shard_size=shard_size, dtype=dtype,
                          device=device, card=card, side_paths=side_paths)  # fmt: skip
    how = "reused" if res["reused"] else f"{res['seconds']:.1f} s, {res['gb_per_s']:.2f} GB/s"
    get_run_logger().info(f"{name}: merged into {res['out_dir']} ({how})")
    if tracking:
        from alloy import registry

        out = Path(res["out_dir"])
        registry.log(tracking["uri"], tracking["run_id"], metrics=merge_metrics(res),
                     tags={"alloy.config_sha256": res["config_sha256"], "alloy.manifest_sha256": res["manifest_sha256"],
                           "alloy.weights_sha256": res["weights_sha256"], "alloy.merge_dir": res["out_dir"]})  # fmt: skip
        registry.log_artifacts(tracking["uri"], tracking["run_id"], texts={"config.yml": res["config_yaml"]},
                               files=[out / "README.md", out / "alloy_manifest.json"])  # fmt: skip
    return res
