"""SCE: select high-variance elements, weight models by their delta energy, erase minority signs."""

from __future__ import annotations

import torch
from torch import Tensor

from merging import primitives as P
from merging.methods.registry import merge_method


def variance_mask(deltas: Tensor, density: float, dtype: torch.dtype) -> Tensor:
    """Mask keeping int(density * #nonzero-variance) elements of largest variance across models (ties: see
    merging.primitives; mergekit uses torch.topk)."""
    if density <= 0:
        return torch.zeros_like(deltas[0], dtype=dtype)
    if density >= 1:
        return torch.ones_like(deltas[0], dtype=dtype)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=dtype)
    if P.current_tie_break() == "torch":
        mask = torch.zeros_like(var, dtype=dtype)
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        return mask
    return P.rank_range_mask(var.abs(), 0, k, descending=True).to(dtype)


def energy_weights(deltas: Tensor) -> Tensor:
    """Each model's mean squared delta, normalised to sum to 1 (uniform when all are ~0)."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


@merge_method("sce", paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE: select, calculate, "
              "erase), arXiv:2408.07990", base=True)
def sce(tensors: list[Tensor], base: Tensor, *, select_topk: float = 1.0, int8_mask: bool = False) -> Tensor:
    """Keep the select_topk share of elements whose deltas vary most across models, weight each model by its
    delta energy, drop deltas against the elected ('sum') sign, and take the weighted mean of the rest."""
    if not tensors:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    deltas = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        deltas = deltas * variance_mask(deltas, select_topk, mask_dtype).unsqueeze(0)
    agree = P.agreement_mask(deltas, "sum", int8=int8_mask)
    w = energy_weights(deltas)
    w = w.view(-1, *([1] * (deltas.dim() - 1)))
    erased = w * agree
    merged = (deltas * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)
