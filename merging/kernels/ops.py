"""The kernels under the names and signatures of the registered torch methods (merging.methods), so the engine
can call KERNELS[name] in place of REGISTRY[name].fn with the same arguments.

PerModel parameters arrive as list[float] (a scalar broadcasts). Seeded methods take the engine's per-tensor
torch.Generator and draw one Philox key from it: DARE's mask is then a function of (seed, model, element), the same
on every GPU and under the interpreter, though not torch.bernoulli's draw (same distribution, different stream).

The task-arithmetic family rounds its intermediates to the inputs' dtype as the torch methods do (they compute in
the base's dtype, after mergekit); linear and slerp compute in float32 as theirs do. Magnitude selections break ties
by the lower flat index, merging.primitives' default rule; under `primitives.tie_break("torch")` (mergekit's own
sort order, which no kernel can reproduce) ties and breadcrumbs defer to the torch method.
"""

from __future__ import annotations

import torch

from merging.errors import ConfigError
from merging.kernels._host import per_model, seed_from
from merging.kernels.gta import (
    CONSENSUS_COUNT,
    CONSENSUS_NONE,
    CONSENSUS_SUM,
    SPARSE_BAND,
    SPARSE_NONE,
    SPARSE_RANDOM,
    SPARSE_TOPK,
    gta_merge,
)
from merging.kernels.slerp import slerp_merge
from merging.methods.registry import PerModel


def _consensus(method: str) -> int:
    if method == "sum":
        return CONSENSUS_SUM
    if method == "count":
        return CONSENSUS_COUNT
    raise ConfigError(f"consensus_method must be 'sum' or 'count', got {method!r}")


def _torch_ties_order() -> bool:
    from merging.primitives import current_tie_break

    return current_tie_break() == "torch"


def _torch_method(name: str):
    from merging.methods import REGISTRY

    return REGISTRY[name].fn


def linear(tensors: list[torch.Tensor], *, weight: PerModel, normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i (fused multiply-adds in float32, as torch's addcmul), divided by sum_i w_i when normalize."""
    w = per_model("weight", weight, len(tensors))
    if normalize and float(torch.tensor(w, dtype=torch.float32).sum()) == 0:
        raise ConfigError(f"linear: weights {w} sum to 0 with normalize: true")
    return gta_merge(tensors, None, weights=w, normalize=normalize, stepwise=False, fma=True, what="linear")


def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: PerModel, density: PerModel = 1.0,
                    normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                    lambda_: float = 1.0) -> torch.Tensor:
    """base + lambda * sum_i w_i (x_i - base) [/ sum_i w_i]; density and rescale are ignored, as mergekit does."""
    return gta_merge(tensors, base, weights=per_model("weight", weight, len(tensors)), sparsify=SPARSE_NONE,
                     normalize=normalize, lambda_=lambda_, what="task_arithmetic")


def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: PerModel, density: PerModel = 1.0,
         normalize: bool = True, rescale: bool = False, int8_mask: bool = False, lambda_: float = 1.0,
         consensus_method: str = "sum") -> torch.Tensor:
    """Keep each delta's top-density magnitudes, elect a sign per element, (weighted) mean of the agreeing."""
    if _torch_ties_order():
        return _torch_method("ties")(tensors, base, weight=weight, density=density, normalize=normalize,
                                     rescale=rescale, int8_mask=int8_mask, lambda_=lambda_,
                                     consensus_method=consensus_method)
    k = len(tensors)
    return gta_merge(tensors, base, weights=per_model("weight", weight, k), sparsify=SPARSE_TOPK,
                     densities=per_model("density", density, k), consensus=_consensus(consensus_method),
                     normalize=normalize, rescale=rescale, lambda_=lambda_, what="ties")


def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: PerModel, density: PerModel = 1.0,
                normalize: bool = False, rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each delta element with probability density, L1-rescale, weighted sum."""
    k = len(tensors)
    return gta_merge(tensors, base, weights=per_model("weight", weight, k), sparsify=SPARSE_RANDOM,
                     densities=per_model("density", density, k), normalize=normalize, rescale=rescale,
                     lambda_=lambda_, seed=seed_from(generator), what="dare_linear")


def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: PerModel, density: PerModel = 1.0,
              normalize: bool = False, rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0,
              consensus_method: str = "sum", generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint sum (mean when normalize)."""
    k = len(tensors)
    return gta_merge(tensors, base, weights=per_model("weight", weight, k), sparsify=SPARSE_RANDOM,
                     densities=per_model("density", density, k), consensus=_consensus(consensus_method),
                     normalize=normalize, rescale=rescale, lambda_=lambda_, seed=seed_from(generator),
                     what="dare_ties")


def _breadcrumbs(name, tensors, base, weight, density, gamma, normalize, rescale, int8_mask, lambda_, consensus):
    if _torch_ties_order():
        extra = {"consensus_method": consensus} if consensus is not None else {}
        return _torch_method(name)(tensors, base, weight=weight, density=density, gamma=gamma, normalize=normalize,
                                   rescale=rescale, int8_mask=int8_mask, lambda_=lambda_, **extra)
    k = len(tensors)
    return gta_merge(tensors, base, weights=per_model("weight", weight, k), sparsify=SPARSE_BAND,
                     densities=per_model("density", density, k), gammas=per_model("gamma", gamma, k),
                     consensus=_consensus(consensus) if consensus is not None else CONSENSUS_NONE,
                     normalize=normalize, rescale=rescale, lambda_=lambda_, what=name)


def breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: PerModel, density: PerModel = 1.0,
                gamma: PerModel = 0.01, normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                lambda_: float = 1.0) -> torch.Tensor:
    """Drop each delta's gamma share of largest magnitudes and the smallest, keep a density share, weighted sum."""
    return _breadcrumbs("breadcrumbs", tensors, base, weight, density, gamma, normalize, rescale, int8_mask,
                        lambda_, None)


def breadcrumbs_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight: PerModel, density: PerModel = 1.0,
                     gamma: PerModel = 0.01, normalize: bool = False, rescale: bool = False,
                     int8_mask: bool = False, lambda_: float = 1.0, consensus_method: str = "sum") -> torch.Tensor:
    """Breadcrumbs' pruning, then TIES' sign election."""
    return _breadcrumbs("breadcrumbs_ties", tensors, base, weight, density, gamma, normalize, rescale, int8_mask,
                        lambda_, consensus_method)


def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """Spherical interpolation from base (t=0) to tensors[0] (t=1); lerp when nearly colinear or antipodal."""
    if len(tensors) != 1:
        raise ConfigError(f"merge method 'slerp' needs exactly 1 model besides the base, got {len(tensors)}")
    return slerp_merge(base, tensors[0], float(t))


def magnitude_prune(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """merging.primitives.magnitude_prune on the GPU: the k = max(1, int(density*n)) largest |delta|."""
    return gta_merge([delta], None, weights=[1.0], sparsify=SPARSE_TOPK, densities=[float(density)],
                     rescale=rescale, what="magnitude_prune")


def dare_drop(delta: torch.Tensor, density: float, *, rescale: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """merging.primitives.dare_drop on the GPU: keep each element with probability density (Philox), rescale."""
    return gta_merge([delta], None, weights=[1.0], sparsify=SPARSE_RANDOM, densities=[float(density)],
                     rescale=rescale, seed=seed_from(generator), what="random_prune")
