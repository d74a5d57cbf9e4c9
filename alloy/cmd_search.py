"""`alloy search`: an Optuna search over merge recipes of params.yaml's models (flows/search.py).

Trials merge in memory and are scored on the tune split; the held-out split is reported beside. The study lives in
sqlite storage (default: optuna.db beside the MLflow store): running the command again resumes it, and a larger
--trials adds only the missing trials.
"""

from __future__ import annotations

import argparse

from alloy.cmd_pipeline import _common, _env


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy search", description=(
        "Search merge recipes (method, per-model weights and densities, lambda) with Optuna; each trial merges in "
        "memory, is scored with lm-eval and logged as an MLflow child run; the best is written as a mergekit YAML."))
    _common(p)
    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help="finished trials the study should hold (default: search.trials); a resumed study runs "
                   "only the missing ones")  # fmt: skip
    p.add_argument("--runner", choices=["thread", "dask"], default=None, help="task runner (default: params.runner)")
    p.add_argument("--dask-address", default=None, help="run trials on this Dask scheduler (tcp://host:8786)")
    reg = p.add_mutually_exclusive_group()
    reg.add_argument("--register", dest="register", action="store_true", default=None,
                     help="send the best recipe through merge -> quant-check -> evaluate -> register as `search-best`")
    reg.add_argument("--no-register", dest="register", action="store_false",
                     help="do not (overrides search.register_best)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.trials is not None and args.trials < 1:
        from merging.errors import ConfigError

        raise ConfigError(f"--trials {args.trials}: must be at least 1")
    _env()
    from flows.search import run_search

    summary = run_search(args.params, args.overrides, trials=args.trials, runner=args.runner,
                         address=args.dask_address, register=args.register)  # fmt: skip
    print()
    print(summary["table"])
    print()
    print(f"study {summary['study']}: {len(summary['trials'])} trials ({len(summary['ran'])} run now) in "
          f"{summary['seconds']:.0f} s; storage {summary['storage']}")  # fmt: skip
    best = summary.get("best")
    if not best:
        print("no trial completed: no recipe written")
        return 1
    held = f", held-out {best['heldout_objective']:.3f}" if best.get("heldout_objective") is not None else ""
    print(f"best: trial {best['trial']} (tune {best['objective']:.3f}{held})")
    ref = summary.get("reference")
    if ref:
        print(f"best hand-written candidate of the last pipeline run: {ref['candidate']} "
              f"(held-out {ref['heldout_objective']:.3f})")  # fmt: skip
    if summary.get("promoted"):
        pr = summary["promoted"]
        reg = pr.get("registration") or {}
        what = pr.get("error") or (f"registered as version {reg.get('version')}" if reg.get("registered")
                                   else f"not registered: {reg.get('reason', '?')}")  # fmt: skip
        print(f"search-best through the pipeline (run {pr.get('pipeline_run_id')}): {what}")
    print(f"recipe: {best['recipe']}")
    return 0
