"""alloy merge's command line: mergekit-yaml's option names and size units read as mergekit reads them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from alloy.cmd_merge import main, parse_size, parser
from merging.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent / "merging"))


@pytest.mark.parametrize("text, size", [("5B", 5 * 10**9), ("1b", 10**9), ("2GB", 2 * 10**9), ("500MB", 5 * 10**8),
                                        ("500M", 5 * 10**8), ("20KB", 20_000), ("1GiB", 2**30), ("4096", 4096)])
def test_sizes_as_mergekit_and_people_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5X", "", "-1GB", "0"])
def test_unreadable_size_names_the_option(text):
    with pytest.raises(ConfigError, match="--shard-size"):
        parse_size(text)


def test_mergekit_option_names():
    args = parser().parse_args(["c.yml", "out", "--random-seed", "3", "--cuda", "--out-shard-size", "5B",
                                "--lora-merge-cache", "lc"])
    assert (args.seed, args.device, args.shard_size, args.lora_merge_cache) == (3, "cuda", "5B", "lc")
    assert parser().parse_args(["c.yml", "out"]).device == "cpu"


def test_merge_with_mergekit_names_end_to_end(tmp_path):
    from family import make_family

    fam = make_family(tmp_path / "fam", n_finetunes=2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(fam["base"]),
                                   "parameters": {"density": 0.5, "weight": 0.5},
                                   "models": [{"model": str(fam["ft0"])}, {"model": str(fam["ft1"])}]}))
    assert main([str(cfg), str(tmp_path / "a"), "--random-seed", "5", "--out-shard-size", "40KB", "--no-progress"]) == 0
    assert main([str(cfg), str(tmp_path / "b"), "--seed", "5", "--shard-size", "40KB", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "a" / "alloy_manifest.json").read_text())
    assert manifest["seed"] == 5 and len(manifest["outputs"]) > 1
    assert manifest["tensors"] == json.loads((tmp_path / "b" / "alloy_manifest.json").read_text())["tensors"]
