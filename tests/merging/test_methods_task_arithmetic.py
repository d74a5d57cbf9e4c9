"""The task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) against mergekit 0.1.5."""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import merge_tensors  # the oracle (a test dependency)

from merging import primitives as P
from merging.errors import ConfigError
from merging.methods import REGISTRY

WEIGHTS = [0.3, 0.5, 0.9]
DENSITIES = [0.5, 0.3, 0.7]


def family(dtype: torch.dtype, shape=(48, 130), n=3, seed=0, distinct=False):
    """A base and n fine-tunes. distinct: every delta magnitude differs (no ties in fp32, so index and torch tie
    rules agree)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        if distinct:
            numel = base.numel()
            mags = (torch.randperm(numel, generator=g) + 1).to(torch.float32) * (0.5 / numel)
            signs = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
            delta = (mags * signs).view(shape)
        else:
            delta = 0.02 * torch.randn(shape, generator=g)
        models.append(base + delta)
    return base.to(dtype), [m.to(dtype) for m in models]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def theirs(name, base, models, params, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return merge_tensors([base, *models], name, parameters=params, base_index=0)


def ours(name, base, models, params, seed=None):
    per_model = {k: v for k, v in params.items() if k in REGISTRY[name].per_model}
    shared = {k: v for k, v in params.items() if k not in per_model}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return REGISTRY[name].call(models, base, per_model, shared, generator=generator)


DETERMINISTIC = [
    ("task_arithmetic", {"weight": WEIGHTS}),
    ("task_arithmetic", {"weight": WEIGHTS, "normalize": True, "lambda": 0.7}),
    ("ties", {"weight": WEIGHTS, "density": DENSITIES}),
    ("ties", {"weight": WEIGHTS, "density": DENSITIES, "rescale": True, "int8_mask": True, "lambda": 1.3}),
    ("ties", {"weight": WEIGHTS, "density": DENSITIES, "normalize": False}),
    ("breadcrumbs", {"weight": WEIGHTS, "density": [0.5, 0.9, 0.95], "gamma": [0.01, 0.05, 0.1]}),
    ("breadcrumbs_ties", {"weight": WEIGHTS, "density": [0.5, 0.9, 0.8], "gamma": 0.02, "normalize": True}),
]


@pytest.mark.parametrize("name,params", DETERMINISTIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_identical_to_mergekit_with_its_tie_rule(name, params, dtype):
    base, models = family(dtype)
    with P.tie_break("torch"):
        assert same_bits(ours(name, base, models, params), theirs(name, base, models, params))


@pytest.mark.parametrize("name,params", DETERMINISTIC)
def test_fp32_without_ties_alloy_rule_matches_mergekit(name, params):
    base, models = family(torch.float32, distinct=True)
    out, ref = ours(name, base, models, params), theirs(name, base, models, params)
    assert out.dtype == base.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    assert same_bits(out, ref)


def test_bf16_alloy_rule_differs_from_mergekit_only_through_tied_trims():
    base, models = family(torch.bfloat16, seed=3)
    params = {"weight": WEIGHTS, "density": DENSITIES}
    out, ref = ours("ties", base, models, params), theirs("ties", base, models, params)
    # with both rules fed the same trimmed deltas the merges coincide: rebuild ours from mergekit's trims
    differs = out != ref
    tied_somewhere = torch.zeros_like(differs)
    for m, d in zip(models, DENSITIES):
        delta = (m - base).abs().float()
        k = max(1, int(d * delta.numel()))
        threshold = torch.sort(delta.reshape(-1), descending=True).values[k - 1]
        tied_somewhere |= delta == threshold
    assert bool(differs.any())  # bf16 ties are common enough to show
    assert not bool((differs & ~tied_somewhere).any())


SEEDED = [
    ("dare_linear", {"weight": WEIGHTS, "density": DENSITIES}),
    ("dare_ties", {"weight": WEIGHTS, "density": DENSITIES, "rescale": False}),
    ("dare_ties", {"weight": WEIGHTS, "density": DENSITIES, "normalize": True}),
    ("della", {"weight": WEIGHTS, "density": DENSITIES, "epsilon": [0.1, 0.2, 0.15]}),
    ("della_linear", {"weight": WEIGHTS, "density": DENSITIES, "lambda": 0.8}),
]


@pytest.mark.parametrize("name,params", SEEDED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_methods_reproduce_mergekit_draws_from_the_same_seed(name, params, dtype):
    base, models = family(dtype)
    with P.tie_break("torch"):
        assert same_bits(ours(name, base, models, params, seed=11), theirs(name, base, models, params, seed=11))


@pytest.mark.parametrize("name,params", SEEDED)
def test_seeded_methods_are_deterministic_per_seed(name, params):
    base, models = family(torch.bfloat16)
    a = ours(name, base, models, params, seed=5)
    b = ours(name, base, models, params, seed=5)
    c = ours(name, base, models, params, seed=6)
    assert same_bits(a, b)
    assert not torch.equal(a, c)


def test_dare_linear_kept_fraction_and_rescale_through_the_method():
    base = torch.zeros(400, 400)
    model = base + 0.01 * torch.randn(400, 400, generator=torch.Generator().manual_seed(0))
    out = ours("dare_linear", base, [model], {"weight": [1.0], "density": [0.25]}, seed=1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 5 * (0.25 * 0.75 / kept.numel()) ** 0.5
    assert out.abs().sum().item() == pytest.approx(model.abs().sum().item(), rel=1e-4)  # L1 ratio restores it


def test_ties_semantics_on_a_hand_example():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 0.5, 0.0])
    b = torch.tensor([3.0, 1.0, -0.5, 0.0])
    out = ours("ties", base, [a, b], {"weight": [1.0, 1.0], "density": [1.0, 1.0]})
    # signs by mass: +, -, + (0 counts +), none; disjoint mean of the agreeing entries
    assert out.tolist() == [2.0, -2.0, 0.5, 0.0]
    count = ours("ties", base, [a, b, b * 0 - 0.1], {"weight": 1.0, "consensus_method": "count"})
    assert count.tolist()[0] == pytest.approx(2.0)  # 2 votes + beat 1 vote -


def test_zero_weights_and_lambda():
    base, models = family(torch.float32)
    out = ours("task_arithmetic", base, models, {"weight": [0.0, 0.0, 0.0], "normalize": True})
    assert torch.equal(out, base)  # a zero divisor becomes 1, as mergekit does
    one = ours("task_arithmetic", base, models, {"weight": WEIGHTS})
    half = ours("task_arithmetic", base, models, {"weight": WEIGHTS, "lambda": 0.5})
    torch.testing.assert_close(half - base, (one - base) * 0.5, rtol=1e-5, atol=1e-6)


def test_required_weight_and_bad_consensus_are_config_errors():
    base, models = family(torch.float32)
    with pytest.raises(ConfigError, match="weight"):
        REGISTRY["ties"].call(models, base, {}, {})
    with pytest.raises(ConfigError, match="consensus_method"):
        ours("ties", base, models, {"weight": 1.0, "consensus_method": "vote"})
    with pytest.raises(ConfigError, match="base_model"):
        REGISTRY["ties"].call(models, None, {"weight": [1.0] * 3}, {})


def test_no_models_returns_the_base():
    base = torch.randn(3, 3)
    assert torch.equal(REGISTRY["ties"].fn([], base, weight=[]), base)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_count_consensus_elects_by_vote(name):
    base, models = family(torch.float32, n=4, seed=8)
    params = {"weight": [0.2, 0.2, 0.2, 3.0], "density": [0.8] * 4}
    by_sum = ours(name, base, models, {**params, "consensus_method": "sum"}, seed=2)
    by_count = ours(name, base, models, {**params, "consensus_method": "count"}, seed=2)
    assert not torch.equal(by_sum, by_count)  # one heavy model wins mass votes, not head counts
    if name == "ties":  # rebuild 'count' from the primitives
        deltas = torch.stack([P.magnitude_prune(m - base, 0.8) for m in models])
        weights = P.stacked_weights(params["weight"], deltas)
        weighted = deltas * weights
        mask = P.agreement_mask(weighted, "count")
        expected = base + P.disjoint_merge(weighted, weights, mask, normalize=True)
        torch.testing.assert_close(by_count, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combine_in_slices_gives_the_same_bytes(method, dtype, monkeypatch):
    """The combine stage runs over slices of COMBINE_CHUNK elements for speed; a slice size that does not divide
    the tensor must give the bytes of one whole-tensor pass."""
    from merging.methods import task_arithmetic as ta

    base, models = family(dtype)
    per_model = {"weight": WEIGHTS, "density": DENSITIES}
    params = {"lambda": 0.7, "normalize": True} if method in ("ties", "della") else {"lambda": 0.7}

    def run() -> torch.Tensor:
        spec = REGISTRY[method]
        gen = torch.Generator().manual_seed(3) if spec.seeded else None
        return spec.call(models, base, per_model, params, generator=gen)

    monkeypatch.setattr(ta, "COMBINE_CHUNK", base.numel() + 1)
    whole = run()
    monkeypatch.setattr(ta, "COMBINE_CHUNK", 997)
    sliced = run()
    assert same_bits(whole, sliced)
    assert not same_bits(whole, base)  # the merge did something


@pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
                                  "della_linear"])
def test_owned_inputs_leave_the_list_and_change_no_bit(name):
    base, models = family(torch.bfloat16)
    params = {"density": 0.5} | ({"epsilon": 0.1} if name.startswith("della") else {})

    def merge(tensors, owned):
        gen = torch.Generator().manual_seed(7)
        return REGISTRY[name].call(tensors, base, {"weight": WEIGHTS}, params, generator=gen, owned=owned)

    given = [m.clone() for m in models]
    ref = merge(given, False)
    assert all(torch.equal(a, b) for a, b in zip(given, models))  # not owned: the caller keeps its tensors
    owned = [m.clone() for m in models]
    assert same_bits(merge(owned, True), ref)
    assert owned == [None] * 3  # each read buffer let go once its delta was taken
