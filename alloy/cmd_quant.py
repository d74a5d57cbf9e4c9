"""`alloy quant-check MODEL_DIR`: does the model survive int8/int4 quantisation? Exit 1 (with the reasons) if not."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from merging.errors import ConfigError, InputError

# Held-out prose used when no --text is given: plain English on everyday topics, written for this check.
DEFAULT_TEXT = """\
The history of the bicycle begins in the early nineteenth century, when inventors in Europe experimented with \
two-wheeled machines that riders pushed along with their feet. Over the following decades, pedals, chains and \
pneumatic tyres turned a curiosity into one of the most efficient means of transport ever devised. Today, hundreds \
of millions of people ride bicycles to work, to school and for pleasure, and many cities have built lanes to keep \
cyclists safe from cars.

Water boils at one hundred degrees Celsius at sea level, but at lower temperatures high in the mountains, because \
the air pressure is lower. This is why cooking pasta at altitude takes longer: the water is not as hot even though \
it is boiling. Pressure cookers work the other way round, raising the pressure so that water stays liquid above its \
usual boiling point and food cooks faster.

To write a good function, give it one job, a clear name and as few arguments as it needs. Test the unusual inputs \
as well as the common ones: empty lists, negative numbers, very long strings. When a bug is found, first write a \
test that fails because of it, then fix the code and watch the test pass. Small, well-tested pieces are easier to \
change later than one large block of clever code.

The capital of France is Paris, a city on the river Seine known for its museums, its cafes and the Eiffel Tower, \
built for the world's fair of 1889. The capital of Italy is Rome, the capital of Spain is Madrid and the capital of \
Germany is Berlin. Each of these cities has a long history, with buildings from many centuries standing side by side.

A garden needs three things above all: light, water and good soil. Tomatoes and beans want full sun for most of the \
day, while lettuce and spinach are happy with some shade. Water in the early morning so the leaves dry before \
evening, and add compost every spring to feed the soil. Most plants grown from seed should be started indoors a few \
weeks before the last frost, then moved outside once the nights are warm.

The Moon takes about twenty-seven days to travel once around the Earth, and it always shows us the same face. Its \
gravity pulls on the oceans and raises the tides, which rise and fall twice a day on most coasts. Astronauts first \
walked on its surface in 1969, bringing back rocks that showed it formed from material thrown out when a large \
body struck the young Earth.

When you meet someone for the first time, a smile and a simple question go a long way. Ask what they enjoy doing, \
listen to the answer, and remember a detail or two. Good conversations are not contests: they are a way of finding \
out how another person sees the world, and often of learning something you did not expect.
"""


def _read_texts(paths: list[str]) -> list[str]:
    """A .jsonl file gives one text per line (its "text" field, else its string fields joined); any other file is
    one text."""
    texts: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputError(f"--text {p}: no such file")
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{p}:{i}: invalid JSON ({e.msg})") from None
                if isinstance(row, dict):
                    text = row.get("text") or " ".join(str(v) for v in row.values() if isinstance(v, str))
                else:
                    text = str(row)
                texts.append(text)
        else:
            texts.append(p.read_text(encoding="utf-8"))
    return texts


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
    ap.add_argument("--max-tokens", type=int, default=1024, help="tokens of held-out text to use (default 1024)")
    ap.add_argument("--thresholds", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override thresholds, e.g. int4_kl_max=0.5 (see eval.quant.DEFAULT_THRESHOLDS)")
    ap.add_argument("--baseline", metavar="JSON", help="a --json report of a reference model on the same text")
    ap.add_argument("--embeddings", action="store_true", help="quantise the input/output embeddings too")
    ap.add_argument("--fp16", choices=["native", "emulated"], default="native",
                    help="fp16 pass: the model in half precision (default), or fp32 with outputs rounded to fp16 "
                    "(faster on CPUs)")
    ap.add_argument("--threads", type=int, help="torch threads (1 is fastest on a loaded small machine)")
    ap.add_argument("--json", metavar="OUT", help="write the report as JSON here")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never wait on the network
    import torch

    from eval.quant import quant_check, resolve_thresholds

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
    texts = _read_texts(args.text) if args.text else [DEFAULT_TEXT]
    report = quant_check(
        args.model_dir, texts, thresholds, max_tokens=args.max_tokens, quantize_embeddings=args.embeddings,
        baseline=baseline, fp16=args.fp16,
    )
    print(format_report(report, args.model_dir))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model_dir": str(args.model_dir), **report.to_dict()}, indent=2) + "\n")
    return 0 if report.passed else 1
