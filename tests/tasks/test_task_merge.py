"""merge task: one candidate merged, reused when nothing changed, merged again when the config or an input did."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tasks.download import resolve_model
from tasks.merge import merge_candidate, merge_metrics

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
       "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32,
       "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32"}


def write_model(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    h, i, v = 16, 32, 32
    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "model.norm.weight": torch.ones(h)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))]:
            t[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.1
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(CFG))
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture
def models(tmp_path):
    out = {}
    for k, name in enumerate(["base", "a", "b"]):
        write_model(tmp_path / name, seed=k)
        out[name] = resolve_model(name, {"path": name}, root=tmp_path, models_dir=tmp_path)
    return out


def config(lam: float) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}],
            "parameters": {"lambda": lam}}


def test_merge_then_reuse_then_remerge(tmp_path, models):
    out = tmp_path / "merges" / "ta"
    first = merge_candidate("ta", config(0.5), models, out, seed=0)
    assert not first["reused"] and first["n_tensors"] == 20 and first["seconds"] > 0
    manifest = json.loads((out / "alloy_manifest.json").read_text())
    assert first["weights_sha256"] == manifest["weights_sha256"]
    assert {i["model"] for i in manifest["inputs"]} == {"base", "a", "b"}
    m = merge_metrics(first)
    assert {"merge.seconds", "merge.gb_per_s", "merge.peak_rss_gb", "merge.n_tensors"} <= set(m)

    again = merge_candidate("ta", config(0.5), models, out, seed=0)
    assert again["reused"] and again["manifest_sha256"] == first["manifest_sha256"]
    assert again["seconds"] == first["seconds"]  # the recorded figures of the merge that made the folder

    other = merge_candidate("ta", config(0.8), models, out, seed=0)  # config changed: merged again, replaced
    assert not other["reused"] and other["weights_sha256"] != first["weights_sha256"]

    # an input's bytes changed (same path): merged again
    (tmp_path / "a" / "model.safetensors").unlink()
    import shutil

    shutil.rmtree(tmp_path / "a")
    write_model(tmp_path / "a", seed=7)
    models["a"] = resolve_model("a", {"path": "a"}, root=tmp_path, models_dir=tmp_path)
    changed = merge_candidate("ta", config(0.8), models, out, seed=0)
    assert not changed["reused"] and changed["weights_sha256"] != other["weights_sha256"]


def test_bad_config_names_the_candidate(tmp_path, models):
    from merging.errors import AlloyError

    with pytest.raises(AlloyError, match="candidate ta"):
        merge_candidate("ta", {"merge_method": "task_arithmetic", "modles": []}, models, tmp_path / "x")
