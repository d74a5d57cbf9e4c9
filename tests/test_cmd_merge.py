"""alloy merge's command line: mergekit-yaml's option names and size units read as mergekit reads them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from alloy.cmd_merge import main, parse_size, parser
from merging.errors import ConfigError, InputError

sys.path.insert(0, str(Path(__file__).parent / "merging"))
from family import linear_of, write_cfg  # noqa: E402


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


def test_a_mergekit_yaml_command_line_runs_unchanged(tmp_path, capsys):
    from family import make_family

    fam = make_family(tmp_path / "fam", n_finetunes=2)
    for m in ("ft0", "ft1"):
        (fam[m] / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    cfg = write_cfg(tmp_path, linear_of(fam["ft0"], fam["ft1"]))
    assert main([str(cfg), str(tmp_path / "plain"), "--no-progress"]) == 0
    plain = tmp_path / "plain"
    assert (plain / "README.md").is_file() and (plain / "tokenizer_config.json").is_file()
    capsys.readouterr()
    # a typical mergekit-yaml line: options alloy acts on and options that ask for what it always does
    assert main([str(cfg), str(tmp_path / "mk"), "--cuda", "--no-cuda", "--allow-crimes", "--lazy-unpickle",
                 "--low-cpu-memory", "--no-read-to-gpu", "--async-write", "--write-threads", "2", "--clone-tensors",
                 "--trust-remote-code", "--safe-serialization", "-j", "1", "--out-shard-size", "5B",
                 "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]) == 0
    mk = tmp_path / "mk"
    assert capsys.readouterr().out == ""  # --quiet: no summary line
    assert not any((mk / f).exists() for f in ("README.md", "mergekit_config.yml", "tokenizer_config.json"))
    manifest = json.loads((mk / "alloy_manifest.json").read_text())
    assert manifest["tokenizer_files"] == [] and manifest["device"] == "cpu"
    assert manifest["tensors"] == json.loads((plain / "alloy_manifest.json").read_text())["tensors"]


def test_allow_crimes_merges_models_whose_configs_name_different_architectures(tmp_path):
    from family import make_family

    fam = make_family(tmp_path / "fam", n_finetunes=2)
    cfg_file = fam["ft1"] / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "architectures": ["MistralForCausalLM"]}))
    cfg = write_cfg(tmp_path, linear_of(fam["ft0"], fam["ft1"]))
    with pytest.raises(InputError, match="architectures differ: .*--allow-crimes"):
        main([str(cfg), str(tmp_path / "no"), "--no-progress"])
    assert not (tmp_path / "no").exists()
    assert main([str(cfg), str(tmp_path / "yes"), "--no-progress", "--allow-crimes"]) == 0
    assert (tmp_path / "yes" / "alloy_manifest.json").is_file()


@pytest.mark.parametrize("flag, words", [("--no-safe-serialization", "safetensors only"),
                                         ("--unsafe-truncate-embeddings", "tokenizer section"),
                                         ("-j=0", "--num-threads")])
def test_mergekit_options_alloy_refuses_say_why_before_anything_is_read(tmp_path, flag, words):
    with pytest.raises(ConfigError, match=words):
        main([str(tmp_path / "missing.yml"), str(tmp_path / "out"), flag])
    assert not (tmp_path / "out").exists()


def test_transformers_cache_is_where_hub_ids_are_found(tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as c
    from family import make_family

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    fam = make_family(tmp_path / "fam", n_finetunes=2)
    cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(fam["ft0"], repo / "snapshots" / commit)
    monkeypatch.chdir(tmp_path)
    cfg = write_cfg(tmp_path, linear_of("org/tiny", fam["ft1"]))
    with pytest.raises(InputError, match="org/tiny.*not in the local Hugging Face cache"):
        main([str(cfg), str(tmp_path / "a"), "--no-progress"])
    assert main([str(cfg), str(tmp_path / "a"), "--no-progress", "--transformers-cache", str(cache)]) == 0
    inputs = json.loads((tmp_path / "a" / "alloy_manifest.json").read_text())["inputs"]
    assert inputs[0]["model"] == "org/tiny" and set(inputs[0]["files"]) == {p.name for p in fam["ft0"].glob("*.safetensors")}


@pytest.fixture
def alloy_log_level():
    import logging

    logger = logging.getLogger("alloy")
    before = logger.level
    yield
    logger.setLevel(before)  # main() sets it for -v; later tests must not see alloy's debug records


def test_verbose_logs_the_plan_and_each_shard_and_more_with_vv(tmp_path, caplog, alloy_log_level):
    from family import make_family

    fam = make_family(tmp_path / "fam", n_finetunes=2)
    cfg = write_cfg(tmp_path, linear_of(fam["ft0"], fam["ft1"]))
    assert main([str(cfg), str(tmp_path / "a"), "--no-progress", "--out-shard-size", "40KB", "-v"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "alloy"]
    shards = json.loads((tmp_path / "a" / "alloy_manifest.json").read_text())["outputs"]
    assert any(m.startswith("alloy: linear: ") and f"into {len(shards)} of {len(shards)} shards" in m for m in lines)
    assert sorted(m.removeprefix("alloy: wrote ") for m in lines if m.startswith("alloy: wrote ")) == sorted(shards)
    assert not any("model.layers.0.mlp.up_proj.weight" in m for m in lines)  # per tensor: -vv only
    caplog.clear()
    assert main([str(cfg), str(tmp_path / "b"), "--no-progress", "-vv"]) == 0
    assert any(m.startswith("alloy: model.layers.0.mlp.up_proj.weight (") for m in (r.getMessage() for r in caplog.records))
