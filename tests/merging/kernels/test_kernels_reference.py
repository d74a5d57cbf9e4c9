"""Every kernel against its torch twin (merging.kernels.reference), through the Triton interpreter: the same bytes."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, family, gen, same_bytes

from merging.errors import AlloyError
from merging.kernels import KERNELS, PRIMITIVES, reference
from merging.kernels._common import check_inputs
from merging.kernels.gta import CONSENSUS_SUM, SPARSE_RANDOM, SPARSE_TOPK, gta_merge

W3 = [0.7, 0.5, -0.3]
CASES = {
    "linear": dict(weight=[0.3, 0.5, 0.2]),
    "linear_raw": dict(weight=[0.3, 1.5, 0.25], normalize=False),
    "task_arithmetic": dict(weight=[0.3, 0.5, 0.2], lambda_=0.8),
    "task_arithmetic_norm": dict(weight=W3, normalize=True),
    "ties": dict(weight=[1.0, 0.5, 0.7], density=[0.5, 0.3, 0.9]),
    "ties_count_rescale": dict(weight=W3, density=[0.4, 1.0, 0.0], rescale=True, consensus_method="count",
                               lambda_=1.3),
    "dare_linear": dict(weight=[1.0, 1.0, 0.5], density=0.4),
    "dare_ties": dict(weight=[1.0, 0.6, 1.0], density=[0.6, 0.2, 1.0], normalize=True),
    "breadcrumbs": dict(weight=[0.3, 0.5, 0.2], density=0.6, gamma=0.05),
    "breadcrumbs_ties": dict(weight=W3, density=[0.5, 0.9, 1.0], gamma=[0.1, 0.0, 0.01], normalize=True),
    "slerp": dict(t=0.3),
}


def call(fn, case: str, xs, base, seed: int = 11):
    name = case.split("_raw")[0].split("_norm")[0].split("_count")[0]
    kwargs = dict(CASES[case])
    if name.startswith("dare"):
        kwargs["generator"] = gen(seed)
    if name == "linear":
        return fn(xs, **kwargs)
    if name == "slerp":
        return fn(xs[:1], base, **kwargs)
    return fn(xs, base, **kwargs)


def method_of(case: str) -> str:
    for name in sorted(KERNELS, key=len, reverse=True):
        if case.startswith(name):
            return name
    raise KeyError(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_bytes(case, dtype):
    # 5003 elements: two interpreter blocks of 4096, the second partial
    xs, base = family(5003, dtype)
    name = method_of(case)
    out = call(KERNELS[name], case, xs, base)
    ref = call(getattr(reference, name), case, xs, base)
    assert out.dtype == dtype and out.shape == base.shape
    assert same_bytes(out, ref)
    assert not torch.equal(out, base)  # the merge did something


@pytest.mark.parametrize("case", ["ties", "dare_ties", "breadcrumbs", "linear"])
def test_shape_is_kept_for_matrices(case):
    xs, base = family((37, 81), torch.bfloat16)
    name = method_of(case)
    out = call(KERNELS[name], case, xs, base)
    assert out.shape == (37, 81)
    assert same_bytes(out, call(getattr(reference, name), case, xs, base))


@pytest.mark.parametrize("sparsify", [SPARSE_TOPK, SPARSE_RANDOM])
def test_block_size_does_not_change_the_bytes(sparsify):
    xs, base = family(3001, torch.bfloat16)
    kw = dict(weights=[1.0, 0.5, 0.8], sparsify=sparsify, densities=[0.3, 0.5, 0.7], consensus=CONSENSUS_SUM,
              rescale=True, seed=1234)
    outs = [gta_merge(xs, base, block=block, **kw) for block in (512, 1024, 4096)]
    assert same_bytes(outs[0], outs[1]) and same_bytes(outs[1], outs[2])


def test_magnitude_prune_keeps_exactly_k_with_ties():
    # bf16 deltas on a coarse grid: hundreds of magnitudes equal the threshold
    g = gen(3)
    sign = torch.randint(0, 2, (4099,), generator=g) * 2 - 1
    delta = (sign * torch.randint(1, 7, (4099,), generator=g) * 0.01).to(torch.bfloat16)
    for density in (0.1, 0.37, 0.5, 0.93):
        out = PRIMITIVES["magnitude_prune"](delta, density)
        k = max(1, int(density * delta.numel()))
        assert int((out != 0).sum()) == k
        assert same_bytes(out, reference.magnitude_prune(delta, density))
        threshold = out.abs().float()[out != 0].min()
        assert bool((delta.abs().float() > threshold)[out == 0].logical_not().all())
        # ties go to the lowest indices
        tied = (delta.abs().float() == threshold).nonzero().squeeze(1)
        kept_tied = (out.abs().float() == threshold).nonzero().squeeze(1)
        assert torch.equal(kept_tied, tied[: kept_tied.numel()])


def test_dare_drop_reference_and_rescale():
    delta = family(4097, torch.float32)[0][0] - family(4097, torch.float32)[1]
    out = PRIMITIVES["dare_drop"](delta, 0.3, rescale=True, generator=gen(5))
    assert same_bytes(out, reference.dare_drop(delta, 0.3, rescale=True, generator=gen(5)))
    assert abs(float(out.abs().double().sum() / delta.abs().double().sum()) - 1) < 1e-5


def test_zero_weight_sum_and_no_models():
    xs, base = family(1000, torch.float32)
    out = KERNELS["task_arithmetic"](xs[:2], base, weight=[1.0, -1.0], normalize=True)
    assert same_bytes(out, reference.task_arithmetic(xs[:2], base, weight=[1.0, -1.0], normalize=True))
    assert same_bytes(KERNELS["ties"]([], base, weight=[]), base)


def test_inputs_are_checked():
    xs, base = family(100, torch.float32)
    with pytest.raises(AlloyError, match="shapes differ"):
        KERNELS["task_arithmetic"]([xs[0][:50]], base, weight=[1.0])
    with pytest.raises(AlloyError, match="dtypes differ"):
        KERNELS["task_arithmetic"]([xs[0].half()], base, weight=[1.0])
    with pytest.raises(AlloyError, match="float64 not supported"):
        KERNELS["linear"]([xs[0].double()], weight=[1.0])
    with pytest.raises(AlloyError, match="2 values for 3 models"):
        KERNELS["ties"](xs, base, weight=[1.0, 1.0])

    class CompiledKernel:  # what a kernel is without the interpreter
        pass

    with pytest.raises(AlloyError, match="need CUDA tensors"):
        check_inputs("ties", xs, base, CompiledKernel())
