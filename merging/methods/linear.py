"""Linear (weighted average) merge."""

from __future__ import annotations

import torch
from torch import Tensor

from merging import bitwise as B
from merging.errors import ConfigError
from merging.methods.registry import PerModel, merge_method, model_values


@merge_method("linear", paper="Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models "
              "improves accuracy without increasing inference time, ICML 2022, arXiv:2203.05482")
def linear(tensors: list[Tensor], *, weight: PerModel, normalize: bool = True) -> Tensor:
    """sum_i w_i t_i (divided by sum_i w_i when normalize), accumulated in fp32 (fp64 for fp64 inputs) and
    returned in the inputs' dtype, as mergekit does. Every model is an input: there is no base.

    Deviation: with normalize and weights summing to 0 mergekit writes inf/NaN; alloy raises ConfigError.
    """
    first = tensors[0]
    if not first.is_floating_point():
        raise ConfigError(f"linear: cannot merge a {first.dtype} tensor")
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = model_values(weight, len(tensors))
    w = torch.tensor(weight, dtype=dtype, device=first.device)
    divisor = w.sum() if normalize else None
    if divisor is not None and divisor == 0:
        raise ConfigError(f"linear: weights {list(weight)} sum to 0 with normalize: true")
    if first.dtype == dtype or first.device.type != "cpu" or \
            not all(t.is_contiguous() and t.dtype == first.dtype for t in tensors):
        return _weighted_sum(tensors, w, divisor).to(first.dtype)
    # Half-precision inputs: the fp32 sum a slice at a time, each slice's accumulator staying in cache, instead of a
    # tensor-sized fp32 block the kernel must fault in and zero, streamed through five times. Each element's
    # arithmetic is the same ops in the same order, so the bits are too (tests/merging/test_methods_interpolation.py).
    out = torch.empty_like(first)
    flat = [t.view(-1) for t in tensors]
    for s in range(0, first.numel(), B.CHUNK):
        out.view(-1)[s:s + B.CHUNK] = _weighted_sum([f[s:s + B.CHUNK] for f in flat], w, divisor)
    return out


def _weighted_sum(tensors: list[Tensor], w: Tensor, total: Tensor | None) -> Tensor:
    out = torch.zeros_like(tensors[0], dtype=w.dtype)
    for t, coefficient in zip(tensors, w):
        out.addcmul_(t, coefficient)
    if total is not None:
        out.div_(total)
    return out
