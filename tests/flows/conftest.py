"""Fixtures for the pipeline tests: an isolated Prefect home, offline Hugging Face, and a tiny trained family."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_env import isolate_env  # noqa: E402

isolate_env()  # before prefect is imported anywhere in this session


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory) -> Path:
    """A tiny Llama family (base + 3 specialists + eval data), trained for a few steps: seconds, not minutes."""
    from alloy.demo.tiny import TEST_SIZE, build_tiny_family

    out = tmp_path_factory.mktemp("family") / "tiny"
    build_tiny_family(out, seed=0, base_steps=20, specialist_steps=8, size=TEST_SIZE, n_eval=8)
    return out
