"""The rest of mergekit's catalogue: model_stock, sce, nearswap, arcee_fusion, ram, ramplus_tl."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import merge_tensors  # the oracle (a test dependency)

from merging import primitives as P
from merging.errors import ConfigError
from merging.methods import REGISTRY


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def family(dtype, shape=(32, 90), n=3, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def both(name, base, models, params=None, seed=None):
    params = params or {}
    if seed is not None:
        torch.manual_seed(seed)
    ref = merge_tensors([base, *models], name, parameters=params, base_index=0)
    spec = REGISTRY[name]
    per_model = {k: v for k, v in params.items() if k in spec.per_model}
    shared = {k: v for k, v in params.items() if k not in per_model}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return spec.call(models, base, per_model, shared, generator=generator), ref


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(32, 90), (77,), (601, 1000), (3, 211, 997), ()])  # 600K: slices of rows / elements
def test_model_stock_matches_mergekit(dtype, filter_wise, shape):
    base, models = family(dtype, shape=shape)
    out, ref = both("model_stock", base, models, {"filter_wise": filter_wise})
    assert same_bits(out, ref)


def test_model_stock_interpolation_ratio_and_singularity():
    base = torch.zeros(2)
    # two fine-tunes at 90 degrees: cos 0 -> t = 0, the base
    out = REGISTRY["model_stock"].call([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], base, {}, {})
    assert out.tolist() == [0.0, 0.0]
    # identical fine-tunes: cos 1 -> t = 1, their average
    same = torch.tensor([0.5, -1.0])
    assert REGISTRY["model_stock"].call([same, same.clone()], base, {}, {}).tolist() == [0.5, -1.0]
    # opposite fine-tunes: 1 + (N-1) cos = 0 -> base kept
    out = REGISTRY["model_stock"].call([same, -same], base, {}, {})
    assert out.tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="at least 2"):
        REGISTRY["model_stock"].call([same], base, {}, {})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [{}, {"select_topk": 0.3}, {"select_topk": 0.7, "int8_mask": True},
                                    {"select_topk": 0.0}])
def test_sce_matches_mergekit(dtype, params):
    base, models = family(dtype)
    with P.tie_break("torch"):
        out, ref = both("sce", base, models, params)
    assert same_bits(out, ref)
    if dtype == torch.float32:  # no variance ties in fp32: alloy's rule agrees
        out, ref = both("sce", base, models, params)
        assert same_bits(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_population_variance_is_torch_var_bit_for_bit(dtype, n):
    from merging.bitwise import CHUNK
    from merging.methods.sce import population_variance

    g = torch.Generator().manual_seed(n)
    cols = CHUNK * 2 + 1001  # several slices, the last one short
    for scale in (0.002, 1.0, 300.0, 1e-6):
        deltas = (torch.randn(n, 3, cols // 3 + 1, generator=g) * scale).to(dtype)
        flat = deltas.view(n, -1)
        flat[:, :500] = flat[0, :500].clone()  # zero variance
        flat[-1, 500:900] = 0
        flat[0, 900] = float("nan")
        flat[-1, 901] = float("inf")
        ours, ref = population_variance(deltas), torch.var(deltas, dim=0, unbiased=False)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert torch.equal(ours.view(-1)[:900], ref.view(-1)[:900])
        assert torch.equal(ours.isnan(), ref.isnan())
        assert bool(((ours == ref) | ours.isnan()).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_energy_weights_are_torch_mean_bit_for_bit(dtype, threads):
    """The float32 squares are built a slice at a time; torch's half-precision mean is checked to be that sum."""
    from merging.bitwise import CHUNK
    from merging.methods.sce import energy_weights

    def reference(deltas):
        energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
        total = torch.sum(energy).item()
        return torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for n in (1, 2, 3):
            for scale in (1e-4, 1.0, 40.0):
                deltas = (torch.randn(n, 2, CHUNK + 777, generator=g) * scale).to(dtype)
                ours, ref = energy_weights(deltas), reference(deltas)
                assert ours.dtype == ref.dtype and torch.equal(ours, ref), (n, scale)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_owned_inputs_leave_the_list_and_change_no_bit(dtype):
    base, models = family(dtype, n=3, seed=5)
    params = {"select_topk": 0.5}
    ref = REGISTRY["sce"].call([m.clone() for m in models], base, {}, params)
    owned = [m.clone() for m in models]
    assert same_bits(REGISTRY["sce"].call(owned, base, {}, params, owned=True), ref)
    assert owned == [None] * 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_sce_over_several_slices_matches_mergekit(dtype):
    from merging.bitwise import CHUNK

    base, models = family(dtype, shape=(CHUNK // 500 + 3, 1000), n=3, seed=4)  # two slices and a short third
    with P.tie_break("torch"):
        out, ref = both("sce", base, models, {"select_topk": 0.5})
    assert same_bits(out, ref)


def test_sce_selects_by_variance_and_erases_minority_signs():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 0.1, -1.0, 2.0])
    b = torch.tensor([1.0, -0.1, 1.0, 2.0])
    out = REGISTRY["sce"].call([a, b], base, {}, {"select_topk": 0.5})
    # variances 0, 0.01, 1, 0 -> with two non-zero variances, keep 1: the third element; signs tie -> '+' wins
    assert out.tolist() == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.5])
def test_nearswap_matches_mergekit(dtype, t):
    base, models = family(dtype, n=1)
    out, ref = both("nearswap", base, models, {"t": t})
    assert same_bits(out, ref)


def test_nearswap_swaps_close_values_only():
    base = torch.tensor([0.0, 0.0, 0.0])
    other = torch.tensor([0.05, 0.2, 1.0])
    out = REGISTRY["nearswap"].call([other], base, {}, {"t": 0.1})
    assert out.tolist() == pytest.approx([0.05, 0.1, 0.1])  # weight min(1, t / |diff|)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion_matches_mergekit(dtype):
    base, models = family(dtype, n=1, scale=0.2)
    out, ref = both("arcee_fusion", base, models)
    assert same_bits(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcee_fusion_samples_large_tensors_from_the_seed(dtype):
    base, models = family(dtype, shape=(1000, 1050), n=1, scale=0.2)  # over the 1e6 sampling bound, 3 slices
    out, ref = both("arcee_fusion", base, models, seed=4)
    assert same_bits(out, ref)
    again, _ = both("arcee_fusion", base, models, seed=4)
    assert same_bits(out, again)
    changed = (out != base).float().mean().item()
    assert 0 < changed < 0.5  # only the outliers of importance move to the other model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,params", [("ram", {}), ("ram", {"epsilon": 0.01}), ("ramplus_tl", {}),
                                         ("ramplus_tl", {"r": 0.5, "alpha": 0.8, "epsilon": 0.01})])
def test_ram_matches_mergekit(dtype, name, params):
    base, models = family(dtype)
    # sparse deltas so that unique and shared elements both occur
    g = torch.Generator().manual_seed(9)
    models = [base + (m - base) * (torch.rand(base.shape, generator=g) < 0.4).to(dtype) for m in models]
    out, ref = both(name, base, models, params)
    assert same_bits(out, ref)


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(3)
    a = torch.tensor([1.0, 2.0, 0.0])
    b = torch.tensor([0.0, 4.0, 0.0])
    assert REGISTRY["ram"].call([a, b], base, {}, {}).tolist() == [1.0, 3.0, 0.0]
    plus = REGISTRY["ramplus_tl"].call([a, b], base, {}, {"r": 1.0, "alpha": 1.0})
    # a: 1 shared, 1 unique -> rho 1 -> unique amplified by 1 + r * min(rho, alpha) = 2
    assert plus.tolist() == [2.0, 3.0, 0.0]
