"""Arcee Fusion: keep the other model's changes where they matter most (dynamic threshold on importance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from merging.bitwise import CHUNK
from merging.methods.registry import merge_method

_SAMPLE = 1_000_000  # quantiles of larger tensors come from this many elements drawn with replacement


def _quantiles(x: Tensor, q: Tensor, generator: torch.Generator | None) -> Tensor:
    flat = x.reshape(-1)
    if flat.numel() > _SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_SAMPLE,), device=flat.device, generator=generator)]
    ordered, _ = torch.sort(flat)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def importance(other: Tensor, base: Tensor) -> Tensor:
    """|other - base| times the KL divergence of softmax(other) from softmax(base) along the last dim."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


@merge_method("arcee_fusion", paper="Arcee AI 2025, Arcee Fusion (mergekit), https://arcee.ai", base=True,
              min_models=1, max_models=1)
def arcee_fusion(tensors: list[Tensor], base: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """base + (other - base) where importance >= median + 1.5 IQR of importance (Tukey's outlier fence).

    Seeded: quantiles of tensors over 1e6 elements are estimated from a random sample (with replacement).
    """
    other = tensors[0]
    score = importance(other, base)
    q1, median, q3 = _quantiles(score, torch.tensor([0.25, 0.5, 0.75]), generator)
    keep = (score >= median + 1.5 * (q3 - q1)).reshape(-1)
    del score
    # mergekit's base + (other - base) * keep.float(), element-wise, so a slice at a time: the same bits (float32 or
    # wider, as its float mask promotes them) without three tensor-sized float32 temporaries
    ob, bb = other.reshape(-1), base.reshape(-1)
    out = torch.empty(ob.shape, dtype=torch.promote_types(base.dtype, torch.float32), device=base.device)
    for s in range(0, ob.numel(), CHUNK):
        sl = slice(s, s + CHUNK)
        torch.add(bb[sl], (ob[sl] - bb[sl]) * keep[sl].float(), out=out[sl])
    return out.view(base.shape)
