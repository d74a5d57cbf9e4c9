"""SCE: select high-variance elements, weight models by their delta energy, erase minority signs."""

from __future__ import annotations

import torch
from torch import Tensor

from merging import bitwise as B
from merging import primitives as P
from merging.methods.registry import merge_method


def population_variance(deltas: Tensor) -> Tensor:
    """torch.var(deltas, dim=0, unbiased=False), bit for bit, in flat slices.

    Why: on the CPU torch reduces dim 0 with a scalar Welford loop in float64, 0.4-0.5 s for three models of 4M
    elements; the same recurrence (mean += d / k, m2 += d * (x - mean), var = m2 / n, in float64, rounded once to the
    input dtype) over vectors takes a fifth of that. Checked equal to torch.var on 128M bf16/fp16 and 24M fp32
    elements of several scales (tests/merging/test_methods_selection.py)."""
    if deltas.device.type != "cpu" or deltas.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.var(deltas, dim=0, unbiased=False)
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=deltas.dtype)
    # four float64 slice buffers, reused: no allocation per step
    mean_, m2_, x_, d_ = torch.empty((4, min(B.CHUNK, flat.shape[1])), dtype=torch.float64)
    for s in range(0, flat.shape[1], B.CHUNK):
        part = flat[:, s:s + B.CHUNK]
        m = part.shape[1]
        mean, m2, x, d = mean_[:m].zero_(), m2_[:m].zero_(), x_[:m], d_[:m]
        for i in range(n):
            x.copy_(part[i])
            torch.sub(x, mean, out=d)
            mean.add_(d / (i + 1))
            x.sub_(mean)
            m2.add_(d.mul_(x))  # two roundings, as torch.var's loop (addcmul may fuse them)
        out[s:s + B.CHUNK] = m2.div_(n)
    return out.view(deltas.shape[1:])


def variance_mask(deltas: Tensor, density: float, dtype: torch.dtype) -> Tensor:
    """Mask keeping int(density * #nonzero-variance) elements of largest variance across models (ties: see
    merging.primitives; mergekit uses torch.topk)."""
    if density <= 0:
        return torch.zeros_like(deltas[0], dtype=dtype)
    if density >= 1:
        return torch.ones_like(deltas[0], dtype=dtype)
    var = population_variance(deltas)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=dtype)
    var.abs_()  # a no-op on a variance but for a NaN's sign bit (mergekit ranks |var|)
    if P.current_tie_break() == "torch":
        mask = torch.zeros_like(var, dtype=dtype)
        mask.view(-1)[torch.topk(var.view(-1), k=k, largest=True).indices] = 1
        return mask
    return P.rank_range_mask(var, 0, k, descending=True).to(dtype)


def energy_weights(deltas: Tensor) -> Tensor:
    """Each model's mean squared delta, normalised to sum to 1 (uniform when all are ~0)."""
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    if deltas.device.type == "cpu" and deltas.dtype in (torch.bfloat16, torch.float16):
        # torch's CPU mean of a half tensor sums a float32 copy, divides, rounds back: the same here, with the
        # float32 copy of the squares written a slice at a time (no half-precision square stack beside it)
        squares = torch.empty(flat.shape, dtype=torch.float32)
        for s in range(0, flat.shape[1], B.CHUNK):
            squares[:, s:s + B.CHUNK] = flat[:, s:s + B.CHUNK].square()
        energy = squares.sum(dim=1).div_(flat.shape[1]).to(deltas.dtype)
        del squares
    else:
        energy = deltas.square().reshape(n, -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


@merge_method("sce", paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE: select, calculate, "
              "erase), arXiv:2408.07990", base=True)
def sce(tensors: list[Tensor], base: Tensor, *, select_topk: float = 1.0, int8_mask: bool = False,
        owned: bool = False) -> Tensor:
    """Keep the select_topk share of elements whose deltas vary most across models, weight each model by its
    delta energy, drop deltas against the elected ('sum') sign, and take the weighted mean of the rest.
    When `owned`, each model leaves `tensors` once its delta is taken."""
    if not tensors:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    deltas = P.stacked_deltas(tensors, base, owned=owned)
    if select_topk < 1:
        deltas *= variance_mask(deltas, select_topk, mask_dtype).unsqueeze(0)
    w = energy_weights(deltas)
    # the rest is element-wise across the tensor (a sign vote and a weighted mean over the models at each
    # position), so it runs over slices: the same bits, and no stack-sized sign, mask or product temporaries
    flat = deltas.view(len(tensors), -1)
    out = torch.empty_like(base).view(-1)
    bflat = base.reshape(-1)
    wcol = w.view(-1, 1)
    for s in range(0, flat.shape[1], B.CHUNK):
        part = flat[:, s:s + B.CHUNK]
        erased = wcol * P.agreement_mask(part, "sum", int8=int8_mask)
        merged = (part * erased).sum(dim=0)
        torch.add(bflat[s:s + B.CHUNK], merged / torch.sum(erased, dim=0).clamp(min=1e-6), out=out[s:s + B.CHUNK])
    return out.view(base.shape)
