"""alloy moe: dense models as a Mixtral mixture, against mergekit-moe and through transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merging.errors import ConfigError, InputError
from merging.moe import build_moe
from family import make_family, write_cfg


def save_word_tokenizer(path: Path, vocab: list[str]) -> None:
    """One token per whitespace-separated word (`w12` is one token), so prompts route by their words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(str(path))


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    out = make_family(tmp_path_factory.mktemp("moe"), n_finetunes=3)
    for folder in out.values():
        save_word_tokenizer(folder, ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(92)])
    return out


def _config(fam: dict[str, Path], mode: str, **extra) -> dict:
    cfg = {"base_model": str(fam["base"]), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
           "experts": [
               {"source_model": str(fam["ft0"]), "positive_prompts": ["w1 w2 w3", "w4 w5"], "negative_prompts": ["w9"]},
               {"source_model": str(fam["ft1"]), "positive_prompts": ["w10 w11", "w12"]},
               {"source_model": str(fam["ft2"]), "positive_prompts": ["w20 w30 w40 w50"], "residual_scale": 0.5}]}
    cfg.update(extra)
    return cfg


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden", "hidden_avg", "random", "uniform_random"])
def test_same_mixture_as_mergekit_moe(fam, tmp_path, mode):
    from click.testing import CliRunner
    from mergekit.scripts.moe import main as mergekit_moe

    cfg = _config(fam, mode)
    if mode == "random":
        cfg["experts"][1]["noise_scale"] = 0.01  # drawn after the gates, in mergekit's order
    path = write_cfg(tmp_path, cfg)
    build_moe(path, tmp_path / "ours", seed=7)
    res = CliRunner().invoke(mergekit_moe, [str(path), str(tmp_path / "theirs"), "--random-seed", "7", "--quiet"])
    assert res.exit_code == 0, res.output
    ours, theirs = _state(tmp_path / "ours"), _state(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == json.loads(
        (tmp_path / "theirs" / "config.json").read_text())
    gate = ours["model.layers.0.mlp.gate.weight"]  # the experts' prompts point three different ways
    cos = torch.nn.functional.normalize(gate, dim=1) @ torch.nn.functional.normalize(gate, dim=1).T
    assert gate.shape == (3, 64) and (cos - torch.eye(3)).abs().max() < 0.95


def test_experts_are_the_models_mlps_and_a_mixture_of_one_model_is_that_model(fam, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    build_moe(write_cfg(tmp_path, _config(fam, "cheap_embed")), tmp_path / "mix")
    out = load_file(tmp_path / "mix" / "model.safetensors")
    ft1 = load_file(fam["ft1"] / "model.safetensors")
    assert torch.equal(out["model.layers.2.block_sparse_moe.experts.1.w3.weight"],
                       ft1["model.layers.2.mlp.up_proj.weight"])
    ft2 = load_file(fam["ft2"] / "model.safetensors")
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.2.w2.weight"],
                       0.5 * ft2["model.layers.0.mlp.down_proj.weight"])  # residual_scale
    # every expert the base itself, routed to all of them: the routing weights sum to 1, so the base's logits
    same = _config(fam, "random", experts_per_token=3)
    for e in same["experts"]:
        e.update(source_model=str(fam["base"]), residual_scale=None)
    with pytest.raises(ConfigError, match="every expert is the same model"):
        build_moe(write_cfg(tmp_path, same, "same.yml"), tmp_path / "same")
    build_moe(write_cfg(tmp_path, same, "same.yml"), tmp_path / "same", allow_all_same=True)
    ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(fam["base"])(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "same")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_shards_and_tokenizer(fam, tmp_path):
    from transformers import AutoTokenizer

    build_moe(write_cfg(tmp_path, _config(fam, "random")), tmp_path / "mix", shard_size=200_000)
    index = json.loads((tmp_path / "mix" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(_state(tmp_path / "mix")) == 30
    assert AutoTokenizer.from_pretrained(tmp_path / "mix")("w1 w2")["input_ids"] == [5, 6]  # the base's tokenizer


@pytest.mark.parametrize("change,message", [
    ({"experts_per_token": 4}, "experts: 3 expert\\(s\\), fewer than experts_per_token \\(4\\)"),
    ({"shared_experts": [{"source_model": "x"}]}, "shared_experts: Mixtral has no shared experts"),
    ({"architecture": "qwen"}, "architecture: 'qwen': alloy writes Mixtral mixtures only"),
    ({"gate_mode": "hiden"}, "gate_mode: Input should be 'hidden'"),
    ({"expert_per_token": 1}, "expert_per_token: Extra inputs are not permitted"),
])
def test_bad_configs_name_their_key(fam, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        build_moe(write_cfg(tmp_path, _config(fam, "cheap_embed", **change)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompts_are_needed_and_must_differ(fam, tmp_path):
    cfg = _config(fam, "hidden")
    del cfg["experts"][1]["positive_prompts"]
    with pytest.raises(ConfigError, match="experts\\[1\\].positive_prompts: gate_mode hidden routes by prompts"):
        build_moe(write_cfg(tmp_path, cfg), tmp_path / "out")
    cfg = _config(fam, "hidden")
    for e in cfg["experts"]:
        e.update(positive_prompts=["w1"], negative_prompts=None)
    with pytest.raises(ConfigError, match="every expert has the same prompts"):
        build_moe(write_cfg(tmp_path, cfg), tmp_path / "out")


def test_inputs_that_cannot_be_experts(fam, tmp_path):
    import transformers as tf

    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)).save_pretrained(tmp_path / "gpt2")
    cfg = _config(fam, "random")
    cfg["experts"][0]["source_model"] = str(tmp_path / "gpt2")
    with pytest.raises(InputError, match="takes Llama or Mistral models, all of one type .*gpt2"):
        build_moe(write_cfg(tmp_path, cfg), tmp_path / "out")
    wide = make_family(tmp_path / "wide", n_finetunes=0, hidden=32)
    cfg = _config(fam, "random")
    cfg["experts"][2]["source_model"] = str(wide["base"])
    with pytest.raises(InputError, match="experts must be the base's size"):
        build_moe(write_cfg(tmp_path, cfg), tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="out: exists; pass --overwrite"):
        build_moe(write_cfg(tmp_path, _config(fam, "random")), tmp_path / "out")


def test_command_line(fam, tmp_path):
    path = write_cfg(tmp_path, _config(fam, "cheap_embed"))
    r = subprocess.run([sys.executable, "-m", "alloy", "moe", str(path), str(tmp_path / "mix")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "mixture of 3 experts (2 per token, gates: cheap_embed)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "alloy", "moe", str(path), str(tmp_path / "mix")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--overwrite" in r.stderr
    assert yaml.safe_load((tmp_path / "mix" / "mergekit_moe_config.yml").read_text())["gate_mode"] == "cheap_embed"
    card = (tmp_path / "mix" / "README.md").read_text()
    assert "a Mixtral mixture of 3 experts, 2 per token" in card and "1. `" + str(fam["ft1"]) + "`: 'w10 w11', 'w12'" in card
    assert "base_model" not in card.split("---")[1]  # local folders only: no hub id to name


def test_card_names_hub_models_only(fam):
    from merging.moe import MoEConfig, moe_card

    config = MoEConfig.model_validate(_config(fam, "random"))
    card = moe_card(config, "gate_mode: random\n", [Path("/cache/models--org--base/snapshots/0123abc"),
                                                   Path("/data/local-expert")])
    assert card.startswith("---\nbase_model:\n- org/base\nlibrary_name: transformers\n")
