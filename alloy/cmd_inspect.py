"""`alloy inspect CONFIG.yml`: task-vector similarity, sign conflicts, trim and survival shares."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alloy inspect", description=__doc__)
    p.add_argument("config")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report (per layer) here")
    args = p.parse_args(argv)
    from merging.inspect import format_table, inspect_merge

    report = inspect_merge(args.config)
    print(format_table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
