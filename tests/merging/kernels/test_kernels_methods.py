"""KERNELS against the registered torch methods (merging.methods), which the engine swaps them for on CUDA.

Deterministic methods: float32 within 1e-5 relative, bf16/fp16 within 1 ulp. DARE draws from Philox instead of
torch.bernoulli: compared by what must hold for any draw (kept share, rescale, determinism).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from kernel_helpers import DTYPES, family, gen, same_bytes, ulp_diff

from merging import primitives as P
from merging.kernels import KERNELS, PRIMITIVES
from merging.methods import REGISTRY

W3 = [0.7, 0.5, -0.3]
DETERMINISTIC = [
    ("linear", dict(weight=[0.3, 0.5, 0.2])),
    ("linear", dict(weight=[0.3, 1.5, 0.25], normalize=False)),
    ("task_arithmetic", dict(weight=[0.3, 0.5, 0.2], lambda_=0.8)),
    ("task_arithmetic", dict(weight=W3, normalize=True)),
    ("ties", dict(weight=[1.0, 0.5, 0.7], density=[0.5, 0.3, 0.9])),
    ("ties", dict(weight=W3, density=[0.4, 1.0, 0.0], rescale=True, consensus_method="count", lambda_=1.3)),
    ("breadcrumbs", dict(weight=[0.3, 0.5, 0.2], density=0.6, gamma=0.05)),
    ("breadcrumbs_ties", dict(weight=W3, density=[0.5, 0.9, 1.0], gamma=[0.1, 0.0, 0.01], normalize=True)),
    ("slerp", dict(t=0.35)),
]


def run(fn, name, xs, base, kwargs):
    if name == "linear":
        return fn(xs, **kwargs)
    if name == "slerp":
        return fn(xs[:1], base, **kwargs)
    return fn(xs, base, **kwargs)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_signature_is_the_registered_methods(name):
    def shape(fn):  # `owned` is the engine's word to the torch function; a kernel is never handed it
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "owned"]

    assert shape(KERNELS[name]) == shape(REGISTRY[name].fn)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("name,kwargs", DETERMINISTIC, ids=[f"{n}{i}" for i, (n, _) in enumerate(DETERMINISTIC)])
def test_kernel_matches_registered_method(name, kwargs, dtype):
    xs, base = family(4097, dtype, seed=len(name))
    out = run(KERNELS[name], name, xs, base, kwargs)
    expected = run(REGISTRY[name].fn, name, xs, base, kwargs)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-8)
    else:
        assert int(ulp_diff(out, expected).max()) <= 1


def test_magnitude_prune_is_the_primitive_bit_for_bit():
    for dtype in DTYPES:
        xs, base = family(4099, dtype, tie_share=0.5)
        delta = xs[0] - base
        for density in (0.2, 0.5, 0.8):
            assert same_bytes(PRIMITIVES["magnitude_prune"](delta, density), P.magnitude_prune(delta, density))


def test_torch_tie_rule_defers_to_the_method():
    xs, base = family(2001, torch.bfloat16, tie_share=0.5)
    kw = dict(weight=[1.0, 1.0, 1.0], density=0.5)
    with P.tie_break("torch"):
        assert same_bytes(KERNELS["ties"](xs, base, **kw), REGISTRY["ties"].fn(xs, base, **kw))


def kept_share(out: torch.Tensor, base: torch.Tensor) -> float:
    return float((out != base).float().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_keeps_density_share_like_the_method(dtype):
    # one model, delta nonzero everywhere: out != base exactly where an element was kept
    n = 20000
    base = (torch.randn(n, generator=gen(0)) * 0.05).to(dtype)
    delta = torch.randn(n, generator=gen(1)) * 0.005
    delta = torch.where(delta.abs() < 1e-3, 1e-3, delta)
    model = (base.float() + delta).to(dtype)
    density = 0.3
    target = float(torch.tensor(density, dtype=dtype))  # the method's Bernoulli probability, rounded in bf16
    sigma = math.sqrt(target * (1 - target) / n)
    kw = dict(weight=[1.0], density=density, rescale=False)
    shares = [kept_share(fn([model], base, generator=gen(7), **kw), base)
              for fn in (KERNELS["dare_linear"], REGISTRY["dare_linear"].fn)]
    for share in shares:
        assert abs(share - target) < 5 * sigma


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dare_rescale_restores_the_l1_norm(dtype):
    xs, base = family(8191, dtype, models=1)
    delta = (xs[0].float() - base.float()).abs().sum()
    for fn in (KERNELS["dare_linear"], REGISTRY["dare_linear"].fn):
        out = fn(xs, base, weight=[1.0], density=0.25, rescale=True, generator=gen(3))
        ratio = float((out.float() - base.float()).abs().sum() / delta)
        # bf16: the output is rounded back onto the base's grid, so the norm holds to about 1%
        assert abs(ratio - 1) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_dare_ties_agrees_with_the_method_in_distribution():
    # Two draws of the torch method differ from each other; the kernel's draw must differ from them no more.
    xs, base = family(20000, torch.float32)
    kw = dict(weight=[1.0, 0.8, 0.6], density=0.5, normalize=True)
    ours = KERNELS["dare_ties"](xs, base, generator=gen(4), **kw) - base
    theirs = REGISTRY["dare_ties"].fn(xs, base, generator=gen(4), **kw) - base
    again = REGISTRY["dare_ties"].fn(xs, base, generator=gen(5), **kw) - base

    def stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
        both = (a != 0) & (b != 0)
        return (float((a != 0).float().mean() - (b != 0).float().mean()),
                float(a.abs().mean() / b.abs().mean()) - 1,
                float((a.sign() == b.sign())[both].float().mean()))

    share, scale, agree = stats(ours, theirs)
    share0, scale0, agree0 = stats(again, theirs)
    assert abs(share) < 0.01 and abs(share0) < 0.01
    assert abs(scale) < 0.02 and abs(scale0) < 0.02
    assert abs(agree - agree0) < 0.02


@pytest.mark.parametrize("shape", [(), (1,), (0,), (3, 0)], ids=str)
def test_scalar_single_and_empty_tensors(shape):
    g = gen(0)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    xs = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2)]
    for name, kwargs in [("ties", dict(weight=[1.0, 0.5], density=0.5)), ("linear", dict(weight=[1.0, 2.0])),
                         ("breadcrumbs", dict(weight=[1.0, 1.0], density=0.5)), ("slerp", dict(t=0.5))]:
        out = run(KERNELS[name], name, xs, base, kwargs)
        assert out.shape == shape
        assert same_bytes(out, run(REGISTRY[name].fn, name, xs, base, kwargs))
    out = KERNELS["dare_ties"](xs, base, weight=[1.0, 1.0], density=0.5, generator=gen(1))
    assert out.shape == shape
