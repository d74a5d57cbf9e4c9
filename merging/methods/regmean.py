"""RegMean: each linear layer merged so that it reproduces every model's outputs on that model's own inputs.

For a linear layer y = W x and models i with input Gram matrices G_i = X_i^T X_i (statistics of the inputs the
layer saw on model i's data, `merging.gram`), RegMean takes the W minimising sum_i ||X_i W^T - X_i W_i^T||^2:

    W^T = (sum_i G_i)^-1  sum_i G_i W_i^T

With a base model the same solve runs on the deltas W_i - W_base (identical in exact arithmetic, better conditioned
in floating point). alpha shrinks each Gram's off-diagonal entries (alpha G + (1 - alpha) diag G), which the paper
found needed for stable merges; alpha 1 is the exact least-squares solution. A per-model weight scales that model's
Gram (its share of the objective). Tensors no Gram file covers (embeddings, norms, biases) are the weighted average
of the models, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merging.errors import InputError
from merging.methods.registry import PerModel, merge_method, model_values

_REGMEAN = ("Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean), ICLR 2023, "
            "arXiv:2212.09849")


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """alpha * G + (1 - alpha) * diag(G): the paper's regularisation of the inner-product matrices."""
    if alpha == 1:
        return gram
    return gram * alpha + torch.diag_embed(torch.diagonal(gram) * (1 - alpha))


def regression_mean(weights: list[Tensor], grams: list[Tensor], scales: list[float]) -> Tensor:
    """(sum_i s_i G_i)^-1 sum_i s_i G_i W_i^T, transposed back: weights [out, in], grams [in, in], in float64."""
    lhs = sum(s * g for s, g in zip(scales, grams))
    rhs = sum(s * (g @ w.T) for s, g, w in zip(scales, grams, weights))
    # A feature no model's data ever activates leaves a zero row; a ridge of 1e-9 of the mean diagonal keeps the
    # system solvable without moving any activated direction measurably.
    ridge = 1e-9 * torch.diagonal(lhs).mean().clamp_min(1e-30)
    lhs = lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.solve(lhs, rhs).T


@merge_method("regmean", paper=_REGMEAN, base="optional", side_inputs=("gram",))
def regmean(tensors: list[Tensor], base: Tensor | None, *, gram: PerModel, weight: PerModel = 1.0,
            alpha: float = 0.9) -> Tensor:
    """RegMean over `tensors` (base optional); `gram` holds each model's Gram matrix for this tensor, or None."""
    n = len(tensors)
    scales = [float(w) for w in model_values(weight, n)]
    grams = model_values(gram, n)
    if all(g is None for g in grams) or tensors[0].dim() != 2:
        total = sum(scales)
        if total == 0:
            raise InputError("regmean: the model weights sum to 0")
        if base is None:
            return sum(s * t for s, t in zip(scales, tensors)) / total
        return base + sum(s * (t - base) for s, t in zip(scales, tensors)) / total
    if any(g is None for g in grams):
        raise InputError("regmean: a Gram matrix is missing for some of the models")  # the plan names which
    dtype = tensors[0].dtype
    grams64 = [shrink_off_diagonal(g.to(torch.float64), alpha) for g in grams]
    if base is None:
        return regression_mean([t.to(torch.float64) for t in tensors], grams64, scales).to(dtype)
    b64 = base.to(torch.float64)
    delta = regression_mean([t.to(torch.float64) - b64 for t in tensors], grams64, scales)
    return (b64 + delta).to(dtype)
