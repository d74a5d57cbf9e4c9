"""`alloy eval MODEL_DIR`: score a checkpoint with lm-eval, compare it with its parents, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from alloy.argtypes import device, positive_int
from merging.errors import InputError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alloy eval",
        description="Evaluate a Hugging Face checkpoint with lm-eval on the bundled skills (default) or any lm-eval "
        "task. A merge (a folder with alloy_manifest.json) is compared with its parents, each evaluated once "
        "and cached by content hash.",
    )
    p.add_argument("model_dir", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--tasks", nargs="+", default=["skills"],
                   help="bundled tasks (facts_em, facts_mc, ..., heldout_ppl), the aliases skills / skills_em / "
                   "skills_mc, or lm-eval task names; commas work too (default: skills)")  # fmt: skip
    p.add_argument("--limit", type=_limit, default=None, help="examples per task: a count, or a fraction below 1")
    p.add_argument("--parents", nargs="+", default=None, metavar="DIR",
                   help="parent checkpoints to compare with (default: the merge's inputs from alloy_manifest.json, "
                   "its base model left out)")  # fmt: skip
    p.add_argument("--no-parents", action="store_true", help="do not evaluate or compare parents")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--data-dir", default=None, help="the skills' JSONL folder (default: seed-0 data in the cache)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--cache-dir", default=None, help="result cache (default: $ALLOY_EVAL_CACHE or ~/.cache/alloy/eval)")
    p.add_argument("--no-cache", action="store_true", help="evaluate again even if cached (the cache is refreshed)")
    return p


def _limit(text: str) -> int | float:
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: not a number") from None
    return value


def manifest_parents(model_dir: Path) -> list[Path]:
    """The merge's input folders named in its alloy_manifest.json that exist here, without the base model."""
    path = model_dir / "alloy_manifest.json"
    if not path.is_file():
        return []
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    base = (manifest.get("config") or {}).get("base_model")
    base_name = base.get("model") if isinstance(base, dict) else base
    out: list[Path] = []
    for entry in manifest.get("inputs", []):
        name = entry.get("model") if isinstance(entry, dict) else None
        if not name or (base_name and str(name) == str(base_name)):
            continue
        # Config paths are as written at merge time: absolute, or relative to where the merge ran.
        for cand in (Path(name), model_dir.parent / name):
            if (cand / "config.json").is_file():
                if cand.resolve() not in out:
                    out.append(cand.resolve())
                break
    return out


def _names(paths: list[Path]) -> list[str]:
    short = [p.name for p in paths]
    return short if len(set(short)) == len(short) else [str(p) for p in paths]


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def print_table(model: str, scores: dict, rows: list[dict] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from eval.compare import primary_metric

    table = Table(title=f"alloy eval: {model}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if rows:
        for col in ("best parent", "", "mean parents", "vs best", "vs mean"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["task"], r["metric"], _fmt(r["merge"]), _fmt(r["best"]), r["best_parent"] or "-",
                          _fmt(r["mean_parents"]), _fmt(r["vs_best"], True), _fmt(r["vs_mean"], True))  # fmt: skip
    else:
        table.add_column("other metrics")
        for task, metrics in scores.items():
            m = primary_metric(task, metrics)
            others = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != m and not k.endswith("_stderr"))
            table.add_row(task, m or "-", _fmt(metrics.get(m)) if m else "-", others)
    # Logs and pipes get 160 columns: rich's default of 80 would wrap the column headers.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from eval.compare import compare_to_parents
    from eval.harness import evaluate_detailed
    from merging.engine import check_device
    from merging.guard import check_output_file, write_report

    t0 = time.perf_counter()
    check_device(args.device)  # a GPU that is there
    model = Path(args.model_dir).resolve()
    tasks = [t for item in args.tasks for t in item.split(",") if t]
    common = dict(limit=args.limit, batch_size=args.batch_size, device=args.device, data_dir=args.data_dir,
                  cache_dir=args.cache_dir, use_cache=not args.no_cache)  # fmt: skip
    parents = [] if args.no_parents else (
        [Path(p).resolve() for p in args.parents] if args.parents else manifest_parents(model))  # fmt: skip
    for path in parents:
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: parent is not a checkpoint folder (no config.json)")
    # the results may not go over or into a model evaluated here, nor into the data: refused before any work
    inputs = [model, *parents, *([args.data_dir] if args.data_dir else [])]
    if args.out:
        check_output_file(args.out, inputs, option="--out")
    result = evaluate_detailed(model, tasks, **common)
    parent_results: dict[str, dict] = {}
    for name, path in zip(_names(parents), parents):
        parent_results[name] = {"path": str(path), **evaluate_detailed(path, tasks, **common)}
    rows = None
    if parents:
        rows = compare_to_parents(result["scores"], {n: r["scores"] for n, r in parent_results.items()})
    print_table(model.name, result["scores"], rows)
    if args.out:
        doc = {"model": str(model), "model_hash": result["model_hash"], "tasks": list(result["scores"]),
               "limit": args.limit, "scores": result["scores"], "cached": result["cached"],
               "parents": parent_results, "comparison": rows or [],
               "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        write_report(args.out, json.dumps(doc, indent=2) + "\n", inputs, option="--out")
        print(f"wrote {args.out}")
    return 0
