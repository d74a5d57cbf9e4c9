"""Consensus merging with TALL masks (Wang et al., ICML 2024): the properties the paper states."""

from __future__ import annotations

import pytest
import torch

from merging.errors import ConfigError
from merging.methods import REGISTRY
from merging.methods.consensus import consensus_mask, tall_masks


def run(name, base, models, per_model=None, **shared):
    return REGISTRY[name].call(models, base, per_model or {}, shared)


def family(n=4, shape=(30, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # sparse-ish task vectors so that selfish and shared weights both occur
    models = [base + torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3) for _ in range(n)]
    return base, models


def test_tall_mask_is_the_papers_rule():
    deltas = torch.tensor([[1.0, 0.2], [0.1, 0.2]])
    merged = deltas.sum(0)
    masks = tall_masks(deltas, merged, [0.5, 0.5])
    # |tau_t| > lambda_t * |tau_MTL - tau_t|: 1 > 0.05 yes, 0.2 > 0.1 yes / 0.1 > 0.5 no, 0.2 > 0.1 yes
    assert masks.tolist() == [[True, True], [False, True]]
    assert consensus_mask(deltas, merged, [0.5, 0.5], 2).tolist() == [False, True]


def test_k0_is_task_arithmetic_and_k_beyond_the_tasks_is_the_base():
    base, models = family()
    ta = REGISTRY["task_arithmetic"].call(models, base, {"weight": [1.0] * 4}, {"lambda": 0.7})
    torch.testing.assert_close(run("consensus_ta", base, models, k=0, **{"lambda": 0.7}), ta)
    assert torch.equal(run("consensus_ta", base, models, k=5), base)


def test_selfish_weights_go_at_k2_and_catastrophic_ones_at_k1():
    base = torch.zeros(3)
    a = torch.tensor([1.0, 1.0, 1.0])
    b = torch.tensor([0.0, 1.0, 1.0])
    c = torch.tensor([0.0, 0.0, 1.0])
    lam = {"tall_lambda": [0.6] * 3}
    # element 0: only a changes it (selfish); element 1: a and b agree; element 2: all three pile up, so that
    # |tau_t| = 1 < 0.6 * |3 - 1|: no task finds the merged value close to its own (catastrophic)
    assert run("consensus_ta", base, [a, b, c], lam, k=2).tolist() == [0.0, 2.0, 0.0]
    assert run("consensus_ta", base, [a, b, c], lam, k=1).tolist() == [1.0, 2.0, 0.0]


def test_consensus_masks_shrink_as_k_grows():
    base, models = family(seed=3)
    kept = [(run("consensus_ta", base, models, k=k) != base) for k in range(0, 6)]
    for looser, stricter in zip(kept, kept[1:]):
        assert not bool((stricter & ~looser).any())
    assert int(kept[1].sum()) > int(kept[2].sum()) > int(kept[4].sum())


def test_consensus_ties_masks_the_ties_vector():
    base, models = family(seed=5)
    params = {"weight": [1.0] * 4, "density": [0.5] * 4}
    ties = REGISTRY["ties"].call(models, base, params, {})
    out = run("consensus_ties", base, models, params, k=0)
    torch.testing.assert_close(out, ties)
    strict = run("consensus_ties", base, models, params, k=2)
    changed = strict != base
    torch.testing.assert_close(strict[changed], ties[changed])
    assert int(changed.sum()) < int((ties != base).sum())


def test_bf16_round_trip_and_bad_k():
    base, models = family()
    out = run("consensus_ta", base.bfloat16(), [m.bfloat16() for m in models])
    assert out.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="k"):
        run("consensus_ta", base, models, k=-1)
