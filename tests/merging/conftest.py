import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from family import make_family  # noqa: E402


@pytest.fixture(scope="session")
def family_fp32(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam32"), dtype=__import__("torch").float32, seed=0)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam16"), dtype=__import__("torch").bfloat16, seed=1, shards=2)
