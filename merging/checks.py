"""Checks that turn bad numbers into one clear line: parameter values out of range (at plan time, before any tensor
is read) and NaN/Inf in input tensors (where a tensor is read).

Parameter values are checked twice. Every number written in the config is checked against its parameter's range
where it is written, so the error names the key path (`models[1].parameters.density`); interpolating a gradient
between in-range numbers stays in range, so this covers every resolved value of a single parameter. Rules that tie
two parameters (della's density +/- epsilon, weights that sum to zero under normalize) are checked on the values
resolved for each tensor, and name the tensor and model instead.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from merging.config import ConditionalParameter, MergeConfig
from merging.errors import ConfigError, InputError

log = logging.getLogger("alloy")


# ------------------------------------------------------------------------------------------- parameter ranges


@dataclass(frozen=True)
class Range:
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def __contains__(self, v: float) -> bool:
        if self.integer and v != int(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is None and self.hi is None:
            return kind
        if self.hi is None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        return f"{kind} in {'(' if self.lo_open else '['}{lo}, {self.hi:g}{')' if self.hi_open else ']'}"


ANY = Range()
UNIT = Range(0, 1)
FRACTION = Range(0, 1, lo_open=True)  # a share of elements to keep: 0 would keep nothing
NON_NEGATIVE = Range(0)

# Ranges by parameter name, for every method that takes it; METHOD_RANGES overrides one method's parameter.
RANGES: dict[str, Range] = {
    "weight": ANY,  # negative weights are task negation in task arithmetic (Ilharco et al. 2023): allowed
    "lambda": ANY,
    "scale": ANY,
    "density": FRACTION,
    "gamma": UNIT,
    "epsilon": Range(0, 1, hi_open=True),
    "select_topk": FRACTION,
    "common_space_fraction": UNIT,
    "sv_reduction": FRACTION,
    "tall_lambda": NON_NEGATIVE,
    "k": Range(0, integer=True),
    "max_iter": Range(1, integer=True),
    "tol": NON_NEGATIVE,
    "eps": NON_NEGATIVE,
    "r": NON_NEGATIVE,
    "alpha": NON_NEGATIVE,
    "t": UNIT,
}
METHOD_RANGES: dict[tuple[str, str], Range] = {
    # interpolations on the sphere: a negative weight is not a point between the inputs
    ("nuslerp", "weight"): NON_NEGATIVE,
    ("multislerp", "weight"): NON_NEGATIVE,
    # a distance threshold, not an interpolation factor; at 0 every element two models share is 0 / 0 = NaN
    ("nearswap", "t"): Range(0, lo_open=True),
    ("slerp", "t"): ANY,  # beyond [0, 1] slerp extrapolates along the same arc; mergekit takes any t
    ("ram", "epsilon"): NON_NEGATIVE,  # the |delta| below which a change does not count
    ("ramplus_tl", "epsilon"): NON_NEGATIVE,
    ("regmean", "alpha"): UNIT,  # a share of the Grams' off-diagonal entries kept
}
BOOLEANS = {"normalize", "rescale", "int8_mask", "filter_wise", "nuslerp_row_wise", "nuslerp_flatten",
            "normalize_weights"}
CHOICES = {"consensus_method": ("sum", "count")}
FILES = {"gram"}  # a path to a safetensors file of per-tensor statistics


def parameter_range(method: str, name: str) -> Optional[Range]:
    return METHOD_RANGES.get((method, name)) or RANGES.get(name)


def parameter_kind(method: str, name: str) -> str:
    """How a value of this parameter is read: 'bool', 'text' (a choice or a file), 'int' or 'number'. Only numbers'
    gradients interpolate; mergekit reads every value as its parameter's type first, so `normalize: [0, 1]` steps
    from false to true, and `max_iter: 5.0` is 5."""
    if name in BOOLEANS:
        return "bool"
    if name in CHOICES or name in FILES:
        return "text"
    rng = parameter_range(method, name)
    return "int" if rng is not None and rng.integer else "number"


def typed_value(method: str, name: str, value: Any, tensor: str) -> Any:
    """A value evaluate() resolved (already checked by check_parameter_values), as its parameter's type."""
    kind = parameter_kind(method, name)
    if value is None or kind in ("text", "number"):
        return value
    if kind == "bool":
        return bool(value)
    if value != int(value):
        raise ConfigError(f"parameters.{name}: the gradient gives {value:g} at tensor {tensor!r}, and method "
                          f"{method!r} needs an integer")
    return int(value)


def _leaves(setting: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(key path, value) of every value written in one parameter setting: scalar, gradient or filtered list."""
    if isinstance(setting, ConditionalParameter):
        yield from _leaves(setting.value, path + ".value")
    elif isinstance(setting, list):
        if not setting:
            yield path, setting  # refused by _check_value: a gradient needs at least one value
        for i, item in enumerate(setting):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, setting


def _check_value(method: str, name: str, where: str, value: Any) -> None:
    if isinstance(value, list):
        raise ConfigError(f"{where}: an empty list; give a value, or a gradient of at least one value")
    if name in BOOLEANS:
        # YAML "false" in quotes is a string, and a non-empty string is true: refuse it rather than flip the meaning
        if not isinstance(value, bool) and value not in (0, 1):
            raise ConfigError(f"{where}: {value!r} is not true or false (method {method!r})")
        return
    if name in FILES:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {value!r} is not a file path (method {method!r})")
        return
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(CHOICES[name])} (method {method!r})")
        return
    rng = parameter_range(method, name)
    if rng is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {value!r} is not a number (method {method!r} needs {rng})")
    if not math.isfinite(value) or value not in rng:
        raise ConfigError(f"{where}: {value!r} is out of range: method {method!r} needs {rng}")


def parameter_scopes(config: MergeConfig) -> list[tuple[str, dict | None, bool]]:
    """(key path, parameters, whether the scope belongs to one model) for every parameters block of a config."""
    scopes: list[tuple[str, dict | None, bool]] = [("parameters", config.parameters, False)]
    for at, mod in [("", config), *((f"modules.{k}.", m) for k, m in (config.modules or {}).items())]:
        if at:
            scopes.append((f"{at}parameters", mod.parameters, False))
        for i, m in enumerate(mod.models or []):
            scopes.append((f"{at}models[{i}].parameters", m.parameters, True))
        for i, s in enumerate(mod.slices or []):
            scopes.append((f"{at}slices[{i}].parameters", s.parameters, False))
            for j, src in enumerate(s.sources):
                scopes.append((f"{at}slices[{i}].sources[{j}].parameters", src.parameters, True))
    return scopes


def check_parameter_values(config: MergeConfig, per_model: set[str], shared: set[str]) -> None:
    """Every value written in the config is of its parameter's type and range; shared parameters are not set on
    one model (mergekit reads them only from the top-level or slice parameters, so there they would be ignored)."""
    method = config.merge_method
    for where, params, model_scope in parameter_scopes(config):
        for name, setting in (params or {}).items():
            if model_scope and name in shared and name not in per_model:
                raise ConfigError(f"{where}.{name}: {name!r} applies to the whole merge, not to one model; "
                                  "move it to the top-level 'parameters'")
            for path, value in _leaves(setting, f"{where}.{name}"):
                _check_value(method, name, path, value)


def check_task_parameters(method: str, models: list[str], per_model: dict[str, list[Any]], shared: dict[str, Any],
                          tensor: str) -> None:
    """Rules between parameters, on the values resolved for one output tensor (per-model lists in `models` order)."""
    if method in ("della", "della_linear"):
        for model, d, e in zip(models, per_model.get("density", []), per_model.get("epsilon", [])):
            if d is not None and e is not None and d < 1 and not (0 < d - e and d + e < 1):
                raise ConfigError(f"parameters.epsilon: {e:g} with density {d:g} puts model {model}'s keep "
                                  f"probabilities outside (0, 1) (tensor {tensor!r}); use epsilon < {min(d, 1 - d):g}")
    weights = per_model.get("weight")
    normalized = (method == "linear" and shared.get("normalize", True)) or \
                 (method == "multislerp" and shared.get("normalize_weights", True))
    if normalized and weights and all(w is not None for w in weights) and sum(weights) == 0:
        raise ConfigError(f"parameters.weight: the weights {weights} of {', '.join(models)} sum to 0 for tensor "
                          f"{tensor!r}, and {method} divides by their sum; change a weight or turn normalize off")
    if method == "tsv_m" and shared.get("sv_reduction") is not None and shared["sv_reduction"] * len(models) > 1:
        raise ConfigError(f"parameters.sv_reduction: {shared['sv_reduction']:g} x {len(models)} models is more than "
                          f"the whole rank (tensor {tensor!r}); use at most {1 / len(models):g}")


# ------------------------------------------------------------------------------------------------ NaN and Inf

NAN_POLICIES = ("refuse", "warn")
_NAN_POLICY: ContextVar[str] = ContextVar("alloy_nan_policy", default="refuse")


def check_nan_policy(mode: str) -> str:
    if mode not in NAN_POLICIES:
        raise ConfigError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {mode!r}")
    return mode


@contextmanager
def nan_policy(mode: str) -> Iterator[None]:
    """The NaN/Inf policy of merges planned within this context (read when a plan opens its checkpoints)."""
    token = _NAN_POLICY.set(check_nan_policy(mode))
    try:
        yield
    finally:
        _NAN_POLICY.reset(token)


def current_nan_policy() -> str:
    return _NAN_POLICY.get()


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or +/-Inf. min and max propagate NaN and surface Inf, so one aminmax pass
    (no mask allocated) decides: ~10x faster than isfinite().all() on the CPU (24 vs 230 ms, 11.5 M bf16)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8: no aminmax kernel; upcasting is exact
        t = t.to(torch.float16)
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_finite(t: torch.Tensor, *, model: str, tensor: str, policy: str = "refuse") -> bool:
    """True when `t` is finite; otherwise raise InputError (policy "refuse") or log one warning and return False
    (policy "warn"). Both name the model and the tensor and count the bad values."""
    if all_finite(t):
        return True
    n_nan = int(torch.isnan(t.float()).sum())
    n_inf = int(torch.isinf(t.float()).sum())
    what = f"model {model}: tensor {tensor!r} has {n_nan} NaN and {n_inf} Inf value(s) of {t.numel()}"
    if check_nan_policy(policy) == "refuse":
        raise InputError(f"{what}; refused (repair or re-export the checkpoint, or pass --nan-policy warn to merge "
                         "it anyway)")
    log.warning(f"alloy: warning: {what}; merged anyway (--nan-policy warn)")
    return False
