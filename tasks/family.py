"""demo_family: build the demo family (tiny from scratch, or SmolLM2 LoRA specialists), once.

The builders are deterministic, so a family built with the same settings (and, for smol, the same base bytes) is
reused: a stamp of those settings is written beside the family when it is built and compared on the next run.
The stamp lies next to the folder, not in it, so the folder holds exactly what the builder wrote: the bytes that
dvc.yaml's `family` stage records (a family built by `make demo` can be `dvc commit`ted as that stage's output).
It holds the digest of the family's family.json too, so a folder rebuilt by anything else is not taken for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

LEGACY_STAMP = ".alloy-pipeline-family.json"  # where earlier versions kept the stamp: inside the family folder


def stamp_path(root: Path) -> Path:
    return root.with_name(f".{root.name}.alloy-family.json")


def _family_digest(root: Path) -> str | None:
    try:
        return hashlib.sha256((root / "family.json").read_bytes()).hexdigest()
    except OSError:
        return None


def _write_stamp(root: Path, stamp: dict) -> None:
    text = json.dumps({**stamp, "family_json": _family_digest(root)}, indent=2, sort_keys=True) + "\n"
    stamp_path(root).write_text(text)


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
    stamp_file = stamp_path(root)
    base_path = Path(base["path"]) if base else None
    legacy = root / LEGACY_STAMP
    if legacy.is_file() and not stamp_file.exists():  # written by alloy before the stamp moved beside the folder
        try:
            if json.loads(legacy.read_text()) == stamp:
                _write_stamp(root, stamp)
                legacy.unlink()
        except (OSError, ValueError):
            pass
    try:
        found = json.loads(stamp_file.read_text())
        built = found.pop("family_json", None)
        members = _members(root, skills, base_path)
        if found == stamp and built == _family_digest(root) and all(Path(p).is_dir() for p in
                                                                   members["specialists"].values()):  # fmt: skip
            return {**members, "reused": True}
    except (OSError, ValueError, AttributeError):
        pass
    if kind == "tiny":
        from alloy.demo.tiny import TEST_SIZE, TinySize, build_tiny_family

        kwargs = dict(options)  # the stamp keeps the options as given ("test", a dict), JSON-able
        size = kwargs.pop("size", None)
        if size == "test":
            kwargs["size"] = TEST_SIZE
        elif isinstance(size, dict):
            kwargs["size"] = TinySize(**size)
        res = build_tiny_family(root, seed=seed, overwrite=True, log=log, **kwargs)
    else:
        from alloy.demo.smol import build_smol_family

        res = build_smol_family(root, seed=seed, base_dir=base_path, overwrite=True, log=log, **options)
    _write_stamp(root, stamp)
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
