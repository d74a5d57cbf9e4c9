"""NearSwap: take the other model's value where it is close to the base's."""

from __future__ import annotations

import torch
from torch import Tensor

from merging.methods.registry import merge_method


@merge_method("nearswap", paper="alchemonaut 2024, NearSwap (QuartetAnemoi-70B model card), "
              "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", base=True, min_models=1, max_models=1)
def nearswap(tensors: list[Tensor], base: Tensor, *, t: float) -> Tensor:
    """Per element, interpolate towards the other model by weight clamp(t / |other - base|, 0, 1): elements closer
    than t are swapped entirely, far ones barely move."""
    other = tensors[0]
    distance = torch.abs(base - other)
    w = (t / distance.clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base
