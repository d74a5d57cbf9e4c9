"""SLERP as two Triton passes: the dot/norm reduction, then the fused interpolation.

mergekit semantics, over the whole flattened tensor: normalise both (a norm <= eps counts as 1), dot clamped to
[-1, 1]; |dot| > 0.9995 (nearly colinear or antipodal) falls back to lerp; otherwise
out = sin((1-t)θ)/sin θ · base + sin(tθ)/sin θ · other, applied to the unnormalised tensors, θ = acos(dot).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from merging.kernels._common import NUM_WARPS, block_for, block_sum, check_inputs, grid
from merging.kernels.gta import SPARSE_NONE, gta_merge

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@triton.jit
def _dot_norm_kernel(x_ptr, y_ptr, part_ptr, n, nprog, BLOCK: tl.constexpr):
    """Per program: sum x*x, sum y*y, sum x*y in float64 (summed across programs on the host, in a fixed order)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64)
    y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float64)
    tl.store(part_ptr + pid, block_sum(x * x))
    tl.store(part_ptr + nprog + pid, block_sum(y * y))
    tl.store(part_ptr + 2 * nprog + pid, block_sum(x * y))


def slerp_coefficients(xx: float, yy: float, xy: float, t: float) -> tuple[float, float]:
    """(coefficient of base, coefficient of other) from the squared norms and the raw dot product."""
    na = math.sqrt(xx)
    nb = math.sqrt(yy)
    na = na if na > EPS else 1.0
    nb = nb if nb > EPS else 1.0
    dot = min(1.0, max(-1.0, xy / (na * nb)))
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def dot_norms(x: torch.Tensor, y: torch.Tensor, *, block: int | None = None) -> tuple[float, float, float]:
    """(sum x², sum y², sum xy) of two same-shape tensors by the reduction kernel."""
    x = x.contiguous()
    y = y.contiguous()
    n = x.numel()
    if n == 0:
        return 0.0, 0.0, 0.0
    block = block or block_for(_dot_norm_kernel)
    nprog = grid(n, block)[0]
    part = torch.empty((3, nprog), dtype=torch.float64, device=x.device)
    _dot_norm_kernel[grid(n, block)](x, y, part, n, nprog, BLOCK=block, num_warps=NUM_WARPS)
    xx, yy, xy = part.sum(dim=1).tolist()
    return xx, yy, xy


def slerp_merge(base: torch.Tensor, other: torch.Tensor, t: float, *, block: int | None = None) -> torch.Tensor:
    """Spherical interpolation from `base` (t=0) to `other` (t=1)."""
    check_inputs("slerp", [other], base, _dot_norm_kernel)
    ca, cb = slerp_coefficients(*dot_norms(base, other, block=block), float(t))
    return gta_merge([base, other], None, weights=[ca, cb], sparsify=SPARSE_NONE, stepwise=False, what="slerp",
                     block=block)
