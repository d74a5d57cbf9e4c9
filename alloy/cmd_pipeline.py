"""`alloy run` (the merge pipeline on params.yaml) and `alloy serve` (the same flow on a cron schedule).

Prefect runs with no server configured (a temporary local one per process) unless PREFECT_API_URL points at one;
MLflow writes to params.yaml's store (default: sqlite file + artifacts folder in the project) unless
MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from merging.errors import InputError
from merging.folders import replace_folder

# Set before prefect/mlflow/transformers are imported; a user's own settings win.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a cold start took > 20 s on a loaded machine
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _env() -> None:
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="the pipeline's params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the params file, e.g. --set eval.limit=10 (repeatable)")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy run", description="Run the merge pipeline (Prefect flow): download -> "
                                "merge -> quantisation check -> evaluate -> register, tracked in MLflow.")  # fmt: skip
    _common(p)
    p.add_argument("--runner", choices=["thread", "dask"], default=None, help="task runner (default: params.runner)")
    p.add_argument("--dask-address", default=None, help="run candidates on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--write-configs", metavar="DIR", default=None,
                   help="only write each candidate's mergekit YAML to DIR/<candidate>/<merge>.yml and the quantisation "
                   "check's arguments (what dvc.yaml's stages read), then exit")  # fmt: skip
    p.add_argument("--write-grams", action="store_true",
                   help="only compute the Gram matrices the candidates read (regmean) into <paths.models>/grams, "
                   "then exit (dvc.yaml's grams stage)")  # fmt: skip
    p.add_argument("--summarize", metavar="RESULTS", default=None,
                   help="only collect the eval and quant-check JSON that dvc.yaml's stages wrote under RESULTS into "
                   "RESULTS/summary.json and RESULTS/comparison.md, then exit")  # fmt: skip
    return p


def _model_locator(params):
    """name -> where a merge config finds the model (a path relative to the params file's folder, or a hub id)."""
    models = params.all_models()
    fam = params.family_dir()
    root = params.root

    def where(name: str) -> str:
        spec = models.get(name)
        if spec is None:
            return name
        if spec.path:
            return spec.path
        if spec.hub:
            return spec.hub + (f"@{spec.revision}" if spec.revision else "")
        if spec.family and fam is not None:
            return os.path.relpath(fam / spec.family, root)
        if spec.gguf:
            return os.path.relpath(params.path(params.paths.models) / name, root)
        return name

    return where


def write_grams(params_path: str, overrides: list[str]) -> list[Path]:
    """The Gram matrices every candidate reads (regmean), as the flow computes them, and an index beside them
    (<paths.models>/grams/grams.json, written even when no candidate needs any: dvc.yaml's stage output)."""
    import json

    from alloy.cmd_gram import ensure_grams
    from alloy.pipeline_params import expand_candidates, load_params, needed_grams

    params = load_params(params_path, overrides)
    where = _model_locator(params)
    folder = params.path(params.paths.models) / "grams"
    folder.mkdir(parents=True, exist_ok=True)
    index, written = {}, []
    for m, g in needed_grams(expand_candidates(params, source=params_path), params_path).items():
        local = params.path(where(m))
        if not local.is_dir():
            raise InputError(f"grams: model {m!r} is not a local folder ({where(m)}); run the pipeline (alloy run) or "
                             "download it first")
        res = ensure_grams(local, g["data"], params.path(g["file"]), examples=g["examples"], seed=g["seed"])
        index[m] = {"file": g["file"], "data": g["data"], "examples": g["examples"], "seed": g["seed"],
                    "tokens": res["tokens"]}
        written.append(Path(res["path"]))
    (folder / "grams.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


def write_configs(params_path: str, overrides: list[str], out_dir: str) -> list[Path]:
    """Each expanded candidate as a mergekit YAML whose models are paths (relative to the params file's folder)."""
    import json
    import shutil

    import yaml

    from alloy.pipeline_params import expand_candidates, load_params, model_name_of, needed_grams

    params = load_params(params_path, overrides)
    where = _model_locator(params)
    candidates = expand_candidates(params, source=params_path)

    def swap(node):
        if isinstance(node, dict):
            return {k: (where(model_name_of(v)) if k in ("model", "base_model") and isinstance(v, str) else swap(v))
                    for k, v in node.items()}  # fmt: skip
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    out = Path(out_dir)
    if not out.is_absolute():
        out = Path.cwd() / out
    written = []
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in candidates:
        f = tmp / c.group / f"{c.name}.yml"
        f.parent.mkdir(parents=True, exist_ok=True)
        cfg = swap(c.config)
        f.write_text(f"# candidate {c.name} ({c.run_name()}), seed {c.seed}; written by `alloy run --write-configs`\n"
                     + yaml.safe_dump(cfg, sort_keys=False))  # fmt: skip
        written.append(out / c.group / f.name)
    tmp.mkdir(parents=True, exist_ok=True)
    for name, text in _quant_args(params, where).items():
        (tmp / name).write_text(text + "\n")
    # what the grams stage computes: it depends on this file, not on every candidate parameter
    needed = needed_grams(candidates, params_path)
    (tmp / "grams.json").write_text(json.dumps(needed, indent=2, sort_keys=True) + "\n")
    replace_folder(tmp, out)
    return written


def _quant_args(params, where) -> dict[str, str]:
    """`alloy quant-check` arguments equal to what the flow passes eval.quant.quant_check."""
    q = params.quant
    if q.texts:
        texts = q.texts
    elif params.family_dir() is not None:
        texts = os.path.relpath(params.family_dir() / "data" / "heldout.jsonl", params.root)
    else:
        from merging.errors import ConfigError

        raise ConfigError("quant.texts: no held-out text file (and no family whose data/heldout.jsonl to use)")
    common = f"--text {texts} --max-tokens {q.max_tokens}"
    if q.thresholds:
        common += " --thresholds " + " ".join(f"{k}={v}" for k, v in q.thresholds.items())
    base_dir = where(q.baseline) if q.baseline else ""
    baseline = os.path.join(params.paths.results, "quant", "baseline.json")
    return {
        "quant.args": common + (f" --baseline {baseline}" if base_dir else ""),
        "quant-baseline.args": common,
        "quant-baseline.dir": base_dir,
    }


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(params_path: str, overrides: list[str], results: str) -> str:
    """dvc.yaml's last stage: the flow's comparison, from the JSON files the eval and quant-check stages wrote.

    Writes RESULTS/summary.json (the metrics file of `dvc metrics show/diff`: per model, the task scores and the
    derived metrics the flow logs to MLflow) and RESULTS/comparison.md (the flow's table)."""
    import json

    from alloy.pipeline_params import expand_candidates, load_params
    from flows.table import build_rows, render
    from alloy.pipeline_params import derived_metrics, primary_scores

    params = load_params(params_path, overrides)
    res = Path(results)
    models = params.all_models()
    parents: dict[str, dict] = {}
    own_skill: dict[str, dict[str, float]] = {}
    for f in sorted((res / "eval-parents").glob("*.json")):
        doc = _read_json(f) or {}
        name = f.stem
        spec = models.get(name)
        skill = spec.skill if spec else None
        parents[name] = {"source": name, "skill": skill, "scores": doc.get("scores", {}),
                         "metrics": derived_metrics(doc.get("scores", {}))}  # fmt: skip
        if skill:
            own_skill[skill] = primary_scores(doc.get("scores", {}))
    cands: dict[str, dict] = {}
    for c in expand_candidates(params, source=params_path):
        ev = _read_json(res / "eval" / c.group / f"{c.name}.json")
        q = _read_json(res / "quant" / c.group / f"{c.name}.json")
        entry: dict = {"run_name": c.run_name(), "quant": q, "metrics": {}}
        if ev is None:
            entry["error"] = f"no eval results at {res / 'eval' / c.group / (c.name + '.json')}"
        else:
            entry["scores"] = ev.get("scores", {})
            entry["metrics"] = derived_metrics(entry["scores"], own_skill)
        cands[c.name] = entry
    tasks = list(dict.fromkeys(t for e in [*parents.values(), *cands.values()] for t in e.get("scores", {})))
    table = render(build_rows(parents, cands, tasks))
    metric = params.champion.metric
    ok = {n: e["metrics"][metric] for n, e in cands.items()
          if metric in e["metrics"] and (e["quant"] is None or e["quant"].get("passed"))}  # fmt: skip
    best = (max if params.champion.higher_is_better else min)(ok, key=ok.get) if ok else None
    summary = {
        "candidates": {n: {**e["metrics"], "quant_passed": (e["quant"] or {}).get("passed")} for n, e in cands.items()},
        "parents": {n: e["metrics"] for n, e in parents.items()},
        "best": {"metric": metric, "candidate": best, "score": ok.get(best) if best else None},
    }
    (res / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (res / "comparison.md").write_text(table + "\n")
    return table


def _where_to_look(summary: dict) -> str:
    uri = summary["tracking_uri"]
    lines = [f"MLflow: {uri} (parent run {summary['parent_run_id']})"]
    if uri.startswith("sqlite:"):
        lines.append(f"  browse: mlflow ui --backend-store-uri {uri}   (or: alloy ui)")
    if summary.get("report"):
        lines.append(f"Report: {summary['report']}   (rebuild: alloy report)")
    champ = summary.get("champion")
    name = summary.get("registry_name")
    if champ:
        lines.append(f"Champion: models:/{name}@champion = version {champ['version']} (score {champ['score']})")
    else:
        lines.append(f"Champion: none registered in {name!r}")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    _env()
    if args.write_configs:
        for f in write_configs(args.params, args.overrides, args.write_configs):
            print(f)
        return 0
    if args.write_grams:
        for f in write_grams(args.params, args.overrides):
            print(f)
        return 0
    if args.summarize:
        table = summarize(args.params, args.overrides, args.summarize)
        print(table)
        return 0
    from alloy.pipeline_params import load_params

    load_params(args.params, args.overrides)  # a bad params file fails here, before Prefect starts
    from flows.pipeline import run_pipeline

    summary = run_pipeline(args.params, args.overrides, runner=args.runner, address=args.dask_address)
    failed = {n: c["error"] for n, c in summary["candidates"].items() if c.get("error")}
    print(_where_to_look(summary))
    print(f"pipeline finished in {summary['seconds']:.0f} s: {len(summary['candidates']) - len(failed)} of "
          f"{len(summary['candidates'])} candidates ran")  # fmt: skip
    for n, e in failed.items():
        print(f"alloy: error: candidate {n}: {e}", file=sys.stderr)
    return 1 if failed else 0


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy serve", description="Serve the merge pipeline on a schedule (Prefect "
                                "flow.serve). Schedules need a Prefect server: set PREFECT_API_URL "
                                "(`prefect server start`).")  # fmt: skip
    _common(p)
    p.add_argument("--cron", default="0 3 * * *", help='cron schedule (default "0 3 * * *": 03:00 every day)')
    p.add_argument("--name", default="alloy-nightly", help="deployment name")
    p.add_argument("--timezone", default=None, help="time zone of the cron schedule (default: UTC)")
    return p


def serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
    _env()
    from alloy.pipeline_params import load_params
    from merging.errors import AlloyError

    load_params(args.params, args.overrides)
    if not os.environ.get("PREFECT_API_URL"):
        raise AlloyError("serve: PREFECT_API_URL is not set; schedules need a running Prefect server "
                         "(prefect server start, then export PREFECT_API_URL=http://127.0.0.1:4200/api)")  # fmt: skip
    from prefect.schedules import Cron

    from flows.pipeline import merge_pipeline

    params_path = str(Path(args.params).resolve())
    schedule = Cron(args.cron, timezone=args.timezone) if args.timezone else Cron(args.cron)
    merge_pipeline.serve(name=args.name, schedules=[schedule],
                         parameters={"params_path": params_path, "overrides": args.overrides},
                         description=f"alloy merge pipeline on {params_path}")  # fmt: skip
    return 0
