"""Merges in the singular-vector space of each weight matrix: TSV-M, Iso-C, Iso-CTS.

Matrices (2-D tensors, embeddings included: the function never sees a tensor's name) are merged through SVDs of the
task vectors; every other tensor gets the mean of the task vectors, as both papers' code does. Computed in fp32
(fp64 for fp64 inputs: SVD has no half-precision kernel) and returned in the base's dtype. `lambda` is the papers'
alpha, the scale of the merged task vector.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merging.errors import ConfigError
from merging.methods.registry import merge_method

_TSV = ("Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025, "
        "arXiv:2412.00081")
_ISO = ("Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
        "ICML 2025, arXiv:2502.04959")


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _task_vectors(tensors: list[Tensor], base: Tensor) -> list[Tensor]:
    dtype = _work_dtype(base)
    b = base.to(dtype)
    return [t.to(dtype) - b for t in tensors]


def _finish(base: Tensor, merged: Tensor, lambda_: float) -> Tensor:
    return (base.to(merged.dtype) + lambda_ * merged).to(base.dtype)


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD; when LAPACK's divide-and-conquer does not converge (ill-conditioned input, many repeated singular
    values: met on SmolLM2's rank-deficient LoRA task matrices), once more in float64, cast back."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def polar_factor(x: Tensor) -> Tensor:
    """The orthonormal matrix nearest to x (Frobenius): P Q^T for x = P S Q^T. The papers' orthogonalisation."""
    p, _, qh = svd(x)
    return p @ qh


def _mean(deltas: list[Tensor]) -> Tensor:
    return torch.stack(deltas).mean(dim=0)


@merge_method("tsv_m", paper=_TSV, base=True, min_models=1)
def tsv_m(tensors: list[Tensor], base: Tensor, *, sv_reduction: float | None = None,
          lambda_: float = 1.0) -> Tensor:
    """TSV-Merge: keep each task matrix's top k = int(r * sv_reduction) singular triplets (default 1/#models of the
    rank r), concatenate them, replace the stacked left and right singular vectors by their nearest orthonormal
    matrices (removing inter-task interference), and recombine with the kept singular values."""
    deltas = _task_vectors(tensors, base)
    if base.dim() != 2:
        return _finish(base, _mean(deltas), lambda_)
    fraction = 1.0 / len(deltas) if sv_reduction is None else sv_reduction
    if not 0 < fraction * len(deltas) <= 1 + 1e-9:
        raise ConfigError(f"tsv_m: sv_reduction {fraction} times {len(deltas)} models must lie in (0, 1]")
    k = int(min(base.shape) * fraction)
    if k == 0:
        return _finish(base, torch.zeros_like(deltas[0]), lambda_)
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u_perp = polar_factor(torch.cat(us, dim=1))
    vh_perp = polar_factor(torch.cat(vhs, dim=0))
    merged = (u_perp * torch.cat(ss)) @ vh_perp
    return _finish(base, merged, lambda_)


@merge_method("iso_c", paper=_ISO, base=True, min_models=1)
def iso_c(tensors: list[Tensor], base: Tensor, *, lambda_: float = 1.0) -> Tensor:
    """Iso-C: the task-arithmetic sum of the task matrices with its spectrum flattened to the mean singular value
    (U diag(mean(S)) V^T): every direction of the common subspace gets the same scale."""
    deltas = _task_vectors(tensors, base)
    if base.dim() != 2:
        return _finish(base, _mean(deltas), lambda_)
    u, s, vh = svd(torch.stack(deltas).sum(dim=0))
    return _finish(base, s.mean() * (u @ vh), lambda_)


def iso_cts_sizes(rank: int, n_models: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dims, dims per task): the task-specific share is rounded to a multiple of the number of models and
    the common subspace takes the rest, so that together they fill the rank, as the paper's code does."""
    common = int(rank * common_space_fraction)
    specific_total = round((rank - common) / n_models) * n_models
    common = rank - specific_total
    return common, specific_total // n_models


@merge_method("iso_cts", paper=_ISO, base=True, min_models=1)
def iso_cts(tensors: list[Tensor], base: Tensor, *, common_space_fraction: float = 0.8,
            lambda_: float = 1.0) -> Tensor:
    """Iso-CTS: the top singular directions of the summed task matrices (the common subspace, a
    common_space_fraction share of the rank) plus, for each task, the top directions of what its matrix has
    outside the common subspace; both bases orthogonalised, all directions scaled by the mean kept singular value."""
    if not 0 <= common_space_fraction <= 1:
        raise ConfigError(f"iso_cts: common_space_fraction {common_space_fraction} must lie in [0, 1]")
    deltas = _task_vectors(tensors, base)
    if base.dim() != 2 or not any(d.any() for d in deltas):  # no task moved this matrix (LoRA leaves embeddings)
        return _finish(base, _mean(deltas), lambda_)
    n_common, per_task = iso_cts_sizes(min(base.shape), len(deltas), common_space_fraction)
    u, s, vh = svd(torch.stack(deltas).sum(dim=0))
    u_c, s_c, vh_c = u[:, :n_common], s[:n_common], vh[:n_common]
    us, ss, vhs = [], [], []
    for d in deltas:
        outside = d - u_c @ (u_c.T @ d)
        ut, st, vht = svd(outside)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    u_all = polar_factor(torch.cat(us + [u_c], dim=1))
    vh_all = polar_factor(torch.cat(vhs + [vh_c], dim=0))
    scale = torch.cat(ss + [s_c]).mean()
    return _finish(base, scale * (u_all @ vh_all), lambda_)
