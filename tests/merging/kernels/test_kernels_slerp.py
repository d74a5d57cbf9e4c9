"""SLERP: the reduction + interpolation kernels against the torch twin and the registered method, both branches."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import DTYPES, family, same_bytes, ulp_diff

from merging.kernels import KERNELS, reference
from merging.kernels.slerp import DOT_THRESHOLD, dot_norms, slerp_coefficients
from merging.methods import REGISTRY


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_reference_and_method(dtype, t):
    xs, base = family(4999, dtype, models=1, seed=int(t * 4))
    other = (xs[0].float() + torch.randn(4999) * 0.05).to(dtype)  # far enough apart for the spherical branch
    out = KERNELS["slerp"]([other], base, t=t)
    assert same_bytes(out, reference.slerp([other], base, t=t))
    expected = REGISTRY["slerp"].fn([other], base, t=t)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    else:
        assert int(ulp_diff(out, expected).max()) <= 1


def test_dot_and_norms_reduce_over_blocks():
    x = torch.randn(9001)
    y = torch.randn(9001)
    xx, yy, xy = dot_norms(x, y, block=1024)
    assert math.isclose(xx, float(x.double().square().sum()), rel_tol=1e-12)
    assert math.isclose(yy, float(y.double().square().sum()), rel_tol=1e-12)
    assert math.isclose(xy, float((x.double() * y.double()).sum()), rel_tol=1e-9)


def test_orthogonal_halfway_is_the_spherical_midpoint():
    ca, cb = slerp_coefficients(1.0, 1.0, 0.0, 0.5)
    assert math.isclose(ca, math.sqrt(0.5)) and math.isclose(cb, math.sqrt(0.5))
    a = torch.zeros(2001)
    b = torch.zeros(2001)
    a[0], b[1] = 1.0, 1.0
    out = KERNELS["slerp"]([b], a, t=0.5)
    assert math.isclose(float(out[0]), math.sqrt(0.5), rel_tol=1e-6)
    assert math.isclose(float(out.norm()), 1.0, rel_tol=1e-6)  # stays on the sphere, unlike lerp (0.707)


@pytest.mark.parametrize("factor", [2.0, -3.0])
def test_colinear_and_antipodal_fall_back_to_lerp(factor):
    base = torch.randn(3001)
    other = base * factor
    t = 0.3
    out = KERNELS["slerp"]([other], base, t=t)
    lerp = (1 - t) * base + t * other
    torch.testing.assert_close(out, lerp, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, REGISTRY["slerp"].fn([other], base, t=t), rtol=1e-5, atol=1e-7)


def test_threshold_edge_and_zero_vector():
    # just below the threshold the spherical branch is taken, just above it lerp
    angle_in = math.acos(DOT_THRESHOLD) * 1.01
    angle_out = math.acos(DOT_THRESHOLD) * 0.99
    for angle, branch in ((angle_in, "slerp"), (angle_out, "lerp")):
        ca, cb = slerp_coefficients(1.0, 1.0, math.cos(angle), 0.5)
        if branch == "lerp":
            assert (ca, cb) == (0.5, 0.5)
        else:
            assert ca > 0.5 and math.isclose(ca, cb)
    # a zero base counts as norm 1: orthogonal to everything, the result is a scaled copy of the other
    zero = torch.zeros(1500)
    other = torch.randn(1500)
    out = KERNELS["slerp"]([other], zero, t=0.5)
    torch.testing.assert_close(out, REGISTRY["slerp"].fn([other], zero, t=0.5), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out, other * math.sqrt(0.5), rtol=1e-5, atol=1e-7)
