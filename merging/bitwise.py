"""Exact CPU fast paths for masking and sign-elected merging: the reference primitives' bits, computed on the floats'
bit patterns.

Why: on the CPU, torch's comparisons, bool-to-float conversions and sums over a stacked dimension run 5-40x slower
than plain arithmetic. Measured per 1M bf16 elements on one thread (torch 2.13): `x > 0` 0.86 ms, `x * bool_mask`
1.8 ms, `stack.sum(0)` 1.9 ms, `torch.where` 3.6 ms, against `a + b` 0.20 ms and int16 `^`, `&`, `>>` 0.05 ms.
TIES' and DARE's combine step is made of the slow kind (merging.primitives follows mergekit op by op).

IEEE floats are sign-magnitude, so on their bits read as integers:
- `x * mask` (mask 0/1) is x where kept and a zero carrying x's sign where not: `bits & (keep | SIGN)`, keep -1 or 0;
- "the sign of x differs from the elected sign" is the top bit of `bits ^ elected`;
- "x is not ±0" is the top bit of `(bits & MAX) + MAX` (the addition wraps).
These hold for finite values only (inf * 0 is NaN), so every fast path first checks its tensors
(merging.checks.all_finite) and returns None on NaN or inf: the caller then runs the reference.

`exact_sum` reproduces torch's `stack.sum(0)` (one float32 accumulator per element, models added in order from +0,
one rounding at the end) with element-wise adds; tests/merging/test_bitwise.py checks every function here against the
reference bit for bit, signed zeros, subnormals, ties and non-finite inputs included.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from merging.checks import all_finite

_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def applies(t: Tensor) -> bool:
    """Whether the fast paths handle this tensor: a CPU tensor of bf16, fp16 or fp32 (the reductions they emulate are
    the CPU's; other devices and dtypes take the reference)."""
    return t.device.type == "cpu" and t.dtype in _INT


def _consts(dtype: torch.dtype) -> tuple[torch.dtype, int, int, int]:
    idt = _INT[dtype]
    bits = 8 * dtype.itemsize
    return idt, bits - 1, -(1 << (bits - 1)), (1 << (bits - 1)) - 1  # int dtype, sign shift, SIGN, MAX


# Elements per slice of the chunked passes here and in merging.primitives / methods.task_arithmetic: a slice's
# temporaries stay in cache, and under 2 MB, below the size torch backs with huge pages (merging/__init__.py). With the
# engine's heap settings, 1M-element slices (2 MB of int16) made a dare_ties tensor 149 ms and a ties one 256 ms
# against 117 and 147 ms at 512K (one thread, 5632x2048 bf16, two fine-tunes).
CHUNK = 1 << 19


def exact_sum(terms: list[Tensor]) -> Tensor:
    """torch.stack(terms).sum(0), bit for bit (CPU; bf16, fp16 or fp32 terms of one shape), without the stack.

    torch sums a stacked dimension in one float32 accumulator per element, starting from +0 and rounding once; for two
    half-precision terms that is one rounded add (fp32 add, then round), and +0 turns a -0 result into +0 as the
    accumulator's start does."""
    dtype = terms[0].dtype
    if len(terms) == 2 and dtype != torch.float32:
        out = torch.add(terms[0], terms[1])
        out += 0
        return out
    acc = terms[0].float() + 0.0
    for t in terms[1:]:
        acc += t
    return acc.to(dtype)


def mask_multiply(x: Tensor, keep: Tensor) -> Tensor | None:
    """x * keep for a bool `keep` of x's shape (as merging.primitives.apply_mask multiplies: dropped elements become
    zeros with x's sign), or None when x holds NaN or inf."""
    if not all_finite(x):
        return None
    idt, _, sign, _ = _consts(x.dtype)
    xs, ks = x.reshape(-1).view(idt), keep.reshape(-1).view(torch.int8)
    out = torch.empty_like(xs)
    for s in range(0, xs.numel(), CHUNK):
        k = ks[s:s + CHUNK].to(idt).neg_().bitwise_or_(sign)  # -1 where kept, SIGN where dropped
        torch.bitwise_and(xs[s:s + CHUNK], k, out=out[s:s + CHUNK])
    return out.view(x.dtype).view(x.shape)


def abs_into(x: Tensor, out: Tensor) -> Tensor:
    """|x| written into `out` (x's dtype and shape): clearing the sign bit is `abs` for every value but NaN, and
    out-of-place `abs` would fault in and zero a fresh tensor-sized block each call."""
    idt, _, _, mx = _consts(x.dtype)
    torch.bitwise_and(x.view(idt), mx, out=out.view(idt))
    return out


def keep_below_(x: Tensor, keys: Callable[[int], Tensor], level: int) -> None:
    """In place, x * (key < level) as merging.primitives.apply_mask multiplies (dropped elements become zeros with
    x's sign), for one key per element: `keys(m)` returns the next m int16 keys in [0, 2**15), called slice by slice
    in order. x: contiguous and finite (merging.checks.all_finite); level in [0, 2**15]."""
    idt, _, sign, _ = _consts(x.dtype)
    flat = x.view(-1).view(idt)
    for s in range(0, flat.numel(), CHUNK):
        part = flat[s:s + CHUNK]
        k = keys(part.numel())
        k -= level  # in [-2**15, 2**15): no wrap
        k >>= 15  # -1 where key < level, else 0
        if idt != torch.int16:
            k = k.to(idt)
        k |= sign  # where dropped, keep x's sign bit only
        part &= k
    return None


def keep_below_levels_(x: Tensor, keys: Tensor, levels: Tensor) -> None:
    """In place, x * (keys < levels) as keep_below_ multiplies, with a level per element: keys int16 in [0, 2**15),
    levels int32 in [0, 2**15], both x's shape; x contiguous and finite."""
    idt, _, sign, _ = _consts(x.dtype)
    m = keys.to(torch.int32).sub_(levels)  # negative where key < level
    m >>= 31  # -1 where kept, else 0
    if idt != torch.int32:
        m = m.to(idt)
    m |= sign
    x.view(idt).bitwise_and_(m)


def keep_ranked_(x: Tensor, keys: Tensor, thr: int, tied: int) -> None:
    """In place, x * mask as merging.primitives.apply_mask multiplies, for the mask of merging.primitives'
    `_first_in_order` (descending): keys above `thr` kept, and the first `tied` keys equal to it by index.
    keys: x's magnitudes' bit patterns (abs_into), flat; x contiguous and finite."""
    idt, shift, sign, _ = _consts(x.dtype)
    flat = x.view(-1).view(idt)
    for s in range(0, flat.numel(), CHUNK):
        part, key = flat[s:s + CHUNK], keys[s:s + CHUNK]
        m = torch.rsub(key, thr)  # thr - key: both in [0, MAX], no wrap
        m >>= shift  # -1 where key > thr, else 0
        if tied > 0:
            first = (key == thr).nonzero().squeeze(1)[:tied]  # in ascending index order
            m[first] = -1
            tied -= first.numel()
        m |= sign
        part &= m
    return None


def weighted_rows(deltas: Tensor, weights: Tensor) -> list[Tensor] | None:
    """The rows of deltas * weights ([n, L] * [n, 1], both in one dtype), or None for a non-finite weight."""
    wvals = [float(w) for w in weights.reshape(-1)]
    if not all(math.isfinite(w) for w in wvals):
        return None
    # x * 1 is x exactly: unit weights (TIES' and DARE's default) skip the multiply
    return [deltas[i] if wvals[i] == 1.0 else deltas[i] * weights[i] for i in range(deltas.shape[0])]


def sign_merge(deltas: Tensor, weights: Tensor, *, normalize: bool) -> Tensor | None:
    """merging.primitives' TIES combine with the 'sum' sign election, bit for bit:
    `disjoint_merge(W, weights, agreement_mask(W, 'sum'), normalize)` for W = deltas * weights.

    deltas: [n, L] (a view is fine); weights: [n, 1] in deltas' dtype. None when a value is NaN or inf."""
    dtype = deltas.dtype
    idt, shift, sign, mx = _consts(dtype)
    ws = weighted_rows(deltas, weights)
    if ws is None:
        return None
    total = exact_sum(ws)
    t = total.view(idt)
    if not all_finite(total):  # a NaN or inf in any term reaches the total
        return None
    # SIGN where the elected sign is -1 (total < 0), 0 where +1; the total is never -0 (exact_sum starts from +0)
    elected = t & sign
    kept, votes = [], []
    for w, wt in zip(ws, weights):
        x = w.view(idt)
        differs = (x ^ elected) >> shift  # -1 where x's sign bit is not the elected one
        # Dropped elements become +0 where the reference's `x * False` leaves a signed zero, and ±0 elements (which
        # never agree) are kept as they are: the sum below starts from +0, so a zero's sign never reaches the result.
        kept.append((x & ~differs).view(dtype))
        if normalize:
            agrees = (((x & mx) + mx) >> shift) & ~differs  # -1 where x is non-zero with the elected sign
            votes.append((wt.view(idt) & (agrees | sign)).view(dtype))  # weight * agrees
    mixed = exact_sum(kept)
    if normalize:
        d = exact_sum(votes).view(idt)
        nonzero = ((d & mx) + mx) >> shift
        one = torch.ones((), dtype=dtype).view(idt)
        mixed /= ((d & nonzero) | (one & ~nonzero)).view(dtype)  # a sum of no weights divides by 1
    return mixed
