"""One registry of merge methods: a decorated pure function per technique, its parameters read off its signature."""

from __future__ import annotations

import inspect
import keyword
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class PerModel(float):
    """Annotation marker: the parameter takes one value per input model (arrives as list[float])."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    base: bool | str  # True: required, "optional", False: ignored
    per_model: dict[str, Any] = field(default_factory=dict)  # yaml name -> default
    globals: dict[str, Any] = field(default_factory=dict)  # yaml name -> default
    seeded: bool = False
    min_models: int = 1

    @property
    def parameters(self) -> set[str]:
        return set(self.per_model) | set(self.globals)

    def call(self, tensors: list[torch.Tensor], base: torch.Tensor | None, per_model: dict[str, list],
             global_params: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        kwargs = {_py_name(k): v for k, v in {**global_params, **per_model}.items()}
        if self.seeded:
            kwargs["generator"] = generator
        if self.base:
            return self.fn(tensors, base, **kwargs)
        return self.fn(tensors, **kwargs)


REGISTRY: dict[str, MethodSpec] = {}


def _py_name(yaml_name: str) -> str:
    return yaml_name + "_" if keyword.iskeyword(yaml_name) else yaml_name


def _yaml_name(py_name: str) -> str:
    return py_name[:-1] if py_name.endswith("_") and keyword.iskeyword(py_name[:-1]) else py_name


def merge_method(name: str, *, paper: str = "", base: bool | str = False, min_models: int = 1):
    """Register `fn(tensors, [base,] *, params...)`; keyword-only parameters annotated PerModel are per model."""

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        per_model: dict[str, Any] = {}
        glob: dict[str, Any] = {}
        seeded = False
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name == "generator":
                seeded = True
                continue
            default = None if p.default is inspect.Parameter.empty else p.default
            ann = p.annotation
            target = per_model if ann is PerModel or ann == "PerModel" else glob
            target[_yaml_name(p.name)] = default
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        REGISTRY[name] = MethodSpec(name, fn, paper, base, per_model, glob, seeded, min_models)
        fn.spec = REGISTRY[name]  # type: ignore[attr-defined]
        return fn

    return deco
