"""A merge's scores against its parents': per task, the merge, the best parent and the mean of parents."""

from __future__ import annotations

from collections.abc import Mapping

from eval.skills import PRIMARY_METRIC

Scores = Mapping[str, Mapping[str, float]]

LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"})
# For lm-eval's own tasks, the first of these a task reports is the one compared.
_PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "word_perplexity", "perplexity", "bits_per_byte")


def primary_metric(task: str, metrics: Mapping[str, float]) -> str | None:
    """The metric a table shows for ``task``: the bundled task's own, else the first preferred one reported."""
    if task in PRIMARY_METRIC and PRIMARY_METRIC[task] in metrics:
        return PRIMARY_METRIC[task]
    for name in _PREFERRED:
        if name in metrics:
            return name
    plain = sorted(m for m in metrics if not m.endswith("_stderr"))
    return plain[0] if plain else None


def compare_to_parents(merge_scores: Scores, parent_scores: Mapping[str, Scores]) -> list[dict]:
    """One row per task of ``merge_scores`` (in its order), on the task's primary metric.

    Row keys: ``task``, ``metric``, ``higher_is_better``, ``merge``, ``best_parent`` (name), ``best`` (its score),
    ``mean_parents``, ``vs_best`` and ``vs_mean`` (merge minus those; for lower-is-better metrics the sign is
    flipped, so positive always means the merge is better), and ``parents`` ({name: score}). Parents that lack the
    task are left out of that row; with none left, the parent fields are None.
    """
    rows: list[dict] = []
    for task, metrics in merge_scores.items():
        metric = primary_metric(task, metrics)
        if metric is None:
            continue
        higher = metric not in LOWER_IS_BETTER
        merged = float(metrics[metric])
        per_parent = {name: float(s[task][metric]) for name, s in parent_scores.items() if metric in s.get(task, {})}
        row = {"task": task, "metric": metric, "higher_is_better": higher, "merge": merged, "parents": per_parent,
               "best_parent": None, "best": None, "mean_parents": None, "vs_best": None, "vs_mean": None}  # fmt: skip
        if per_parent:
            pick = max if higher else min
            best_name = pick(per_parent, key=lambda n: per_parent[n])
            sign = 1.0 if higher else -1.0
            mean = sum(per_parent.values()) / len(per_parent)
            row.update(best_parent=best_name, best=per_parent[best_name], mean_parents=mean,
                       vs_best=sign * (merged - per_parent[best_name]), vs_mean=sign * (merged - mean))  # fmt: skip
        rows.append(row)
    return rows
