"""One fused Triton pass for the task-arithmetic family and plain weighted sums.

out = base + lambda * combine_i(w_i * scale_i * keep_i * (x_i - base))      (base optional: linear, slerp, pruning)

- keep_i: all (task arithmetic, linear), magnitude (|delta| above a per-model threshold found on the host, ties cut
  at an element index so exactly k survive), or random (a Philox word keyed by (seed, element, model) below a
  per-model threshold: DARE).
- scale_i: 1, or the L1 rescale of DARE/DELLA (sum |delta| / sum |kept delta|) measured by a first reduction pass.
- combine: a plain sum, or TIES' disjoint mean: elect the sign of the summed weighted deltas, keep only the agreeing
  ones, divide by the sum of their weights.

Every input is read once per pass; arithmetic is float32 in registers; the output is stored in the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from merging.errors import AlloyError
from merging.kernels._common import (
    NUM_WARPS,
    block_for,
    check_inputs,
    grid,
    out_buffer,
    philox_word,
    store_rounded,
)
from merging.kernels._host import keep_threshold

SPARSE_NONE, SPARSE_MAGNITUDE, SPARSE_RANDOM = 0, 1, 2
RESCALE_EPS = 1e-7  # below this L1 norm (before or after pruning) the pruned delta is left unscaled, as mergekit does
NPARAM = 4  # float params per model: weight, magnitude threshold, rescale factor, (spare)


@triton.jit
def _keep(d, offs, i, fparams_ptr, iparams_ptr, seed, SPARSIFY: tl.constexpr):
    """Which elements of model i's delta survive pruning."""
    if SPARSIFY == 1:
        thr = tl.load(fparams_ptr + i * 4 + 1)
        cut = tl.load(iparams_ptr + 1 + i)
        a = tl.abs(d)
        keep = (a > thr) | ((a == thr) & (offs <= cut))
    elif SPARSIFY == 2:
        limit = tl.load(iparams_ptr + 1 + i)
        keep = philox_word(seed, offs, i).to(tl.int64) < limit
    else:
        keep = offs >= 0
    return keep


@triton.jit
def _gta_kernel(xs, base_ptr, out_ptr, fparams_ptr, iparams_ptr, n, lam, divisor,
                N: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, CONSENSUS: tl.constexpr,
                NORMALIZE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    seed = tl.load(iparams_ptr)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)  # summed in model order, as torch's sum over the model axis
    pos = tl.zeros([BLOCK], dtype=tl.float32)
    neg = tl.zeros([BLOCK], dtype=tl.float32)
    wpos = tl.zeros([BLOCK], dtype=tl.float32)
    wneg = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(N):
        x = tl.load(xs[i] + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_BASE:
            d = x - b
        else:
            d = x
        w = tl.load(fparams_ptr + i * 4)
        if SPARSIFY != 0:
            keep = _keep(d, offs, i, fparams_ptr, iparams_ptr, seed, SPARSIFY)
            d = tl.where(keep, d, 0.0) * tl.load(fparams_ptr + i * 4 + 2)
        wd = w * d
        total += wd
        if CONSENSUS:
            # Both signs are accumulated so the election needs no second read of the inputs. A zero delta has
            # no sign and joins neither side (mergekit: sign(0) matches neither +1 nor -1).
            pos += tl.where(wd > 0, wd, 0.0)
            neg += tl.where(wd < 0, wd, 0.0)
            wpos += tl.where(wd > 0, w, 0.0)
            wneg += tl.where(wd < 0, w, 0.0)
    if CONSENSUS:
        up = total >= 0
        mixed = tl.where(up, pos, neg)
        div = tl.where(up, wpos, wneg)
        div = tl.where(div == 0, 1.0, div)
    else:
        mixed = total
        div = divisor
    if NORMALIZE:
        mixed = tl.math.div_rn(mixed, div + tl.zeros([BLOCK], dtype=tl.float32))
    mixed = mixed * lam
    if HAS_BASE:
        mixed = b + mixed
    store_rounded(out_ptr, offs, mixed, m, ROUND_BF16)


@triton.jit
def _l1_kernel(xs, base_ptr, part_ptr, fparams_ptr, iparams_ptr, n, nprog,
               N: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, BLOCK: tl.constexpr):
    """Per program and model: sum |delta| and sum |kept delta| in float64, for the L1 rescale."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    seed = tl.load(iparams_ptr)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    for i in tl.static_range(N):
        x = tl.load(xs[i] + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_BASE:
            d = x - b
        else:
            d = x
        keep = _keep(d, offs, i, fparams_ptr, iparams_ptr, seed, SPARSIFY)
        a = tl.abs(d)
        tl.store(part_ptr + (2 * i) * nprog + pid, tl.sum(a.to(tl.float64), axis=0))
        tl.store(part_ptr + (2 * i + 1) * nprog + pid, tl.sum(tl.where(keep, a, 0.0).to(tl.float64), axis=0))


def magnitude_cut(delta: torch.Tensor, density: float) -> tuple[float, int]:
    """(threshold, cut index) that keep exactly k = max(1, int(density * n)) elements of |delta|.

    Kept: |d| > threshold, and the elements equal to it up to flat index `cut` — the largest magnitudes first,
    ties to the lower index (the order of a stable descending sort). kthvalue + one count instead of a sort.
    """
    a = delta.reshape(-1).abs()
    n = a.numel()
    if density >= 1.0:
        return -1.0, n  # every |d| >= 0 > -1
    if density <= 0.0 or n == 0:
        return float("inf"), -1
    k = max(1, int(density * n))
    thr = torch.kthvalue(a, n - k + 1).values
    need = k - int((a > thr).sum())
    cut = int(torch.nonzero(a == thr)[need - 1, 0])
    return float(thr), cut


def gta_merge(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weights: list[float],
              sparsify: int = SPARSE_NONE, densities: list[float] | None = None, consensus: bool = False,
              normalize: bool = False, rescale: bool = False, lambda_: float = 1.0, seed: int = 0,
              zero_divisor_eps: float = 1e-8, what: str = "gta", block: int | None = None) -> torch.Tensor:
    """The generic fused merge (see the module docstring); the named methods in merging.kernels call this."""
    dtype = check_inputs(what, tensors, base, _gta_kernel)
    if not tensors:
        if base is None:
            raise AlloyError(f"kernel {what}: no input tensors")
        return base.clone()
    xs = tuple(t.contiguous() for t in tensors)
    b = base.contiguous() if base is not None else None
    n = xs[0].numel()
    device = xs[0].device
    count = len(xs)
    densities = densities if densities is not None else [1.0] * count
    block = block or block_for(_gta_kernel)

    fparams = torch.zeros((count, NPARAM), dtype=torch.float64)
    iparams = torch.zeros(count + 1, dtype=torch.int64)
    iparams[0] = seed
    fparams[:, 0] = torch.tensor(weights, dtype=torch.float64)
    fparams[:, 2] = 1.0
    for i, (x, dens) in enumerate(zip(xs, densities)):
        if sparsify == SPARSE_MAGNITUDE:
            delta = x.float() - b.float() if b is not None else x.float()
            thr, cut = magnitude_cut(delta, dens)
            del delta
            fparams[i, 1] = thr
            iparams[1 + i] = cut
        elif sparsify == SPARSE_RANDOM:
            iparams[1 + i] = keep_threshold(dens)
    fparams_d = fparams.to(torch.float32).to(device)
    iparams_d = iparams.to(device)
    dummy = b if b is not None else xs[0]

    if sparsify != SPARSE_NONE and rescale and n:
        nprog = grid(n, block)[0]
        part = torch.empty((count, 2, nprog), dtype=torch.float64, device=device)
        _l1_kernel[grid(n, block)](xs, dummy, part, fparams_d, iparams_d, n, nprog, N=count,
                                   HAS_BASE=b is not None, SPARSIFY=sparsify, BLOCK=block, num_warps=NUM_WARPS,
                                   enable_fp_fusion=False)
        sums = part.sum(dim=2).cpu()
        for i, dens in enumerate(densities):
            before, after = float(sums[i, 0]), float(sums[i, 1])
            # mergekit leaves a tensor with density >= 1 untouched, and skips the rescale of (nearly) empty ones
            if dens < 1.0 and before >= RESCALE_EPS and after >= RESCALE_EPS:
                fparams[i, 2] = before / after
        fparams_d = fparams.to(torch.float32).to(device)

    wsum = float(fparams[:, 0].to(torch.float32).sum())
    divisor = 1.0 if abs(wsum) < zero_divisor_eps else wsum
    out, round_bf16 = out_buffer(xs[0])
    if n:
        _gta_kernel[grid(n, block)](xs, dummy, out, fparams_d, iparams_d, n, float(lambda_), divisor, N=count,
                                    HAS_BASE=b is not None, SPARSIFY=sparsify, CONSENSUS=consensus,
                                    NORMALIZE=normalize, ROUND_BF16=round_bf16, BLOCK=block, num_warps=NUM_WARPS,
                                    enable_fp_fusion=False)  # no FMA contraction: the bytes torch computes
    return out.to(dtype) if out.dtype != dtype else out
