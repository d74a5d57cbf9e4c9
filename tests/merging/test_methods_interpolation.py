"""linear, slerp, nuslerp, multislerp, karcher against mergekit 0.1.5, edge cases included."""

from __future__ import annotations

import math

import pytest
import torch
from mergekit.merge_methods import merge_tensors  # the oracle (a test dependency)

from merging.errors import ConfigError
from merging.methods import REGISTRY


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def randn(shape, seed, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# ---------------------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(dtype, normalize):
    tensors = [randn((40, 70), s, dtype) for s in range(3)]
    w = [0.2, 0.5, 0.7]
    ref = merge_tensors(tensors, "linear", parameters={"weight": w, "normalize": normalize})
    out = REGISTRY["linear"].call(tensors, None, {"weight": w}, {"normalize": normalize})
    assert same_bits(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_over_several_slices_matches_mergekit(dtype, normalize, monkeypatch):
    from merging import bitwise as B

    monkeypatch.setattr(B, "CHUNK", 1000)  # half-precision inputs are summed a slice at a time: a ragged last one
    tensors = [randn((37, 101), s, dtype) * torch.exp2(torch.randint(-20, 5, (37, 101))).to(dtype) for s in range(3)]
    w = [0.2, 0.5, 0.7]
    ref = merge_tensors(tensors, "linear", parameters={"weight": w, "normalize": normalize})
    assert same_bits(REGISTRY["linear"].call(tensors, None, {"weight": w}, {"normalize": normalize}), ref)


def test_linear_is_the_weighted_mean_and_rejects_zero_total():
    a, b = torch.full((3,), 1.0), torch.full((3,), 4.0)
    assert REGISTRY["linear"].call([a, b], None, {"weight": [1.0, 2.0]}, {}).tolist() == [3.0] * 3
    with pytest.raises(ConfigError, match="sum to 0"):
        REGISTRY["linear"].call([a, b], None, {"weight": [1.0, -1.0]}, {})
    assert REGISTRY["linear"].call([a, b], None, {"weight": [1.0, -1.0]}, {"normalize": False}).tolist() == [-3.0] * 3


# ----------------------------------------------------------------------------------------------------------- slerp


def slerp_pair(name, base, other, t):
    ref = merge_tensors([base, other], name, parameters={"t": t}, base_index=0)
    out = REGISTRY[name].call([other], base, {}, {"t": t})
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(dtype, t):
    out, ref = slerp_pair("slerp", randn((64, 33), 1, dtype), randn((64, 33), 2, dtype), t)
    assert same_bits(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_over_several_chunks_matches_mergekit(dtype):
    base, other = randn((3, 700_000), 1, dtype), randn((3, 700_000), 2, dtype)  # 2.1 M elements: three 1 Mi chunks
    out, ref = slerp_pair("slerp", base, other, 0.4)
    assert same_bits(out, ref)


@pytest.mark.parametrize("case", ["colinear", "antipodal", "zero", "empty"])
def test_slerp_edge_cases_match_mergekit(case):
    a = randn((10, 10), 3)
    b = {"colinear": 2.5 * a, "antipodal": -a, "zero": torch.zeros_like(a), "empty": None}[case]
    if case == "empty":
        a, b = torch.zeros(0, 4), torch.zeros(0, 4)
    out, ref = slerp_pair("slerp", a, b, 0.25)
    assert same_bits(out, ref)
    if case == "colinear":  # falls back to linear interpolation
        torch.testing.assert_close(out, 0.75 * a + 0.25 * b)


def test_slerp_keeps_the_norm_between_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = REGISTRY["slerp"].call([b], a, {}, {"t": 0.5})
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5)] * 2))
    with pytest.raises(ConfigError, match="at most 1"):
        REGISTRY["slerp"].call([a, b], a, {}, {"t": 0.5})
    with pytest.raises(ConfigError, match="'t'"):
        REGISTRY["slerp"].call([b], a, {}, {})


# --------------------------------------------------------------------------------------------------------- nuslerp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_mergekit(dtype, options, with_base):
    base, a, b = (randn((24, 50), s, dtype) for s in (1, 2, 3))
    w = [0.3, 0.9]
    if with_base:
        ref = merge_tensors([base, a, b], "nuslerp", parameters={"weight": w, **options}, base_index=0)
    else:
        ref = merge_tensors([a, b], "nuslerp", parameters={"weight": w, **options})
    out = REGISTRY["nuslerp"].call([a, b], base if with_base else None, {"weight": w}, options)
    assert same_bits(out, ref)


def test_nuslerp_zero_weights_and_colinear_rows():
    a = randn((4, 8), 1)
    b = a.clone()
    b[1] = -3 * a[1]  # one antipodal row among unrelated ones
    for w in ([0.0, 0.0], [1.0, 1.0]):
        ref = merge_tensors([a, b], "nuslerp", parameters={"weight": w, "nuslerp_flatten": False})
        assert same_bits(REGISTRY["nuslerp"].call([a, b], None, {"weight": w}, {"nuslerp_flatten": False}), ref)


# ------------------------------------------------------------------------------------------------------ multislerp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_mergekit(dtype, with_base, normalize):
    base = randn((16, 40), 0, dtype)
    tensors = [randn((16, 40), s, dtype) for s in (1, 2, 3, 4)]
    params = {"weight": [0.1, 0.2, 0.3, 0.4], "normalize_weights": normalize}
    inputs = [base, *tensors] if with_base else tensors
    ref = merge_tensors(inputs, "multislerp", parameters=params, base_index=0 if with_base else None)
    out = REGISTRY["multislerp"].call(tensors, base if with_base else None, {"weight": params["weight"]},
                                      {"normalize_weights": normalize})
    assert same_bits(out, ref)


def test_multislerp_degenerate_inputs():
    a = randn((5, 5), 1)
    assert REGISTRY["multislerp"].call([a], None, {"weight": [2.0]}, {}) is a
    ref = merge_tensors([a, -a], "multislerp", parameters={"weight": [1.0, 1.0]})
    assert same_bits(REGISTRY["multislerp"].call([a, -a], None, {"weight": [1.0, 1.0]}, {}), ref)  # linear fallback
    zero = torch.zeros_like(a)  # with a base: the fallback recomputes the deltas (the stack holds the units by then)
    ref = merge_tensors([zero, a, -a], "multislerp", parameters={"weight": [1.0, 1.0]}, base_index=0)
    assert same_bits(REGISTRY["multislerp"].call([a, -a], zero, {"weight": [1.0, 1.0]}, {}), ref)
    with pytest.raises(ConfigError, match="cancel"):
        REGISTRY["multislerp"].call([a, -a, a, -a], None, {"weight": 1.0}, {})
    with pytest.raises(ConfigError, match="sum to 0"):
        REGISTRY["multislerp"].call([a, 2 * a], None, {"weight": [1.0, -1.0]}, {})


# --------------------------------------------------------------------------------------------------------- karcher


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_karcher_matches_mergekit(dtype):
    tensors = [randn((12, 30), s, dtype) for s in (1, 2, 3)]
    for params in ({}, {"max_iter": 3, "tol": 1e-3}):
        ref = merge_tensors(tensors, "karcher", parameters=params)
        assert same_bits(REGISTRY["karcher"].call(tensors, None, {}, params), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_karcher_owned_inputs_leave_the_list_and_change_no_bit(dtype):
    from merging.methods.spherical import _CHUNK

    tensors = [randn((3, _CHUNK // 3 + 7), s, dtype) for s in (1, 2, 3)]  # two slices, the last one short
    tensors.append(tensors[1] * 0)  # a zero input: left out of the direction
    ref = merge_tensors(tensors, "karcher", parameters={"max_iter": 4})
    given = [t.clone() for t in tensors]
    assert same_bits(REGISTRY["karcher"].call(given, None, {}, {"max_iter": 4}), ref)
    assert all(torch.equal(a, b) for a, b in zip(given, tensors))  # not owned: the caller's tensors untouched
    owned = [t.clone() for t in tensors]
    assert same_bits(REGISTRY["karcher"].call(owned, None, {}, {"max_iter": 4}, owned=True), ref)
    assert owned == [None] * 4  # each read buffer let go as its unit vector was made


def test_karcher_zero_inputs_and_the_spherical_mean():
    zeros = [torch.zeros(4), torch.zeros(4)]
    assert torch.equal(REGISTRY["karcher"].call(zeros, None, {}, {}), torch.zeros(4))
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    out = REGISTRY["karcher"].call([a, b], None, {}, {})
    assert out[0].item() == pytest.approx(out[1].item())  # the direction bisects the angle
    assert out.norm().item() == pytest.approx(2.0, rel=1e-5)  # scaled by the mean norm
    ref = merge_tensors([a, torch.zeros(2), b], "karcher")
    assert same_bits(REGISTRY["karcher"].call([a, torch.zeros(2), b], None, {}, {}), ref)
