"""The registry: every method registered, its signature read right, and each one runs on every float dtype."""

from __future__ import annotations

import pytest
import torch

from merging.errors import ConfigError
from merging.methods import REGISTRY, PerModel, merge_method

MERGEKIT = {"linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
            "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce",
            "nearswap", "arcee_fusion", "ram", "ramplus_tl"}
BEYOND = {"tsv_m", "iso_c", "iso_cts", "consensus_ta", "consensus_ties"}
REQUIRED_ARGS = {"slerp": {"t": 0.4}, "nearswap": {"t": 0.01}}


def test_catalogue_is_complete_and_cited():
    assert MERGEKIT | BEYOND <= set(REGISTRY)
    for spec in REGISTRY.values():
        assert spec.paper, spec.name
    assert REGISTRY["ties"].required == {"weight"} and REGISTRY["ties"].per_model["density"] == 1.0
    assert REGISTRY["ties"].globals["lambda"] == 1.0  # YAML name, python lambda_
    assert {n for n, s in REGISTRY.items() if s.seeded} == {"dare_linear", "dare_ties", "della", "della_linear",
                                                           "arcee_fusion"}


@pytest.mark.parametrize("name", sorted(MERGEKIT | BEYOND))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_method_runs_and_keeps_shape(name, dtype):
    spec = REGISTRY[name]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 20, generator=g)
    n = spec.max_models or 3
    models = [(base + 0.05 * torch.randn(12, 20, generator=g)).to(dtype) for _ in range(n)]
    base = base.to(dtype)
    per_model = {k: [0.6] * n for k in spec.required if k in spec.per_model}
    shared = dict(REQUIRED_ARGS.get(name, {}))
    if "density" in spec.per_model:
        per_model["density"] = [0.6] * n
    use_base = base if spec.base else None
    out = spec.call(models, use_base, per_model, shared, generator=torch.Generator().manual_seed(1))
    assert out.shape == base.shape
    assert bool(torch.isfinite(out.float()).all())
    if spec.base is not True:  # an all-same input set is a fixed point of every averaging method
        same = spec.call([base] * n, None, per_model, shared, generator=torch.Generator())
        torch.testing.assert_close(same.float(), base.float(), rtol=1e-2, atol=1e-2)


def test_call_checks_parameters_and_broadcasts_scalars():
    spec = REGISTRY["ties"]
    a = torch.ones(3)
    with pytest.raises(ConfigError, match="unknown parameter"):
        spec.call([a], a * 0, {"weight": [1.0]}, {"gamma": 0.1})
    with pytest.raises(ConfigError, match="2 values for 1 models"):
        spec.call([a], a * 0, {"weight": [1.0, 2.0]}, {})
    assert spec.call([a, a], a * 0, {"weight": 0.5}, {"normalize": False}).tolist() == [1.0] * 3


def test_decorator_reads_the_signature():
    @merge_method("__probe__", paper="none", base="optional", min_models=2)
    def probe(tensors, base, *, w: PerModel, scale: float = 2.0, lambda_: float = 1.0,
              generator: torch.Generator | None = None):
        return tensors[0]

    try:
        spec = REGISTRY["__probe__"]
        assert spec.per_model == {"w": None} and spec.globals == {"scale": 2.0, "lambda": 1.0}
        assert spec.seeded and spec.required == {"w"} and spec.base == "optional" and not spec.inplace
        with pytest.raises(ConfigError, match="at least 2"):
            spec.call([torch.ones(1)], None, {"w": 1.0}, {})
        with pytest.raises(ValueError, match="twice"):
            merge_method("__probe__")(probe)
    finally:
        del REGISTRY["__probe__"]


def test_owned_is_passed_to_inplace_methods_only_and_is_no_parameter():
    seen = []

    @merge_method("__owner__", paper="none")
    def owner(tensors, *, scale: float = 1.0, owned: bool = False):
        seen.append(owned)
        return tensors[0] * scale

    try:
        spec = REGISTRY["__owner__"]
        assert spec.inplace and spec.parameters == {"scale"}
        x = torch.ones(2)
        spec.call([x], None, {}, {})
        spec.call([x], None, {}, {}, owned=True)
        assert seen == [False, True]
        with pytest.raises(ConfigError, match="unknown parameter.*owned"):  # not settable from a config
            spec.call([x], None, {}, {"owned": True})
        spec.call([x], None, {}, {}, owned=True, fn=lambda ts, **kw: ts[0])  # a kernel is not handed `owned`
        assert seen == [False, True]
    finally:
        del REGISTRY["__owner__"]
    assert {n for n, s in REGISTRY.items() if s.inplace} == {"karcher", "sce", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                                          "breadcrumbs_ties", "della", "della_linear"}
