"""`alloy multimerge CONFIG.yml -I DIR [--out-path OUT]`: recipes that merge each other's outputs (mergekit-multi)."""

from __future__ import annotations

import argparse
import sys

from alloy.cmd_merge import add_engine_options, engine_kwargs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alloy multimerge",
        description="Merge several configs of one YAML file (one document each, mergekit-multi's format): a document "
                    "with `name: X` is merged into INTERMEDIATE_DIR/X and other documents may list X as a model; the "
                    "document without a name is the final merge, written to --out-path.")
    p.add_argument("config", help="YAML file of merge configs, separated by ---")
    p.add_argument("--intermediate-dir", "-I", required=True, help="where the named merges are written")
    p.add_argument("--out-path", default=None, help="where the final (unnamed) merge is written")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a named merge already there when its manifest says it was merged from the same config "
                        "(default); --no-lazy merges every recipe again")
    p.add_argument("--overwrite", action="store_true", help="replace --out-path when the final merge runs again")
    add_engine_options(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    kwargs = engine_kwargs(args)
    from merging.multimerge import run_multimerge

    say = None if args.quiet else (lambda line: print(f"alloy: {line}", file=sys.stderr))
    steps = run_multimerge(args.config, args.intermediate_dir, args.out_path, lazy=args.lazy,
                           overwrite=args.overwrite, log=say, **kwargs)
    if not args.quiet:
        for step in steps:
            print(f"{step.recipe.label}: " + (f"kept {step.out}" if step.result is None else step.result.summary()))
    return 0
