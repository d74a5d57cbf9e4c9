"""Multi-module models (a VLM: text decoder, vision tower, projector), merged as mergekit merges them.

The family is a tiny random Mistral3ForConditionalGeneration (3 text layers, 4 vision layers, so the two stacks
differ in depth) and two fine-tunes of it, saved by transformers; mergekit 0.1.5 is the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merging.config import load_config
from merging.engine import run_merge
from merging.errors import ConfigError
from merging.modules import module_of
from merging.plan import build_plan
from test_parity import assert_same, load_dir, run_mergekit
from family import llama_shapes, tiny_config, write_cfg, write_model

TEXT_LAYERS, VISION_LAYERS = 3, 4


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> dict[str, Path]:
    import transformers as tf

    text = tf.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=TEXT_LAYERS,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS,
                                    num_attention_heads=4, head_dim=8, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(text_config=text, vision_config=vision,
                                                                  spatial_merge_size=2))
    root = tmp_path_factory.mktemp("vlm")
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    out = {}
    with torch.no_grad():
        for p in params.values():  # no norm left at exactly one, no bias at zero
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        orig = {n: p.clone() for n, p in params.items()}
        out["base"] = root / "base"
        model.save_pretrained(out["base"])
        for k in range(2):
            for n, p in params.items():
                p.copy_(orig[n] + 0.02 * torch.randn(p.shape, generator=g))
            out[f"ft{k}"] = root / f"ft{k}"
            model.save_pretrained(out[f"ft{k}"])
    return out


def _both(cfg: dict, tmp_path: Path) -> tuple[dict, dict]:
    run_merge(write_cfg(tmp_path, cfg), tmp_path / "ours", progress=False, copy_tokenizer=False)
    run_mergekit(cfg, tmp_path / "theirs")
    return load_dir(tmp_path / "ours"), load_dir(tmp_path / "theirs")


def _vision_layers(tensors: dict) -> set[int]:
    return {int(n.split(".")[3]) for n in tensors if n.startswith("vision_tower.transformer.layers.")}


def test_models_merge_every_module_at_its_own_depth(vlm, tmp_path):
    # the vision tower is deeper than the text decoder: its last layer was dropped when layers were counted once
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(vlm[k]), "parameters": {"weight": w}} for k, w in (("ft0", 0.3), ("ft1", 0.7))]}
    ours, theirs = _both(cfg, tmp_path)
    assert _vision_layers(ours) == set(range(VISION_LAYERS))
    assert_same(ours, theirs, torch.float32)
    assert set(ours) == set(load_dir(vlm["base"]))


def test_module_parameters_and_gradients_as_in_mergekit(vlm, tmp_path):
    both = [{"model": str(vlm["ft0"])}, {"model": str(vlm["ft1"])}]
    cfg = {"merge_method": "slerp", "base_model": str(vlm["ft0"]), "dtype": "float32",
           "parameters": {"t": 0.3},  # the projector's, from the top level
           "modules": {
               "text_decoder": {"models": both, "parameters": {"t": [0, 0.5, 1]}},
               "vision_tower": {"models": both,
                                "parameters": {"t": [{"filter": "mlp", "value": 0.8}, {"value": [1, 0.2]}]}},
               "multi_modal_projector": {"models": both}}}
    ours, theirs = _both(cfg, tmp_path)
    assert_same(ours, theirs, torch.float32)
    # the vision gradient runs over the vision tower's own four layers: its last layer is at t = 0.2, the first at 1
    a, b = (load_dir(vlm[k]) for k in ("ft0", "ft1"))
    name = f"vision_tower.transformer.layers.{VISION_LAYERS - 1}.attention_norm.weight"
    assert not torch.allclose(ours[name], b[name]) and not torch.allclose(ours[name], a[name])
    first = "vision_tower.transformer.layers.0.attention_norm.weight"
    torch.testing.assert_close(ours[first], b[first])


def test_ties_with_a_module_density(vlm, tmp_path):
    fts = [{"model": str(vlm[k]), "parameters": {"weight": 0.5}} for k in ("ft0", "ft1")]
    cfg = {"merge_method": "ties", "base_model": str(vlm["base"]), "dtype": "float32",
           "parameters": {"density": 0.5},
           "modules": {m: {"models": fts, **({"parameters": {"density": 0.9}} if m == "vision_tower" else {})}
                       for m in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    ours, theirs = _both(cfg, tmp_path)
    assert_same(ours, theirs, torch.float32)


def test_frankenmerge_of_the_text_decoder_keeps_the_vision_tower_and_loads(vlm, tmp_path):
    from transformers import Mistral3ForConditionalGeneration

    cfg = {"merge_method": "passthrough", "dtype": "float32", "modules": {
        "text_decoder": {"slices": [{"sources": [{"model": str(vlm["ft0"]), "layer_range": [0, 2]}]},
                                    {"sources": [{"model": str(vlm["ft1"]), "layer_range": [1, 3]}]}]},
        "vision_tower": {"models": [{"model": str(vlm["ft0"])}]},
        "multi_modal_projector": {"models": [{"model": str(vlm["ft1"])}]}}}
    ours, theirs = _both(cfg, tmp_path)
    assert_same(ours, theirs, torch.float32)
    out_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert out_cfg["text_config"]["num_hidden_layers"] == 4
    assert out_cfg["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    b = load_dir(vlm["ft1"])
    torch.testing.assert_close(ours["language_model.model.layers.3.mlp.up_proj.weight"],
                               b["language_model.model.layers.2.mlp.up_proj.weight"])
    model = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert len(model.model.language_model.layers) == 4


def _refused(cfg: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        build_plan(load_config(write_cfg(tmp_path, cfg)))
    return str(e.value)


def test_a_module_left_out_is_refused(vlm, tmp_path):
    # mergekit writes the listed modules only: a Mistral3 without its vision tower, which no longer loads
    models = [{"model": str(vlm["ft0"])}, {"model": str(vlm["ft1"])}]
    msg = _refused({"merge_method": "linear", "modules": {"text_decoder": {"models": models}}}, tmp_path)
    assert "vision_tower" in msg and "not listed" in msg


def test_unknown_module_names_the_known_ones(vlm, tmp_path):
    models = [{"model": str(vlm["ft0"])}]
    msg = _refused({"merge_method": "passthrough", "modules": {"vision": {"models": models}}}, tmp_path)
    assert msg.startswith("modules.vision: did you mean 'vision_tower'?")
    assert "text_decoder, vision_tower, multi_modal_projector" in msg


def test_slices_on_a_modular_model_are_refused(vlm, tmp_path):
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": str(vlm["ft0"]), "layer_range": [0, 2]}]}]}
    assert "cut them with modules:" in _refused(cfg, tmp_path)


def test_module_with_both_models_and_slices_names_its_key(tmp_path):
    cfg = {"merge_method": "linear", "modules": {"text_decoder": {
        "models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}}}
    with pytest.raises(ConfigError, match=r"modules\.text_decoder: a module takes exactly one of 'models' or 'slices'"):
        load_config(write_cfg(tmp_path, cfg))


def test_module_parameter_names_are_checked_with_their_path(vlm, tmp_path):
    models = [{"model": str(vlm["ft0"])}]
    cfg = {"merge_method": "linear", "modules": {
        m: {"models": models, **({"parameters": {"wieght": 1.0}} if m == "vision_tower" else {})}
        for m in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    assert _refused(cfg, tmp_path).startswith("modules.vision_tower.parameters.wieght: method 'linear' has no "
                                              "parameter 'wieght' (did you mean 'weight'?)")


def test_default_module_of_a_one_module_model(tmp_path):
    # mergekit names the one module of every other architecture `default`; its parameters rank below the models'
    cfg0 = tiny_config(layers=2)
    g = torch.Generator().manual_seed(0)
    paths = []
    for k in range(2):
        tensors = {n: torch.randn(s, generator=g) for n, s in llama_shapes(cfg0).items()}
        paths.append(write_model(tmp_path / f"m{k}", tensors, cfg0))
    cfg = {"merge_method": "linear", "modules": {"default": {
        "models": [{"model": str(paths[0]), "parameters": {"weight": 0.25}}, {"model": str(paths[1])}],
        "parameters": {"weight": 0.75}}}}
    ours, theirs = _both(cfg, tmp_path)
    assert_same(ours, theirs, torch.float32)
    a, b = load_dir(paths[0]), load_dir(paths[1])
    torch.testing.assert_close(ours["model.norm.weight"], 0.25 * a["model.norm.weight"] + 0.75 * b["model.norm.weight"])


def test_gpt2_files_without_a_prefix_have_layers(tmp_path):
    # GPT-2's own checkpoints name layers `h.0.attn...` (no `transformer.`): slices must find them
    g = torch.Generator().manual_seed(0)
    shapes = {"wte.weight": (16, 8), "wpe.weight": (8, 8), "ln_f.weight": (8,)}
    for i in range(3):
        shapes.update({f"h.{i}.attn.c_attn.weight": (8, 24), f"h.{i}.ln_1.weight": (8,)})
    model = write_model(tmp_path / "gpt2", {n: torch.randn(s, generator=g) for n, s in shapes.items()},
                        {"architectures": ["GPT2Model"], "model_type": "gpt2", "n_layer": 3})
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(model), "layer_range": [1, 3]}]}]}
    run_merge(write_cfg(tmp_path, cfg), tmp_path / "out", progress=False, copy_tokenizer=False)
    out, src = load_dir(tmp_path / "out"), load_dir(model)
    assert sorted(n for n in out if n.startswith("h.")) == sorted(
        f"h.{i}.{x}" for i in range(2) for x in ("attn.c_attn.weight", "ln_1.weight"))
    torch.testing.assert_close(out["h.0.ln_1.weight"], src["h.1.ln_1.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == 2


@pytest.mark.parametrize("arch,name,module", [
    ("Mistral3ForConditionalGeneration", "language_model.model.layers.0.mlp.up_proj.weight", "text_decoder"),
    ("Mistral3ForConditionalGeneration", "model.language_model.layers.0.mlp.up_proj.weight", "text_decoder"),
    ("Mistral3ForConditionalGeneration", "lm_head.weight", "text_decoder"),
    ("Mistral3ForConditionalGeneration", "model.vision_tower.transformer.layers.0.ffn_norm.weight", "vision_tower"),
    ("Gemma3ForConditionalGeneration", "multi_modal_projector.mm_input_projection_weight", "multi_modal_projector"),
    ("Qwen2VLForConditionalGeneration", "model.layers.0.mlp.up_proj.weight", "text_decoder"),
    ("Qwen2VLForConditionalGeneration", "visual.blocks.0.mlp.fc1.weight", "vision_tower"),
    ("Qwen2VLForConditionalGeneration", "visual.merger.mlp.0.weight", "multi_modal_projector"),
    ("Qwen3VLForConditionalGeneration", "model.visual.deepstack_merger_list.0.norm.weight", "multi_modal_projector"),
    ("WhisperForConditionalGeneration", "model.encoder.conv1.weight", "encoder"),
    ("WhisperForConditionalGeneration", "proj_out.weight", "decoder"),
    ("LlamaForCausalLM", "model.layers.0.mlp.up_proj.weight", "default"),
    ("Mistral3ForConditionalGeneration", "image_newline", None),
])
def test_module_of_takes_the_longest_prefix(arch, name, module):
    assert module_of(arch, name) == module


def test_inspect_keeps_the_stacks_apart(vlm, tmp_path):
    from merging.inspect import inspect_merge

    fts = [{"model": str(vlm[k])} for k in ("ft0", "ft1")]
    cfg = {"merge_method": "ties", "base_model": str(vlm["base"]), "parameters": {"density": 0.5, "weight": 1.0},
           "modules": {m: {"models": fts} for m in ("text_decoder", "vision_tower", "multi_modal_projector")}}
    report = inspect_merge(write_cfg(tmp_path, cfg))
    assert list(report["layers"]) == ([f"language_model.model.layers.{i}" for i in range(TEXT_LAYERS)]
                                      + [f"vision_tower.transformer.layers.{i}" for i in range(VISION_LAYERS)])


def test_t5_blocks_are_layers_and_every_tensor_is_merged(tmp_path):
    # T5's `decoder.block.N.layer.2.DenseReluDense` was read as layer 2 of a stack `decoder.block.N.layer`, cut at
    # the config's num_layers (2): the decoder's feed-forward sublayers were dropped without a word
    import transformers as tf

    cfg = tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=4)
    paths = []
    for k in range(2):
        torch.manual_seed(k)
        tf.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / f"m{k}")
        paths.append(tmp_path / f"m{k}")
    merge = {"merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, (0.3, 0.7))]}
    run_merge(write_cfg(tmp_path, merge), tmp_path / "out", progress=False, copy_tokenizer=False)
    out, a, b = load_dir(tmp_path / "out"), load_dir(paths[0]), load_dir(paths[1])
    assert set(out) == set(a)
    for name in out:
        torch.testing.assert_close(out[name], 0.3 * a[name] + 0.7 * b[name])


def _tiny(arch: str):
    import transformers as tf

    text = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    if arch == "gemma3":
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8)
        return tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**text),
                                                                 vision_config=vision, mm_tokens_per_image=4))
    if arch == "qwen2_vl":
        return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(
            text_config=dict(**text), vision_config=dict(depth=3, embed_dim=32, hidden_size=32, num_heads=4,
                                                         mlp_ratio=2), bos_token_id=1, eos_token_id=2))
    return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=96, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=32,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[]))


# the modules of each architecture, and which of them carry a layer stack whose depth config.json records
MODULE_DEPTHS = {"gemma3": {"text_decoder": ("text_config.num_hidden_layers", 2),
                            "vision_tower": ("vision_config.num_hidden_layers", 3), "multi_modal_projector": None},
                 "qwen2_vl": {"text_decoder": ("text_config.num_hidden_layers", 2),
                              "vision_tower": ("vision_config.depth", 3), "multi_modal_projector": None},
                 "whisper": {"encoder": ("encoder_layers", 3), "decoder": ("decoder_layers", 2)}}


@pytest.mark.parametrize("arch", sorted(MODULE_DEPTHS))
def test_each_module_takes_its_own_weights_and_frankenmerge_depth(arch, tmp_path):
    """Per-module weights land on exactly that module's tensors (so the name -> module table fits the checkpoints
    transformers saves), and a module's stack cut by slices changes its own depth key only; transformers loads it."""
    from merging.modules import architecture
    import transformers as tf

    torch.manual_seed(0)
    paths = []
    for k in range(2):
        model = _tiny(arch)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape))
        model.save_pretrained(tmp_path / f"m{k}")
        paths.append(tmp_path / f"m{k}")
    a, b = load_dir(paths[0]), load_dir(paths[1])
    arch_name = architecture(json.loads((paths[0] / "config.json").read_text()))
    weights = {m: 0.1 * (i + 1) for i, m in enumerate(MODULE_DEPTHS[arch])}
    cfg = {"merge_method": "linear", "dtype": "float32", "modules": {
        m: {"models": [{"model": str(paths[0]), "parameters": {"weight": w}},
                       {"model": str(paths[1]), "parameters": {"weight": 1 - w}}]} for m, w in weights.items()}}
    run_merge(write_cfg(tmp_path, cfg), tmp_path / "lin", progress=False, copy_tokenizer=False)
    out = load_dir(tmp_path / "lin")
    assert set(out) == set(a)
    seen = set()
    for name, t in out.items():
        w = weights[module_of(arch_name, name)]
        seen.add(module_of(arch_name, name))
        torch.testing.assert_close(t, w * a[name] + (1 - w) * b[name])
    assert seen == set(weights)
    # cut the deepest stack to one layer, the others whole
    deep = max((m for m, d in MODULE_DEPTHS[arch].items() if d), key=lambda m: MODULE_DEPTHS[arch][m][1])
    cut = {m: ({"slices": [{"sources": [{"model": str(paths[0]), "layer_range": [1, 2]}]}]} if m == deep
               else {"models": [{"model": str(paths[1])}]}) for m in MODULE_DEPTHS[arch]}
    run_merge(write_cfg(tmp_path, {"merge_method": "passthrough", "modules": cut}), tmp_path / "cut", progress=False,
              copy_tokenizer=False)
    out_cfg = json.loads((tmp_path / "cut" / "config.json").read_text())
    for m, d in MODULE_DEPTHS[arch].items():
        if d:
            node = out_cfg
            for part in d[0].split("."):
                node = node[part]
            assert node == (1 if m == deep else d[1]), (m, d)
    loaded = getattr(tf, type(_tiny(arch)).__name__).from_pretrained(tmp_path / "cut")
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in _tiny(arch).parameters())
