"""Consensus merging with TALL masks: keep only the weights that at least k tasks find important.

A task's TALL mask marks the elements where the merged model is closer to the task's own model than the base is:
|tau_t| > lambda_t * |tau_MTL - tau_t| (tau_t the task vector, tau_MTL the merged task vector, before scaling).
An element is kept when at least k masks mark it; with k = 2 that removes the "selfish" weights (important to one
task only) and the "catastrophic" ones (important to none). The masks are element-wise, so per-tensor computation
is exactly the paper's whole-model one. Computed in fp32 (fp64 for fp64 inputs), returned in the base's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merging import primitives as P
from merging.errors import ConfigError
from merging.methods.registry import PerModel, merge_method, model_value
from merging.methods.task_arithmetic import combine_deltas

_PAPER = ("Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression (TALL masks, "
          "consensus merging), ICML 2024, arXiv:2405.07813")


def tall_masks(deltas: Tensor, merged: Tensor, tall_lambda: list[float]) -> Tensor:
    """Bool [n, ...]: per task, |tau_t| > lambda_t * |tau_MTL - tau_t| (stacked task vectors `deltas`)."""
    lam = P.stacked_weights(tall_lambda, deltas)
    return deltas.abs() > (merged.unsqueeze(0) - deltas).abs() * lam


def consensus_mask(deltas: Tensor, merged: Tensor, tall_lambda: list[float], k: int) -> Tensor:
    """Bool mask of the elements marked important by at least k tasks' TALL masks."""
    return tall_masks(deltas, merged, tall_lambda).sum(dim=0) >= k


def _consensus(tensors: list[Tensor], base: Tensor, merged_of, tall_lambda: list[float], k: int,
               lambda_: float) -> Tensor:
    if k < 0:
        raise ConfigError(f"consensus: k {k} must be >= 0")
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(dtype)
    models = [t.to(dtype) for t in tensors]
    deltas = torch.stack([m - b for m in models])
    merged = merged_of(models, b)
    kept = merged * consensus_mask(deltas, merged, tall_lambda, k)
    return (b + lambda_ * kept).to(base.dtype)


@merge_method("consensus_ta", paper=_PAPER, base=True, min_models=1)
def consensus_ta(tensors: list[Tensor], base: Tensor, *, weight: PerModel = 1.0, tall_lambda: PerModel = 0.4,
                 k: int = 2, lambda_: float = 1.0) -> Tensor:
    """Consensus Task Arithmetic: base + lambda * mask_k * sum_i w_i tau_i. k = 0 is task arithmetic; k above the
    number of models returns the base."""
    def merged_of(models: list[Tensor], b: Tensor) -> Tensor:
        return combine_deltas(models, b, weight, sparsify=None, consensus=None, normalize=False, int8_mask=False)

    return _consensus(tensors, base, merged_of, tall_lambda, k, lambda_)


@merge_method("consensus_ties", paper=_PAPER, base=True, min_models=1)
def consensus_ties(tensors: list[Tensor], base: Tensor, *, weight: PerModel = 1.0, density: PerModel = 1.0,
                   normalize: bool = True, consensus_method: str = "sum", tall_lambda: PerModel = 0.4, k: int = 2,
                   lambda_: float = 1.0) -> Tensor:
    """Consensus TIES: the TIES-merged task vector (alloy's ties: trim to density, elect sign, disjoint mean),
    masked by the consensus of TALL masks computed against it."""
    def merged_of(models: list[Tensor], b: Tensor) -> Tensor:
        def prune(d: Tensor, i: int) -> Tensor:
            return P.magnitude_prune(d, model_value(density, i))

        return combine_deltas(models, b, weight, sparsify=prune, consensus=consensus_method, normalize=normalize,
                              int8_mask=False)

    return _consensus(tensors, base, merged_of, tall_lambda, k, lambda_)
