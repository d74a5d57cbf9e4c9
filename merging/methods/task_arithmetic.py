"""The task-arithmetic family: base + lambda * combine(sparsify(model - base)).

Computes in the dtype the tensors arrive in (mergekit: the base's, since the engine hands over one dtype), and
returns the base's dtype. Per model: weight (required, as in mergekit), density; shared: normalize, rescale, lambda,
int8_mask. Variants differ by how each delta is sparsified and whether signs are elected:

| method            | sparsify                      | sign election | normalize | rescale |
|-------------------|-------------------------------|---------------|-----------|---------|
| task_arithmetic   | -                             | -             | False     | False   |
| ties              | magnitude top-k               | yes           | True      | False   |
| dare_linear       | Bernoulli drop                | -             | False     | True    |
| dare_ties         | Bernoulli drop                | yes           | False     | True    |
| breadcrumbs       | drop outliers and smallest    | -             | False     | False   |
| breadcrumbs_ties  | drop outliers and smallest    | yes           | False     | False   |
| della             | magnitude-ranked Bernoulli    | yes           | True      | True    |
| della_linear      | magnitude-ranked Bernoulli    | -             | False     | True    |

`density` on task_arithmetic is accepted and ignored, as mergekit does. `consensus_method` ('sum', TIES' mass;
'count', a vote) is an alloy extension on the sign-electing variants; mergekit always uses 'sum'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from merging import bitwise as B
from merging import primitives as P
from merging.methods.registry import PerModel, merge_method, model_value

Sparsify = P.Sparsify


# Elements per slice of the combine stage. Every step after sparsify is element-wise across models (weights, sign
# election, disjoint mean, lambda, + base), so slicing the flattened tensors changes no element's arithmetic (the
# bytes are the same) while the temporaries of each step stay in cache instead of streaming through memory.
COMBINE_CHUNK = B.CHUNK


def _combine_slice(deltas: Tensor, weights: Tensor, *, consensus: str | None, normalize: bool,
                   int8_mask: bool) -> Tensor:
    if B.applies(deltas):  # the same bits, 2.6-5.4x faster on the CPU (merging.bitwise); None: a NaN/inf
        if consensus == "sum":
            mixed = B.sign_merge(deltas, weights, normalize=normalize)
            if mixed is not None:
                return mixed
        elif consensus is None and (rows := B.weighted_rows(deltas, weights)) is not None:
            mixed = B.exact_sum(rows)
            return P.divide_by_weights(mixed, weights) if normalize else mixed
    weighted = deltas * weights
    mask = P.agreement_mask(weighted, consensus, int8=int8_mask) if consensus else None
    return P.disjoint_merge(weighted, weights, mask, normalize=normalize)


def combine_deltas(tensors: list[Tensor], base: Tensor, weight: list[float], *, sparsify: Sparsify | None,
                   consensus: str | None, normalize: bool, int8_mask: bool, owned: bool = False) -> Tensor:
    """sum_i w_i * sparsify(t_i - base), restricted to the elected sign when `consensus`, divided by the weights that
    contributed to each element when normalize. Arithmetic and dtype follow mergekit 0.1.5 step by step."""
    return _combine(tensors, base, weight, sparsify=sparsify, consensus=consensus, normalize=normalize,
                    int8_mask=int8_mask, lambda_=None, owned=owned)


def _combine(tensors, base, weight, *, sparsify, consensus, normalize, int8_mask, lambda_: float | None,
             owned: bool = False) -> Tensor:
    """combine_deltas, then (lambda_ not None) base + lambda_ * that, over slices of COMBINE_CHUNK elements.

    Without sparsification (a threshold or rescale needs the whole delta) the deltas too are taken a slice at a
    time, into one slice-sized buffer: no [n, *shape] block to fault in, and the same subtraction per element."""
    n = len(tensors)
    fbase = base.reshape(-1)
    whole = sparsify is not None or not all(t.is_contiguous() for t in tensors)
    if whole:
        flat = P.stacked_deltas(tensors, base, sparsify, owned=owned).view(n, -1)
    else:
        flat = base.new_empty((n, min(COMBINE_CHUNK, fbase.numel())))
        inputs = [t.view(-1) for t in tensors]
    weights = P.stacked_weights(weight, flat)  # [n, 1]
    out = torch.empty_like(fbase)
    for start in range(0, max(fbase.numel(), 1), COMBINE_CHUNK):
        sl = slice(start, start + COMBINE_CHUNK)
        if whole:
            deltas = flat[:, sl]
        else:
            m = min(COMBINE_CHUNK, fbase.numel() - start)
            deltas = flat[:, :m]
            for i, t in enumerate(inputs):
                torch.sub(t[sl], fbase[sl], out=deltas[i])
        mixed = _combine_slice(deltas, weights, consensus=consensus, normalize=normalize, int8_mask=int8_mask)
        if lambda_ is None:
            out[sl] = mixed
            continue
        if lambda_ != 1:
            mixed *= lambda_
        torch.add(fbase[sl], mixed, out=out[sl])
    return out.view(base.shape)


def generalized_task_arithmetic(tensors: list[Tensor], base: Tensor, weight: list[float], *,
                                sparsify: Sparsify | None, consensus: str | None, normalize: bool,
                                int8_mask: bool, lambda_: float, owned: bool = False) -> Tensor:
    """base + lambda * combine_deltas(...), in the base's dtype. owned: the inputs may leave `tensors` (see
    MethodSpec.inplace) once their deltas are taken."""
    if not tensors:
        return base
    return _combine(tensors, base, weight, sparsify=sparsify, consensus=consensus, normalize=normalize,
                    int8_mask=int8_mask, lambda_=lambda_, owned=owned)


_TA = "Ilharco et al. 2023, Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089"
_TIES = "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, arXiv:2306.01708"
_DARE = ("Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
         "Lunch (DARE), ICML 2024, arXiv:2311.03099")
_BREADCRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, " \
               "ECCV 2024, arXiv:2312.06795"
_DELLA = ("Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, "
          "arXiv:2406.11617")


@merge_method("task_arithmetic", paper=_TA, base=True)
def task_arithmetic(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
                    normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                    lambda_: float = 1.0) -> Tensor:
    """base + lambda * sum_i w_i (t_i - base) (divided by sum_i w_i when normalize)."""
    return generalized_task_arithmetic(tensors, base, weight, sparsify=None, consensus=None, normalize=normalize,
                                       int8_mask=int8_mask, lambda_=lambda_)


@merge_method("ties", paper=_TIES, base=True)
def ties(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
         normalize: bool = True, rescale: bool = False, int8_mask: bool = False, lambda_: float = 1.0,
         consensus_method: str = "sum", owned: bool = False) -> Tensor:
    """Trim each delta to its top-density magnitudes, elect a sign per element, average the agreeing deltas."""
    def prune(d: Tensor, i: int) -> Tensor:
        return P.magnitude_prune(d, model_value(density, i), rescale=rescale, inplace=True)

    return generalized_task_arithmetic(tensors, base, weight, sparsify=prune, consensus=consensus_method,
                                       normalize=normalize, int8_mask=int8_mask, lambda_=lambda_, owned=owned)


def _dare(tensors, base, weight, density, rescale, generator, consensus, normalize, int8_mask, lambda_, owned):
    def drop(d: Tensor, i: int) -> Tensor:
        return P.dare_drop(d, model_value(density, i), rescale=rescale, generator=generator, inplace=True)

    return generalized_task_arithmetic(tensors, base, weight, sparsify=drop, consensus=consensus,
                                       normalize=normalize, int8_mask=int8_mask, lambda_=lambda_, owned=owned)


@merge_method("dare_linear", paper=_DARE, base=True)
def dare_linear(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
                normalize: bool = False, rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0,
                generator: torch.Generator | None = None, owned: bool = False) -> Tensor:
    """Drop each delta element with probability 1 - density, rescale (L1 ratio), weighted sum."""
    return _dare(tensors, base, weight, density, rescale, generator, None, normalize, int8_mask, lambda_, owned)


@merge_method("dare_ties", paper=_DARE, base=True)
def dare_ties(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
              normalize: bool = False, rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0,
              consensus_method: str = "sum", generator: torch.Generator | None = None,
              owned: bool = False) -> Tensor:
    """DARE's random drop and rescale, then TIES' sign election."""
    return _dare(tensors, base, weight, density, rescale, generator, consensus_method, normalize, int8_mask,
                 lambda_, owned)


def _breadcrumbs(tensors, base, weight, density, gamma, rescale, consensus, normalize, int8_mask, lambda_, owned):
    def prune(d: Tensor, i: int) -> Tensor:
        return P.breadcrumbs_prune(d, model_value(density, i), model_value(gamma, i), rescale=rescale)

    return generalized_task_arithmetic(tensors, base, weight, sparsify=prune, consensus=consensus,
                                       normalize=normalize, int8_mask=int8_mask, lambda_=lambda_, owned=owned)


@merge_method("breadcrumbs", paper=_BREADCRUMBS, base=True)
def breadcrumbs(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
                gamma: PerModel = 0.01, normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                lambda_: float = 1.0, owned: bool = False) -> Tensor:
    """Remove the gamma share of largest outliers and the smallest magnitudes of each delta, weighted sum."""
    return _breadcrumbs(tensors, base, weight, density, gamma, rescale, None, normalize, int8_mask, lambda_, owned)


@merge_method("breadcrumbs_ties", paper=_BREADCRUMBS, base=True)
def breadcrumbs_ties(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
                     gamma: PerModel = 0.01, normalize: bool = False, rescale: bool = False,
                     int8_mask: bool = False, lambda_: float = 1.0, consensus_method: str = "sum",
                     owned: bool = False) -> Tensor:
    """Breadcrumbs' pruning, then TIES' sign election."""
    return _breadcrumbs(tensors, base, weight, density, gamma, rescale, consensus_method, normalize, int8_mask,
                        lambda_, owned)


def _della(tensors, base, weight, density, epsilon, rescale, generator, consensus, normalize, int8_mask, lambda_,
           owned):
    def drop(d: Tensor, i: int) -> Tensor:
        return P.della_drop(d, model_value(density, i), model_value(epsilon, i), rescale=rescale, generator=generator,
                            inplace=True)

    return generalized_task_arithmetic(tensors, base, weight, sparsify=drop, consensus=consensus,
                                       normalize=normalize, int8_mask=int8_mask, lambda_=lambda_, owned=owned)


@merge_method("della", paper=_DELLA, base=True)
def della(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
          epsilon: PerModel = 0.15, normalize: bool = True, rescale: bool = True, int8_mask: bool = False,
          lambda_: float = 1.0, consensus_method: str = "sum", generator: torch.Generator | None = None,
          owned: bool = False) -> Tensor:
    """MagPrune (keep probability density +/- epsilon by magnitude rank within rows), rescale, sign election."""
    return _della(tensors, base, weight, density, epsilon, rescale, generator, consensus_method, normalize,
                  int8_mask, lambda_, owned)


@merge_method("della_linear", paper=_DELLA, base=True)
def della_linear(tensors: list[Tensor], base: Tensor, *, weight: PerModel, density: PerModel = 1.0,
                 epsilon: PerModel = 0.15, normalize: bool = False, rescale: bool = True, int8_mask: bool = False,
                 lambda_: float = 1.0, generator: torch.Generator | None = None, owned: bool = False) -> Tensor:
    """MagPrune and rescale, weighted sum without sign election."""
    return _della(tensors, base, weight, density, epsilon, rescale, generator, None, normalize, int8_mask,
                  lambda_, owned)
