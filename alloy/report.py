"""The HTML report of one pipeline run: candidates against their parents and the base, with plots.

    collect(parent_run_id, tracking_uri) -> ReportData     everything read back from MLflow (runs, registry)
    render_html(data) -> str                                one self-contained page: inline CSS and inline SVG
    write_report(parent_run_id, tracking_uri, out_path)     writes the page and logs it as `report.html` on the run

Everything comes from what the flow logged (flows/pipeline.py): the parent run (tag alloy.role=pipeline), one child
run per candidate (alloy.role=candidate, alloy.candidate, alloy.parents, metrics per task, merge.*, quant.*) and one
per evaluated input model (alloy.role=parent, alloy.model). What is missing is left out of the page, not guessed:
a run without quantisation metrics gets no quantisation bar, a store without a registry no champion.

Deltas: for each candidate and task, the score minus the best of its merged parents (the base excluded), and minus
their mean. For a lower-is-better task (perplexity) "best" is the lowest and a negative delta is the good direction.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.errors import AlloyError, InputError

ARTIFACT = "report.html"
CHAMPION_ALIAS = "champion"
# what inspect JSON artifacts may be called (merging.inspect.inspect_merge's output), on the parent or a candidate
INSPECT_NAMES = ("inspect.json",)


# ------------------------------------------------------------------------------------------------- the data


@dataclass
class RunView:
    """One MLflow run as the report needs it."""

    run_id: str
    name: str  # candidate name or model name
    run_name: str
    role: str  # "candidate" | "parent"
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)  # candidates: every input model, base included
    base: str | None = None  # candidates: the base model, when the method has one
    skill: str | None = None  # input models: the skill it specialises in

    @property
    def merged(self) -> list[str]:
        """The models merged into this candidate, the base left out."""
        return [p for p in self.parents if p != self.base]

    @property
    def quant_passed(self) -> bool | None:
        v = self.metrics.get("quant.passed")
        return None if v is None else bool(v)

    @property
    def error(self) -> str | None:
        return self.tags.get("alloy.error")


@dataclass
class ReportData:
    tracking_uri: str
    experiment_id: str
    experiment_name: str
    parent: Any  # mlflow Run
    candidates: list[RunView]
    models: dict[str, RunView]  # evaluated input models by name
    tasks: list[str]
    lower_is_better: set[str]
    champion: dict[str, Any] | None  # {version, run_id, candidate (or None: another run's), metric, score}
    champion_metric: str
    registry_name: str | None
    thresholds: dict[str, float]
    inspect: list[tuple[str, dict]]  # (label, inspect_merge report)
    generated: float = field(default_factory=time.time)

    def model_score(self, model: str, task: str) -> float | None:
        m = self.models.get(model)
        return _num(m.metrics.get(task)) if m else None

    def base_of(self, c: RunView) -> str | None:
        return c.base if c.base in self.models else None


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _client(tracking_uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _download_json(c, run_id: str, path: str) -> Any:
    """An artifact as JSON/YAML, or None when the run has none by that name."""
    try:
        with tempfile.TemporaryDirectory(prefix="alloy-report-") as tmp:
            local = Path(c.download_artifacts(run_id, path, tmp))
            text = local.read_text()
    except Exception:  # missing artifact, or an artifact store this process cannot reach
        return None
    try:
        if path.endswith((".yml", ".yaml")):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except ValueError:
        return None
    except Exception:  # a YAML error
        return None


def _artifact_paths(c, run_id: str) -> set[str]:
    try:
        return {a.path for a in c.list_artifacts(run_id)}
    except Exception:
        return set()


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _task_order(tasks: set[str]) -> list[str]:
    """Bundled tasks skill by skill (eval.skills' order), any other task after them by name."""
    try:
        from eval.skills import PRIMARY_METRIC

        order = list(PRIMARY_METRIC)
    except Exception:  # eval's dependencies missing: plain name order
        order = []
    return sorted(tasks, key=lambda t: (order.index(t) if t in order else len(order), t))


def _lower_is_better(task: str) -> bool:
    try:
        from eval.skills import PRIMARY_METRIC

        metric = PRIMARY_METRIC.get(task, "")
    except Exception:
        metric = ""
    return "perplexity" in metric or task.endswith(("_ppl", "perplexity", "_loss"))


def _tasks_of(runs: list[RunView]) -> set[str]:
    """Tasks a run was scored on: `eval.<task>.<metric>` keys whose task also has its headline metric `<task>`."""
    out: set[str] = set()
    for r in runs:
        for k in r.metrics:
            parts = k.split(".")
            if len(parts) >= 3 and parts[0] == "eval" and parts[1] in r.metrics:
                out.add(parts[1])
    return out


def _view(run, role: str) -> RunView:
    t = run.data.tags
    name = t.get("alloy.candidate") if role == "candidate" else t.get("alloy.model")
    return RunView(run_id=run.info.run_id, name=name or run.info.run_name or run.info.run_id[:8],
                   run_name=run.info.run_name or "", role=role, status=run.info.status,
                   metrics=dict(run.data.metrics), params=dict(run.data.params), tags=dict(t),
                   parents=_split(t.get("alloy.parents") or run.data.params.get("parents")),
                   base=t.get("alloy.base_model") or None, skill=t.get("alloy.skill") or None)  # fmt: skip


def collect(parent_run_id: str, tracking_uri: str) -> ReportData:
    """Read one pipeline run (its children, artifacts and the registry) back from MLflow."""
    c = _client(tracking_uri)
    try:
        parent = c.get_run(parent_run_id)
    except Exception as e:
        raise InputError(f"run {parent_run_id}: not found in {tracking_uri} ({' '.join(str(e).split())[:200]})") from None
    if parent.data.tags.get("mlflow.parentRunId"):  # a candidate's id: report on its pipeline run
        return collect(parent.data.tags["mlflow.parentRunId"], tracking_uri)
    exp_id = parent.info.experiment_id
    exp = c.get_experiment(exp_id)
    children = []
    token = None
    while True:  # paged: a grid search may log hundreds of candidates
        page = c.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000,
                             order_by=["attributes.start_time ASC"], page_token=token)  # fmt: skip
        children += list(page)
        token = page.token
        if not token:
            break
    cands = [_view(r, "candidate") for r in children if r.data.tags.get("alloy.role") == "candidate"]
    models = {v.name: v for v in (_view(r, "parent") for r in children if r.data.tags.get("alloy.role") == "parent")}
    if not cands and parent.data.tags.get("alloy.role") != "pipeline":
        raise InputError(f"run {parent_run_id}: not an alloy pipeline run (no alloy.role=pipeline tag, no candidates)")

    # candidates in the order params.yaml lists them (the flow records it), else by start time
    order = _split(parent.data.tags.get("alloy.candidates"))
    cands.sort(key=lambda v: order.index(v.name) if v.name in order else len(order))

    summary = _download_json(c, parent_run_id, "summary.json") or {}
    params_name = Path(parent.data.tags.get("alloy.params_file", "params.yaml")).name
    params = _download_json(c, parent_run_id, params_name) or {}
    params = params if isinstance(params, dict) else {}
    _fill_structure(c, cands, models, summary)

    tasks = _tasks_of([*cands, *models.values()])
    champ_cfg = params.get("champion") or {}
    champion_metric = str(champ_cfg.get("metric") or "mean_em")
    registry_name = summary.get("registry_name") or (params.get("mlflow") or {}).get("registry_name")
    champion = _champion(c, registry_name, cands, champion_metric, summary)

    return ReportData(
        tracking_uri=tracking_uri, experiment_id=exp_id, experiment_name=exp.name if exp else exp_id, parent=parent,
        candidates=cands, models=models, tasks=_task_order(tasks),
        lower_is_better={t for t in tasks if _lower_is_better(t)}, champion=champion,
        champion_metric=champion_metric, registry_name=registry_name,
        thresholds=_thresholds((params.get("quant") or {}).get("thresholds")),
        inspect=_inspect_reports(c, parent_run_id, cands),
    )  # fmt: skip


def _fill_structure(c, cands: list[RunView], models: dict[str, RunView], summary: dict) -> None:
    """Base model of each candidate and skill of each input model, from tags when the flow wrote them, else from
    summary.json, else from each candidate's config.yml artifact."""
    s_cands = summary.get("candidates") or {}
    for v in cands:
        if v.base is None:
            cfg = (s_cands.get(v.name) or {}).get("config")
            if not isinstance(cfg, dict):
                cfg = _download_json(c, v.run_id, "config.yml")
            base = cfg.get("base_model") if isinstance(cfg, dict) else None
            if isinstance(base, dict):
                base = base.get("model") or base.get("path")
            v.base = str(base) if base else None
            if v.base and v.base not in v.parents:
                v.parents.insert(0, v.base)
    for name, m in models.items():
        if m.skill is None:
            m.skill = ((summary.get("parents") or {}).get(name) or {}).get("skill")


def _champion(c, registry_name: str | None, cands: list[RunView], metric: str, summary: dict) -> dict | None:
    """The version holding the `champion` alias now; which of this run's candidates it is, if any."""
    by_run = {v.run_id: v for v in cands}
    found = None
    if registry_name:
        try:
            mv = c.get_model_version_by_alias(registry_name, CHAMPION_ALIAS)
            found = {"version": str(mv.version), "run_id": mv.run_id,
                     "score": _num(mv.tags.get(f"alloy.score.{metric}"))}  # fmt: skip
        except Exception:  # no registered model or no alias
            found = None
    if found is None and summary.get("champion"):
        found = {k: summary["champion"].get(k) for k in ("version", "run_id", "score")}
    if found is None:
        return None
    v = by_run.get(found.get("run_id")) or next(  # or a candidate that reused the version a killed run registered
        (x for x in cands if x.tags.get("alloy.model_version") == str(found.get("version"))), None)
    if found.get("score") is None and v is not None:
        found["score"] = _num(v.metrics.get(metric))
    found.update(candidate=v.name if v else None, metric=metric, registry_name=registry_name)
    return found


def _thresholds(overrides: Any) -> dict[str, float]:
    try:
        from eval.quant import resolve_thresholds

        return resolve_thresholds(overrides if isinstance(overrides, dict) else None)
    except Exception:  # eval not importable, or an override it rejects: draw no threshold lines
        return {}


def _inspect_reports(c, parent_run_id: str, cands: list[RunView]) -> list[tuple[str, dict]]:
    """inspect_merge reports logged on the parent run or on candidates; one per distinct set of models."""
    found: list[tuple[str, dict]] = []
    seen: set[tuple] = set()
    runs = [("pipeline", parent_run_id)] + [(v.name, v.run_id) for v in cands]
    for label, run_id in runs:
        paths = _artifact_paths(c, run_id)
        names = [p for p in sorted(paths) if Path(p).name in INSPECT_NAMES]
        if "inspect" in paths:
            names += [p for p in sorted(a.path for a in c.list_artifacts(run_id, "inspect")) if p.endswith(".json")]
        for p in names:
            rep = _download_json(c, run_id, p)
            if not isinstance(rep, dict) or "overall" not in rep or "models" not in rep:
                continue
            key = (rep.get("base"), tuple(rep["models"]))
            if key in seen:
                continue
            seen.add(key)
            found.append((label if label != "pipeline" else Path(p).stem, rep))
    return found


# ------------------------------------------------------------------------------------------------- numbers


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _signed(v: float | None) -> str:
    if v is None:
        return "–"
    return ("+" if v > 0 else "") + _fmt(v)


def deltas(data: ReportData, c: RunView, task: str) -> tuple[float | None, float | None, str | None]:
    """(score − best merged parent, score − mean of merged parents, which parent is best) for one task."""
    score = _num(c.metrics.get(task))
    vals = {p: data.model_score(p, task) for p in c.merged}
    vals = {p: v for p, v in vals.items() if v is not None}
    if score is None or not vals:
        return None, None, None
    pick = min if task in data.lower_is_better else max
    best = pick(vals, key=vals.get)
    return score - vals[best], score - sum(vals.values()) / len(vals), best


def _good(delta: float | None, task: str, data: ReportData) -> str:
    if delta is None or delta == 0:
        return ""
    better = delta < 0 if task in data.lower_is_better else delta > 0
    return "up" if better else "down"


# ------------------------------------------------------------------------------------------------ the page


CSS = """
:root { --ink:#1d2330; --mute:#667085; --line:#d9dee7; --gold:#f2b400; --goldbg:#fff6d6; --bad:#b42318;
        --good:#067647; --blue:#2e6fd8; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0; background: #f6f7f9; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; }
.meta { color: var(--mute); font-size: 12.5px; }
.meta code { color: var(--ink); }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; margin: 12px 0; }
.champion-card { border-color: var(--gold); background: var(--goldbg); }
.badge { display: inline-block; font-size: 11px; font-weight: 600; padding: 1px 7px; border-radius: 10px;
         background: #eef1f6; color: var(--ink); margin-left: 6px; white-space: nowrap; }
.badge.champ { background: var(--gold); color: #3b2d00; }
.badge.fail { background: #fde7e5; color: var(--bad); }
.badge.pass { background: #e3f6ea; color: var(--good); }
.table-wrap { overflow-x: auto; background: #fff; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top;
         white-space: nowrap; }
th { background: #f0f2f6; font-weight: 600; position: sticky; top: 0; }
th.l, td.l { text-align: left; }
tr.group td { background: #fafbfc; color: var(--mute); font-weight: 600; text-align: left; font-size: 12px; }
tr.champion td { background: var(--goldbg); }
tr.champion td:first-child { box-shadow: inset 4px 0 0 var(--gold); }
tr.failed td { color: var(--mute); }
td .d { display: block; font-size: 11px; color: var(--mute); }
.up { color: var(--good) !important; }
.down { color: var(--bad) !important; }
.small { font-size: 12px; color: var(--mute); }
td.what { white-space: normal; min-width: 170px; max-width: 260px; overflow-wrap: anywhere; }
.err { color: var(--bad); white-space: normal; max-width: 420px; text-align: left; font-size: 12px; }
figure { margin: 10px 0 22px; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
figure svg { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: var(--mute); font-size: 12.5px; margin-top: 6px; }
footer { margin-top: 36px; color: var(--mute); font-size: 12px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _dt(ms: int | None) -> str:
    if not ms:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ms / 1000))


def _status(data: ReportData, c: RunView) -> str:
    """The registry column: version, champion, blocked, or the error."""
    badges = []
    if data.champion and data.champion.get("candidate") == c.name:
        badges.append('<span class="badge champ">★ champion</span>')
    if c.error or c.status == "FAILED":
        return f'<span class="badge fail">failed</span><div class="err">{_e((c.error or "run failed")[:300])}</div>'
    reg = c.tags.get("alloy.registration", "")
    version = c.tags.get("alloy.model_version")
    if version:
        badges.insert(0, f'<span class="badge" title="{_e(reg)}">v{_e(version)}</span>')
    elif reg.startswith("not registered"):
        badges.insert(0, f'<span class="badge fail" title="{_e(reg)}">not registered</span>')
    elif c.status == "RUNNING":
        badges.insert(0, '<span class="badge">running</span>')
    return "".join(badges) or "–"


def _quant_cell(c: RunView) -> str:
    p = c.quant_passed
    if p is None:
        return "–"
    why = c.tags.get("alloy.quant", "")
    return (f'<span class="badge pass">pass</span>' if p
            else f'<span class="badge fail" title="{_e(why)}">FAIL</span>')  # fmt: skip


def _table(data: ReportData) -> str:
    tasks = data.tasks
    head = ['<th class="l">model</th>', '<th class="l">what</th>']
    for t in tasks:
        arrow = "↓" if t in data.lower_is_better else "↑"
        head.append(f'<th title="{"lower" if arrow == "↓" else "higher"} is better">{_e(t)} {arrow}</th>')
    extra = [("mean_em", "mean EM"), ("mean_mc", "mean MC"), ("min_retained_em", "min retained EM")]
    extra = [(k, label) for k, label in extra if any(k in r.metrics for r in [*data.candidates, *data.models.values()])]
    head += [f"<th>{label}</th>" for _, label in extra]
    head += ["<th>quant</th>", "<th>int8 KL</th>", "<th>int4 KL</th>", "<th>merge s</th>", "<th>GB/s</th>",
             "<th>peak RSS GB</th>", '<th class="l">registry</th>']  # fmt: skip
    ncol = len(head)
    rows = [f"<tr>{''.join(head)}</tr>"]

    bases = {c.base for c in data.candidates if c.base}
    order = sorted(data.models, key=lambda n: (n not in bases, n))
    if data.models:
        rows.append(f'<tr class="group"><td colspan="{ncol}">input models (base and parents)</td></tr>')
    for n in order:
        m = data.models[n]
        role = "base" if n in bases else ("parent" + (f", {m.skill}" if m.skill else ""))
        cells = [f'<td class="l"><b>{_e(n)}</b> <span class="badge">{_e(role)}</span></td>',
                 f'<td class="l small what">{_e(_clip(m.tags.get("alloy.source", ""), 60))}</td>']  # fmt: skip
        for t in tasks:
            cells.append(f"<td>{_fmt(_num(m.metrics.get(t)))}</td>")
        cells += [f"<td>{_fmt(_num(m.metrics.get(k)))}</td>" for k, _ in extra]
        cells += ["<td></td>"] * 6 + ["<td></td>"]
        rows.append(f'<tr class="model" data-model="{_e(n)}" data-run-id="{_e(m.run_id)}">{"".join(cells)}</tr>')

    rows.append(f'<tr class="group"><td colspan="{ncol}">merge candidates</td></tr>')
    for c in data.candidates:
        champ = data.champion and data.champion.get("candidate") == c.name
        cls = "candidate" + (" champion" if champ else "") + (" failed" if c.error or c.status == "FAILED" else "")
        base = f" on {c.base}" if c.base else ""
        cells = [f'<td class="l"><b>{_e(c.name)}</b></td>',
                 f'<td class="l small what" title="{_e(c.run_name)}">{_e(_clip(c.run_name, 60))}<br>'
                 f'{_e(", ".join(c.merged))}{_e(base)}</td>']  # fmt: skip
        for t in tasks:
            score = _num(c.metrics.get(t))
            d_best, d_mean, best = deltas(data, c, t)
            sub = ""
            if d_best is not None:
                sub = (f'<span class="d"><span class="{_good(d_best, t, data)}" title="minus the best parent ({_e(best)})">'
                       f"Δbest {_signed(d_best)}</span> · <span class=\"{_good(d_mean, t, data)}\" "
                       f'title="minus the mean of the merged parents">Δmean {_signed(d_mean)}</span></span>')  # fmt: skip
            cells.append(f'<td data-task="{_e(t)}">{_fmt(score)}{sub}</td>')
        cells += [f"<td>{_fmt(_num(c.metrics.get(k)))}</td>" for k, _ in extra]
        reused = c.metrics.get("merge.reused") == 1.0
        cells += [f"<td>{_quant_cell(c)}</td>", f"<td>{_fmt(_num(c.metrics.get('quant.int8_kl')))}</td>",
                  f"<td>{_fmt(_num(c.metrics.get('quant.int4_kl')))}</td>",
                  f"<td>{_fmt(_num(c.metrics.get('merge.seconds')))}{' <span class=small>(reused)</span>' if reused else ''}</td>",
                  f"<td>{_fmt(_num(c.metrics.get('merge.gb_per_s')))}</td>",
                  f"<td>{_fmt(_num(c.metrics.get('merge.peak_rss_gb')))}</td>",
                  f'<td class="l">{_status(data, c)}</td>']  # fmt: skip
        rows.append(f'<tr class="{cls}" data-candidate="{_e(c.name)}" data-run-id="{_e(c.run_id)}">{"".join(cells)}</tr>')
    return f'<div class="table-wrap"><table id="candidates">{"".join(rows)}</table></div>'


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else ("…" + text[-(n - 1):] if "/" in text else text[: n - 1] + "…")


def _champion_card(data: ReportData) -> str:
    ch = data.champion
    metric = data.champion_metric
    if not ch:
        why = (f"no version of <code>{_e(data.registry_name)}</code> holds the alias <code>{CHAMPION_ALIAS}</code>"
               if data.registry_name else "no model registry information on this run")  # fmt: skip
        return f'<div class="card" id="champion">No champion: {why}.</div>'
    score = f"{_e(metric)} = <b>{_fmt(ch.get('score'), 4)}</b>" if ch.get("score") is not None else _e(metric)
    where = f"models:/{_e(data.registry_name)}@{CHAMPION_ALIAS}" if data.registry_name else CHAMPION_ALIAS
    if ch.get("candidate"):
        c = next(v for v in data.candidates if v.name == ch["candidate"])
        return (f'<div class="card champion-card" id="champion"><b>★ Champion: {_e(c.name)}</b> '
                f'<span class="small">({_e(c.run_name)})</span><br>{score} · version {_e(ch.get("version"))} · '
                f"<code>{where}</code></div>")  # fmt: skip
    made = [v.name for v in data.candidates if "made champion" in v.tags.get("alloy.registration", "")]
    then = f" This run made {_e(', '.join(made))} champion at the time." if made else ""
    return (f'<div class="card" id="champion">The champion (<code>{where}</code>, version {_e(ch.get("version"))}, '
            f"{score}) comes from another run (<code>{_e(ch.get('run_id'))}</code>): none of this run's candidates "
            f"beat it.{then}</div>")  # fmt: skip


def render_html(data: ReportData) -> str:
    """The whole page: header, champion, table, plots, inspect plots, notes."""
    from alloy import report_plots as rp

    p = data.parent
    t = p.data.tags
    n_failed = sum(1 for c in data.candidates if c.error or c.status == "FAILED")
    secs = _num(p.data.metrics.get("pipeline.seconds"))
    meta = [f"experiment <code>{_e(data.experiment_name)}</code> (id {_e(data.experiment_id)})",
            f"pipeline run <code>{_e(p.info.run_id)}</code>",
            f"started {_e(_dt(p.info.start_time))}", f"status {_e(p.info.status)}"]  # fmt: skip
    if secs is not None:
        meta.append(f"took {secs:.0f} s")
    if t.get("alloy.git_revision"):
        meta.append(f"git <code>{_e(t['alloy.git_revision'][:20])}</code>")
    if t.get("alloy.params_file"):
        meta.append(f"params <code>{_e(t['alloy.params_file'])}</code>")
    meta.append(f"store <code>{_e(data.tracking_uri)}</code>")

    figures = rp.all_figures(data)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>alloy report · {_e(p.info.run_name or p.info.run_id)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>Merge report · {_e(p.info.run_name or p.info.run_id)}</h1>",
        f'<div class="meta">{" · ".join(meta)}</div>',
        f'<div class="meta">{len(data.candidates)} candidates ({n_failed} failed), {len(data.models)} input models '
        f"scored, {len(data.tasks)} tasks · champion metric <code>{_e(data.champion_metric)}</code></div>",
        _champion_card(data),
        "<h2>Candidates against their parents and the base</h2>",
        _table(data) if data.candidates else '<div class="card">This run logged no candidates.</div>',
        '<p class="small">Δbest: the candidate minus the best of the models it merges (the base left out); Δmean: '
        "minus their mean. Green is the good direction (for ↓ tasks, lower). Quantisation: int8/int4 round-to-nearest, "
        "mean KL divergence of the next-token distribution from the unquantised model.</p>",
        "<h2>Plots</h2>",
        *[f'<figure id="{_e(fid)}">{svg}<figcaption>{cap}</figcaption></figure>' for fid, svg, cap in figures],
        f"<footer>Built by <code>alloy report</code> on {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} from "
        f"<code>{_e(data.tracking_uri)}</code>. Rebuild: <code>alloy report {_e(p.info.run_id)}</code>.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ entry points


def build_report(parent_run_id: str, tracking_uri: str) -> str:
    return render_html(collect(parent_run_id, tracking_uri))


def write_report(parent_run_id: str, tracking_uri: str, out_path: str | os.PathLike, *, log_artifact: bool = True) -> Path:
    """Write the report of pipeline run `parent_run_id` to `out_path` and log it on that run as `report.html`."""
    out = Path(out_path)
    page = build_report(parent_run_id, tracking_uri)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        raise AlloyError(f"report: cannot write {out} ({e.strerror or e})") from None
    if log_artifact:
        c = _client(tracking_uri)
        run_id = c.get_run(parent_run_id).data.tags.get("mlflow.parentRunId") or parent_run_id
        # the artifact is always called report.html, whatever the local file is called
        with tempfile.TemporaryDirectory(prefix="alloy-report-") as tmpdir:
            staged = Path(tmpdir) / ARTIFACT
            staged.write_text(page, encoding="utf-8")
            c.log_artifact(run_id, str(staged))
    return out


def latest_pipeline_run(tracking_uri: str, experiment: str) -> str:
    """The most recent pipeline (parent) run of `experiment`."""
    c = _client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(f"experiment {experiment!r}: not found in {tracking_uri} (run the pipeline first: alloy run)")
    runs = c.search_runs([exp.experiment_id], "tags.`alloy.role` = 'pipeline'", max_results=1,
                         order_by=["attributes.start_time DESC"])  # fmt: skip
    if not runs:
        raise InputError(f"experiment {experiment!r} in {tracking_uri}: no pipeline run yet (run: alloy run)")
    return runs[0].info.run_id


def svg_of(fig) -> str:
    """A matplotlib figure as inline SVG markup (text kept as text: searchable and smaller)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "alloy"}):
        # no date in the metadata: the same run gives the same bytes
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]
