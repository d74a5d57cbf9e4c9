"""extract-lora: a fine-tune as a LoRA adapter of its base, against mergekit-extract-lora and through peft itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging.errors import ConfigError, InputError
from merging.extract import extract_lora, lora_factors
from test_parity import load_dir
from family import llama_shapes, make_family, tiny_config, write_model


def _mergekit_extract(ft: Path, base: Path, out: Path, *args: str) -> None:
    from click.testing import CliRunner
    from mergekit.scripts.extract_lora import main as mk_extract

    res = CliRunner().invoke(mk_extract, ["--model", str(ft), "--base-model", str(base), "--out-path", str(out),
                                          "--quiet", *args])
    assert res.exit_code == 0, res.output


def _products(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A per module (the factors' signs are SVD's choice; their product is not), and the whole tensors."""
    out = {}
    for k, v in adapter.items():
        if "_A" in k:
            b = adapter[k.replace("_A", "_B")]
            out[k.replace("_A", "_BA")] = b.float() @ v.float()
        elif "_B" not in k:
            out[k] = v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("args", [["--max-rank", "16"], ["--max-rank", "8", "--no-distribute-scale", "--embed-lora"],
                                  ["--max-rank", "32", "--sv-epsilon", "0.1", "--skip-undecomposable", "-e", "mlp"]])
def test_same_adapter_as_mergekit(tmp_path, dtype, args):
    fam = make_family(tmp_path / "fam", n_finetunes=1, dtype=dtype)
    _mergekit_extract(fam["ft0"], fam["base"], tmp_path / "theirs", *args)
    opts = dict(max_rank=int(args[1]), distribute_scale="--no-distribute-scale" not in args,
                embed_lora="--embed-lora" in args, skip_undecomposable="--skip-undecomposable" in args,
                sv_epsilon=float(args[args.index("--sv-epsilon") + 1]) if "--sv-epsilon" in args else 0.0,
                exclude=["mlp"] if "-e" in args else [])
    result = extract_lora(fam["ft0"], fam["base"], tmp_path / "ours", **opts)
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype == dtype and ours[k].shape == theirs[k].shape, k
    po, pt = _products(ours), _products(theirs)
    if dtype == torch.float32:
        for k in po:
            torch.testing.assert_close(po[k], pt[k], rtol=1e-5, atol=1e-6)
    else:  # each factor is rounded to bf16 on its own: as close to the exact rank-r product as mergekit's
        ft, base = load_dir(fam["ft0"]), load_dir(fam["base"])
        r = int(args[1])
        for k in po:
            if "_BA" not in k:
                assert torch.equal(po[k], pt[k]), k
                continue
            name = k.removeprefix("base_model.model.").replace(".lora_embedding_BA", ".weight").replace(
                ".lora_BA.weight", ".weight")
            delta = (ft[name].double() - base[name].double()).to(dtype).double()
            if "embedding" in k:
                delta = delta.T
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            rank = min(r, int((sv > opts["sv_epsilon"]).sum())) if opts["sv_epsilon"] else r
            truth = (u[:, :rank] * sv[:rank]) @ vh[:rank]
            ours_err, theirs_err = (po[k].double() - truth).norm(), (pt[k].double() - truth).norm()
            assert ours_err <= 1.25 * theirs_err + 1e-9, (k, ours_err, theirs_err)
    c_ours, c_theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    for c in (c_ours, c_theirs):
        c["target_modules"] = sorted(c["target_modules"])
        c.pop("base_model_name_or_path")
    assert c_ours == c_theirs
    if "--sv-epsilon" in args:  # some modules kept fewer singular values, listed as peft reads them
        assert c_ours["rank_pattern"] and min(result.ranks.values()) < c_ours["r"]


def test_full_rank_adapter_gives_the_fine_tune_back_through_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fam = make_family(tmp_path / "fam", n_finetunes=1, hidden=32)
    extract_lora(fam["ft0"], fam["base"], tmp_path / "adapter", max_rank=64, embed_lora=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fam["base"]), tmp_path / "adapter")
    merged = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    ft = load_dir(fam["ft0"])
    for name, want in ft.items():
        torch.testing.assert_close(merged[name], want, rtol=0, atol=2e-6)


def test_low_rank_delta_is_found_and_alloy_merges_the_adapter_back(tmp_path):
    from merging.engine import run_merge
    from family import write_cfg

    cfg = tiny_config(layers=2, hidden=32)
    g = torch.Generator().manual_seed(0)
    base = {n: 0.05 * torch.randn(s, generator=g) for n, s in llama_shapes(cfg).items()}
    ft = {n: t.clone() for n, t in base.items()}
    q = "model.layers.1.self_attn.q_proj.weight"
    ft[q] += torch.randn(32, 3, generator=g) @ torch.randn(3, 32, generator=g)  # a rank-3 change
    write_model(tmp_path / "base", base, cfg)
    write_model(tmp_path / "ft", ft, cfg)
    result = extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "adapter", max_rank=8, sv_epsilon=1e-4)
    assert result.ranks["model.layers.1.self_attn.q_proj"] == 3
    # unchanged modules: no singular value above epsilon, so no factors (peft refuses rank 0; mergekit writes it)
    assert "model.layers.0.self_attn.q_proj" in result.unchanged and len(result.ranks) == 1
    assert result.config["r"] == 3 and result.config["rank_pattern"] == {}
    assert not any("layers.0.self_attn.q_proj" in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    # alloy's own base+adapter reader (rank_pattern, scaling alpha/r = 1) gives the fine-tune back
    out = tmp_path / "merged"
    run_merge(write_cfg(tmp_path, {"merge_method": "passthrough",
                                   "models": [{"model": f"{tmp_path / 'base'}+{tmp_path / 'adapter'}"}]}),
              out, progress=False, lora_cache=tmp_path / "cache")
    merged = load_dir(out)
    torch.testing.assert_close(merged[q], ft[q], rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 40), (24, 70), (70, 24)])
def test_top_singular_triplets_are_svds(shape):
    from merging.extract import top_singular

    g = torch.Generator().manual_seed(1)
    d = torch.randn(shape, generator=g)
    u, s, vh = top_singular(d, 6)
    u0, s0, vh0 = torch.linalg.svd(d.double(), full_matrices=False)
    torch.testing.assert_close(s.double(), s0[:6], rtol=1e-6, atol=0)
    torch.testing.assert_close((u * s) @ vh, ((u0[:, :6] * s0[:6]) @ vh0[:6]).float(), rtol=1e-5, atol=1e-5)
    # rank 2 (and an all-zero matrix): the directions past it have s = 0 and add nothing, with finite vectors
    low = torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)
    for m in (low, torch.zeros(shape)):
        u, s, vh = top_singular(m, 6)
        assert torch.isfinite(u).all() and torch.isfinite(vh).all() and (s[2:] == 0).all()
        torch.testing.assert_close((u * s) @ vh, m, rtol=1e-5, atol=1e-5)


def test_factors_are_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, 7, generator=g)
    a, b = lora_factors(d, 3)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    torch.testing.assert_close(b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    torch.testing.assert_close(a.norm(dim=1), s[:3].sqrt())  # the scale split evenly
    a, b = lora_factors(d, 100, transpose=True)
    assert a.shape == (7, 12) and b.shape == (7, 7)
    torch.testing.assert_close((b @ a).T, d, rtol=1e-5, atol=1e-5)


def test_save_module_keeps_a_module_whole(tmp_path):
    # (mergekit 0.1.5's --save-module fails: it appends to the tuple click gives it)
    fam = make_family(tmp_path / "fam", n_finetunes=1, hidden=32)
    result = extract_lora(fam["ft0"], fam["base"], tmp_path / "a", max_rank=4, modules_to_save=["o_proj"])
    adapter, ft = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_dir(fam["ft0"])
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(adapter["base_model.model." + name], ft[name])
    assert "o_proj" in result.config["modules_to_save"] and "o_proj" not in result.config["target_modules"]


def test_refusals(tmp_path):
    fam = make_family(tmp_path / "fam", n_finetunes=1, hidden=32)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="taken: exists; pass --overwrite"):
        extract_lora(fam["ft0"], fam["base"], tmp_path / "taken")
    with pytest.raises(ConfigError, match="--include-regex/--exclude-regex '\\(': "):
        extract_lora(fam["ft0"], fam["base"], tmp_path / "x", exclude=["("])
    with pytest.raises(ConfigError, match="no module left to decompose"):
        extract_lora(fam["ft0"], fam["base"], tmp_path / "x", include=["nothing_matches"])
    other = make_family(tmp_path / "other", n_finetunes=0, hidden=48)
    with pytest.raises(InputError, match="model.layers.0.self_attn.q_proj.weight'?: shape \\[32, 32\\]"):
        extract_lora(fam["ft0"], other["base"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_command_line(tmp_path):
    fam = make_family(tmp_path / "fam", n_finetunes=1, hidden=32)
    cmd = [sys.executable, "-m", "alloy", "extract-lora", "--model", str(fam["ft0"]), "--base-model",
           str(fam["base"]), "--out-path", str(tmp_path / "a"), "--max-rank", "4", "-i", "q_proj", "-i", "v_proj"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == str(fam["base"])
    r = subprocess.run(cmd[:7] + [str(tmp_path / "missing"), "--out-path", str(tmp_path / "b")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("alloy: error: --base-model: model ") and "missing" in r.stderr
