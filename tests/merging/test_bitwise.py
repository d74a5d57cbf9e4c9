"""merging.bitwise against the reference primitives, bit for bit: signed zeros, subnormals, zero and negative weights,
ties of the elected sign; NaN and inf hand the work back to the reference."""

from __future__ import annotations

import pytest
import torch

from merging import bitwise as B
from merging import primitives as P
from merging.methods import task_arithmetic as TA
from merging.methods.registry import REGISTRY

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ, first at {diff[0].tolist()}: {a.flatten()[diff[0, 0]]} vs {b.flatten()[diff[0, 0]]}"


def awkward(shape, dtype, seed: int) -> torch.Tensor:
    """Values over a wide range of magnitudes with exact zeros of both signs, subnormals and repeats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 4, shape, generator=g).float())
    pick = torch.rand(shape, generator=g)
    x[pick < 0.15] = 0.0
    x[(pick >= 0.15) & (pick < 0.3)] = -0.0
    tiny = torch.finfo(dtype).smallest_normal
    x[(pick >= 0.3) & (pick < 0.35)] = tiny / 4  # subnormal in the dtype
    x[(pick >= 0.35) & (pick < 0.4)] = -tiny / 8
    x[(pick >= 0.4) & (pick < 0.5)] = 0.25  # many equal values: totals of exactly 0 across models
    x[(pick >= 0.5) & (pick < 0.6)] = -0.25
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_exact_sum_equals_stacked_sum(dtype, n):
    terms = [awkward((4099,), dtype, seed=i) for i in range(n)]
    assert_same_bits(B.exact_sum(terms), torch.stack(terms).sum(0))


@pytest.mark.parametrize("shape", [(0,), (3, 0), ()])
def test_empty_and_scalar_tensors(shape):
    deltas = torch.stack([awkward(shape, torch.bfloat16, seed=i) for i in range(2)])
    w = P.stacked_weights([1.0, 0.5], deltas)
    flat = deltas.reshape(2, -1)
    ref = P.disjoint_merge(flat * w.view(2, 1), w.view(2, 1), P.agreement_mask(flat * w.view(2, 1), "sum"),
                           normalize=True)
    assert_same_bits(B.sign_merge(flat, w.view(2, 1), normalize=True), ref)
    x = deltas[0]
    assert_same_bits(B.mask_multiply(x, x > 0), x * (x > 0))


def test_exact_sum_all_negative_zeros_gives_positive_zero():
    z = torch.full((8,), -0.0, dtype=torch.bfloat16)
    out = B.exact_sum([z, z])
    assert_same_bits(out, torch.stack([z, z]).sum(0))
    assert not torch.signbit(out).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_multiply_equals_multiply(dtype, monkeypatch):
    monkeypatch.setattr(B, "CHUNK", 1000)  # several chunks and a ragged last one
    x = awkward((37, 101), dtype, seed=3)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    assert_same_bits(B.mask_multiply(x, keep), x * keep)
    assert_same_bits(P.apply_mask(x, keep, rescale=True), P.l1_rescale(x, x * keep))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_take_the_reference(bad):
    x = awkward((300,), torch.bfloat16, seed=5)
    x[123] = bad
    keep = torch.ones(300, dtype=torch.bool)
    assert B.mask_multiply(x, keep) is None
    deltas = torch.stack([x, awkward((300,), torch.bfloat16, seed=6)])
    w = P.stacked_weights([1.0, 1.0], deltas)
    assert B.sign_merge(deltas, w, normalize=True) is None
    # the combine then runs the reference: NaN where the reference has NaN, the same bits elsewhere
    fast = TA._combine_slice(deltas, w, consensus="sum", normalize=True, int8_mask=False)
    ref = P.disjoint_merge(deltas * w, w, P.agreement_mask(deltas * w, "sum"), normalize=True)
    assert torch.equal(fast.isnan(), ref.isnan())
    assert_same_bits(fast.nan_to_num(0.0), ref.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0], [0.3, 1.0, 0.7], [1.0, -0.6, 0.0, 0.45]])
def test_sign_merge_equals_reference(dtype, normalize, weights):
    n = len(weights)
    deltas = torch.stack([awkward((2053,), dtype, seed=10 + i) for i in range(n)])
    w = P.stacked_weights(weights, deltas)
    weighted = deltas * w
    ref = P.disjoint_merge(weighted, w, P.agreement_mask(weighted, "sum"), normalize=normalize)
    assert_same_bits(B.sign_merge(deltas, w, normalize=normalize), ref)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_methods_give_the_same_bits_with_and_without_fast_paths(method, dtype, monkeypatch):
    g = torch.Generator().manual_seed(7)
    base = (0.02 * torch.randn(64, 300, generator=g)).to(dtype)
    models = [(base.float() + 0.002 * torch.randn(base.shape, generator=g)).to(dtype) for _ in range(3)]
    models[1][5, :40] = base[5, :40]  # deltas of exactly zero
    spec = REGISTRY[method]
    params = {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.6, 0.7]}
    if method == "task_arithmetic":
        params.pop("density")

    def run() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1) if spec.seeded else None
        return spec.call(list(models), base, params, {}, generator=gen)

    monkeypatch.setattr(TA, "COMBINE_CHUNK", 4096)  # several slices per tensor
    fast = run()
    monkeypatch.setattr(B, "applies", lambda t: False)
    assert_same_bits(fast, run())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 0.97])
def test_dare_drop_in_place_equals_reference(dtype, rescale, density, monkeypatch):
    monkeypatch.setattr(B, "CHUNK", 1000)  # in-place slices unlike the reference draw's: the same key stream
    delta = awkward((37, 101), dtype, seed=21)
    ref = P.dare_drop(delta.clone(), density, rescale=rescale, generator=torch.Generator().manual_seed(3))
    work = delta.clone()
    out = P.dare_drop(work, density, rescale=rescale, generator=torch.Generator().manual_seed(3), inplace=True)
    assert_same_bits(out, ref)
    # bf16 and fp32 are dropped in place; fp16 is drawn and rescaled in fp32 (as mergekit), so it takes the reference
    assert (out.data_ptr() == work.data_ptr()) == (dtype != torch.float16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dare_drop_in_place_hands_non_finite_deltas_to_the_reference(bad):
    delta = awkward((2000,), torch.bfloat16, seed=22)
    delta[7] = bad
    work = delta.clone()
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out = P.dare_drop(work, 0.5, rescale=True, generator=g1, inplace=True)
    ref = P.dare_drop(delta, 0.5, rescale=True, generator=g2)
    assert torch.equal(out.isnan(), ref.isnan()) and out.data_ptr() != work.data_ptr()
    assert_same_bits(out.nan_to_num(0.0), ref.nan_to_num(0.0))
    assert_same_bits(work, delta)  # untouched
    assert torch.equal(g1.get_state(), g2.get_state())  # and no key drawn twice


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("density", [0.0001, 0.3, 0.5, 0.97])
def test_magnitude_prune_in_place_equals_reference(dtype, rescale, density, monkeypatch):
    monkeypatch.setattr(B, "CHUNK", 1000)  # the tied elements kept (first by index) span several slices
    delta = awkward((37, 101), dtype, seed=23)  # many ties: +-0.25, zeros, subnormals
    ref = P.magnitude_prune(delta.clone(), density, rescale=rescale)
    work = delta.clone()
    out = P.magnitude_prune(work, density, rescale=rescale, inplace=True)
    assert_same_bits(out, ref)
    assert out.data_ptr() == work.data_ptr()


def test_magnitude_prune_in_place_hands_non_finite_deltas_to_the_reference():
    delta = awkward((2000,), torch.float32, seed=24)
    delta[9] = float("inf")
    work = delta.clone()
    out = P.magnitude_prune(work, 0.5, rescale=False, inplace=True)
    assert out.data_ptr() != work.data_ptr() and torch.equal(work, delta)
    assert_same_bits(out, P.magnitude_prune(delta, 0.5, rescale=False))
