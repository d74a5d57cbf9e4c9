"""merging.primitives: selection rule, prune/drop/rescale, sign election, against mergekit 0.1.5's sparsify."""

from __future__ import annotations

import pytest
import torch
from mergekit import sparsify as mk_sparsify  # the oracle (a test dependency)

from merging import primitives as P
from merging.errors import ConfigError
RescaleNorm = mk_sparsify.RescaleNorm


def tied_magnitudes(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Deltas with many exactly equal magnitudes (bf16-like quantisation), random signs."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 40, (n,), generator=g).to(torch.float64) / 64
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (levels * signs).to(dtype)


def realistic_delta(shape, dtype, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def stable_first(values: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    order = torch.sort(values.reshape(-1), descending=descending, stable=True).indices[start:stop]
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(values.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


# ----------------------------------------------------------------------------------------------- selection rule


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("descending", [True, False])
def test_rank_range_mask_is_a_stable_sort_slice(dtype, descending):
    values = tied_magnitudes(5000, dtype).abs()
    n = values.numel()
    assert values.unique().numel() < 50  # the point: heavy ties
    for start, stop in [(0, 1), (0, 2500), (0, n - 1), (17, 3001), (1200, 1201), (0, n), (n, n), (300, 200)]:
        got = P.rank_range_mask(values, start, stop, descending=descending)
        assert torch.equal(got, stable_first(values, start, stop, descending)), (start, stop)


def test_rank_range_mask_fp32_two_level_radix_without_ties():
    values = realistic_delta((300, 70), torch.float32, seed=3).abs()
    for k in [1, 5, 10500, 20999]:
        assert torch.equal(P.rank_range_mask(values, 0, k, descending=True), stable_first(values, 0, k, True))


def test_rank_range_mask_fp32_ties_across_both_radix_levels():
    # equal high halves, distinct and equal low halves
    base = torch.tensor([1.0]).view(torch.int32)
    keys = base + torch.tensor([0, 5, 5, 3, 0x10000, 0x10000, 7, 5, 0])
    values = keys.view(torch.float32)
    for k in range(0, 10):
        for desc in (True, False):
            assert torch.equal(P.rank_range_mask(values, 0, k, descending=desc), stable_first(values, 0, k, desc))


# ------------------------------------------------------------------------------------------------ magnitude (TIES)


def mergekit_kept(tensor: torch.Tensor, density: float) -> torch.Tensor:
    return mk_sparsify.magnitude(tensor, density) != 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.9])
def test_magnitude_keeps_mergekits_count_and_differs_only_among_ties(dtype, density):
    delta = realistic_delta((96, 257), dtype, seed=1)
    n = delta.numel()
    k = max(1, int(density * n))
    ours = P.magnitude_prune(delta, density) != 0
    theirs = mergekit_kept(delta, density)
    assert int(ours.sum()) == int(theirs.sum()) == k
    mag = delta.abs().float()
    threshold = mag[ours].min()
    assert bool((mag[~ours] <= threshold).all()) and bool((mag[ours] >= threshold).all())
    differ = ours != theirs
    assert bool((mag[differ] == threshold).all())  # only elements tied at the threshold differ
    # the tie rule: among those tied, the lowest flat indices are kept
    tied = (mag == threshold).reshape(-1).nonzero().squeeze(1)
    kept_tied = ours.reshape(-1)[tied]
    assert bool(kept_tied[: int(kept_tied.sum())].all())


def test_magnitude_torch_tie_break_is_bit_identical_to_mergekit():
    delta = realistic_delta((128, 300), torch.bfloat16, seed=2)
    with P.tie_break("torch"):
        for density in (0.2, 0.5):
            for rescale in (False, True):
                ours = P.magnitude_prune(delta, density, rescale=rescale)
                theirs = mk_sparsify.magnitude(delta, density, RescaleNorm.l1 if rescale else None)
                assert same_bits(ours, theirs)


def test_magnitude_fp64_orders_by_fp32_magnitudes_like_mergekit():
    delta = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12, 0.5], dtype=torch.float64)  # equal once in fp32
    kept = P.magnitude_prune(delta, 0.5) != 0
    assert kept.tolist() == [True, True, False, False]


def test_magnitude_edge_densities():
    delta = realistic_delta((10, 10), torch.float32)
    assert P.magnitude_prune(delta, 1.0) is delta
    assert torch.count_nonzero(P.magnitude_prune(delta, 0.0)) == 0
    assert torch.count_nonzero(P.magnitude_prune(delta, 0.001)) == 1  # max(1, int(density * n))
    assert P.magnitude_keep_count(0.5, 7) == 3


def test_magnitude_rescale_restores_l1_norm():
    delta = realistic_delta((50, 40), torch.float32)
    out = P.magnitude_prune(delta, 0.3, rescale=True)
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- breadcrumbs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.9, 0.05), (0.95, 0.1), (0.0, 0.1), (0.3, 0.0)])
def test_breadcrumbs_matches_mergekit_counts_and_torch_rule_bits(dtype, density, gamma):
    delta = realistic_delta((64, 130), dtype, seed=4)
    n = delta.numel()
    theirs = mk_sparsify.magnitude_outliers(delta, density, gamma=gamma)
    ours = P.breadcrumbs_prune(delta, density, gamma)
    assert int((ours != 0).sum()) == int((theirs != 0).sum()) == int(density * n)
    mag = delta.abs().float()
    if density > 0:
        kept = mag[ours != 0]
        removed_top = min(int(gamma * n), n - int(density * n))  # shrunk when density + gamma > 1
        top = torch.sort(mag.reshape(-1), descending=True).values
        assert kept.max() <= top[removed_top]  # the outliers went
        assert kept.min() >= top[removed_top + int(density * n) - 1]  # and so did the smallest
    with P.tie_break("torch"):
        assert same_bits(P.breadcrumbs_prune(delta, density, gamma), theirs)


def test_breadcrumbs_shrinks_outlier_removal_when_density_plus_gamma_exceed_one():
    delta = torch.arange(1, 11, dtype=torch.float32)
    out = P.breadcrumbs_prune(delta, 0.95, 0.2)  # keep 9 of 10: only the largest can go
    assert out.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert P.breadcrumbs_prune(delta, 1.0, 0.5) is delta


# ---------------------------------------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dare_drop_same_seed_same_bytes_and_equals_mergekit(dtype):
    delta = realistic_delta((200, 300), dtype, seed=5)
    a = P.dare_drop(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(7))
    b = P.dare_drop(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(7))
    c = P.dare_drop(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(8))
    assert same_bits(a, b) and not torch.equal(a, c)
    with P.tie_break("torch"):  # mergekit's draw: torch.bernoulli on the same generator state
        ours = P.dare_drop(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(ours != 0, a != 0)  # the default rule draws its own mask
    torch.manual_seed(7)
    assert same_bits(ours, mk_sparsify.bernoulli(delta, 0.3, RescaleNorm.l1))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.97])
def test_keep_draw_is_uniform_and_independent(p):
    like = torch.empty(400, 1001)  # an odd element count: the last 64-bit word is used in part
    n = like.numel()
    keep = P.keep_draw(like, p, torch.Generator().manual_seed(11))
    sigma = (p * (1 - p) / n) ** 0.5
    assert keep.dtype == torch.bool and keep.shape == like.shape
    assert abs(keep.float().mean().item() - p) < 5 * sigma
    # the four 16-bit lanes of each word are alike (the word's zero top bit is masked off, not leaked into lane 3)
    lanes = keep.reshape(-1)[: n - n % 4].view(-1, 4).float().mean(0)
    assert (lanes - p).abs().max().item() < 5 * (p * (1 - p) / (n / 4)) ** 0.5
    # neighbours are independent: P(both kept) = p^2
    both = (keep.reshape(-1)[:-1] & keep.reshape(-1)[1:]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    # per-element probabilities: the kept share follows each element's p
    probs = torch.linspace(0, 1, 1001).expand(400, 1001)
    kept = P.keep_draw(like, probs, torch.Generator().manual_seed(12)).float().mean(0)
    assert kept[0].item() == 0 and kept[-1].item() == 1
    assert (kept - probs[0]).abs().max().item() < 5 * (0.25 / 400) ** 0.5


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_and_l1_rescale(density):
    delta = realistic_delta((300, 300), torch.float32, seed=6)
    n = delta.numel()
    plain = P.dare_drop(delta, density, rescale=False, generator=torch.Generator().manual_seed(1))
    kept = plain != 0
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(kept.float().mean().item() - density) < 5 * sigma
    assert torch.equal(plain[kept], delta[kept])  # survivors untouched without rescale
    scaled = P.dare_drop(delta, density, rescale=True, generator=torch.Generator().manual_seed(1))
    ratio = delta.abs().sum() / plain.abs().sum()
    assert torch.allclose(scaled[kept], delta[kept] * ratio, rtol=1e-6)
    assert scaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    assert abs(ratio.item() - 1 / density) < 0.05 / density  # the L1 ratio, close to but not 1/density
    assert ratio.item() != pytest.approx(1 / density, rel=1e-7)


def test_l1_rescale_leaves_near_zero_alone():
    zero = torch.zeros(5)
    assert torch.equal(P.l1_rescale(zero, zero), zero)
    x = torch.tensor([1.0, -2.0, 3.0])
    masked = torch.tensor([0.0, 0.0, 0.0])
    assert torch.equal(P.l1_rescale(x, masked), masked)


# ---------------------------------------------------------------------------------------------------------- DELLA


def test_della_probabilities_follow_magnitude_rank_per_row():
    delta = realistic_delta((4, 101), torch.float32, seed=9)
    probs = P.della_keep_probs(delta, 0.5, 0.2)
    assert probs.shape == delta.shape
    for row, p in zip(delta.abs(), probs):
        order = torch.argsort(row)
        assert p[order[0]].item() == pytest.approx(0.3) and p[order[-1]].item() == pytest.approx(0.7)
        assert bool((p[order].diff() > 0).all())  # strictly increasing with rank (no ties in fp32 randn)
    vector = P.della_keep_probs(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.1)  # 1-D: one row
    assert vector.shape == (1, 3) and vector[0].tolist() == pytest.approx([0.6, 0.4, 0.5])


def test_della_single_element_rows_get_density():
    probs = P.della_keep_probs(torch.tensor([[0.3], [-0.1]]), 0.4, 0.1)
    assert probs.flatten().tolist() == pytest.approx([0.4, 0.4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_della_drop_same_seed_same_bytes_and_equals_mergekit(dtype):
    delta = realistic_delta((64, 200), dtype, seed=10)
    args = dict(rescale=True)
    a = P.della_drop(delta, 0.4, 0.1, generator=torch.Generator().manual_seed(3), **args)
    b = P.della_drop(delta, 0.4, 0.1, generator=torch.Generator().manual_seed(3), **args)
    assert same_bits(a, b)
    with P.tie_break("torch"):
        ours = P.della_drop(delta, 0.4, 0.1, generator=torch.Generator().manual_seed(3), **args)
    torch.manual_seed(3)
    assert same_bits(ours, mk_sparsify.della_magprune(delta, 0.4, 0.1, RescaleNorm.l1))
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.4) < 0.02
    vec = realistic_delta((1000,), dtype, seed=11)  # 1-D: one row
    assert P.della_drop(vec, 0.4, 0.1, rescale=False, generator=torch.Generator()).shape == vec.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 200), (70, 1023), (5, 3), (1000,), (1, 1), (3, 1), (300, 7), (20000, 7)],
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else str(s))
@pytest.mark.parametrize("rescale", [True, False])
def test_della_in_place_blocks_give_the_whole_tensor_paths_bits(dtype, shape, rescale):
    # Row lengths not a multiple of 4 (1023, 7, 3, 1), more rows than one block, ties (zeros and repeated values):
    # the in-place path's blocks must reproduce the whole-tensor probabilities, the same key stream and rescale.
    delta = realistic_delta(shape, dtype, seed=12)
    flat = delta.view(-1)
    flat[: flat.numel() // 5] = 0
    flat[flat.numel() // 2:: 7] = flat[flat.numel() // 2]
    g_ref, g_in = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    rows = delta if delta.dim() == 2 else delta.unsqueeze(0)
    keep = P.keep_draw(rows, P.della_keep_probs(delta, 0.4, 0.15), g_ref)
    reference = P.apply_mask(rows, keep, rescale).reshape(delta.shape)
    work = delta.clone()
    out = P.della_drop(work, 0.4, 0.15, rescale=rescale, generator=g_in, inplace=True)
    assert out.data_ptr() == work.data_ptr()  # it took the in-place path
    assert same_bits(out, reference)
    assert torch.equal(torch.randint(1 << 30, (4,), generator=g_in), torch.randint(1 << 30, (4,), generator=g_ref))
    assert same_bits(P.della_drop(delta, 0.4, 0.15, rescale=rescale, generator=torch.Generator().manual_seed(5)),
                     reference)  # and the out-of-place call is unchanged


def test_della_in_place_leaves_what_it_does_not_handle_to_the_reference():
    g = torch.Generator().manual_seed(2)
    for delta in (realistic_delta((4, 6, 5), torch.float32, seed=1),  # 3-D: ranked along dim 1, whole tensor
                  realistic_delta((8, 16), torch.float16, seed=1),  # drawn in fp32
                  torch.tensor([[1.0, float("nan"), 3.0, -2.0]])):  # not finite
        before = delta.clone()
        out = P.della_drop(delta, 0.5, 0.1, rescale=True, generator=g, inplace=True)
        assert out.data_ptr() != delta.data_ptr() and same_bits(delta, before)
        assert out.shape == delta.shape


def test_della_rejects_epsilon_outside_density_range():
    with pytest.raises(ConfigError, match="epsilon"):
        P.della_drop(torch.ones(4, 4), 0.1, 0.2, rescale=True, generator=None)


# --------------------------------------------------------------------------------------- sign election and merge


def test_elect_sign_sum_versus_count():
    deltas = torch.tensor([[5.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 2.0, 0.0]])
    assert P.elect_sign(deltas, "sum").tolist() == [1, 1, 1]  # mass: 3, 2, 0 (zero counts as +)
    assert P.elect_sign(deltas, "count").tolist() == [-1, 1, 1]  # votes: -1, +1, 0
    mask = P.agreement_mask(deltas, "sum")
    assert mask[:, 2].tolist() == [False, False, False]  # zeros never agree
    assert mask[:, 0].tolist() == [True, False, False]
    assert torch.equal(P.agreement_mask(deltas, "count", int8=True), P.agreement_mask(deltas, "count"))
    with pytest.raises(ConfigError):
        P.elect_sign(deltas, "median")


def test_disjoint_merge_divides_by_contributing_weights():
    weights = torch.tensor([2.0, 1.0]).view(2, 1)
    weighted = torch.tensor([[2.0, -4.0, 0.0], [1.0, 3.0, 0.0]]) * weights
    mask = P.agreement_mask(weighted, "sum")
    merged = P.disjoint_merge(weighted, weights, mask, normalize=True)
    assert merged.tolist() == pytest.approx([(4 + 1) / 3, -8 / 2, 0.0])
    plain = P.disjoint_merge(weighted, weights, None, normalize=False)
    assert plain.tolist() == pytest.approx([5.0, -5.0, 0.0])


def test_tie_break_context_is_scoped_and_validated():
    assert P.current_tie_break() == "index"
    with P.tie_break("torch"):
        assert P.current_tie_break() == "torch"
    assert P.current_tie_break() == "index"
    with pytest.raises(ConfigError):
        with P.tie_break("random"):  # type: ignore[arg-type]
            pass
