"""alloy against mergekit 0.1.5 on the same YAML: same tensor names, shapes, dtypes; values to 1e-5 (fp32) / 1 ulp (bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging.engine import run_merge


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_mergekit(cfg: dict, out: Path, seed: int | None = None) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run_merge
    from mergekit.options import MergeOptions

    mk_run_merge(MergeConfiguration.model_validate(cfg), str(out),
                 options=MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=seed, quiet=True))


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    # map sign-magnitude to a monotone integer line so neighbours differ by 1
    ia = torch.where(ia < 0, -32768 - ia, ia)
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def assert_same(ours: dict, theirs: dict, dtype: torch.dtype) -> None:
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name in theirs:
        a, b = ours[name], theirs[name]
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        if dtype == torch.bfloat16 or a.dtype == torch.bfloat16:
            assert ulp_diff(a, b) <= 1, (name, ulp_diff(a, b))
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def configs(fam: dict[str, Path]) -> dict[str, dict]:
    b, f0, f1, f2 = (str(fam[k]) for k in ("base", "ft0", "ft1", "ft2"))
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": f0, "parameters": {"weight": 0.5}}, {"model": f1, "parameters": {"weight": 0.3}},
            {"model": f2, "parameters": {"weight": 0.2}}]},
        "linear_unnormalized_filters": {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
            {"model": f0, "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.4}]}},
            {"model": f1, "parameters": {"weight": 0.6}}]},
        "slerp_gradient": {"merge_method": "slerp", "base_model": b, "slices": [{"sources": [
            {"model": b, "layer_range": [0, 3]}, {"model": f0, "layer_range": [0, 3]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "parameters": {"lambda": 0.8},
                            "models": [{"model": f0, "parameters": {"weight": 1.0}},
                                       {"model": f1, "parameters": {"weight": [0.2, 1.0]}},
                                       {"model": f2, "parameters": {"weight": 0.5}}]},
        "ties": {"merge_method": "ties", "base_model": b, "models": [
            {"model": f0, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": f1, "parameters": {"weight": 0.7, "density": [0.3, 0.9]}},
            {"model": f2, "parameters": {"weight": 0.5, "density": 0.7}}]},
        "ties_unnormalized": {"merge_method": "ties", "base_model": b, "parameters": {"normalize": False, "density": 0.6},
                              "models": [{"model": f0, "parameters": {"weight": 0.6}},
                                         {"model": f1, "parameters": {"weight": 0.4}}]},
        # mergekit reads YAML 1.1's strings '5e-1' / '1e0' (exponent without a dot) as numbers
        "ties_scientific_notation": {"merge_method": "ties", "base_model": b, "parameters": {"lambda": "1e0"},
                                     "models": [{"model": f0, "parameters": {"weight": "1e0", "density": "5e-1"}},
                                                {"model": f1, "parameters": {"weight": ["2e-1", 1], "density": 0.7}}]},
        # a base_model not listed under models is merged as one more model by methods without a base
        "linear_base_not_listed": {"merge_method": "linear", "base_model": b, "parameters": {"weight": 1.0},
                                   "models": [{"model": f0}, {"model": f1}]},
        "karcher_base_not_listed": {"merge_method": "karcher", "base_model": b, "models": [{"model": f0}, {"model": f1}]},
        "slerp_extrapolated": {"merge_method": "slerp", "base_model": b, "parameters": {"t": [1.2, -0.2]},
                               "models": [{"model": b}, {"model": f0}]},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]}]},
            {"sources": [{"model": f1, "layer_range": [1, 3]}]}]},
        # cases tests/merging/test_parity_fuzz.py found: a base named on each slice only; a flag's gradient steps
        # (0 is false) instead of interpolating; an integer written as a float; a per-input filter matches the
        # input's tensor name (here layer 0 of b, written as output layer 1), not the output's
        "ties_slice_base": {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.6}, "slices": [
            {"base_model": b, "sources": [{"model": b, "layer_range": [0, 3]}, {"model": f0, "layer_range": [0, 3]},
                                          {"model": f1, "layer_range": [0, 3]}]}]},
        "linear_flag_gradient": {"merge_method": "linear", "parameters": {"normalize": [0, 1]}, "models": [
            {"model": f0, "parameters": {"weight": 1.0}}, {"model": f1, "parameters": {"weight": 0.5}}]},
        "karcher_float_max_iter": {"merge_method": "karcher", "parameters": {"max_iter": 3.0},
                                   "models": [{"model": f0}, {"model": f1}]},
        "passthrough_filter_on_input_name": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": b, "layer_range": [0, 1]}]},
            {"sources": [{"model": b, "layer_range": [0, 1]}],
             "parameters": {"scale": [{"filter": "layers.1.", "value": 1.0}, {"value": 2.0}]}}]},
    }


CASES = ["linear", "linear_unnormalized_filters", "slerp_gradient", "task_arithmetic", "ties", "ties_unnormalized",
         "ties_scientific_notation", "linear_base_not_listed", "karcher_base_not_listed", "slerp_extrapolated",
         "passthrough", "ties_slice_base", "linear_flag_gradient", "karcher_float_max_iter",
         "passthrough_filter_on_input_name"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parity_with_mergekit(case, precision, family_fp32, family_bf16, tmp_path):
    fam = family_fp32 if precision == "fp32" else family_bf16
    cfg = configs(fam)[case]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "c.yml", tmp_path / "alloy", progress=False, tie_break="torch")
    run_mergekit(cfg, tmp_path / "mk")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    theirs = load_dir(tmp_path / "mk")
    assert_same(load_dir(tmp_path / "alloy"), theirs, dtype)
    if "ties" in case:
        # alloy's default rule keeps the same number of elements and differs from mergekit only among ties
        run_merge(tmp_path / "c.yml", tmp_path / "index", progress=False)
        ours = load_dir(tmp_path / "index")
        differing = sum(int((ours[k] != theirs[k]).sum()) for k in theirs)
        total = sum(t.numel() for t in theirs.values())
        assert differing / total < (0.01 if precision == "bf16" else 1e-4), differing / total
    ours = json.loads((tmp_path / "alloy" / "config.json").read_text())
    theirs = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"]


def test_inputs_of_two_dtypes_give_their_common_dtype_as_in_mergekit(family_fp32, family_bf16, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(family_bf16["ft1"]), "parameters": {"weight": 0.4}},
                                                {"model": str(family_fp32["ft0"]), "parameters": {"weight": 0.6}}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "c.yml", tmp_path / "alloy", progress=False)
    run_mergekit(cfg, tmp_path / "mk")
    ours, theirs = load_dir(tmp_path / "alloy"), load_dir(tmp_path / "mk")
    assert {t.dtype for t in ours.values()} == {torch.float32}
    assert_same(ours, theirs, torch.float32)
    assert json.loads((tmp_path / "alloy" / "config.json").read_text())["torch_dtype"] == "float32"


def test_out_dtype_and_dtype_keys(family_fp32, tmp_path):
    cfg = configs(family_fp32)["task_arithmetic"] | {"dtype": "float32", "out_dtype": "bfloat16"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "c.yml", tmp_path / "alloy", progress=False)
    run_mergekit(cfg, tmp_path / "mk")
    assert_same(load_dir(tmp_path / "alloy"), load_dir(tmp_path / "mk"), torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float64", "torch.bfloat16"])  # names mergekit's dtype_from_name takes
def test_dtype_names_mergekit_takes(family_fp32, tmp_path, dtype):
    cfg = configs(family_fp32)["linear"] | {"dtype": dtype}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "c.yml", tmp_path / "alloy", progress=False)
    run_mergekit(cfg, tmp_path / "mk")
    ours, theirs = load_dir(tmp_path / "alloy"), load_dir(tmp_path / "mk")
    want = torch.float64 if dtype == "float64" else torch.bfloat16
    assert {t.dtype for t in ours.values()} == {want}
    assert_same(ours, theirs, want)
    assert json.loads((tmp_path / "alloy" / "config.json").read_text())["torch_dtype"] == dtype.removeprefix("torch.")


@pytest.fixture(scope="module")
def tied_and_untied(tmp_path_factory):
    """A tied base (no lm_head) and fine-tunes of it saved untied (their own lm_head), as trainers often save them."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from family import llama_shapes, tiny_config, write_model

    root = tmp_path_factory.mktemp("tied")
    g = torch.Generator().manual_seed(7)
    tied_cfg = tiny_config(tie=True)
    base = {n: 0.05 * torch.randn(s, generator=g) for n, s in llama_shapes(tied_cfg).items()}
    out = {"tied": write_model(root / "tied", base, tied_cfg)}
    for k in range(2):
        ft = {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        ft["lm_head.weight"] = base["model.embed_tokens.weight"] + 0.02 * torch.randn(base["model.embed_tokens.weight"].shape, generator=g)
        out[f"untied{k}"] = write_model(root / f"untied{k}", ft, tiny_config(tie=False))
    return out


@pytest.mark.parametrize("method", ["linear", "ties"])
@pytest.mark.parametrize("template", ["tied", "untied0"])
def test_tied_and_untied_checkpoints_mix_as_in_mergekit(tied_and_untied, tmp_path, method, template):
    """The output has an lm_head when any model has one; a tied model gives its embedding in its place (mergekit's
    tied_names). Unlike mergekit, alloy's config.json then says tie_word_embeddings: false, as the tensors are."""
    t, u0, u1 = (str(tied_and_untied[k]) for k in ("tied", "untied0", "untied1"))
    others = [m for m in (t, u0, u1) if m != str(tied_and_untied[template])]
    if method == "linear":
        cfg = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                                                    for m, w in zip([str(tied_and_untied[template])] + others, [0.5, 0.3, 0.2])]}
    else:
        cfg = {"merge_method": "ties", "base_model": str(tied_and_untied[template]), "parameters": {"density": 0.5},
               "models": [{"model": m, "parameters": {"weight": 0.5}} for m in others]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "c.yml", tmp_path / "alloy", progress=False, tie_break="torch")
    run_mergekit(cfg, tmp_path / "mk")
    ours = load_dir(tmp_path / "alloy")
    assert "lm_head.weight" in ours
    assert_same(ours, load_dir(tmp_path / "mk"), torch.float32)
    assert json.loads((tmp_path / "alloy" / "config.json").read_text())["tie_word_embeddings"] is False
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "alloy"))
    assert torch.equal(model.lm_head.weight.detach(), ours["lm_head.weight"])


def test_untied_model_without_its_head_is_refused(tied_and_untied, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from merging.errors import InputError

    broken = tmp_path / "broken"
    shutil.copytree(tied_and_untied["untied1"], broken)
    sd = load_file(broken / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "models": [{"model": str(tied_and_untied["untied0"])}, {"model": str(broken)}]}
    with pytest.raises(InputError, match="broken: has no .lm_head.weight. though its config says tie_word_embeddings: false"):
        run_merge(__import__("merging.config", fromlist=["x"]).parse_config(cfg), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("order", ["untied_first", "tied_first"])
def test_frankenmerge_of_tied_and_untied_as_in_mergekit(tied_and_untied, tmp_path, order):
    """Stacked layers: the head comes from the last slice's model; a tied one gives its embedding (mergekit too)."""
    a, b = str(tied_and_untied["untied0"]), str(tied_and_untied["tied"])
    if order == "tied_first":
        a, b = b, a
    cfg = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [2, 3]}]}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "c.yml", tmp_path / "alloy", progress=False)
    run_mergekit(cfg, tmp_path / "mk")
    ours, theirs = load_dir(tmp_path / "alloy"), load_dir(tmp_path / "mk")
    if order == "untied_first":
        # mergekit 0.1.5 writes no lm_head here (the last slice's model has none), under the config of a model taken
        # from a set (mergekit's referenced_models(): either one, by the process's hash seed); under the untied one
        # transformers loads a random head, under the tied one the first slice's embedding. alloy writes the head
        # the last slice's model really uses
        assert "lm_head.weight" not in theirs
        theirs["lm_head.weight"] = ours["lm_head.weight"]
    assert_same(ours, theirs, torch.float32)
    src = load_dir(Path(b))
    want = src.get("lm_head.weight", src["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], want)
