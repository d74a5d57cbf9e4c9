"""Interpolation on the sphere: slerp, nuslerp, multislerp, karcher.

Each treats the whole tensor as one vector unless stated (mergekit's per-tensor behaviour), and reproduces
mergekit 0.1.5's arithmetic: the same dtype, the same fallbacks for colinear or zero vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merging.errors import ConfigError
from merging.methods.registry import PerModel, merge_method, model_values

_CHUNK = 1 << 20  # mergekit accumulates slerp's norms and dot over chunks this long: same sums, same bits


@merge_method("slerp", paper="Shoemake 1985, Animating rotation with quaternion curves, SIGGRAPH 1985 "
              "(spherical linear interpolation)", base=True, min_models=1, max_models=1)
def slerp(tensors: list[Tensor], base: Tensor, *, t: float) -> Tensor:
    """Spherical interpolation from base (t=0) to the other model (t=1), the flattened tensor as one vector.

    Computed in fp32 (fp64 for fp64 inputs), returned in the inputs' dtype. Directions closer than
    |cos| > 0.9995 (colinear or antipodal) fall back to linear interpolation; a vector of norm <= 1e-8 is
    taken as is (norm 1), which makes the pair orthogonal.
    """
    v0, v1 = base, tensors[0]
    if not v0.is_floating_point():
        raise ConfigError(f"slerp: cannot merge a {v0.dtype} tensor")
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(-1), v1.reshape(-1)
    tt = torch.tensor(t, dtype=dtype, device=v0.device)
    if a.numel() == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    # Each chunk of both vectors in `dtype` goes into two chunk-sized buffers that every pass reuses, and the
    # element-wise steps run in place there: the same operations on the same values as `.to(dtype)` copies and
    # out-of-place arithmetic (so the same bits), without two fresh fp32 chunks per step (one 5632x2048 bf16 pair:
    # 102 -> 24 ms on one thread).
    chunks = [(s, min(_CHUNK, a.numel() - s)) for s in range(0, a.numel(), _CHUNK)]
    fa = torch.empty(chunks[0][1], dtype=dtype, device=a.device)
    fb = torch.empty_like(fa)

    def load(s: int, m: int) -> tuple[Tensor, Tensor]:
        xa, xb = fa[:m], fb[:m]
        xa.copy_(a[s:s + m])
        xb.copy_(b[s:s + m])
        return xa, xb

    parts = [[torch.linalg.vector_norm(x) for x in load(s, m)] for s, m in chunks]
    norm_a = torch.linalg.vector_norm(torch.stack([p[0] for p in parts]))
    norm_b = torch.linalg.vector_norm(torch.stack([p[1] for p in parts]))
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dots = []
    for s, m in chunks:
        xa, xb = load(s, m)
        dots.append(xa.div_(norm_a).mul_(xb.div_(norm_b)).sum())
    dot = torch.stack(dots).sum().clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s, m in chunks:
        xa, xb = load(s, m)
        out[s:s + m] = xa.mul_(coef_a).add_(xb.mul_(coef_b))
    return out.reshape(v0.shape)


def _nuslerp(t: float, v0: Tensor, v1: Tensor, dim: int, flatten: bool, eps: float = 1e-8) -> Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= eps ** 2
    if flatten and bool(colinear):  # one vector: one branch, the same values as torch.where over both
        return ((1 - t) * v0 + t * v1).reshape(shape)
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    # in place where mergekit makes a temporary per step: the same operations, so the same bits
    out = torch.sin((1 - t) * theta) * v0
    out += torch.sin(t * theta) * v1
    out /= sin_theta
    if not flatten:
        out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@merge_method("nuslerp", paper="Goddard et al. 2024, Arcee's MergeKit (NuSLERP, mergekit's generalised SLERP), "
              "arXiv:2403.13257", base="optional", min_models=2, max_models=2)
def nuslerp(tensors: list[Tensor], base: Tensor | None, *, weight: PerModel, nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True) -> Tensor:
    """SLERP of two models with t = w2 / (w1 + w2) (0.5 if the weights sum to ~0); with a base, of their deltas.

    nuslerp_flatten (default): the tensor as one vector; else per row of the last dim, or with nuslerp_row_wise
    along dim 0 (mergekit's naming). Computed in the inputs' dtype; exactly colinear pairs interpolate linearly.
    """
    weight = model_values(weight, 2)
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if base is not None:
        return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, dim, nuslerp_flatten)
    return _nuslerp(t, tensors[0], tensors[1], dim, nuslerp_flatten)


@merge_method("multislerp", paper="Goddard 2025, Multi-SLERP (barycentric interpolation on the hypersphere), "
              "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", base="optional", min_models=1)
def multislerp(tensors: list[Tensor], base: Tensor | None, *, weight: PerModel, normalize_weights: bool = True,
               eps: float = 1e-8) -> Tensor:
    """Weighted mean of N directions on the unit sphere through the tangent space at their weighted Euclidean
    mean (one exponential-map step), scaled by the weighted mean norm; with a base, of the deltas.

    One model returns it unchanged (base ignored). Two exactly balanced antipodal inputs fall back to linear
    interpolation; more raise ConfigError, as do weights summing to 0 with normalize_weights (mergekit: NaN).
    """
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weight = model_values(weight, len(tensors))
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        if w.sum() == 0:
            raise ConfigError(f"multislerp: weights {list(weight)} sum to 0 with normalize_weights: true")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat.div_(norms + eps)  # in place: the deltas are recomputed if the fallback below needs them
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ConfigError("multislerp: the weighted directions cancel out (antipodal inputs with balancing "
                              "weights); change the weights")
        d0, d1 = (x - base if base is not None else x for x in tensors)
        out = d0 * w[0] + d1 * w[1]
        return out + base if base is not None else out
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    along = dots * mean  # then, in place, (units - dots * mean) * w: the same operations, one [n, N] temporary
    torch.sub(units, along, out=along)
    along *= w.view(-1, 1)
    shape = stacked.shape[1:]
    del stacked, flat, units  # one buffer, the units now: freed before the sum
    tangent = along.sum(0)
    del along
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(shape)
    return out + base if base is not None else out


@merge_method("karcher", paper="Karcher 1977, Riemannian center of mass and mollifier smoothing (Karcher mean); "
              "mergekit's karcher method, arXiv:2603.04972", base=False, min_models=1)
def karcher(tensors: list[Tensor], *, max_iter: int = 10, tol: float = 1e-5, owned: bool = False) -> Tensor:
    """Equal-weight Riemannian (Karcher) mean of the directions on the unit sphere, by fixed-point iteration,
    scaled by the mean norm. Every model is an input (the base too when listed). Inputs of norm <= tol are left
    out of the direction; all-zero inputs give zero.

    mergekit's operations in its order and dtype (the inputs' own: bf16 stays bf16), so the same bits; the
    element-wise steps run a slice at a time, and when `owned` each input leaves `tensors` as soon as its unit
    vector exists (on three 32000x2048 bf16 embeddings: 0.5 GB of working tensors instead of 0.9 GB).
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    n = len(tensors)
    alphas = [1.0 / n] * n
    shape = tensors[0].shape
    scratch = torch.empty(tensors[0].numel() if tensors[0].dtype != dtype else 0, dtype=dtype,
                          device=tensors[0].device)

    def norm(x: Tensor) -> Tensor:
        # vector_norm(x.to(dtype)) with the copy in one reused buffer: the same values in the same layout (so the
        # same reduction), without faulting in a fresh tensor-sized allocation per norm (28 -> 5 ms, 16M bf16)
        if x.dtype == dtype or not x.is_contiguous() or x.numel() != scratch.numel():
            return torch.linalg.vector_norm(x.to(dtype))
        return torch.linalg.vector_norm(scratch.view(x.shape).copy_(x))

    norms = [norm(t) for t in tensors]
    valid = [i for i, nm in enumerate(norms) if float(nm) > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    points = []
    for i in range(n):
        t = tensors[i]
        if owned:
            tensors[i] = None  # the caller's list let go: this read buffer is freed once its unit vector exists
        if i in valid:
            points.append((torch.zeros_like(t) if float(norms[i]) == 0.0 else (t / norms[i]).to(t.dtype)).reshape(-1))
        del t
    total = sum(alphas[i] for i in valid)
    coeffs = [alphas[i] / total for i in valid]
    slices = [slice(s, s + _CHUNK) for s in range(0, points[0].numel(), _CHUNK)]
    mean = torch.zeros_like(points[0])
    for sl in slices:
        for c, u in zip(coeffs, points):
            mean[sl] += c * u[sl]
    mean_norm = norm(mean)
    if float(mean_norm) < tol:
        mean.copy_(points[0])
    else:
        mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for c, u in zip(coeffs, points):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            coef = c * (theta / torch.sin(theta))
            for sl in slices:
                tangent[sl] += coef * (u[sl] - dot * mean[sl])
        tangent_norm = norm(tangent)
        if float(tangent_norm) < tol:
            break
        cos, sin = torch.cos(tangent_norm), torch.sin(tangent_norm)
        for sl in slices:
            mean[sl] = (cos * mean[sl] + sin * (tangent[sl] / tangent_norm)).to(mean.dtype)
        unit_norm = norm(mean)
        if float(unit_norm) > tol:
            mean.div_(unit_norm)
    scale = sum(a * nm for a, nm in zip(alphas, norms))
    for sl in slices:
        torch.mul(scale, mean[sl], out=mean[sl])
    return mean.view(shape)
