"""`alloy quant-check MODEL_DIR`: does the model survive int8/int4 quantisation? Exit 1 (with the reasons) if not."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from alloy.argtypes import positive_int
from merging.errors import ConfigError, InputError


def _parse_thresholds(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--thresholds {item!r}: expected key=value")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--thresholds {item!r}: {value!r} is not a number") from None
    return out


# (metric, threshold key, "max" | "min") rows of the table, in order
TABLE = [
    ("nonfinite_tensors", None, None),
    ("max_outlier_ratio", "outlier_ratio_max", "max"),
    ("max_scale_ratio", "scale_ratio_max", "max"),
    ("max_abs_weight", None, None),
    ("max_tensor_norm", None, None),
    ("fp_ppl", None, None),
    *[
        row
        for fmt in ("int8", "int4")
        for row in (
            (f"{fmt}_kl", f"{fmt}_kl_max", "max"),
            (f"{fmt}_top1", f"{fmt}_top1_min", "min"),
            (f"{fmt}_ppl_ratio", f"{fmt}_ppl_ratio_max", "max"),
            (f"{fmt}_max_weight_error", f"{fmt}_weight_error_max", "max"),
            (f"{fmt}_kl_vs_baseline", "baseline_kl_ratio_max", "max"),
            (f"{fmt}_top1_drop_vs_baseline", "baseline_top1_drop_max", "max"),
        )
    ],
    ("fp16_kl", "fp16_kl_max", "max"),
    ("fp16_nonfinite_positions", None, None),
    ("max_activation", None, None),
]


def format_report(report, model_dir: str) -> str:
    m, th = report.metrics, report.thresholds
    head = f"quant-check {model_dir}"
    if "n_tokens" in m:
        head += (
            f"  ({int(m['n_tokens'])} tokens; {int(m['quantized_tensors'])} tensors,"
            f" {m['quantized_params'] / 1e6:.1f} M parameters quantised; {m['seconds']:.0f} s)"
        )
    lines = [head, f"{'metric':<30} {'value':>12}  {'threshold':<14}", "-" * 60]
    for metric, key, kind in TABLE:
        if metric not in m:
            continue
        limit = ""
        if key:
            limit = f"{'<=' if kind == 'max' else '>='} {th[key]:.3g}"
        lines.append(f"{metric:<30} {m[metric]:>12.4g}  {limit:<14}")
    for fmt, rows in report.worst_tensors.items():
        lines.append(f"worst {fmt} relative weight errors:")
        lines += [f"  {err:8.4f}  {name}" for name, err in rows]
    if report.passed:
        lines.append("PASSED")
    else:
        lines.append("FAILED:")
        lines += [f"  - {r}" for r in report.reasons]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="alloy quant-check",
        description="Quantise a model's weights (int8 per channel, int4 groups of 128, round to nearest), compare it "
        "with the unquantised model on held-out text, scan the weights for NaN/Inf and outliers, and run fp16. "
        "Exits 1 when a threshold is crossed.",
    )
    ap.add_argument("model_dir", help="Hugging Face model folder (safetensors)")
    ap.add_argument("--text", action="append", default=[], metavar="FILE",
                    help="held-out text: a text file, or .jsonl (one text per line); repeatable. "
                    "Default: a few paragraphs of built-in English prose")
    ap.add_argument("--max-tokens", type=positive_int, default=1024, help="tokens of held-out text to use (default 1024)")
    ap.add_argument("--thresholds", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override thresholds, e.g. int4_kl_max=0.5 (see eval.quant.DEFAULT_THRESHOLDS)")
    ap.add_argument("--baseline", metavar="JSON", help="a --json report of a reference model on the same text")
    ap.add_argument("--embeddings", action="store_true", help="quantise the input/output embeddings too")
    ap.add_argument("--fp16", choices=["native", "emulated"], default="native",
                    help="fp16 pass: the model in half precision (default), or fp32 with outputs rounded to fp16 "
                    "(faster on CPUs)")
    ap.add_argument("--threads", type=positive_int, help="torch threads (1 is fastest on a loaded small machine)")
    ap.add_argument("--json", metavar="OUT", help="write the report as JSON here")
    args = ap.parse_args(argv)
    from merging.guard import check_output_file, write_report

    # the report may not replace the model's files, a held-out text or the baseline: refused before any work
    inputs = [args.model_dir, *args.text, *([args.baseline] if args.baseline else [])]
    if args.json:
        check_output_file(args.json, inputs)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never wait on the network
    import torch

    from eval.quant import DEFAULT_TEXT, quant_check, read_texts, resolve_thresholds

    thresholds = _parse_thresholds(args.thresholds)
    resolve_thresholds(thresholds)  # fail on a bad key before loading anything
    baseline = None
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--baseline {args.baseline}: cannot read a JSON report ({e})") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = read_texts(args.text) if args.text else [DEFAULT_TEXT]
    report = quant_check(
        args.model_dir, texts, thresholds, max_tokens=args.max_tokens, quantize_embeddings=args.embeddings,
        baseline=baseline, fp16=args.fp16,
    )
    print(format_report(report, args.model_dir))
    if args.json:
        write_report(args.json, json.dumps({"model_dir": str(args.model_dir), **report.to_dict()}, indent=2) + "\n",
                     inputs)
    return 0 if report.passed else 1
