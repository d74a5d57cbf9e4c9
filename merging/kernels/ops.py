"""The kernels under the names and signatures of the registered torch methods (merging.methods), so the engine
can call KERNELS[name] in place of REGISTRY[name].fn. PerModel parameters arrive as list[float] (a scalar
broadcasts); seeded methods take the engine's per-tensor torch.Generator and draw one Philox key from it."""

from __future__ import annotations

import torch

from merging.kernels._host import per_model, seed_from
from merging.kernels.gta import SPARSE_MAGNITUDE, SPARSE_NONE, SPARSE_RANDOM, gta_merge
from merging.kernels.slerp import slerp_merge


def linear(tensors: list[torch.Tensor], *, weight=1.0, normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when normalize (no guard, as mergekit)."""
    return gta_merge(tensors, None, weights=per_model("weight", weight, len(tensors)), normalize=normalize,
                     zero_divisor_eps=0.0, what="linear")


def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, normalize: bool = False,
                    lambda_: float = 1.0) -> torch.Tensor:
    """base + lambda * sum_i w_i (x_i - base) [/ sum_i w_i]."""
    return gta_merge(tensors, base, weights=per_model("weight", weight, len(tensors)), sparsify=SPARSE_NONE,
                     normalize=normalize, lambda_=lambda_, what="task_arithmetic")


def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, density=1.0, normalize: bool = True,
         int8_mask: bool = False, lambda_: float = 1.0) -> torch.Tensor:
    """Magnitude-prune each delta to its density, elect signs by weighted sum, disjoint (weighted) mean."""
    k = len(tensors)
    return gta_merge(tensors, base, weights=per_model("weight", weight, k), sparsify=SPARSE_MAGNITUDE,
                     densities=per_model("density", density, k), consensus=True, normalize=normalize,
                     lambda_=lambda_, what="ties")


def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, density=1.0,
                normalize: bool = False, rescale: bool = True, lambda_: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly drop each delta's elements (keep probability = density), L1-rescale, weighted sum."""
    k = len(tensors)
    return gta_merge(tensors, base, weights=per_model("weight", weight, k), sparsify=SPARSE_RANDOM,
                     densities=per_model("density", density, k), normalize=normalize, rescale=rescale,
                     lambda_=lambda_, seed=seed_from(generator), what="dare_linear")


def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight=1.0, density=1.0,
              normalize: bool = False, rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    k = len(tensors)
    return gta_merge(tensors, base, weights=per_model("weight", weight, k), sparsify=SPARSE_RANDOM,
                     densities=per_model("density", density, k), consensus=True, normalize=normalize,
                     rescale=rescale, lambda_=lambda_, seed=seed_from(generator), what="dare_ties")


def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Spherical interpolation from base (t=0) to tensors[0] (t=1); lerp when nearly colinear."""
    from merging.errors import AlloyError

    if len(tensors) != 1:
        raise AlloyError(f"kernel slerp: needs exactly one model besides the base, got {len(tensors)}")
    return slerp_merge(base, tensors[0], float(t))


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) largest |delta| (ties: lower index first), optionally L1-rescaled."""
    return gta_merge([delta], None, weights=[1.0], sparsify=SPARSE_MAGNITUDE, densities=[float(density)],
                     rescale=rescale, what="magnitude_prune")


def random_prune(delta: torch.Tensor, density: float, rescale: bool = False, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each element with probability density (Philox keyed by seed and index), optionally L1-rescaled."""
    return gta_merge([delta], None, weights=[1.0], sparsify=SPARSE_RANDOM, densities=[float(density)],
                     rescale=rescale, seed=seed_from(generator), what="random_prune")
