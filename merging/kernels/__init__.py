"""Triton kernels for the merge methods, each with a torch twin in merging.kernels.reference.

KERNELS maps a registered method name to a function with that method's signature (merging.kernels.ops); the engine
calls it instead of REGISTRY[name].fn when it merges on CUDA. On CPU tensors the kernels run only under the Triton
interpreter (TRITON_INTERPRET=1 set before this package is imported), which is how the tests exercise them.
"""

from __future__ import annotations

from typing import Callable

import torch

from merging.kernels import ops

KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": ops.linear,
    "task_arithmetic": ops.task_arithmetic,
    "ties": ops.ties,
    "dare_linear": ops.dare_linear,
    "dare_ties": ops.dare_ties,
    "breadcrumbs": ops.breadcrumbs,
    "breadcrumbs_ties": ops.breadcrumbs_ties,
    "slerp": ops.slerp,
}

# merging.primitives functions with a kernel of the same name and signature, for callers pruning one delta.
PRIMITIVES: dict[str, Callable[..., torch.Tensor]] = {
    "magnitude_prune": ops.magnitude_prune,
    "dare_drop": ops.dare_drop,
}

__all__ = ["KERNELS", "PRIMITIVES"]
