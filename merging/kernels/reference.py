"""Torch twins of the Triton kernels: the same arithmetic in the same order, so kernel and reference agree bit for
bit (the interpreter and torch both round each float32 operation to nearest even).

Written independently of the kernels where it matters: magnitude pruning here sorts (stable, descending) instead
of the kernels' kthvalue + tie cut, and Philox is done on int64 tensors with 16-bit limbs.
Each public function has the signature of the kernel of the same name in merging.kernels.ops.
"""

from __future__ import annotations

import torch

from merging.kernels._host import (
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
    PHILOX_ROUNDS,
    keep_threshold,
    per_model,
    seed_from,
)

M32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b (a: int64 tensor in [0, 2**32), b < 2**32) without int64 overflow."""
    t = a * (b & 0xFFFF)
    u = a * (b >> 16)
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & M32
    return hi, lo


def philox_word(seed: int, offs: torch.Tensor, stream: int) -> torch.Tensor:
    """First word of Philox4x32-10 at counter (offs lo, offs hi, stream, 0), key seed; int64 values in [0, 2**32)."""
    k0, k1 = seed & M32, (seed >> 32) & M32
    c0 = offs & M32
    c1 = (offs >> 32) & M32
    c2 = torch.full_like(offs, stream & M32)
    c3 = torch.zeros_like(offs)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = (k0 + PHILOX_KEY_A) & M32
        k1 = (k1 + PHILOX_KEY_B) & M32
    return c0


def random_keep(n: int, seed: int, stream: int, density: float, device=None) -> torch.Tensor:
    """DARE's keep mask for model `stream` of a tensor of n elements."""
    offs = torch.arange(n, dtype=torch.int64, device=device)
    return philox_word(seed, offs, stream) < keep_threshold(density)


def magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Exactly k = max(1, int(density * n)) largest |delta| kept; ties go to the lower flat index (stable sort)."""
    a = delta.reshape(-1).abs()
    n = a.numel()
    if density >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    keep = torch.zeros(n, dtype=torch.bool, device=a.device)
    if density <= 0.0 or n == 0:
        return keep
    k = max(1, int(density * n))
    keep[torch.sort(a, descending=True, stable=True).indices[:k]] = True
    return keep


def gta_reference(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weights: list[float],
                  sparsify: str | None = None, densities: list[float] | None = None, consensus: bool = False,
                  normalize: bool = False, rescale: bool = False, lambda_: float = 1.0, seed: int = 0,
                  zero_divisor_eps: float = 1e-8) -> torch.Tensor:
    """merging.kernels.gta.gta_merge in torch; sparsify is None, "magnitude" or "random"."""
    if not tensors:
        return base.clone()
    like = tensors[0]
    n = like.numel()
    densities = densities if densities is not None else [1.0] * len(tensors)
    b = base.reshape(-1).float() if base is not None else None
    w32 = torch.tensor(weights, dtype=torch.float32, device=like.device)
    zero = torch.zeros(n, dtype=torch.float32, device=like.device)
    total, pos, neg, wpos, wneg = zero, zero, zero, zero, zero
    for i, (x, dens) in enumerate(zip(tensors, densities)):
        d = x.reshape(-1).float()
        if b is not None:
            d = d - b
        if sparsify is not None:
            if sparsify == "magnitude":
                keep = magnitude_keep(d, dens)
            else:
                keep = random_keep(n, seed, i, dens, device=like.device)
            scale = 1.0
            if rescale and dens < 1.0:
                before = float(d.abs().double().sum())
                after = float(d.abs()[keep].double().sum())
                if before >= 1e-7 and after >= 1e-7:
                    scale = before / after
            d = torch.where(keep, d, 0.0) * torch.tensor(scale, dtype=torch.float32)
        wd = w32[i] * d
        total = total + wd
        if consensus:
            pos = pos + torch.where(wd > 0, wd, 0.0)
            neg = neg + torch.where(wd < 0, wd, 0.0)
            wpos = wpos + torch.where(wd > 0, w32[i], 0.0)
            wneg = wneg + torch.where(wd < 0, w32[i], 0.0)
    if consensus:
        up = total >= 0
        mixed = torch.where(up, pos, neg)
        div = torch.where(up, wpos, wneg)
        div = torch.where(div == 0, 1.0, div)
    else:
        mixed = total
        wsum = w32.sum()
        div = torch.where(wsum.abs() < zero_divisor_eps, 1.0, wsum)
    if normalize:
        mixed = mixed / div
    mixed = mixed * torch.tensor(lambda_, dtype=torch.float32)
    if b is not None:
        mixed = b + mixed
    return mixed.to(like.dtype).reshape(like.shape)


def slerp_reference(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP (float64 statistics, float32 interpolation)."""
    x = base.reshape(-1).double()
    y = other.reshape(-1).double()
    na = torch.linalg.vector_norm(x)
    nb = torch.linalg.vector_norm(y)
    na = torch.where(na > 1e-8, na, 1.0)
    nb = torch.where(nb > 1e-8, nb, 1.0)
    dot = ((x * y).sum() / (na * nb)).clamp(-1.0, 1.0)
    if float(dot.abs()) > 0.9995:
        ca, cb = 1.0 - t, t
    else:
        theta = torch.acos(dot)
        ca = float(torch.sin((1.0 - t) * theta) / torch.sin(theta))
        cb = float(torch.sin(t * theta) / torch.sin(theta))
    return gta_reference([base, other], None, weights=[ca, cb])


# --- the same signatures as merging.kernels.ops ---------------------------------------------------------------


def linear(tensors: list[torch.Tensor], *, weight=1.0, normalize: bool = True) -> torch.Tensor:
    return gta_reference(tensors, None, weights=per_model("weight", weight, len(tensors)), normalize=normalize,
                         zero_divisor_eps=0.0)


def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, normalize: bool = False,
                    lambda_: float = 1.0) -> torch.Tensor:
    return gta_reference(tensors, base, weights=per_model("weight", weight, len(tensors)), normalize=normalize,
                         lambda_=lambda_)


def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, density=1.0, normalize: bool = True,
         int8_mask: bool = False, lambda_: float = 1.0) -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="magnitude",
                         densities=per_model("density", density, k), consensus=True, normalize=normalize,
                         lambda_=lambda_)


def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, density=1.0,
                normalize: bool = False, rescale: bool = True, lambda_: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="random",
                         densities=per_model("density", density, k), normalize=normalize, rescale=rescale,
                         lambda_=lambda_, seed=seed_from(generator))


def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, density=1.0,
              normalize: bool = False, rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="random",
                         densities=per_model("density", density, k), consensus=True, normalize=normalize,
                         rescale=rescale, lambda_=lambda_, seed=seed_from(generator))


def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    return slerp_reference(base, tensors[0], float(t))


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    return gta_reference([delta], None, weights=[1.0], sparsify="magnitude", densities=[density], rescale=rescale)


def random_prune(delta: torch.Tensor, density: float, rescale: bool = False, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    return gta_reference([delta], None, weights=[1.0], sparsify="random", densities=[density], rescale=rescale,
                         seed=seed_from(generator))


__all__ = ["philox_word", "random_keep", "magnitude_keep", "gta_reference", "slerp_reference", "linear",
           "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "magnitude_prune", "random_prune"]
