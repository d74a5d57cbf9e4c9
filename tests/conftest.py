"""Shared fixtures. ``tiny_family``: a tiny Llama family (base + one specialist per skill) built once.

Building takes about a minute on two loaded cores, so the family is kept between sessions in the temp folder,
keyed by the builder's source and settings and checked file by file before reuse (a test that wrote into it
gets a fresh build). ``ALLOY_TINY_FAMILY_REBUILD=1`` forces a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
# What the test family is: enough steps that the facts specialist is clearly above chance (see tests/eval).
TINY_FAMILY_ARGS = {"seed": 0, "base_steps": 120, "specialist_steps": 150, "n_eval": 60}


def _key() -> str:
    import torch

    h = hashlib.sha256(json.dumps([TINY_FAMILY_ARGS, torch.__version__], sort_keys=True).encode())
    for rel in ("alloy/demo/tiny.py", "alloy/demo/skills.py"):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "digests.json"}  # fmt: skip


def _intact(root: Path) -> bool:
    try:
        return json.loads((root / "digests.json").read_text()) == _digests(root)
    except (OSError, ValueError):
        return False


def build_cached_tiny_family(cache_root: Path):
    """The test family under ``cache_root/<key>``, built there if missing or altered."""
    from alloy.demo.tiny import TEST_SIZE, build_tiny_family, family_from_dict

    out = cache_root / f"tiny-family-{_key()}"
    if os.environ.get("ALLOY_TINY_FAMILY_REBUILD") or not _intact(out):
        cache_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_root))
        build_tiny_family(work / "family", size=TEST_SIZE, **TINY_FAMILY_ARGS)
        (work / "family" / "digests.json").write_text(json.dumps(_digests(work / "family"), indent=1))
        shutil.rmtree(out, ignore_errors=True)
        try:
            (work / "family").rename(out)
        except OSError:  # a concurrent session put an identical build there first
            pass
        shutil.rmtree(work, ignore_errors=True)
    paths = {
        "root": out,
        "base": out / "base",
        "specialists": {s: out / s for s in json.loads((out / "family.json").read_text())["skills"]},
        "data_dir": out / "data",
        "data_files": {p.stem if p.suffix == ".jsonl" and p.stem != "heldout" else
                       ("heldout_jsonl" if p.suffix == ".jsonl" else "heldout"): p
                       for p in sorted((out / "data").iterdir())},  # fmt: skip
    }
    return family_from_dict(paths)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """TinyFamily with ``.base``, ``.specialists`` ({skill: path}), ``.data_dir``, ``.data_files``, ``.root``.

    Read-only by convention: copy a checkpoint before changing it.
    """
    cache_root = tmp_path_factory.getbasetemp().parent / "alloy-test-cache"
    return build_cached_tiny_family(cache_root)
