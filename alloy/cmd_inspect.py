"""`alloy inspect CONFIG.yml`: task-vector similarity, sign conflicts, trim and survival shares."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def config_inputs(config: str | Path) -> list[Path]:
    """The config file and the local model folders it names (as a merge would find them): what a report written
    by this command may not replace or go into."""
    from merging.config import load_config
    from merging.plan import resolve_model_path

    cfg = load_config(config)
    search = [Path.cwd(), Path(config).resolve().parent]
    return [Path(config), *(resolve_model_path(ref, search) for ref in cfg.referenced_models())]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alloy inspect", description=__doc__)
    p.add_argument("config")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report (per layer) here")
    p.add_argument("--nan-policy", default="refuse", choices=["refuse", "warn"],
                   help="a tensor holding NaN or Inf: refuse (default, as alloy merge does), or warn and leave that "
                        "tensor out of the statistics (listed in the report)")
    p.add_argument("--lora-merge-cache", default=None, metavar="DIR",
                   help="where `base+adapter` models are merged into full checkpoints (as alloy merge)")
    p.add_argument("--lora-merge-dtype", default=None, metavar="DTYPE",
                   help="the dtype `base+adapter` models are merged in (as alloy merge)")
    args = p.parse_args(argv)
    from merging.guard import check_output_file, write_report
    from merging.inspect import format_table, inspect_merge

    inputs = config_inputs(args.config) if args.json_out else []
    if args.json_out:  # before reading any tensor: the report may not replace the config or go into a model
        check_output_file(args.json_out, inputs)
    report = inspect_merge(args.config, nan_policy=args.nan_policy, lora_cache=args.lora_merge_cache,
                           lora_dtype=args.lora_merge_dtype)
    print(format_table(report))
    if report.get("nonfinite"):
        print(f"alloy: warning: {len(report['nonfinite'])} tensor(s) hold NaN/Inf in the base or a model and were "
              "left out of the statistics (--nan-policy warn)", file=sys.stderr)
    if args.json_out:
        write_report(args.json_out, json.dumps(report, indent=2) + "\n", inputs)
    return 0
