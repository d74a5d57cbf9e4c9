"""One fused Triton pass for the task-arithmetic family and plain weighted sums.

out = base + lambda * combine_i(w_i * scale_i * keep_i * (x_i - base))      (base optional: linear, slerp, pruning)

- keep_i: all (task arithmetic, linear); top-k magnitude (TIES); a band of magnitude ranks (Model Breadcrumbs); or
  random (DARE: a Philox word keyed by (seed, element, model) below a per-model threshold). The magnitude cuts are
  found before the pass with torch ops (a histogram of bf16/fp16 bit patterns, or kthvalue, plus a tie cut at an
  element index, so exactly k survive with ties to the lower index, as merging.primitives orders them); the kernel
  only compares.
- scale_i: 1, or the L1 rescale (sum |delta| / sum |kept delta|) measured by a first reduction pass (_l1_kernel).
- combine: a plain sum, or TIES' disjoint mean: elect the sign (of the summed weighted deltas, or of the count of
  signs), keep only the agreeing deltas, divide by the sum of their weights.

Every input is read once per pass; arithmetic is float32 in registers. With STEP_ROUND the intermediate results are
rounded to the inputs' dtype wherever torch rounds them when the method runs in that dtype (merging.methods and
mergekit compute the task-arithmetic family in the base's dtype), so the kernel writes the bytes the torch method
writes. Without it (linear, slerp, or on request) everything stays float32 and only the output is rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from merging.errors import AlloyError
from merging.kernels._common import NUM_WARPS, block_for, block_sum, check_inputs, grid, philox_word, round_to
from merging.kernels._host import keep_threshold, rescale_factor, round_code, work_dtype

SPARSE_NONE, SPARSE_TOPK, SPARSE_RANDOM, SPARSE_BAND = 0, 1, 2, 3
CONSENSUS_NONE, CONSENSUS_SUM, CONSENSUS_COUNT = 0, 1, 2
# Per model, float params: weight, upper magnitude threshold, rescale factor, lower magnitude threshold;
# int params (after the seed at index 0): upper tie cut (or random keep threshold), lower tie cut.
NF, NI = 4, 2


@triton.jit
def _keep(d, offs, i, fparams_ptr, iparams_ptr, seed, SPARSIFY: tl.constexpr):
    """Which elements of model i's delta survive pruning."""
    if SPARSIFY == 1:  # top k: descending magnitude, ties by ascending index
        thr = tl.load(fparams_ptr + i * 4 + 1)
        cut = tl.load(iparams_ptr + 1 + i * 2)
        a = tl.abs(d)
        keep = (a > thr) | ((a == thr) & (offs <= cut))
    elif SPARSIFY == 2:  # random
        limit = tl.load(iparams_ptr + 1 + i * 2)
        keep = philox_word(seed, offs, i).to(tl.int64) < limit
    elif SPARSIFY == 3:  # ranks [start, stop) of ascending magnitude, ties by ascending index
        hi = tl.load(fparams_ptr + i * 4 + 1)
        hi_cut = tl.load(iparams_ptr + 1 + i * 2)
        lo = tl.load(fparams_ptr + i * 4 + 3)
        lo_cut = tl.load(iparams_ptr + 2 + i * 2)
        a = tl.abs(d)
        below_stop = (a < hi) | ((a == hi) & (offs <= hi_cut))
        below_start = (a < lo) | ((a == lo) & (offs <= lo_cut))
        keep = below_stop & (below_start == 0)
    else:
        keep = offs >= 0
    return keep


@triton.jit
def _gta_kernel(xs, base_ptr, out_ptr, fparams_ptr, iparams_ptr, n, lam, divisor,
                N: tl.constexpr, HAS_BASE: tl.constexpr, SPARSIFY: tl.constexpr, RESCALE: tl.constexpr,
                CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, SCALE_LAMBDA: tl.constexpr, FMA: tl.constexpr,
                STEP_ROUND: tl.constexpr, OUT_ROUND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    seed = tl.load(iparams_ptr)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=m, other=0.0).to(tl.float32)
    # Sums start at -0.0, the identity of IEEE addition, so a single pruned delta keeps its -0.0 (as torch's mask
    # multiply leaves it), and accumulate in model order, as torch's sum over the model axis.
    if FMA:
        total = tl.full([BLOCK], 0.0, tl.float32)  # linear: torch.zeros, then addcmul_
    else:
        total = tl.full([BLOCK], -0.0, tl.float32)
    pos = tl.full([BLOCK], -0.0, tl.float32)
    neg = tl.full([BLOCK], -0.0, tl.float32)
    wpos = tl.full([BLOCK], 0.0, tl.float32)
    wneg = tl.full([BLOCK], 0.0, tl.float32)
    for i in tl.static_range(N):
        x = tl.load(xs[i] + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_BASE:
            d = round_to(x - b, STEP_ROUND)
        else:
            d = x
        w = tl.load(fparams_ptr + i * 4)
        if SPARSIFY != 0:
            keep = _keep(d, offs, i, fparams_ptr, iparams_ptr, seed, SPARSIFY)
            d = d * keep.to(tl.float32)  # a multiply, as torch's mask: dropped negatives become -0.0
            if RESCALE:
                d = round_to(d * tl.load(fparams_ptr + i * 4 + 2), STEP_ROUND)
        if FMA:
            # torch's addcmul (linear) is one fused multiply-add
            wd = d
            total = tl.fma(d, w, total)
        else:
            wd = round_to(w * d, STEP_ROUND)
            if CONSENSUS == 2:
                total += tl.where(wd > 0, 1.0, tl.where(wd < 0, -1.0, 0.0))
            else:
                total += wd
        if CONSENSUS != 0:
            # Both signs are accumulated so the election needs no second read of the inputs. A zero delta has
            # no sign and joins neither side (mergekit: sign(0) matches neither +1 nor -1).
            pos += tl.where(wd > 0, wd, 0.0)
            neg += tl.where(wd < 0, wd, 0.0)
            wpos += tl.where(wd > 0, w, 0.0)
            wneg += tl.where(wd < 0, w, 0.0)
    if CONSENSUS != 0:
        up = round_to(total, STEP_ROUND) >= 0
        mixed = round_to(tl.where(up, pos, neg), STEP_ROUND)
        div = round_to(tl.where(up, wpos, wneg), STEP_ROUND)
        div = tl.where(div == 0, 1.0, div)
    else:
        mixed = round_to(total, STEP_ROUND)
        div = divisor + tl.full([BLOCK], 0.0, tl.float32)
    if NORMALIZE:
        mixed = round_to(tl.math.div_rn(mixed, div), STEP_ROUND)
    if SCALE_LAMBDA:
        mixed = round_to(mixed * lam, STEP_ROUND)
    if HAS_BASE:
        mixed = b + mixed
    # Rounded by hand, so the narrowing store is exact (the interpreter truncates where GPUs round to nearest).
    out = round_to(mixed, OUT_ROUND)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _l1_kernel(xs, base_ptr, part_ptr, fparams_ptr, iparams_ptr, n, nprog, N: tl.constexpr, HAS_BASE: tl.constexpr,
               SPARSIFY: tl.constexpr, STEP_ROUND: tl.constexpr, BLOCK: tl.constexpr):
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
            d = round_to(x - b, STEP_ROUND)
        else:
            d = x
        keep = _keep(d, offs, i, fparams_ptr, iparams_ptr, seed, SPARSIFY)
        a = tl.abs(d)
        tl.store(part_ptr + (2 * i) * nprog + pid, block_sum(a.to(tl.float64)))
        tl.store(part_ptr + (2 * i + 1) * nprog + pid, block_sum(tl.where(keep, a, 0.0).to(tl.float64)))


_HALF_BINS = 1 << 15  # non-negative bf16/fp16 bit patterns (NaN included) lie in [0, 2**15)


def _first_cut(a: torch.Tensor, m: int, descending: bool) -> tuple[float, int]:
    """(threshold, cut) such that the first m elements of 1-D non-negative `a`, ordered by value (descending or
    ascending) with ties by ascending index, are: strictly beyond the threshold, plus the elements equal to it
    with index <= cut.

    No sort: bf16/fp16 magnitudes order like their int16 bits, so one histogram of the bit patterns gives the
    threshold and the count beyond it (one pass); float32 uses kthvalue.
    """
    n = a.numel()
    if m <= 0:
        return (float("inf"), -1) if descending else (-1.0, -1)
    if m >= n:
        return (-1.0, n) if descending else (float("inf"), n)
    if a.dtype in (torch.bfloat16, torch.float16):
        keys = a.view(torch.int16)
        counts = torch.bincount(keys, minlength=_HALF_BINS)
        cum = (counts.flip(0) if descending else counts).cumsum(0)
        pos = int(torch.searchsorted(cum, m))  # the first bin whose running count reaches m
        before = int(cum[pos - 1]) if pos else 0
        key = _HALF_BINS - 1 - pos if descending else pos
        thr = float(torch.tensor(key, dtype=torch.int16).view(a.dtype))
        ties = keys == key
    else:
        thr_t = torch.kthvalue(a, n - m + 1 if descending else m).values
        before = int((a > thr_t).sum()) if descending else int((a < thr_t).sum())
        thr = float(thr_t)
        ties = a == thr_t
    cut = int(torch.nonzero(ties)[m - before - 1, 0])
    return thr, cut


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    a = delta.reshape(-1).abs()
    return a if a.dtype in (torch.bfloat16, torch.float16) else a.float()


def topk_cut(delta: torch.Tensor, k: int) -> tuple[float, int]:
    """Keep |d| > threshold, and |d| == threshold up to flat index cut: exactly the k largest magnitudes."""
    return _first_cut(_magnitudes(delta), k, descending=True)


def band_cuts(delta: torch.Tensor, start: int, stop: int) -> tuple[float, int, float, int]:
    """(stop threshold, stop cut, start threshold, start cut) of ascending-magnitude ranks [start, stop)."""
    a = _magnitudes(delta)
    n = a.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return -1.0, -1, -1.0, -1  # nothing below the stop
    hi, hi_cut = _first_cut(a, stop, descending=False)
    lo, lo_cut = _first_cut(a, start, descending=False)
    return hi, hi_cut, lo, lo_cut


@dataclass
class GtaLaunch:
    """Everything the fused pass needs, once the host-side preparation (magnitude cuts, L1 rescale pass) is done."""

    xs: tuple[torch.Tensor, ...]
    base: torch.Tensor | None
    fparams: torch.Tensor
    iparams: torch.Tensor
    lambda_: float
    divisor: float
    flags: dict
    block: int

    def run(self) -> torch.Tensor:
        """The fused pass: read every input once, write the merged tensor."""
        out = torch.empty_like(self.xs[0], memory_format=torch.contiguous_format)
        n = out.numel()
        if n:
            base = self.base if self.base is not None else self.xs[0]  # HAS_BASE=False never reads it
            _gta_kernel[grid(n, self.block)](
                self.xs, base, out, self.fparams, self.iparams, n, self.lambda_, self.divisor, N=len(self.xs),
                HAS_BASE=self.base is not None, BLOCK=self.block, num_warps=NUM_WARPS,
                enable_fp_fusion=False,  # no contraction into FMAs: round the products torch rounds
                **self.flags)
        return out


def gta_merge(tensors: list[torch.Tensor], base: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """The generic fused merge (see the module docstring and prepare_gta); merging.kernels.ops calls this."""
    prepared = prepare_gta(tensors, base, **kwargs)
    return prepared.run() if isinstance(prepared, GtaLaunch) else prepared


def prepare_gta(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weights: list[float],
                sparsify: int = SPARSE_NONE, densities: list[float] | None = None,
                gammas: list[float] | None = None, consensus: int = CONSENSUS_NONE, normalize: bool = False,
                rescale: bool = False, lambda_: float = 1.0, seed: int = 0, stepwise: bool = True,
                fma: bool = False, zero_divisor_eps: float = 1e-8, what: str = "gta",
                block: int | None = None) -> GtaLaunch | torch.Tensor:
    """Check the inputs, find the magnitude cuts and the rescale factors; return the launch (or, with no models,
    the base itself).

    stepwise: round intermediates to the inputs' dtype as torch does computing in it (False: float32 throughout).
    fma: accumulate w_i * x_i with fused multiply-adds (torch's addcmul; no sparsify, no consensus).
    """
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
    step = round_code(dtype) if stepwise else 0
    cdt = dtype if stepwise else torch.float32
    # DARE draws and rescales in its own work dtype (merging.primitives._sampling_dtype); magnitude pruning in cdt
    wdt = (work_dtype(xs[0]) if stepwise else torch.float32) if sparsify == SPARSE_RANDOM else cdt

    fparams = torch.zeros((count, NF), dtype=torch.float32)
    iparams = torch.zeros(1 + NI * count, dtype=torch.int64)
    iparams[0] = seed
    fparams[:, 0] = torch.tensor(weights, dtype=cdt).float()  # the weights as the torch method holds them
    fparams[:, 2] = 1.0
    prunes = [sparsify != SPARSE_NONE and dens < 1.0 for dens in densities]
    for i, (x, dens) in enumerate(zip(xs, densities)):
        if not prunes[i]:
            # density >= 1 leaves a delta untouched (no rescale either), as mergekit
            fparams[i, 1], iparams[1 + 2 * i] = -1.0, n
            if sparsify == SPARSE_RANDOM:
                iparams[1 + 2 * i] = keep_threshold(1.0)
            elif sparsify == SPARSE_BAND:
                fparams[i, 1], iparams[1 + 2 * i] = float("inf"), n
                fparams[i, 3], iparams[2 + 2 * i] = -1.0, -1
        elif sparsify == SPARSE_RANDOM:
            # the Bernoulli probability as mergekit holds it: a tensor in the work dtype (bf16 rounds 0.3 up)
            iparams[1 + 2 * i] = keep_threshold(float(torch.tensor(dens, dtype=wdt)))
        else:
            delta = (x.to(cdt) - b.to(cdt)) if b is not None else x.to(cdt)
            if sparsify == SPARSE_TOPK:
                fparams[i, 1], iparams[1 + 2 * i] = topk_cut(delta, 0 if dens <= 0 else max(1, int(dens * n)))
            else:
                keep = int(dens * n)
                start = max(0, n - keep - int(gammas[i] * n))
                hi, hi_cut, lo, lo_cut = band_cuts(delta, start, start + keep)
                fparams[i, 1], iparams[1 + 2 * i], fparams[i, 3], iparams[2 + 2 * i] = hi, hi_cut, lo, lo_cut
            del delta
    do_rescale = rescale and any(prunes) and n > 0
    if do_rescale:
        fp_d, ip_d = fparams.to(device), iparams.to(device)
        nprog = grid(n, block)[0]
        part = torch.empty((count, 2, nprog), dtype=torch.float64, device=device)
        _l1_kernel[grid(n, block)](xs, b if b is not None else xs[0], part, fp_d, ip_d, n, nprog, N=count,
                                   HAS_BASE=b is not None, SPARSIFY=sparsify, STEP_ROUND=step, BLOCK=block,
                                   num_warps=NUM_WARPS)
        sums = part.sum(dim=2).cpu()
        for i in range(count):
            if prunes[i]:
                fparams[i, 2] = rescale_factor(float(sums[i, 0]), float(sums[i, 1]), wdt)

    divisor = 1.0
    if normalize and consensus == CONSENSUS_NONE:
        wsum = torch.tensor(weights, dtype=cdt).sum()  # torch's sum, in the dtype the method computes in
        if abs(float(wsum)) < zero_divisor_eps:
            wsum = torch.ones((), dtype=cdt)
        divisor = float(wsum)
    flags = dict(SPARSIFY=sparsify, RESCALE=do_rescale, CONSENSUS=consensus, NORMALIZE=normalize,
                 SCALE_LAMBDA=lambda_ != 1, FMA=fma, STEP_ROUND=step, OUT_ROUND=round_code(dtype))
    return GtaLaunch(xs, b, fparams.to(device), iparams.to(device), float(lambda_), divisor, flags, block)
