"""Model Stock: interpolate between the base and the average of fine-tunes by their mutual angle."""

from __future__ import annotations

import torch
from torch import Tensor

from merging import bitwise as B
from merging.methods.registry import merge_method


def _mean_pairwise_cosine(w0: Tensor, ws: list[Tensor]) -> Tensor:
    """Mean cosine over pairs of deltas (w - w0), along the last dim, as mergekit: the deltas live only here."""
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


@merge_method("model_stock", paper="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models, "
              "ECCV 2024, arXiv:2403.19522", base=True, min_models=2)
def model_stock(tensors: list[Tensor], base: Tensor, *, filter_wise: bool = False) -> Tensor:
    """t * mean(models) + (1 - t) * base with t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the
    deltas (whole tensor, or per row with filter_wise). Where 1 + (N - 1) cos ~ 0 the base is kept (t = 0).
    Computed in the inputs' dtype, as mergekit does; the element-wise interpolation runs a slice at a time (rows of
    the same slice with filter_wise), the same operations per element without tensor-sized temporaries.
    """
    w0, ws = base, list(tensors)
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    cos = _mean_pairwise_cosine(w0, ws)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    one_minus_t = 1 - t
    out = torch.empty_like(w0)
    if w0.dim() == 0:
        parts = [(..., ...)]
    elif filter_wise:  # t holds one value per row: slices of whole rows
        step = max(1, B.CHUNK // max(1, w0[0].numel()))
        parts = [(slice(r, r + step),) * 2 for r in range(0, w0.shape[0], step)]
    else:  # t is one value
        parts = [(slice(s, s + B.CHUNK), slice(None)) for s in range(0, w0.numel(), B.CHUNK)]
    for sl, tsl in parts:
        average = sum(w[sl] for w in ws) / n
        out[sl] = t[tsl] * average + one_minus_t[tsl] * w0[sl]
    return out.reshape(base.shape)
