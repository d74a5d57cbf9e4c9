"""alloy vs mergekit on a medium synthetic Llama family, side by side in one run.

    .venv/bin/python benchmarks/bench_merge.py [--root /tmp/alloy-bench] [--methods linear,ties] [--out benchmarks/RESULTS.md]
    .venv/bin/python benchmarks/bench_merge.py --device cuda   # on a GPU: alloy --device cuda against mergekit --cuda

Family (generated once, reused): hidden 2048, intermediate 5632, 10 layers, vocab 32000, bf16, 1 GB shards — about
1.3 GB per model; a base and two fine-tunes. Each merge runs as its own process with the page cache warm (inputs are
read once before timing); its wall seconds and peak RSS (its rusage from wait4, what `/usr/bin/time -v` reports, which earlier runs used) are
taken. The floor is the time to read every input once plus write one output of the same size with fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from statistics import median
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "merging"))

METHODS = {
    "linear": lambda f: {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": f["ft0"], "parameters": {"weight": 0.5}}, {"model": f["ft1"], "parameters": {"weight": 0.5}}]},
    "slerp": lambda f: {"merge_method": "slerp", "base_model": f["base"], "dtype": "bfloat16", "parameters": {"t": 0.4},
                        "slices": [{"sources": [{"model": f["base"], "layer_range": [0, 10]},
                                                {"model": f["ft0"], "layer_range": [0, 10]}]}]},
    "task_arithmetic": lambda f: {"merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "bfloat16",
                                  "parameters": {"lambda": 0.8}, "models": [
                                      {"model": f["ft0"], "parameters": {"weight": 1.0}},
                                      {"model": f["ft1"], "parameters": {"weight": 1.0}}]},
    "ties": lambda f: {"merge_method": "ties", "base_model": f["base"], "dtype": "bfloat16", "models": [
        {"model": f["ft0"], "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": f["ft1"], "parameters": {"weight": 1.0, "density": 0.5}}]},
    "dare_ties": lambda f: {"merge_method": "dare_ties", "base_model": f["base"], "dtype": "bfloat16", "models": [
        {"model": f["ft0"], "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": f["ft1"], "parameters": {"weight": 1.0, "density": 0.5}}]},
}


def make_medium_family(root: Path) -> dict[str, str]:
    from family import llama_shapes, write_model

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
           "intermediate_size": 5632, "num_hidden_layers": 10, "num_attention_heads": 16, "num_key_value_heads": 16,
           "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "hidden_act": "silu", "rope_theta": 10000.0, "torch_dtype": "bfloat16"}
    paths = {k: root / k for k in ("base", "ft0", "ft1")}
    if all((p / "config.json").exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes(cfg)
    base = {n: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for n, s in shapes.items()}
    shards = 2  # ~1.3 GB at 1 GB shards
    write_model(paths["base"], base, cfg, shards)
    for i, k in enumerate(("ft0", "ft1")):
        ft = {n: (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        write_model(paths[k], ft, cfg, shards)
        del ft
    return {k: str(v) for k, v in paths.items()}


def warm(paths: list[str]) -> float:
    t = time.perf_counter()
    for p in paths:
        for f in Path(p).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    return time.perf_counter() - t


def floor_seconds(paths: list[str], out_bytes: int, scratch: Path) -> float:
    read = warm(paths)
    buf = os.urandom(1 << 24)
    t = time.perf_counter()
    with open(scratch, "wb") as f:
        left = out_bytes
        while left > 0:
            f.write(buf[: min(left, len(buf))])
            left -= len(buf)
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - t
    scratch.unlink()
    return read + write


# Runs the command and writes its wall seconds, peak RSS (KB) and exit status. A separate small process: a child's
# ru_maxrss starts from the high-water mark of the process it was forked from (Linux records the old address space's
# at exec), and this benchmark holds gigabytes after generating the family; /usr/bin/time played this part before,
# but the GPU machine's image has none.
_TIMER = ("import os, subprocess, sys, time\n"
          "t = time.perf_counter(); p = subprocess.Popen(sys.argv[2:]); _, st, ru = os.wait4(p.pid, 0)\n"
          "p.returncode = 0; secs = time.perf_counter() - t\n"
          "open(sys.argv[1], 'w').write(f'{secs} {ru.ru_maxrss} {os.waitstatus_to_exitcode(st)}')\n")


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) and stdout of one run of `cmd`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats"
        r = subprocess.run([sys.executable, "-c", _TIMER, str(stats)] + cmd, capture_output=True, text=True, env=env)
        secs, rss_kb, rc = stats.read_text().split() if stats.exists() else ("nan", "0", str(r.returncode or 1))
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return float(secs), int(rss_kb) * 1024 / 1e9, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/alloy-bench")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per method; figures are medians (default 3)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where both tools compute: cuda runs alloy --device cuda and mergekit --cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    alloy_device = ["--device", args.device]
    mergekit_device = ["--cuda"] if args.device == "cuda" else []
    where = (f"device cuda ({torch.cuda.get_device_name()}; alloy --device cuda, mergekit --cuda)"
             if args.device == "cuda" else "device cpu")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    fam = make_medium_family(root / "family")
    # this checkout's alloy, whatever the virtualenv's editable install points at
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    load_before = os.getloadavg()[0]
    bin_dir = Path(sys.executable).parent
    # the console script where mergekit is installed; its module where it only travels as a wheel (--target)
    mergekit = ([str(bin_dir / "mergekit-yaml")] if (bin_dir / "mergekit-yaml").exists()
                else [sys.executable, "-m", "mergekit.scripts.run_yaml"])
    rows = []
    for name in args.methods.split(","):
        cfg = METHODS[name](fam)
        cfg_path = root / f"{name}.yml"
        import yaml

        cfg_path.write_text(yaml.safe_dump(cfg))
        inputs = sorted({m["model"] for m in cfg.get("models", [])} | {s["model"] for sl in cfg.get("slices", []) for s in sl["sources"]} | ({cfg["base_model"]} if "base_model" in cfg else set()))
        out_a, out_m = root / f"out-alloy-{name}", root / f"out-mk-{name}"
        for o in (out_a, out_m):
            shutil.rmtree(o, ignore_errors=True)
        runs: dict[str, list] = {"alloy": [], "inner": [], "mergekit": [], "floor": []}
        # rounds of alloy, floor, mergekit: this machine's disk and caches drift by 2x within minutes, so each figure
        # is the median of --repeat rounds, the three measured side by side in every round
        for _ in range(args.repeat):
            for o in (out_a, out_m):
                shutil.rmtree(o, ignore_errors=True)
            warm(inputs)
            a_s, a_rss, summary = timed([sys.executable, "-m", "alloy", "merge", str(cfg_path), str(out_a), "--shard-size",
                                         "1GB"] + alloy_device, env)
            out_bytes = sum(f.stat().st_size for f in out_a.glob("*.safetensors"))
            floor = floor_seconds(inputs, out_bytes, root / "floor.bin")
            if args.skip_mergekit:
                m_s, m_rss = float("nan"), float("nan")
            else:
                warm(inputs)
                m_s, m_rss, _ = timed(mergekit + [str(cfg_path), str(out_m), "--out-shard-size",
                                       "500M", "--random-seed", "0", "--no-copy-tokenizer", "--quiet"] + mergekit_device, env)
            inner = re.search(r", ([0-9.]+) s, [0-9.]+ GB/s", summary)
            runs["alloy"].append((a_s, a_rss))
            runs["inner"].append(float(inner.group(1)) if inner else float("nan"))
            runs["mergekit"].append((m_s, m_rss))
            runs["floor"].append(floor)
            print(f"{name}: alloy {a_s:.1f} s {a_rss:.2f} GB | mergekit {m_s:.1f} s {m_rss:.2f} GB | floor {floor:.1f} s "
                  f"| {summary.strip()}", flush=True)
        a_s, m_s = median([r[0] for r in runs["alloy"]]), median([r[0] for r in runs["mergekit"]])
        rows.append((name, a_s, max(r[1] for r in runs["alloy"]), m_s, max(r[1] for r in runs["mergekit"]),
                     median(runs["floor"]), median(runs["inner"]),
                     f"{min(r[0] for r in runs['alloy']):.1f}-{max(r[0] for r in runs['alloy']):.1f}"))
        for o in (out_a, out_m):
            shutil.rmtree(o, ignore_errors=True)
    lines = [
        "# Benchmark: alloy vs mergekit 0.1.5", "",
        f"Machine: {os.cpu_count()} cores, {where}; torch {torch.__version__}; family: Llama hidden 2048, intermediate 5632, "
        "10 layers, vocab 32000, bf16, ~1.3 GB per model, 1 GB shards; page cache warm; each run's wall seconds and peak RSS (its rusage) "
        "(wall seconds include each tool's start-up: importing torch, planning); 'alloy merge s' is alloy's own "
        "figure from planning to the renamed output; the floor reads every input once and writes the output's "
        f"size with fsync. Each time is the median of {args.repeat} rounds (alloy, floor and mergekit measured side by "
        "side in each round), peak RSS the largest of them. "
        f"Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.", "",
        "| method | alloy s | alloy s, range | alloy merge s | alloy peak RSS GB | mergekit s | mergekit peak RSS GB "
        "| speed-up (mergekit/alloy) | floor s | alloy/floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a_s, a_rss, m_s, m_rss, floor, inner, spread in rows:
        lines.append(f"| {name} | {a_s:.1f} | {spread} | {inner:.1f} | {a_rss:.2f} | {m_s:.1f} | {m_rss:.2f} | "
                     f"{m_s / a_s:.1f}x | {floor:.1f} | {a_s / floor:.2f} |")
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    lines.insert(2, f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit[:70]}.\n")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text + _history(Path(args.out)))
    return 0


def _history(out: Path) -> str:
    """The file's earlier runs, the latest of them first: a run never erases the record of the ones before it."""
    if not out.exists():
        return ""
    old = out.read_text()
    latest, _, earlier = old.partition("\n## Earlier runs\n")
    latest = latest.split("\n", 1)[1].strip() if latest.startswith("# ") else latest.strip()
    body = latest.replace("\n## ", "\n#### ")
    return "\n## Earlier runs\n\n### " + body.replace("Latest run", "Run", 1) + "\n\n" + earlier.strip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
