"""RAM: average deltas only where several models change an element; keep unique changes whole."""

from __future__ import annotations

from torch import Tensor

import torch

from merging.methods.registry import merge_method

_RAM = "Reinforced Agent Merging (RAM), arXiv:2601.13572"


def _contributions(tensors: list[Tensor], base: Tensor, epsilon: float):
    deltas = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    active = deltas.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    return deltas, active, counts, counts > 1, counts == 1


@merge_method("ram", paper=_RAM, base=True)
def ram(tensors: list[Tensor], base: Tensor, *, epsilon: float = 1e-5) -> Tensor:
    """base + per element: the delta of the one model that changed it (|delta| > epsilon), or the mean of the
    deltas of the several that did."""
    if not tensors:
        return base
    deltas, active, counts, shared, unique = _contributions(tensors, base, epsilon)
    d = deltas * active
    merged = ((d * unique) + (d * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@merge_method("ramplus_tl", paper=_RAM + " (RAM+, tensor-local variant)", base=True)
def ramplus_tl(tensors: list[Tensor], base: Tensor, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> Tensor:
    """RAM with each model's unique changes amplified by 1 + r * clamp(shared / unique, 0, alpha), the ratio of
    its shared to unique changed elements counted within this tensor. Returns fp32 for lower-precision inputs
    (the amplification is an fp32 tensor), as mergekit does; the engine casts to the output dtype."""
    if not tensors:
        return base
    deltas, active, counts, shared, unique = _contributions(tensors, base, epsilon)
    n_shared = (active & shared).sum(dim=1)
    n_unique = (active & unique).sum(dim=1)
    rho = n_shared / n_unique.clamp(min=epsilon)
    amplify = 1 + r * rho.clamp(min=0, max=alpha)
    d = deltas * active
    merged = ((d * unique * amplify.unsqueeze(-1)) + (d * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
