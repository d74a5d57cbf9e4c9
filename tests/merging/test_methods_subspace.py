"""TSV-M, Iso-C, Iso-CTS: the properties their papers state, on small random task matrices."""

from __future__ import annotations

import pytest
import torch

from merging.errors import ConfigError
from merging.methods import REGISTRY
from merging.methods.subspace import iso_cts_sizes, polar_factor


def tasks(shape=(40, 24), n=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    return base.to(dtype), [m.to(dtype) for m in models]


def run(name, base, models, **params):
    return REGISTRY[name].call(models, base, {}, params)


# ------------------------------------------------------------------------------------------------------------ TSV-M


def test_tsv_m_spectrum_is_the_union_of_each_tasks_top_k():
    base, models = tasks(shape=(40, 26))
    delta = run("tsv_m", base, models) - base
    k = min(base.shape) // 3  # 8: 24 of the 26 directions kept
    kept = torch.cat([torch.linalg.svdvals(m - base)[:k] for m in models])
    sv = torch.linalg.svdvals(delta)
    # orthonormal U and V make the kept singular values exactly the merged matrix's spectrum
    torch.testing.assert_close(sv[: 3 * k], kept.sort(descending=True).values, rtol=1e-9, atol=1e-12)
    assert float(sv[3 * k:].abs().max()) < 1e-10


def test_tsv_m_equals_task_arithmetic_when_tasks_do_not_interfere():
    # each task lives in its own left and right subspace, of rank <= k: nothing to orthogonalise away
    g = torch.Generator().manual_seed(1)
    q_left, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(21, 21, generator=g, dtype=torch.float64))
    base = torch.randn(30, 21, generator=g, dtype=torch.float64)
    models = []
    for t in range(3):  # k = 21 // 3 = 7: rank 7 each, disjoint singular vectors
        cols = slice(7 * t, 7 * t + 7)
        s = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
        models.append(base + (q_left[:, cols] * s) @ q_right[:, cols].T)
    out = run("tsv_m", base, models)
    task_arithmetic = base + sum(m - base for m in models)
    torch.testing.assert_close(out, task_arithmetic, rtol=1e-9, atol=1e-10)


def test_tsv_m_sv_reduction_sets_the_kept_rank():
    base, models = tasks(shape=(40, 26))
    delta = run("tsv_m", base, models, sv_reduction=0.1) - base  # k = int(26 * 0.1) = 2 per task
    sv = torch.linalg.svdvals(delta)
    assert int((sv > 1e-9).sum()) == 6


def test_tsv_m_vectors_average_and_lambda_scales():
    base, models = tasks(shape=(17,))
    out = run("tsv_m", base, models, **{"lambda": 0.5})
    torch.testing.assert_close(out, base + 0.5 * torch.stack([m - base for m in models]).mean(0))
    with pytest.raises(ConfigError, match="sv_reduction"):
        run("tsv_m", *tasks(), sv_reduction=0.5)  # 3 x 0.5 > 1: more directions than the rank


def test_polar_factor_is_orthonormal_and_nearest():
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    q = polar_factor(x)
    torch.testing.assert_close(q.T @ q, torch.eye(5, dtype=torch.float64))
    other, _ = torch.linalg.qr(x)
    assert torch.linalg.norm(x - q) <= torch.linalg.norm(x - other) + 1e-12


# ------------------------------------------------------------------------------------------------------------ Iso-C


def test_iso_c_flattens_the_spectrum_of_the_task_arithmetic_sum():
    base, models = tasks()
    delta = run("iso_c", base, models) - base
    summed = sum(m - base for m in models)
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    sv = torch.linalg.svdvals(delta)
    torch.testing.assert_close(sv, torch.full_like(sv, s.mean().item()))  # isotropic: all equal the mean
    # same singular subspaces as the sum: U^T delta V is diagonal
    torch.testing.assert_close(u.T @ delta @ vh.T, s.mean() * torch.eye(len(s), dtype=torch.float64))


def test_iso_c_keeps_dtype_and_averages_vectors():
    base, models = tasks(dtype=torch.bfloat16)
    assert run("iso_c", base, models).dtype == torch.bfloat16
    b, ms = tasks(shape=(9,))
    torch.testing.assert_close(run("iso_c", b, ms), b + torch.stack([m - b for m in ms]).mean(0))


# ---------------------------------------------------------------------------------------------------------- Iso-CTS


def test_iso_cts_sizes_fill_the_rank_with_equal_task_shares():
    assert iso_cts_sizes(576, 3, 0.8) == (459, 39)  # 460 common, 116 -> 117 task dims: 39 each
    for rank, n, f in [(24, 3, 0.8), (100, 7, 0.5), (10, 4, 0.0), (64, 2, 1.0)]:
        common, per_task = iso_cts_sizes(rank, n, f)
        assert common + n * per_task == rank


def test_iso_cts_is_isotropic_and_contains_the_common_subspace():
    base, models = tasks(shape=(60, 20))
    delta = run("iso_cts", base, models, common_space_fraction=0.5) - base
    sv = torch.linalg.svdvals(delta)
    torch.testing.assert_close(sv, torch.full_like(sv, sv.mean().item()))
    common, _ = iso_cts_sizes(20, 3, 0.5)
    u_sum = torch.linalg.svd(sum(m - base for m in models), full_matrices=False)[0][:, :common]
    u_out = torch.linalg.svd(delta, full_matrices=False)[0]
    # every common direction lies in the merged column space
    torch.testing.assert_close(torch.linalg.norm(u_out.T @ u_sum, dim=0), torch.ones(common, dtype=torch.float64))


def test_iso_cts_with_an_all_common_space_is_iso_c():
    base, models = tasks()
    torch.testing.assert_close(run("iso_cts", base, models, common_space_fraction=1.0), run("iso_c", base, models))
    with pytest.raises(ConfigError, match="common_space_fraction"):
        run("iso_cts", base, models, common_space_fraction=1.5)


def test_iso_cts_of_a_matrix_no_task_moved_is_the_base():
    """LoRA fine-tunes leave the embeddings alone: a zero task matrix must come back unchanged (LAPACK's SVD of the
    stacked zero bases did not converge on the SmolLM2 demo's embeddings before)."""
    base = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    out = REGISTRY["iso_cts"].call([base.clone(), base.clone(), base.clone()], base, {}, {"lambda": 0.8})
    assert torch.equal(out, base)


def test_svd_falls_back_to_float64_when_lapack_does_not_converge(monkeypatch):
    from merging.methods import subspace

    real = torch.linalg.svd
    calls = []

    def flaky(x, full_matrices=True):
        calls.append(x.dtype)
        if x.dtype != torch.float64:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    u, s, vh = subspace.svd(x)
    assert calls == [torch.float32, torch.float64] and u.dtype == torch.float32
    assert torch.allclose(u @ torch.diag(s) @ vh, x, atol=1e-5)
