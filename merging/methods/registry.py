"""One registry of merge methods: a decorated pure function per technique, its parameters read off its signature."""

from __future__ import annotations

import inspect
import keyword
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from merging.errors import ConfigError


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
    min_models: int = 1  # non-base tensors (all tensors when base is False)
    max_models: int | None = None
    required: frozenset[str] = frozenset()  # yaml names declared without a default
    # per-model parameters naming a safetensors file: the engine reads, for each tensor, the file's tensor of the
    # same name and passes it (None where the file has none) in place of the path (RegMean's Gram matrices)
    side_inputs: tuple[str, ...] = ()
    # the function takes `owned`: when the caller passes owned=True (the engine, whose read buffers nobody else
    # holds) it may drop its inputs from `tensors` once used, or overwrite them, so they are freed early
    inplace: bool = False

    @property
    def parameters(self) -> set[str]:
        return set(self.per_model) | set(self.globals)

    def call(self, tensors: list[torch.Tensor], base: torch.Tensor | None, per_model: dict[str, list],
             global_params: dict[str, Any], generator: torch.Generator | None = None,
             fn: Callable[..., torch.Tensor] | None = None, owned: bool = False) -> torch.Tensor:
        """Check counts and parameters, broadcast scalar per-model values, then run the function.

        owned: the tensors are the caller's to lose (an `inplace` method may drop or overwrite them); a kernel is
        never told.

        Raises ConfigError (one line naming the method and the parameter) for what a config can get wrong.
        """
        self.check_models(len(tensors), base is not None)
        values = {**global_params, **per_model}
        unknown = set(values) - self.parameters
        if unknown:
            raise ConfigError(f"merge method {self.name!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        missing = [k for k in sorted(self.required) if values.get(k) is None]
        if missing:
            raise ConfigError(f"merge method {self.name!r} needs parameter {missing[0]!r}")
        kwargs: dict[str, Any] = {}
        for key, default in self.per_model.items():
            if key not in values and default is not None:
                values[key] = default
        for key, value in values.items():
            if key in self.per_model and value is not None:
                value = _per_model_list(self.name, key, value, len(tensors))
            kwargs[_py_name(key)] = value
        if self.seeded:
            kwargs["generator"] = generator
        if self.inplace and fn is None:
            kwargs["owned"] = owned
        fn = fn or self.fn  # a kernel with the same signature, when merging on a GPU
        if self.base:
            return fn(tensors, base, **kwargs)
        return fn(tensors, **kwargs)

    def check_models(self, n_models: int, has_base: bool) -> None:
        """Raise ConfigError when a method gets a number of models (or a base) it cannot use."""
        if self.base is True and not has_base:
            raise ConfigError(f"merge method {self.name!r} needs base_model")
        if n_models < self.min_models:
            raise ConfigError(f"merge method {self.name!r} needs at least {self.min_models} model(s)"
                              f"{' besides the base' if self.base else ''}, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise ConfigError(f"merge method {self.name!r} takes at most {self.max_models} model(s)"
                              f"{' besides the base' if self.base else ''}, got {n_models}")


def _per_model_list(method: str, key: str, value: Any, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"merge method {method!r}: parameter {key!r} has {len(value)} values for {n} models")
        return list(value)
    return [value] * n


def model_value(values: Any, i: int) -> Any:
    """Model i's value of a per-model parameter: a list as the engine passes it, or one scalar for all."""
    return values[i] if isinstance(values, (list, tuple)) else values


def model_values(values: Any, n: int) -> list:
    """A per-model parameter as a list of n values (one scalar stands for every model)."""
    return list(values) if isinstance(values, (list, tuple)) else [values] * n


REGISTRY: dict[str, MethodSpec] = {}


def _py_name(yaml_name: str) -> str:
    return yaml_name + "_" if keyword.iskeyword(yaml_name) else yaml_name


def _yaml_name(py_name: str) -> str:
    return py_name[:-1] if py_name.endswith("_") and keyword.iskeyword(py_name[:-1]) else py_name


def merge_method(name: str, *, paper: str = "", base: bool | str = False, min_models: int = 1,
                 max_models: int | None = None, side_inputs: tuple[str, ...] = ()):
    """Register `fn(tensors, [base,] *, params...)`; keyword-only parameters annotated PerModel are per model.

    A keyword-only parameter without a default is required; `generator` marks the method as seeded, `owned` as one
    that may work in its input tensors when the caller gives them up (MethodSpec.inplace).
    side_inputs: per-model parameters whose value is a safetensors file of per-tensor statistics (see MethodSpec).
    """

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        sig = inspect.signature(fn)
        per_model: dict[str, Any] = {}
        glob: dict[str, Any] = {}
        required: set[str] = set()
        seeded = inplace = False
        for p in sig.parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if p.name == "generator":
                seeded = True
                continue
            if p.name == "owned":
                inplace = True
                continue
            if p.default is inspect.Parameter.empty:
                required.add(_yaml_name(p.name))
            default = None if p.default is inspect.Parameter.empty else p.default
            ann = p.annotation
            target = per_model if ann is PerModel or ann == "PerModel" else glob
            target[_yaml_name(p.name)] = default
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        unknown = [p for p in side_inputs if p not in per_model]
        if unknown:
            raise ValueError(f"merge method {name!r}: side input {unknown[0]!r} is not a per-model parameter")
        REGISTRY[name] = MethodSpec(name, fn, paper, base, per_model, glob, seeded, min_models, max_models,
                                    frozenset(required), tuple(side_inputs), inplace)
        fn.spec = REGISTRY[name]  # type: ignore[attr-defined]
        return fn

    return deco
