"""The merge method catalogue: importing this package registers every method in REGISTRY."""

from merging.methods.registry import REGISTRY, MethodSpec, PerModel, merge_method

# Imported for their registrations.
from merging.methods import (  # noqa: F401  (isort: skip)
    linear,
    spherical,
    task_arithmetic,
    model_stock,
    sce,
    nearswap,
    arcee_fusion,
    ram,
    subspace,
    consensus,
    regmean,
)

__all__ = ["REGISTRY", "MethodSpec", "PerModel", "merge_method"]
