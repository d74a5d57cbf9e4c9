"""demo_family: build the demo family (tiny from scratch, or SmolLM2 LoRA specialists), once.

The builders are deterministic, so a family built with the same settings (and, for smol, the same base bytes) is
reused: a stamp of those settings is written beside the family when it is built and compared on the next run.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

STAMP = ".alloy-pipeline-family.json"  # inside the family folder (the builders replace the folder whole)


def _stamp(kind: str, seed: int, options: dict, base: dict | None) -> dict:
    return {"kind": kind, "seed": seed, "options": options, "base_digest": (base or {}).get("digest")}


def _members(root: Path, skills: list[str], base_path: Path | None) -> dict:
    return {
        "root": str(root),
        "base": str(base_path or root / "base"),
        "specialists": {s: str(root / s) for s in skills},
        "data_dir": str(root / "data"),
    }


def build_family(kind: str, out_dir: str | Path, *, seed: int = 0, options: dict | None = None,
                 base: dict | None = None, log=None) -> dict:
    """{root, base, specialists: {skill: path}, data_dir, reused}; `base` is the downloaded base model (smol)."""
    from alloy.demo.skills import SKILLS

    options = dict(options or {})
    skills = list(options.get("skills") or SKILLS)
    root = Path(out_dir).resolve()
    stamp = _stamp(kind, seed, options, base)
    stamp_file = root / STAMP
    base_path = Path(base["path"]) if base else None
    try:
        if json.loads(stamp_file.read_text()) == stamp and all(Path(p).is_dir() for p in
                                                                 _members(root, skills, base_path)["specialists"].values()):  # fmt: skip
            return {**_members(root, skills, base_path), "reused": True}
    except (OSError, ValueError):
        pass
    if kind == "tiny":
        from alloy.demo.tiny import TEST_SIZE, TinySize, build_tiny_family

        size = options.pop("size", None)
        if size == "test":
            options["size"] = TEST_SIZE
        elif isinstance(size, dict):
            options["size"] = TinySize(**size)
        res = build_tiny_family(root, seed=seed, overwrite=True, log=log, **options)
    else:
        from alloy.demo.smol import build_smol_family

        res = build_smol_family(root, seed=seed, base_dir=base_path, overwrite=True, log=log, **options)
    stamp_file.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    out = _members(root, skills, base_path if kind == "smol" and base_path else None)
    out["base"] = str(res["base"])
    return {**out, "reused": False}


@task(name="demo-family", cache_policy=NO_CACHE)
def demo_family(kind: str, out_dir: str, seed: int, options: dict, base: dict | None = None,
                tracking: dict | None = None) -> dict:
    from prefect import get_run_logger

    log = get_run_logger()
    res = build_family(kind, out_dir, seed=seed, options=options, base=base, log=log.info)
    log.info(f"demo family ({kind}) {'reused' if res['reused'] else 'built'} at {res['root']}")
    if tracking:
        from alloy import registry

        registry.log(tracking["uri"], tracking["run_id"], params={"family.kind": kind, "family.seed": seed,
                                                                 **{f"family.{k}": v for k, v in options.items()}},
                     tags={"alloy.family_root": res["root"]})  # fmt: skip
    return res
