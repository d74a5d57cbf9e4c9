"""compare_to_parents: merge vs best parent vs mean of parents, per task, on the primary metric."""

from __future__ import annotations

import pytest

from eval.compare import compare_to_parents, primary_metric


def test_rows_for_bundled_tasks() -> None:
    merge = {"facts_mc": {"acc": 0.8, "acc_norm": 0.7}, "heldout_ppl": {"word_perplexity": 12.0, "bits_per_byte": 1.1}}
    parents = {
        "facts": {"facts_mc": {"acc": 0.9, "acc_norm": 0.95}, "heldout_ppl": {"word_perplexity": 10.0}},
        "words": {"facts_mc": {"acc": 0.3, "acc_norm": 0.2}, "heldout_ppl": {"word_perplexity": 20.0}},
    }
    rows = compare_to_parents(merge, parents)
    assert [r["task"] for r in rows] == ["facts_mc", "heldout_ppl"]
    acc, ppl = rows
    assert acc["metric"] == "acc" and acc["higher_is_better"]
    assert acc["best_parent"] == "facts" and acc["best"] == pytest.approx(0.9)
    assert acc["mean_parents"] == pytest.approx(0.6)
    assert acc["vs_best"] == pytest.approx(-0.1) and acc["vs_mean"] == pytest.approx(0.2)
    assert acc["parents"] == {"facts": 0.9, "words": 0.3}
    # Perplexity: lower is better, the best parent is the lowest, and positive still means "merge is better".
    assert ppl["metric"] == "word_perplexity" and not ppl["higher_is_better"]
    assert ppl["best_parent"] == "facts" and ppl["best"] == pytest.approx(10.0)
    assert ppl["mean_parents"] == pytest.approx(15.0)
    assert ppl["vs_best"] == pytest.approx(-2.0) and ppl["vs_mean"] == pytest.approx(3.0)


def test_parent_missing_a_task_is_left_out_of_that_row() -> None:
    merge = {"facts_em": {"exact_match": 0.5}, "words_em": {"exact_match": 0.25}}
    parents = {"a": {"facts_em": {"exact_match": 1.0}}, "b": {"facts_em": {"exact_match": 0.0}, "words_em": {}}}
    facts, words = compare_to_parents(merge, parents)
    assert facts["mean_parents"] == pytest.approx(0.5) and facts["vs_mean"] == pytest.approx(0.0)
    assert words["parents"] == {} and words["best_parent"] is None and words["vs_best"] is None
    assert words["merge"] == pytest.approx(0.25)


def test_no_parents_and_ties() -> None:
    rows = compare_to_parents({"words_mc": {"acc": 0.5}}, {})
    assert rows[0]["best"] is None and rows[0]["mean_parents"] is None
    half = {"words_mc": {"acc": 0.5}}
    tie = compare_to_parents(half, {"x": half, "y": half})
    assert tie[0]["best_parent"] == "x" and tie[0]["vs_best"] == 0.0


def test_primary_metric_for_lm_eval_tasks() -> None:
    assert primary_metric("hellaswag", {"acc": 0.3, "acc_norm": 0.4, "acc_stderr": 0.01}) == "acc_norm"
    assert primary_metric("gsm8k", {"exact_match": 0.1, "exact_match_stderr": 0.01}) == "exact_match"
    assert primary_metric("odd", {"zeta_stderr": 0.1, "zeta": 0.2, "alpha": 1.0}) == "alpha"
    assert primary_metric("facts_em", {"exact_match": 1.0}) == "exact_match"
    assert primary_metric("empty", {}) is None
