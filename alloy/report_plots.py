"""The report's plots (matplotlib, object API only: no pyplot state, safe from a worker thread), as inline SVG.

Each function takes alloy.report.ReportData and returns (figure id, svg, caption) or None when the run logged
nothing to draw. The champion is drawn in gold everywhere; candidates whose quantisation check failed, or whose run
failed, are hatched.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alloy.report import ReportData, RunView

GOLD = "#f2b400"
BAR = "#6c8ebf"
BAD = "#d9534f"
BASE = "#333333"
PARENT_COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]
INT8, INT4 = "#4c78a8", "#e45756"

Figure = tuple[str, str, str]


def _fig(w: float, h: float):
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(w, h), dpi=100)
    fig.set_layout_engine("constrained")
    return fig


def _num(v: Any) -> float | None:
    from alloy.report import _num as num

    return num(v)


def _is_champ(data: ReportData, c: RunView) -> bool:
    return bool(data.champion and data.champion.get("candidate") == c.name)


def _bad(c: RunView) -> bool:
    return c.quant_passed is False or bool(c.error) or c.status == "FAILED"


def _style_bar(bar, data: ReportData, c: RunView, colour: str = BAR) -> None:
    if _is_champ(data, c):
        bar.set_facecolor(GOLD)
        bar.set_edgecolor("#7a5a00")
        bar.set_linewidth(1.5)
    else:
        bar.set_facecolor(colour)
    if _bad(c):
        bar.set_hatch("///")
        bar.set_edgecolor(BAD)
        bar.set_alpha(0.75)


def _ylabels(ax, data: ReportData, cands: list[RunView]) -> None:
    ax.set_yticks(range(len(cands)))
    ax.set_yticklabels([("★ " if _is_champ(data, c) else "") + c.name + (" ✗" if _bad(c) else "") for c in cands],
                       fontsize=8.5)  # fmt: skip
    for lab, c in zip(ax.get_yticklabels(), cands):
        if _is_champ(data, c):
            lab.set_fontweight("bold")
    ax.invert_yaxis()  # first candidate on top, as in the table


def _parent_colours(data: ReportData) -> dict[str, str]:
    bases = {c.base for c in data.candidates if c.base}
    out = {}
    i = 0
    for name in sorted(data.models, key=lambda n: (n not in bases, n)):
        if name in bases:
            out[name] = BASE
        else:
            out[name] = PARENT_COLOURS[i % len(PARENT_COLOURS)]
            i += 1
    return out


def task_scores(data: ReportData) -> Figure | None:
    """One panel per task: a bar per candidate, a vertical line per input model (base dashed)."""
    from alloy.report import svg_of

    tasks = [t for t in data.tasks if any(_num(c.metrics.get(t)) is not None for c in data.candidates)]
    if not tasks or not data.candidates:
        return None
    cands = data.candidates
    ncol = min(3, len(tasks))
    nrow = math.ceil(len(tasks) / ncol)
    h_panel = max(1.6, 0.32 * len(cands) + 0.9)
    fig = _fig(4.3 * ncol, h_panel * nrow + 0.6)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    colours = _parent_colours(data)
    bases = {c.base for c in cands if c.base}
    handles: dict[str, Any] = {}
    for i, t in enumerate(tasks):
        ax = axes[i // ncol][i % ncol]
        vals = [_num(c.metrics.get(t)) for c in cands]
        bars = ax.barh(range(len(cands)), [v if v is not None else 0.0 for v in vals], height=0.62)
        for bar, c, v in zip(bars, cands, vals):
            _style_bar(bar, data, c)
            if v is None:
                bar.set_visible(False)
        finite = [v for v in vals if v is not None]
        for name, m in data.models.items():
            v = _num(m.metrics.get(t))
            if v is None:
                continue
            finite.append(v)
            is_base = name in bases
            ln = ax.axvline(v, color=colours.get(name, BASE), linestyle="--" if is_base else "-",
                            linewidth=1.6 if (m.skill and t.startswith(m.skill + "_")) else 1.1, alpha=0.9)  # fmt: skip
            handles.setdefault(name, ln)
        lower = t in data.lower_is_better
        if lower and finite and min(finite) > 0 and max(finite) / min(finite) > 30:
            ax.set_xscale("log")
        ax.set_title(f"{t}  ({'lower' if lower else 'higher'} is better)", fontsize=9.5)
        _ylabels(ax, data, cands)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        for c_i, v in enumerate(vals):
            if v is not None:
                ax.annotate(_short(v), (v, c_i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7.5,
                            color="#333")  # fmt: skip
    for j in range(len(tasks), nrow * ncol):
        axes[j // ncol][j % ncol].set_visible(False)
    if handles:
        labels = [f"{n} (base)" if n in bases else n if data.models[n].skill in (None, n)
                  else f"{n} ({data.models[n].skill})" for n in handles]  # fmt: skip
        fig.legend(list(handles.values()), labels, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8.5,
                   frameon=False, title="input models (lines)", title_fontsize=8.5)  # fmt: skip
    cap = ("Score per task: a bar per candidate (gold: the champion; hatched: failed the quantisation check or the run), "
           "a line per input model — the base dashed, each specialist in its colour, thicker on its own skill.")
    return "plot-task-scores", svg_of(fig), cap


def quant_deltas(data: ReportData) -> Figure | None:
    """int8 / int4 KL (log scale) and perplexity change per candidate, threshold lines where known."""
    from alloy.report import svg_of

    cands = [c for c in data.candidates if any(k.startswith("quant.") and k.endswith("_kl") for k in c.metrics)]
    if not cands:
        return None
    fig = _fig(11, max(2.0, 0.36 * len(cands) + 1.2))
    ax_kl, ax_ppl = fig.subplots(1, 2)
    y = list(range(len(cands)))
    h = 0.38
    for k, (fmt, colour) in enumerate((("int8", INT8), ("int4", INT4))):
        off = (k - 0.5) * h
        kl = [_num(c.metrics.get(f"quant.{fmt}_kl")) for c in cands]
        bars = ax_kl.barh([v + off for v in y], [max(v, 1e-9) if v is not None else 0 for v in kl], height=h,
                          color=colour, label=fmt)  # fmt: skip
        ppl = [_num(c.metrics.get(f"quant.{fmt}_ppl_ratio")) for c in cands]
        pbars = ax_ppl.barh([v + off for v in y], [(v - 1) * 100 if v is not None else 0 for v in ppl], height=h,
                            color=colour, label=fmt)  # fmt: skip
        for group in (bars, pbars):
            for bar, c, v in zip(group, cands, kl):
                if v is None:
                    bar.set_visible(False)
                if _bad(c):
                    bar.set_hatch("///")
                    bar.set_edgecolor(BAD)
                if _is_champ(data, c):
                    bar.set_edgecolor("#7a5a00")
                    bar.set_linewidth(1.5)
        th = data.thresholds.get(f"{fmt}_kl_max")
        if th:
            ax_kl.axvline(th, color=colour, linestyle=":", linewidth=1.2)
        th_p = data.thresholds.get(f"{fmt}_ppl_ratio_max")
        if th_p:
            ax_ppl.axvline((th_p - 1) * 100, color=colour, linestyle=":", linewidth=1.2)
    ax_kl.set_xscale("log")
    ax_kl.set_title("mean KL(fp ‖ quantised) per token (log)", fontsize=9.5)
    ax_ppl.set_title("perplexity change when quantised (%)", fontsize=9.5)
    for ax in (ax_kl, ax_ppl):
        _ylabels(ax, data, cands)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8, loc="lower right")
    cap = ("Quantisation deltas: round-to-nearest int8 (per channel) and int4 (grouped) against the unquantised merge; "
           "dotted lines are the check's thresholds; hatched candidates failed the check (see the table's tooltip for why).")
    return "plot-quant", svg_of(fig), cap


def merge_cost(data: ReportData) -> Figure | None:
    """Wall time, throughput and peak memory of each merge."""
    from alloy.report import svg_of

    cands = [c for c in data.candidates if "merge.seconds" in c.metrics or "merge.peak_rss_gb" in c.metrics]
    if not cands:
        return None
    fig = _fig(12, max(2.0, 0.34 * len(cands) + 1.1))
    axes = fig.subplots(1, 3)
    specs = (("merge.seconds", "merge wall time (s)"), ("merge.gb_per_s", "throughput (GB read+written / s)"),
             ("merge.peak_rss_gb", "peak resident memory (GB)"))  # fmt: skip
    for ax, (key, title) in zip(axes, specs):
        vals = [_num(c.metrics.get(key)) for c in cands]
        bars = ax.barh(range(len(cands)), [v or 0 for v in vals], height=0.62)
        for bar, c, v in zip(bars, cands, vals):
            _style_bar(bar, data, c, colour="#7aa6c2")
            if v is None:
                bar.set_visible(False)
            elif c.metrics.get("merge.reused") == 1.0:
                bar.set_alpha(0.5)
        for i, v in enumerate(vals):
            if v is not None:
                ax.annotate(_short(v), (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7.5)
        ax.set_title(title, fontsize=9.5)
        _ylabels(ax, data, cands)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    cap = ("Merge cost per candidate, as the engine measured it (faded: this run reused an identical earlier merge and "
           "shows that merge's numbers).")
    return "plot-merge", svg_of(fig), cap


def _short_model(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def inspect_plots(data: ReportData) -> list[Figure]:
    """Per inspect report: pairwise task-vector cosine as a heat map, and sign conflicts per layer."""
    from alloy.report import svg_of

    out = []
    for n, (label, rep) in enumerate(data.inspect):
        names = [_short_model(m) for m in rep.get("models", [])]
        pairs = rep.get("overall", {}).get("pairs", {})
        if len(names) < 2 or not pairs:
            continue
        full = rep["models"]
        k = len(names)
        cos = [[1.0 if i == j else math.nan for j in range(k)] for i in range(k)]
        conf = [[0.0 if i == j else math.nan for j in range(k)] for i in range(k)]
        for key, v in pairs.items():
            a, _, b = key.partition(" | ")
            if a in full and b in full:
                i, j = full.index(a), full.index(b)
                cos[i][j] = cos[j][i] = float(v.get("cosine", math.nan))
                conf[i][j] = conf[j][i] = float(v.get("sign_conflict", math.nan))
        layers = rep.get("layers") or {}
        fig = _fig(11, 3.4)
        ax_h, ax_l = fig.subplots(1, 2, width_ratios=[1, 1.5])
        im = ax_h.imshow(cos, cmap="RdBu", vmin=-1, vmax=1)
        ax_h.set_xticks(range(k))
        ax_h.set_xticklabels(names, rotation=30, ha="right", fontsize=8.5)
        ax_h.set_yticks(range(k))
        ax_h.set_yticklabels(names, fontsize=8.5)
        for i in range(k):
            for j in range(k):
                if not math.isnan(cos[i][j]):
                    txt = f"{cos[i][j]:.2f}" + ("" if i == j else f"\n{conf[i][j]:.0%} conflict")
                    ax_h.text(j, i, txt, ha="center", va="center", fontsize=7.5,
                              color="white" if abs(cos[i][j]) > 0.6 else "black")  # fmt: skip
        fig.colorbar(im, ax=ax_h, shrink=0.8, label="cosine")
        ax_h.set_title(f"task-vector cosine vs {_short_model(str(rep.get('base', 'base')))}", fontsize=9.5)
        if layers:
            xs = sorted(layers, key=lambda s: int(s) if str(s).isdigit() else 0)
            for p_i, key in enumerate(pairs):
                a, _, b = key.partition(" | ")
                ys = [layers[x].get("pairs", {}).get(key, {}).get("sign_conflict", math.nan) for x in xs]
                ax_l.plot([int(x) for x in xs], ys, marker="o", markersize=3, linewidth=1.3,
                          color=PARENT_COLOURS[p_i % len(PARENT_COLOURS)],
                          label=f"{_short_model(a)} × {_short_model(b)}")  # fmt: skip
            ax_l.axhline(0.5, color="#999", linestyle=":", linewidth=1)
            from matplotlib.ticker import MaxNLocator

            ax_l.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax_l.set_xlabel("layer", fontsize=8.5)
            ax_l.set_ylabel("sign-conflict rate", fontsize=8.5)
            ax_l.set_ylim(0, max(0.6, ax_l.get_ylim()[1]))
            ax_l.legend(fontsize=7.5)
            ax_l.grid(alpha=0.3)
            ax_l.set_title("sign conflicts per layer (0.5 = unrelated)", fontsize=9.5)
        else:
            ax_l.set_visible(False)
        cap = (f"Merge insight ({label}): cosine similarity of the task vectors (model − base) and, of the weights "
               "both models moved, the share moved in opposite directions — what TIES' sign election has to resolve.")
        out.append((f"plot-inspect-{n}", svg_of(fig), cap))
    return out


def _short(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.1e}"
    return f"{v:.3g}"


def all_figures(data: ReportData) -> list[Figure]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [("plots-missing", "<p>matplotlib is not installed: no plots.</p>", "")]
    figs = [task_scores(data), quant_deltas(data), merge_cost(data), *inspect_plots(data)]
    return [f for f in figs if f is not None]
