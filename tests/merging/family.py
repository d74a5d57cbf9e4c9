"""Tiny Llama checkpoints for engine tests: a base and fine-tunes that differ from it by seeded perturbations."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file


def tiny_config(layers: int = 3, hidden: int = 64, vocab: int = 96, tie: bool = False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 2, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie, "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_model(path: Path, tensors: dict[str, torch.Tensor], cfg: dict, shards: int = 1) -> Path:
    import json

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    dt = next(iter(tensors.values())).dtype
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dt]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, str(path / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def make_family(root: Path, *, n_finetunes: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0,
                layers: int = 3, hidden: int = 64, scale: float = 0.02, shards: int = 1) -> dict[str, Path]:
    """base + fine-tunes: each fine-tune = base + a seeded delta (sparse-ish and of mixed sign, like real task vectors)."""
    cfg = tiny_config(layers=layers, hidden=hidden)
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(cfg)
    base = {}
    for n, s in shapes.items():
        base[n] = (torch.ones(s) + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.05 * torch.randn(s, generator=g)
    out = {"base": write_model(root / "base", {k: v.to(dtype) for k, v in base.items()}, cfg, shards)}
    for k in range(n_finetunes):
        ft = {}
        for n, t in base.items():
            delta = scale * torch.randn(t.shape, generator=g) * (torch.rand(t.shape, generator=g) < 0.6)
            ft[n] = (t + delta).to(dtype)
        out[f"ft{k}"] = write_model(root / f"ft{k}", ft, cfg, shards)
    return out


def write_cfg(tmp: Path, cfg: dict, name: str = "c.yml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def linear_of(*models) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}
