"""The comparison table a pipeline run ends with: parents and candidates side by side, as Markdown."""

from __future__ import annotations

import math
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def _clip(text: str, n: int = 48) -> str:
    text = str(text)
    return text if len(text) <= n else "..." + text[-(n - 3):] if "/" in text else text[: n - 3] + "..."


def build_rows(parents: dict[str, dict], candidates: dict[str, dict], tasks: list[str]) -> list[dict]:
    """One row per model: {model, role, what, <task>..., mean_em, mean_mc, min_retained_em, quant, ...}."""
    rows = []
    for name, p in parents.items():
        m = p.get("metrics", {})
        rows.append({"model": name, "role": "parent" + (f" ({p['skill']})" if p.get("skill") else ""),
                     "what": _clip(p.get("source", "")), **{t: m.get(t) for t in tasks},
                     "mean_em": m.get("mean_em"), "mean_mc": m.get("mean_mc")})  # fmt: skip
    for name, c in candidates.items():
        m = c.get("metrics", {})
        q = c.get("quant")
        reg = c.get("registration") or {}
        if c.get("error"):
            status = f"error: {c['error']}"[:80]
        elif reg.get("registered"):
            status = f"v{reg['version']}" + (" champion" if reg.get("champion") else "")
        elif q is not None and not q.get("passed"):
            status = "blocked (quant)"
        else:
            status = "-"
        rows.append({
            "model": name, "role": "merge", "what": _clip(c.get("run_name", "")), **{t: m.get(t) for t in tasks},
            "mean_em": m.get("mean_em"), "mean_mc": m.get("mean_mc"), "min_retained_em": m.get("min_retained_em"),
            "min_retained_mc": m.get("min_retained_mc"),
            "quant": None if q is None else ("pass" if q.get("passed") else "FAIL"),
            "int8_kl": (q or {}).get("metrics", {}).get("int8_kl"), "int4_kl": (q or {}).get("metrics", {}).get("int4_kl"),
            "merge_s": m.get("merge.seconds"), "registry": status,
        })  # fmt: skip
    return rows


def render(rows: list[dict]) -> str:
    if not rows:
        return "(no models)"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols and any(x.get(k) is not None for x in rows):
                cols.append(k)
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)
