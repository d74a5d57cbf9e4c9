"""Pieces shared by TIES, DARE, breadcrumbs, DELLA and SCE: prune, drop, rescale, elect sign, disjoint merge.

Each function reproduces mergekit 0.1.5's arithmetic (same operations, same dtype, same order) so that results are
bit-identical to it wherever the choice of elements is.

Selection among equal magnitudes. mergekit picks "the k largest" with `torch.argsort`/`torch.sort`/`torch.topk`,
which on the CPU are not stable in torch 2.x: which of several elements tied at the threshold it keeps is an artefact
of the sort's algorithm (it changes with the tensor's size, the torch version and the device). bf16 deltas tie a lot
(about 1% of a realistic 4M-element delta sits exactly at a density-0.5 threshold). alloy's rule, the default
`tie_break("index")`: order by value, ties by ascending flat index (what a stable sort gives), so the kept set is a
function of the values alone. It keeps exactly as many elements as mergekit, the same ones strictly above (or below)
the threshold, and differs from it only in which tied elements are kept. It needs no sort: the threshold comes from a
histogram of the bit patterns (non-negative floats order like their bits read as integers: one pass for
bf16/fp16, two 16-bit passes for fp32; `torch.kthvalue` for fp64), then the first tied elements by index complete the count.
`tie_break("torch")` calls the very sort mergekit calls instead: bit-identical to mergekit on the same torch build
and device, and slower (a full sort).
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor

from merging import bitwise as B
from merging.checks import all_finite
from merging.errors import ConfigError

TieBreak = Literal["index", "torch"]
_TIE_BREAK: ContextVar[str] = ContextVar("alloy_tie_break", default="index")
_HALF_BINS = 1 << 15  # non-negative fp16/bf16 bit patterns (NaN included) lie in [0, 2**15)
_KEY_DTYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@contextmanager
def tie_break(mode: TieBreak) -> Iterator[None]:
    """Select the rule for elements tied at a selection threshold within this context (this thread's context)."""
    if mode not in ("index", "torch"):
        raise ConfigError(f"tie_break must be 'index' or 'torch', got {mode!r}")
    token = _TIE_BREAK.set(mode)
    try:
        yield
    finally:
        _TIE_BREAK.reset(token)


def current_tie_break() -> str:
    return _TIE_BREAK.get()


# ----------------------------------------------------------------------------------------------------- selection


def _locate(counts: Tensor, m: int, descending: bool) -> tuple[int, int]:
    """The bin holding the m-th element in order (1-based m) and how many elements lie in bins before it."""
    cum = (counts.flip(0) if descending else counts).cumsum(0)
    pos = int(torch.searchsorted(cum, m))  # first position whose running count reaches m
    before = int(cum[pos - 1]) if pos else 0
    return (counts.numel() - 1 - pos if descending else pos), before


def _kth_key(keys: Tensor, m: int, descending: bool) -> tuple[int, int]:
    """Bit pattern of the m-th key in order and how many keys come strictly before it, by histograms:
    one of 2**15 bins for 16-bit keys; for 32-bit keys one over the high halves, then one over the low halves of
    the keys in the chosen high bin (a two-pass radix select, no sort)."""
    if keys.dtype == torch.int16:
        return _locate(torch.bincount(keys, minlength=_HALF_BINS), m, descending)
    halves = keys.view(torch.int16)
    high = halves[1::2] if sys.byteorder == "little" else halves[0::2]
    top, before = _locate(torch.bincount(high, minlength=_HALF_BINS), m, descending)
    low = keys[high == top] & 0xFFFF
    bottom, before_low = _locate(torch.bincount(low, minlength=1 << 16), m - before, descending)
    return (top << 16) | bottom, before + before_low


def _first_in_order(flat: Tensor, m: int, descending: bool) -> Tensor:
    """Bool mask of the first m elements of 1-D non-negative `flat` ordered by value, ties by ascending index."""
    n = flat.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if flat.dtype in _KEY_DTYPES:
        # Non-negative IEEE floats order like their bit patterns read as integers.
        values = flat.contiguous().view(_KEY_DTYPES[flat.dtype])
        thr, before = _kth_key(values, m, descending)
    else:
        values = flat
        thr = torch.kthvalue(flat, n - m + 1 if descending else m).values
        before = None
    strict = values > thr if descending else values < thr
    if before is None:
        before = int(strict.sum())
    tied = torch.nonzero(values == thr).squeeze(1)[:m - before]  # nonzero lists indices in ascending order
    strict[tied] = True
    return strict


def rank_range_mask(values: Tensor, start: int, stop: int, *, descending: bool) -> Tensor:
    """Bool mask (values' shape) of the elements at positions [start, stop) of the order by value (descending or
    ascending), ties by ascending flat index. `values` must be non-negative (magnitudes)."""
    flat = values.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    mask = _first_in_order(flat, stop, descending)
    if start > 0:
        mask &= ~_first_in_order(flat, start, descending)
    return mask.view(values.shape)


def _sort_key(magnitude: Tensor) -> Tensor:
    """What mergekit sorts for magnitude and breadcrumbs selection: an fp32 copy on the CPU, the native dtype
    elsewhere. Only fp64 is affected (its magnitudes then tie in fp32); the copy is skipped where it is exact."""
    if magnitude.device.type == "cpu" and magnitude.dtype == torch.float64:
        return magnitude.float()
    return magnitude


def magnitude_keep_count(density: float, n: int) -> int:
    """mergekit's k for magnitude pruning: at least one element of a non-empty tensor once density > 0."""
    return max(1, int(density * n))


def magnitude_mask(delta: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest |delta| (see the module docstring for ties)."""
    mag = delta.abs()
    if current_tie_break() == "torch":
        order = torch.argsort(mag.reshape(-1).float() if mag.device.type == "cpu" else mag.reshape(-1),
                              descending=True)[:k]
        mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
        mask[order] = True
        return mask.view(delta.shape)
    return rank_range_mask(_sort_key(mag), 0, k, descending=True)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask: drop the gamma fraction of largest |delta| and the smallest, keep int(density*n).

    mergekit's counts: keep int(density*n) starting after the n - keep - int(gamma*n) smallest (never below 0, so
    outlier removal shrinks when density + gamma > 1).
    """
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    mag = delta.abs()
    if current_tie_break() == "torch":
        flat = mag.reshape(-1).float() if mag.device.type == "cpu" else mag.reshape(-1)
        order = torch.sort(flat, descending=False).indices[n_bottom:n_bottom + keep]
        mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        mask[order] = True
        return mask.view(delta.shape)
    return rank_range_mask(_sort_key(mag), n_bottom, n_bottom + keep, descending=False)


# ------------------------------------------------------------------------------------------------------- deltas


Sparsify = Callable[[Tensor, int], Tensor]  # (delta, model index) -> sparsified delta


def stacked_deltas(tensors: list[Tensor], base: Tensor, sparsify: Sparsify | None = None, *,
                   owned: bool = False) -> Tensor:
    """[n, *shape] stack of t_i - base in the base's dtype; sparsify(delta, i), when given, runs on each whole delta
    (thresholds, random draws and L1 rescales see every element, as in mergekit) and may work in place.

    owned: the caller gives the inputs up (MethodSpec.inplace): each leaves `tensors` (set to None) once its delta
    is taken, so its read buffer is freed before the next delta's temporaries and whatever follows the stack."""
    deltas = base.new_empty((len(tensors), *base.shape))
    for i in range(len(tensors)):
        torch.sub(tensors[i], base, out=deltas[i])
        if owned:
            tensors[i] = None
        if sparsify is not None:
            d = deltas[i]
            kept = sparsify(d, i)
            if kept.data_ptr() != d.data_ptr():  # not sparsified in place
                d.copy_(kept)
    return deltas


# ------------------------------------------------------------------------------------------------ prune and drop


_L1_EPS = 1e-7


def l1_rescale(original: Tensor, masked: Tensor, eps: float = _L1_EPS) -> Tensor:
    """Scale `masked` so that its L1 norm equals `original`'s (mergekit's `rescale`); unchanged if either is ~0."""
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def apply_mask(tensor: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """tensor * mask (a multiply, as mergekit does: negative dropped values become -0.0), L1-rescaled if asked.

    `mask` is bool or 0/1 in tensor's dtype; a bool mask multiplies to the same bits without a converted copy."""
    masked = None
    if mask.dtype == torch.bool and B.applies(tensor):  # the same bits without a bool-to-float pass (merging.bitwise)
        masked = B.mask_multiply(tensor, mask)
    if masked is None:
        masked = tensor * (mask if mask.dtype == torch.bool else mask.to(tensor.dtype))
    return l1_rescale(tensor, masked) if rescale else masked


def magnitude_prune(delta: Tensor, density: float, *, rescale: bool = False, inplace: bool = False) -> Tensor:
    """TIES' trim: keep the k = max(1, int(density*n)) largest |delta|, zero the rest.

    inplace=True lets it overwrite `delta` and return it (the same bits), as dare_drop does."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = magnitude_keep_count(density, delta.numel())
    if inplace and k < delta.numel() and _prune_in_place(delta, k, rescale):
        return delta
    return apply_mask(delta, magnitude_mask(delta, k), rescale)


def breadcrumbs_prune(delta: Tensor, density: float, gamma: float, *, rescale: bool = False) -> Tensor:
    """Model Breadcrumbs: remove the largest outliers (gamma) and the smallest values, keep a `density` share."""
    if density >= 1:
        return delta  # as mergekit: density 1 keeps everything, outliers included
    return apply_mask(delta, outlier_mask(delta, density, gamma), rescale)


def _sampling_dtype(tensor: Tensor) -> torch.dtype:
    # torch.bernoulli has no fp16 CPU kernel: mergekit draws and rescales in fp32 there, in the native dtype elsewhere.
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


_DRAW_BITS = 15
_DRAW_LEVELS = 1 << _DRAW_BITS


def keep_draw(like: Tensor, probs: float | Tensor, generator: torch.Generator | None) -> Tensor:
    """Bool mask shaped like `like`: each element kept independently with probability `probs` (a scalar or a tensor
    broadcasting to it).

    Default rule: 15-bit uniform integers carved out of one 64-bit draw per four elements, kept where below
    round(p * 2**15); about 7x faster than torch.bernoulli on the CPU (measured on a 5632x2048 bf16 delta: 0.06 s
    against 0.44 s), with p quantised to 1/32768. `tie_break("torch")` draws with torch.bernoulli over p in the
    sampling dtype instead, as mergekit does: the same generator state then gives mergekit's exact mask.
    """
    if current_tie_break() == "torch":
        work = _sampling_dtype(like)
        p = probs.to(work) if isinstance(probs, Tensor) else torch.full_like(like, probs, dtype=work)
        return torch.bernoulli(p.expand_as(like), generator=generator).bool()
    n = like.numel()
    if not isinstance(probs, Tensor):
        # slices of the same stream (random_ fills a tensor in order): each slice's keys stay in cache
        keep = torch.empty(n, dtype=torch.bool, device=like.device)
        level = _draw_level(probs)
        for start in range(0, n, _DRAW_CHUNK):
            m = min(_DRAW_CHUNK, n - start)
            torch.lt(_draw_keys(m, like.device, generator), level, out=keep[start:start + m])
        return keep.view(like.shape)
    keys = _draw_keys(n, like.device, generator).view(like.shape)
    return keys < (probs.float() * _DRAW_LEVELS).round()


def _draw_level(p: float) -> int:
    """Keys below this are kept: p quantised to 1/2**15."""
    return round(float(p) * _DRAW_LEVELS)


_DRAW_CHUNK = B.CHUNK  # a multiple of 4: a slice starts on a word boundary


def _draw_keys(n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """n 15-bit uniform keys: the 16-bit lanes of n/4 64-bit draws."""
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(generator=generator)
    # random_ fills [0, 2**63): the top bit of every word is 0, so each 16-bit lane keeps its 15 low bits.
    return words.view(torch.int16)[:n] & (_DRAW_LEVELS - 1)


def dare_drop(delta: Tensor, density: float, *, rescale: bool, generator: torch.Generator | None,
              inplace: bool = False) -> Tensor:
    """DARE: keep each element independently with probability `density` (`keep_draw`), then optionally L1-rescale
    (in the sampling dtype, as mergekit).

    inplace=True lets it overwrite `delta` and return it (the same bits): on the CPU the draw, mask and rescale then
    run over slices of delta without a tensor-sized mask, masked copy or `abs` temporary, each of which the kernel
    must fault in and zero (merging.bitwise)."""
    if density >= 1:
        return delta
    work = _sampling_dtype(delta)
    if inplace and work == delta.dtype and _drop_in_place(delta, density, rescale, generator):
        return delta
    keep = keep_draw(delta, density, generator)
    return apply_mask(delta.to(work), keep, rescale).to(delta.dtype)


def _in_place_applies(delta: Tensor) -> bool:
    """Whether the in-place prune/drop paths reproduce the reference here: alloy's tie rule, a tensor that
    merging.bitwise handles, contiguous and finite."""
    return current_tie_break() != "torch" and B.applies(delta) and delta.is_contiguous() and all_finite(delta)


def _rescale_in_place(masked: Tensor, before: Tensor, scratch: Tensor) -> None:
    """l1_rescale's arithmetic on `masked` in place; `before` is the L1 norm of the unmasked tensor."""
    after = B.abs_into(masked, scratch).sum()
    if not (before < _L1_EPS or after < _L1_EPS):
        masked.mul_(before / after)


def _prune_in_place(delta: Tensor, k: int, rescale: bool) -> bool:
    """magnitude_prune's default rule in place (the k-th magnitude from the histogram of its bit patterns, then the
    first tied elements by index); False, with delta untouched, where it does not apply (as _drop_in_place)."""
    if not _in_place_applies(delta):
        return False
    scratch = torch.empty_like(delta)
    keys = B.abs_into(delta, scratch).view(-1).view(_KEY_DTYPES[delta.dtype])
    before = scratch.sum() if rescale else None
    thr, above = _kth_key(keys, k, descending=True)
    B.keep_ranked_(delta, keys, thr, k - above)
    if rescale:
        _rescale_in_place(delta, before, scratch)
    return True


def _drop_in_place(delta: Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> bool:
    """dare_drop's default rule in place; False, with delta and the generator untouched, where it does not apply
    (the torch tie-break's bernoulli draw, a device or dtype merging.bitwise does not handle, NaN or inf)."""
    if not _in_place_applies(delta):
        return False
    scratch = torch.empty_like(delta) if rescale else None
    before = B.abs_into(delta, scratch).sum() if rescale else None
    B.keep_below_(delta, lambda m: _draw_keys(m, delta.device, generator), _draw_level(density))
    if rescale:
        _rescale_in_place(delta, before, scratch)
    return True


def della_keep_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities: within each row (dim 1; a 1-D tensor is one row) the smallest magnitude
    gets density - epsilon, the largest density + epsilon, linear in rank between (ties ranked by index).

    Shape: delta's with a leading 1 added to 1-D tensors; dtype: the sampling dtype (bf16 ranks round, as in mergekit).
    A row of one element gets `density` (mergekit fails there on 0/0).
    """
    work = _sampling_dtype(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    mag = rows.abs()
    if current_tie_break() == "torch":
        order = torch.argsort(mag, dim=1, descending=False)
    else:
        order = torch.sort(mag, dim=1, stable=True).indices
    by_rank = _della_rank_probs(rows.shape[1], density, epsilon, work, delta.device)
    return torch.empty(rows.shape, dtype=work, device=delta.device).scatter_(1, order, _along_dim1(by_rank, order))


def _della_rank_probs(length: int, density: float, epsilon: float, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """The keep probability of ranks 0..length-1 (ascending magnitude) in a row of `length`: mergekit's arithmetic
    on each rank (rank to dtype, + 1, min-max normalised), done once per row length instead of once per element."""
    ranks = torch.arange(length, device=device).to(dtype) + 1
    if length == 1:
        rank_norm = torch.full_like(ranks, 0.5)
    else:
        rank_norm = ((ranks - ranks.min()) / (ranks.max() - ranks.min())).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _along_dim1(by_rank: Tensor, like: Tensor) -> Tensor:
    """A per-rank vector broadcast along dim 1 of `like` (rows, then any trailing dims)."""
    return by_rank.view(1, -1, *([1] * (like.dim() - 2))).expand_as(like)


# Elements per block of the in-place DELLA path: torch sorts a 1-D integer tensor of at least 32768 elements with a
# radix sort, rows at a time (dim=1) a comparison sort: the ranks of a 4096x1024 bf16 delta on one thread took 43 ms
# in blocks of 32 rows against 236 ms for the stable row sort; blocks under 32768 elements fell back (175 ms).
_DELLA_BLOCK = 1 << 16


def _della_in_place(delta: Tensor, density: float, epsilon: float, rescale: bool,
                    generator: torch.Generator | None) -> bool:
    """della_drop's default rule in place, rows at a time: each block of rows is ranked by one stable sort of
    (row, magnitude bits) integer keys, its draws and mask stay in cache, and no tensor-sized int64 rank or index
    tensor is made. The draws are the whole-tensor path's: blocks hold whole rows and a multiple of 4 elements, so
    the key stream is cut on word boundaries. False, with delta and the generator untouched, where it does not
    apply (as _drop_in_place; also fp16, drawn in fp32, and tensors of more than 2 dims)."""
    if delta.dim() > 2 or not _in_place_applies(delta) or _sampling_dtype(delta) != delta.dtype:
        return False
    rows = delta if delta.dim() == 2 else delta.unsqueeze(0)
    length = rows.shape[1]
    probs = _della_rank_probs(length, density, epsilon, delta.dtype, delta.device)
    step = max(1, -(-_DELLA_BLOCK // length))
    step += -step % (4 // math.gcd(length, 4))
    levels = (probs.float() * _DRAW_LEVELS).round().to(torch.int32).repeat(step)  # level by sorted position
    idt, mag_bits = _KEY_DTYPES[delta.dtype], 8 * delta.dtype.itemsize - 1
    kdt = torch.int32 if mag_bits + (step - 1).bit_length() <= 31 else torch.int64
    row_keys = (torch.arange(step, dtype=kdt, device=delta.device) << mag_bits).view(-1, 1)
    scratch = torch.empty_like(delta) if rescale else None
    before = B.abs_into(delta, scratch).sum() if rescale else None
    for r in range(0, rows.shape[0], step):
        block = rows[r:r + step]
        n = block.numel()
        keys = (block.view(idt) & ((1 << mag_bits) - 1)).to(kdt)
        keys |= row_keys[:block.shape[0]]
        order = torch.sort(keys.view(-1), stable=True).indices  # by row, then magnitude, ties by index
        level = torch.empty(n, dtype=torch.int32, device=delta.device).scatter_(0, order, levels[:n])
        B.keep_below_levels_(block, _draw_keys(n, delta.device, generator).view(block.shape), level.view(block.shape))
    if rescale:
        _rescale_in_place(delta, before, scratch)
    return True


def della_drop(delta: Tensor, density: float, epsilon: float, *, rescale: bool,
               generator: torch.Generator | None, inplace: bool = False) -> Tensor:
    """DELLA MagPrune: drop with magnitude-ranked probabilities (see della_keep_probs), then optionally L1-rescale.

    inplace=True lets it overwrite `delta` and return it (the same bits), as dare_drop does."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(f"della: epsilon {epsilon} must keep density {density} +/- epsilon inside (0, 1)")
    if inplace and delta.dim() and delta.numel() and _della_in_place(delta, density, epsilon, rescale, generator):
        return delta
    work = _sampling_dtype(delta)
    probs = della_keep_probs(delta, density, epsilon)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    keep = keep_draw(rows, probs, generator)
    return apply_mask(rows.to(work), keep, rescale).to(delta.dtype).reshape(delta.shape)


# ------------------------------------------------------------------------------------------ sign election, merge


def elect_sign(deltas: Tensor, method: str = "sum", dtype: torch.dtype | None = None) -> Tensor:
    """Majority sign (+1 / -1, zero counts as +1) over dim 0 of stacked deltas.

    'sum' (TIES): the sign of the summed deltas, i.e. of the total mass. 'count': the sign most deltas have.
    """
    dtype = dtype or deltas.dtype
    if method == "sum":
        total = deltas.sum(dim=0)
    elif method == "count":
        total = deltas.sign().to(dtype).sum(dim=0)
    else:
        raise ConfigError(f"consensus_method must be 'sum' or 'count', got {method!r}")
    return (total >= 0).to(dtype) * 2 - 1


def agreement_mask(deltas: Tensor, method: str = "sum", *, int8: bool = False) -> Tensor:
    """Bool mask over stacked deltas: True where an element's sign equals the elected sign (zeros never agree).

    int8 holds the signs in int8 instead of the deltas' dtype (memory only; the mask is the same).
    """
    dtype = torch.int8 if int8 else deltas.dtype
    return deltas.sign().to(dtype) == elect_sign(deltas, method, dtype)


def disjoint_merge(weighted: Tensor, weights: Tensor, mask: Tensor | None, *, normalize: bool) -> Tensor:
    """Sum stacked weighted deltas (where `mask` agrees); with normalize, divide by the sum of the weights that
    contributed to each element (TIES' disjoint mean). Sums of zero weight divide by 1, as mergekit does.

    `weights` is shaped to broadcast against `weighted` ([n, 1, ...]).
    """
    if mask is None:
        mixed = weighted.sum(dim=0)
        return divide_by_weights(mixed, weights) if normalize else mixed
    mixed = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


def divide_by_weights(mixed: Tensor, weights: Tensor) -> Tensor:
    """mixed / sum of the weights ([n, 1, ...]), in place; a sum within 1e-8 of zero divides by 1."""
    divisor = weights.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    mixed /= divisor
    return mixed


def stacked_weights(values: list[float] | float, like: Tensor) -> Tensor:
    """Per-model weights as a tensor in `like`'s dtype shaped [n, 1, ..., 1] to broadcast over stacked deltas
    (one scalar stands for every model)."""
    if not isinstance(values, (list, tuple)):
        values = [values] * like.shape[0]
    w = torch.tensor(values, dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))
