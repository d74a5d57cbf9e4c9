"""Differential fuzzing against mergekit 0.1.5: hypothesis writes mergekit configs over the tiny family (a base B and
fine-tunes F0..F2: all fp32, all bf16, or B and F0 in one and F1 and F2 in the other) and alloy must do what mergekit
does with each:

- both refuse the config: skipped (hypothesis.reject);
- one refuses it: a failure; alloy must never raise anything but an AlloyError;
- both merge: the same tensor names, shapes and dtypes, values to rtol 1e-5 / atol 1e-6 (fp32, fp64) or 1 ulp
  (bf16, fp16), and the same num_hidden_layers in config.json.

Methods, `models:` and `slices:` forms (sub-ranges, stacked ranges, other models per slice, a slice's own base_model),
either also under `modules: {default: ...}` (with the module's own parameters, shadowing the top level's),
parameter values as scalars, gradients and filter lists at the top, slice and model levels, dtype / out_dtype, a
base_model listed among the models or not. Configs stay inside what alloy refuses on purpose (docs/reliability.md):
values in their documented ranges, shared parameters never set on one model, weights that cannot sum to 0 where a
method divides by their sum; alloy's refusal of the Inf/NaN mergekit would write in float16 counts as both refusing.
Now and then a model is listed twice, which mergekit refuses. The seeded
methods (dare_*, della*) draw per tensor in alloy (merging.engine.tensor_seed) and from one global stream in
mergekit, so their values are compared only where no random draw happens (every density 1); otherwise the names,
shapes and dtypes are. Ties-family merges use tie_break="torch" (mergekit's tie rule), as test_parity does.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from merging.engine import run_merge
from merging.errors import AlloyError
from test_parity import load_dir, run_mergekit, ulp_diff

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])

N_LAYERS = 3  # family.make_family's default depth
FILTERS = ["self_attn", "mlp", "q_proj", "norm", "layers.1.", "layers.0.", "embed", "lm_head", "proj", "*"]


# ------------------------------------------------------------------------------------------------ values


def _num(lo: float, hi: float, specials: tuple = ()) -> st.SearchStrategy:
    """A number in [lo, hi], rounded for readable YAML; sometimes a round value or another spelling of one (an int,
    YAML 1.1's '5e-1', which mergekit reads as a number)."""
    nice = [v for v in (lo, hi, 0.1, 0.5, 0.9, 1) if lo <= v <= hi]
    return st.one_of(st.floats(lo, hi, allow_nan=False).map(lambda x: round(x, 3)),
                     st.sampled_from(nice + list(specials)))


def _bool_scalar() -> st.SearchStrategy:
    return st.one_of(st.booleans(), st.sampled_from([0, 1]))


@dataclass(frozen=True)
class Param:
    scope: str  # "shared", "input" (every model, base included), "non_base"
    scalar: Any  # a strategy of one value
    required: bool = False
    boolean: bool = False


def _params(method: str) -> dict[str, Param]:
    pos_weight = Param("input", _num(0.1, 1.5, ("5e-1", "1e0")), required=True)
    gta = {
        "weight": Param("non_base", _num(-0.5, 1.5, ("5e-1",)), required=True),
        "density": Param("non_base", _num(0.05, 1.0, ("5e-1", "1e0"))),
        "normalize": Param("shared", _bool_scalar(), boolean=True),
        "rescale": Param("shared", _bool_scalar(), boolean=True),
        "int8_mask": Param("shared", _bool_scalar(), boolean=True),
        "lambda": Param("shared", _num(0.5, 1.5, ("1e0",))),
    }
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        gta["gamma"] = Param("non_base", _num(0.0, 0.1))
    if method in ("della", "della_linear"):
        gta["density"] = Param("non_base", _num(0.3, 0.7))
        gta["epsilon"] = Param("non_base", _num(0.05, 0.2))
    if method in GTA:
        return gta
    return {
        "linear": {"weight": pos_weight, "normalize": Param("shared", _bool_scalar(), boolean=True)},
        "slerp": {"t": Param("shared", _num(-0.2, 1.2), required=True)},
        "nuslerp": {"weight": Param("non_base", _num(0.0, 1.0), required=True),
                    "nuslerp_row_wise": Param("shared", _bool_scalar(), boolean=True),
                    "nuslerp_flatten": Param("shared", _bool_scalar(), boolean=True)},
        "multislerp": {"weight": Param("non_base", _num(0.1, 1.0), required=True),
                       "normalize_weights": Param("shared", _bool_scalar(), boolean=True),
                       "eps": Param("shared", st.sampled_from([1e-8, 1e-6, 0.0]))},
        "karcher": {"max_iter": Param("shared", st.one_of(st.integers(1, 20), st.integers(1, 20).map(float))),
                    "tol": Param("shared", st.sampled_from([1e-5, 1e-7, 1e-3]))},
        "model_stock": {"filter_wise": Param("shared", _bool_scalar(), boolean=True)},
        "sce": {"select_topk": Param("shared", _num(0.1, 1.0)),
                "int8_mask": Param("shared", _bool_scalar(), boolean=True)},
        "nearswap": {"t": Param("shared", _num(0.001, 0.05), required=True)},  # t 0: alloy refuses 0 / 0
        "arcee_fusion": {},
        "passthrough": {"scale": Param("input", _num(0.5, 2.0))},
    }[method]


GTA = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
       "della_linear")
SEEDED = ("dare_linear", "dare_ties", "della", "della_linear")


@dataclass(frozen=True)
class Shape:
    base: str  # "required", "optional", "ignored"
    min_nb: int = 1  # non-base models
    max_nb: int = 3


SHAPES = {
    **{m: Shape("required") for m in GTA},
    "linear": Shape("ignored", 1, 3), "karcher": Shape("ignored", 1, 3), "passthrough": Shape("ignored", 1, 1),
    "slerp": Shape("required", 1, 1), "nearswap": Shape("required", 1, 1), "arcee_fusion": Shape("required", 1, 1),
    "nuslerp": Shape("optional", 2, 2), "multislerp": Shape("optional", 1, 3),
    "model_stock": Shape("required", 2, 3), "sce": Shape("required", 1, 3),
}
METHODS = sorted(SHAPES)


def _setting(draw, p: Param, *, filtered_ok: bool = True, catch_all: bool = True) -> Any:
    """A scalar, a gradient, or a list of {filter, value} (ending in a catch-all unless catch_all is False)."""
    kinds = ["scalar", "scalar", "gradient"] + (["filtered"] if filtered_ok else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "scalar":
        return draw(p.scalar)
    if kind == "gradient":
        if p.boolean:
            return draw(st.lists(st.one_of(st.booleans(), st.sampled_from([0, 1])), min_size=1, max_size=4))
        return draw(st.lists(p.scalar, min_size=1, max_size=4))
    conds = []
    for f in draw(st.lists(st.sampled_from(FILTERS), min_size=1, max_size=2, unique=True)):
        conds.append({"filter": f, "value": _setting(draw, p, filtered_ok=False)})
    if catch_all:
        conds.append({"value": _setting(draw, p, filtered_ok=False)})
    return conds


# ------------------------------------------------------------------------------------------------ configs


@st.composite
def merge_configs(draw) -> tuple[dict, bool]:
    """(config over the symbolic models B, F0, F1, F2, whether it draws random numbers in a seeded method)."""
    method = draw(st.sampled_from(METHODS))
    shape = SHAPES[method]
    params = _params(method)
    form = draw(st.sampled_from(["models", "slices"]))

    # which model is the base, and the others (non-base models; for methods without a base, the base model written
    # in base_model is one more input, as in mergekit)
    if shape.base == "required":
        base = draw(st.sampled_from(["B", "B", "B", "F0"]))
    elif shape.base == "optional":
        base = draw(st.sampled_from(["B", None]))
    else:
        base = draw(st.sampled_from([None, None, "B"]))
    pool = [m for m in ("B", "F0", "F1", "F2") if m != base]
    n = draw(st.integers(shape.min_nb, min(shape.max_nb, len(pool))))
    others = draw(st.permutations(pool))[:n]

    cfg: dict[str, Any] = {"merge_method": method}
    if base is not None:
        cfg["base_model"] = base
    # where each parameter goes: top level, slice level, each model's own, or a top-level default with model overrides
    placements = {}
    for name, p in params.items():
        present = p.required or draw(st.booleans())
        if not present:
            continue
        options = ["top"] + (["slice"] if form == "slices" else [])
        if p.scope != "shared":
            options += ["model", "mixed"]
        placements[name] = draw(st.sampled_from(options))

    def model_params(is_base: bool) -> dict:
        out = {}
        for name, where in placements.items():
            if where not in ("model", "mixed"):
                continue
            if is_base and params[name].scope == "non_base" and draw(st.booleans()):
                continue  # mergekit ignores a base's non-base parameters: sometimes write them anyway
            if where == "mixed" and draw(st.booleans()):
                continue  # this model takes the top-level value
            # a model's own filter list may end without a catch-all where a top-level value stands behind it
            out[name] = _setting(draw, params[name], catch_all=where == "model")
        return out

    top = {name: _setting(draw, params[name]) for name, where in placements.items() if where in ("top", "mixed")}
    if top:
        cfg["parameters"] = top

    random_draws = method in SEEDED and "density" in placements
    has_base = shape.base != "ignored"  # the base model is the method's base (else one more input)
    if form == "models":
        entries = list(others)
        if base is not None and draw(st.booleans()):  # listed among the models, or added by both tools
            entries.insert(draw(st.integers(0, len(entries))), base)
        if draw(st.integers(0, 19)) == 0:  # a model listed twice: mergekit refuses (duplicate merge inputs)
            entries.append(draw(st.sampled_from(entries)))
        models = []
        for m in entries:
            mp = model_params(has_base and m == base)
            models.append({"model": m, **({"parameters": mp} if mp else {})})
        cfg["models"] = models
    else:
        slice_base = base is not None and has_base and draw(st.integers(0, 4)) == 0
        if slice_base:
            del cfg["base_model"]  # each slice names its base
        n_slices = draw(st.integers(1, 3 if method == "passthrough" else 2))
        slices = []
        for _ in range(n_slices):
            length = draw(st.integers(1, N_LAYERS))
            srcs = list(others)
            if draw(st.integers(0, 3)) == 0:  # other models in this slice (as many: README, where alloy and
                srcs = draw(st.permutations(pool))[:len(others)]  # mergekit part: a last slice with more sources)
            if method == "passthrough":
                srcs = [draw(st.sampled_from(["B", "F0", "F1", "F2"]))]
            elif base is not None and has_base:
                srcs.insert(draw(st.integers(0, len(srcs))), base)
            same_start = draw(st.booleans())
            start0 = draw(st.integers(0, N_LAYERS - length))
            sources = []
            for m in srcs:
                start = start0 if same_start else draw(st.integers(0, N_LAYERS - length))
                mp = model_params(has_base and m == base)
                sources.append({"model": m, "layer_range": [start, start + length],
                                **({"parameters": mp} if mp else {})})
            sl: dict[str, Any] = {"sources": sources}
            if slice_base:
                sl["base_model"] = base
            slice_params = {name: _setting(draw, params[name])
                            for name, where in placements.items() if where == "slice"}
            if slice_params:
                sl["parameters"] = slice_params
            slices.append(sl)
        cfg["slices"] = slices
    if draw(st.integers(0, 3)) == 0:  # mergekit's modules: form, the one module of a one-module model
        module: dict[str, Any] = {form: cfg.pop(form)}
        if "parameters" in cfg and draw(st.booleans()):
            module["parameters"] = cfg.pop("parameters")
            if draw(st.booleans()):  # a top-level value the module's own shadows
                cfg["parameters"] = {name: _setting(draw, params[name]) for name in module["parameters"]}
        cfg["modules"] = {"default": module}
    for key in ("dtype", "out_dtype"):
        dt = draw(st.sampled_from([None, None, None, "float32", "bfloat16", "float16", "float64"]))
        if dt is not None:
            cfg[key] = dt
    return cfg, random_draws


# ------------------------------------------------------------------------------------------------ the oracle


def _resolve(obj: Any, paths: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        return {k: (paths[v] if k in ("model", "base_model") and v in paths else _resolve(v, paths))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, paths) for v in obj]
    return obj


def _same(ours: dict, theirs: dict, values: bool) -> tuple[str, str] | None:
    """None when equal; else ("tensors" or "values", what differs on one line)."""
    if set(ours) != set(theirs):
        return "tensors", (f"tensor names differ: only alloy {sorted(set(ours) - set(theirs))}, "
                           f"only mergekit {sorted(set(theirs) - set(ours))}")
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            return "tensors", f"{name}: alloy {a.dtype} {list(a.shape)}, mergekit {b.dtype} {list(b.shape)}"
    if not values:
        return None
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        if a.dtype in (torch.bfloat16, torch.float16):
            if ulp_diff(a, b) > 1:
                return "values", (f"{name}: {ulp_diff(a, b)} ulp apart "
                                  f"(max |diff| {float((a.float() - b.float()).abs().max()):.3g})")
        elif not torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
            return "values", f"{name}: max |diff| {float((a.double() - b.double()).abs().max()):.3g}"
    return None


def differ(cfg: dict, random_draws: bool, fam: dict[str, Path]) -> tuple[str, str] | None:
    """Merge `cfg` (symbolic models) with both tools: None when they agree, else (kind of difference, what differs).
    Rejects (hypothesis) a config both refuse."""
    paths = {"B": str(fam["base"]), "F0": str(fam["ft0"]), "F1": str(fam["ft1"]), "F2": str(fam["ft2"])}
    real = _resolve(cfg, paths)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "c.yml").write_text(yaml.safe_dump(real))
        ours_err = theirs_err = None
        try:
            run_merge(tmp / "c.yml", tmp / "alloy", progress=False, tie_break="torch")
        except Exception as e:  # noqa: BLE001  (classified below)
            ours_err = e
        try:
            run_mergekit(real, tmp / "mk", seed=0 if cfg["merge_method"] in SEEDED else None)
        except Exception as e:  # noqa: BLE001
            theirs_err = e
        if ours_err is not None and not isinstance(ours_err, AlloyError):
            return "crash", f"alloy raised {type(ours_err).__name__}: {ours_err} (mergekit: {_first_line(theirs_err)})"
        if ours_err is not None and theirs_err is not None:
            reject()
        if ours_err is not None and "in float16" in str(ours_err) and not all(
                bool(torch.isfinite(t).all()) for t in load_dir(tmp / "mk").values()):
            reject()  # alloy refuses on purpose the Inf/NaN that mergekit writes (merging.engine.compute_tensor)
        if ours_err is not None:
            return "only alloy refuses", str(ours_err)
        if theirs_err is not None:
            return "only mergekit refuses", _first_line(theirs_err)
        theirs = load_dir(tmp / "mk")
        if cfg["merge_method"] == "arcee_fusion" and "out_dtype" not in cfg:
            # README, where alloy and mergekit part: mergekit writes float32 from half inputs, alloy their dtype
            ours = load_dir(tmp / "alloy")
            theirs = {k: v.to(ours[k].dtype) if k in ours else v for k, v in theirs.items()}
        diff = _same(load_dir(tmp / "alloy"), theirs, values=not random_draws)
        if diff:
            return diff
        layers = [json.loads((tmp / d / "config.json").read_text())["num_hidden_layers"] for d in ("alloy", "mk")]
        if layers[0] != layers[1]:
            return "config", f"config.json num_hidden_layers: alloy {layers[0]}, mergekit {layers[1]}"
    return None


def _first_line(e: Exception | None) -> str:
    return "merged" if e is None else f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"


@FUZZ
@given(case=merge_configs(), precision=st.sampled_from(["fp32", "bf16", "fp32", "bf16", "mixed", "mixed'"]))
def test_alloy_merges_what_mergekit_merges_to_the_same_numbers(case, precision, family_fp32, family_bf16):
    cfg, random_draws = case
    fam = {"fp32": family_fp32, "bf16": family_bf16}.get(precision)
    if fam is None:  # inputs of two dtypes: B and F0 in fp32, F1 and F2 in bf16 (mixed), or the other way (mixed')
        first, second = (family_fp32, family_bf16) if precision == "mixed" else (family_bf16, family_fp32)
        fam = {k: (first if k in ("base", "ft0") else second)[k] for k in family_fp32}
    found = differ(cfg, random_draws, fam)
    kind, what = found or (None, None)
    where = f"{precision}: {what}\n{yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)}"
    # one assertion per kind, so that hypothesis reports (and shrinks) one example of each
    assert kind != "crash", where
    assert kind != "only alloy refuses", where
    assert kind != "only mergekit refuses", where
    assert kind != "tensors", where
    assert kind != "values", where
    assert kind != "config", where
