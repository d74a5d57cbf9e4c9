"""Every merge method alloy shares with mergekit 0.1.5, timed against mergekit side by side.

    .venv/bin/python benchmarks/bench_catalogue.py [--root /tmp/alloy-catalogue] [--methods linear,ties]
                                                  [--rounds 2] [--out benchmarks/CATALOGUE.md]

Family (generated once under --root, reused): Llama hidden 1024, intermediate 2816, 6 layers, vocab 16000, bf16
(~220 MB per model); a base and three fine-tunes (base + seeded N(0, 0.002) noise). Methods that take several models
get the three fine-tunes; those that take exactly two inputs (slerp, nearswap, arcee_fusion: base + one fine-tune)
get two, and nuslerp (exactly two non-base models) gets two fine-tunes and the base.

Per method: the inputs are read once (page cache warm), then --rounds rounds, each running alloy and mergekit as
separate processes (the order alternates from round to round); wall seconds and peak RSS come from each process's
rusage (bench_merge's timer). Figures are medians over the rounds. The two outputs of the last round are compared:
tensor names and the largest absolute difference (in bf16, compared in float32). A method that fails in either tool
is recorded with the first error line rather than stopping the run.

The timer, the page-cache warm-up and the family writer are bench_merge's and tests/merging/family.py's.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_merge  # noqa: E402  (also puts tests/merging on sys.path)
from family import llama_shapes, write_model  # noqa: E402

LAYERS = 6
FAMILY_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
              "intermediate_size": 2816, "num_hidden_layers": LAYERS, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 16000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0, "torch_dtype": "bfloat16"}
FINETUNES = ("ft0", "ft1", "ft2")


def _models(f, keys, **params):
    return [{"model": f[k], "parameters": dict(params)} if params else {"model": f[k]} for k in keys]


def _ta(method, lam=None, **per_model):
    """A task-arithmetic-family config: the base and the three fine-tunes, weight 1.0 and per_model each."""
    def cfg(f):
        c = {"merge_method": method, "base_model": f["base"], "dtype": "bfloat16",
             "models": _models(f, FINETUNES, weight=1.0, **per_model)}
        if lam is not None:
            c["parameters"] = {"lambda": lam}
        return c
    return cfg


# name -> (config builder, short description of the inputs and parameters)
METHODS = {
    "linear": (lambda f: {"merge_method": "linear", "dtype": "bfloat16", "models": _models(f, FINETUNES, weight=1.0)},
               "3 ft, weight 1.0"),
    "slerp": (lambda f: {"merge_method": "slerp", "base_model": f["base"], "dtype": "bfloat16", "parameters": {"t": 0.5},
                         "slices": [{"sources": [{"model": f["base"], "layer_range": [0, LAYERS]},
                                                 {"model": f["ft0"], "layer_range": [0, LAYERS]}]}]},
              "base + ft0, t 0.5"),
    "nuslerp": (lambda f: {"merge_method": "nuslerp", "base_model": f["base"], "dtype": "bfloat16",
                           "models": _models(f, ("ft0", "ft1"), weight=1.0)},
                "base + 2 ft, weight 1.0"),
    "multislerp": (lambda f: {"merge_method": "multislerp", "base_model": f["base"], "dtype": "bfloat16",
                              "models": _models(f, FINETUNES, weight=1.0)},
                   "base + 3 ft, weight 1.0"),
    "karcher": (lambda f: {"merge_method": "karcher", "dtype": "bfloat16", "models": _models(f, FINETUNES)},
                "3 ft"),
    "task_arithmetic": (_ta("task_arithmetic", lam=0.5), "base + 3 ft, weight 1.0, lambda 0.5"),
    "ties": (_ta("ties", density=0.5), "base + 3 ft, weight 1.0, density 0.5"),
    "dare_linear": (_ta("dare_linear", lam=0.5, density=0.5), "base + 3 ft, weight 1.0, density 0.5, lambda 0.5"),
    "dare_ties": (_ta("dare_ties", density=0.5), "base + 3 ft, weight 1.0, density 0.5"),
    "breadcrumbs": (_ta("breadcrumbs", lam=0.5, density=0.5, gamma=0.01),
                    "base + 3 ft, weight 1.0, density 0.5, gamma 0.01, lambda 0.5"),
    "breadcrumbs_ties": (_ta("breadcrumbs_ties", density=0.5, gamma=0.01),
                         "base + 3 ft, weight 1.0, density 0.5, gamma 0.01"),
    "della": (_ta("della", density=0.5, epsilon=0.1), "base + 3 ft, weight 1.0, density 0.5, epsilon 0.1"),
    "della_linear": (_ta("della_linear", lam=0.5, density=0.5, epsilon=0.1),
                     "base + 3 ft, weight 1.0, density 0.5, epsilon 0.1, lambda 0.5"),
    "model_stock": (lambda f: {"merge_method": "model_stock", "base_model": f["base"], "dtype": "bfloat16",
                               "models": _models(f, FINETUNES)},
                    "base + 3 ft"),
    "sce": (lambda f: {"merge_method": "sce", "base_model": f["base"], "dtype": "bfloat16",
                       "parameters": {"select_topk": 0.5}, "models": _models(f, FINETUNES)},
            "base + 3 ft, select_topk 0.5"),
    "nearswap": (lambda f: {"merge_method": "nearswap", "base_model": f["base"], "dtype": "bfloat16",
                            "parameters": {"t": 0.001}, "models": _models(f, ("base", "ft0"))},
                 "base + ft0, t 0.001"),
    "arcee_fusion": (lambda f: {"merge_method": "arcee_fusion", "base_model": f["base"], "dtype": "bfloat16",
                                "models": _models(f, ("base", "ft0"))},
                     "base + ft0"),
    "passthrough": (lambda f: {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": f["ft0"], "layer_range": [0, 4]}]},
        {"sources": [{"model": f["ft1"], "layer_range": [2, LAYERS]}]}]},
                    "ft0 layers 0-4 + ft1 layers 2-6"),
}


def make_family(root: Path) -> dict[str, str]:
    paths = {k: root / k for k in ("base",) + FINETUNES}
    if all((p / "config.json").exists() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    g = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for n, s in llama_shapes(FAMILY_CFG).items()}
    write_model(paths["base"], base, FAMILY_CFG)
    for k in FINETUNES:
        ft = {n: (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(torch.bfloat16) for n, t in base.items()}
        write_model(paths[k], ft, FAMILY_CFG)
        del ft
    return {k: str(v) for k, v in paths.items()}


def inputs_of(cfg: dict) -> list[str]:
    return sorted({m["model"] for m in cfg.get("models", [])}
                  | {s["model"] for sl in cfg.get("slices", []) for s in sl["sources"]}
                  | ({cfg["base_model"]} if "base_model" in cfg else set()))


def run_timed(cmd: list[str], env: dict) -> tuple[float, float, str | None]:
    """Wall seconds, peak RSS (MB) and None, or (nan, nan, first error line) when the command fails.

    bench_merge.timed raises with only a stderr tail; this runs the same timer and keeps the whole stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats"
        r = subprocess.run([sys.executable, "-c", bench_merge._TIMER, str(stats)] + cmd, capture_output=True,
                           text=True, env=env)
        secs, rss_kb, rc = stats.read_text().split() if stats.exists() else ("nan", "0", str(r.returncode or 1))
    if int(rc) != 0:
        return float("nan"), float("nan"), first_error_line(r.stderr + "\n" + r.stdout, int(rc))
    return float(secs), int(rss_kb) * 1024 / 1e6, None


_ERR = re.compile(r"^\s*(?:[\w.]*(?:Error|Exception)\b|error\b|Error\b|alloy\b[^:]*: error\b)", re.IGNORECASE)


def first_error_line(text: str, rc: int) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hits = [ln for ln in lines if _ERR.match(ln) and not ln.startswith(("Traceback", "File "))]
    line = hits[0] if hits else (lines[-1] if lines else f"exit status {rc}")
    return line[:160]


def compare(out_a: Path, out_m: Path) -> tuple[str, str]:
    """('yes'/'no: ...', max abs diff) of two output folders' tensors."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, tuple[Path, str]]:
        found = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for n in fh.keys():
                    found[n] = f
        return found

    a, m = tensors(out_a), tensors(out_m)
    if not a or not m:
        return "n/a", "n/a"
    only_a, only_m = sorted(set(a) - set(m)), sorted(set(m) - set(a))
    same = "yes" if not only_a and not only_m else f"no ({len(only_a)} only alloy, {len(only_m)} only mergekit)"
    worst, shape_mismatch = 0.0, 0
    handles: dict[Path, object] = {}
    try:
        for n in sorted(set(a) & set(m)):
            for f in (a[n], m[n]):
                if f not in handles:
                    handles[f] = safe_open(str(f), "pt").__enter__()
            ta, tm = handles[a[n]].get_tensor(n), handles[m[n]].get_tensor(n)
            if ta.shape != tm.shape:
                shape_mismatch += 1
                continue
            d = (ta.float() - tm.float()).abs().max().item() if ta.numel() else 0.0
            worst = d if d != d or d > worst else worst  # NaN sticks
            if worst != worst:
                break
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    diff = f"{worst:.3g}"
    if shape_mismatch:
        diff += f" ({shape_mismatch} shape mismatches)"
    return same, diff


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/alloy-catalogue")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "CATALOGUE.md"))
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fam = make_family(root / "family")
    print(f"family ready in {time.perf_counter() - t0:.1f} s", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))  # this checkout's alloy
    bin_dir = Path(sys.executable).parent
    alloy = ([str(bin_dir / "alloy")] if (bin_dir / "alloy").exists() else [sys.executable, "-m", "alloy"])
    mergekit = ([str(bin_dir / "mergekit-yaml")] if (bin_dir / "mergekit-yaml").exists()
                else [sys.executable, "-m", "mergekit.scripts.run_yaml"])
    load_before = os.getloadavg()
    rows = []
    for name in args.methods.split(","):
        build, desc = METHODS[name]
        cfg = build(fam)
        cfg_path = root / f"{name}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out_a, out_m = root / f"out-alloy-{name}", root / f"out-mk-{name}"
        cmds = {"alloy": alloy + ["merge", str(cfg_path), str(out_a), "--random-seed", "0", "--no-progress"],
                "mergekit": mergekit + [str(cfg_path), str(out_m), "--random-seed", "0", "--no-copy-tokenizer",
                                        "--quiet"]}
        outs = {"alloy": out_a, "mergekit": out_m}
        runs: dict[str, list] = {"alloy": [], "mergekit": []}
        errors: dict[str, str] = {}
        bench_merge.warm(inputs_of(cfg))
        for rnd in range(args.rounds):
            order = ("alloy", "mergekit") if rnd % 2 == 0 else ("mergekit", "alloy")
            for tool in order:
                if tool in errors:
                    continue  # a failure repeats; record it once
                shutil.rmtree(outs[tool], ignore_errors=True)
                secs, rss, err = run_timed(cmds[tool], env)
                if err:
                    errors[tool] = err
                    print(f"{name} round {rnd + 1}: {tool} FAILED: {err}", flush=True)
                else:
                    runs[tool].append((secs, rss))
                    print(f"{name} round {rnd + 1}: {tool} {secs:.2f} s {rss:.0f} MB", flush=True)
        same, diff = compare(out_a, out_m) if not errors else ("n/a", "n/a")
        for o in (out_a, out_m):
            shutil.rmtree(o, ignore_errors=True)

        def fig(tool):
            r = runs[tool]
            return (median(x[0] for x in r), median(x[1] for x in r)) if r else (float("nan"), float("nan"))

        (a_s, a_mb), (m_s, m_mb) = fig("alloy"), fig("mergekit")
        rows.append(dict(name=name, desc=desc, a_s=a_s, a_mb=a_mb, m_s=m_s, m_mb=m_mb, same=same, diff=diff,
                         runs={k: [f"{x[0]:.1f}" for x in v] for k, v in runs.items()}, errors=errors))
        print(f"{name}: alloy {a_s:.2f} s {a_mb:.0f} MB | mergekit {m_s:.2f} s {m_mb:.0f} MB | names {same} | "
              f"max|diff| {diff}", flush=True)

    def num(x, fmt):
        return "—" if x != x else format(x, fmt)

    def ratio(m, a):
        return "—" if m != m or a != a or a == 0 else f"{m / a:.2f}x"

    lines = [
        "| method | inputs, parameters | alloy s | mergekit s | time ratio (mergekit/alloy) | alloy peak RSS MB "
        "| mergekit peak RSS MB | memory ratio (mergekit/alloy) | same tensor names | max abs diff (bf16) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "; ".join(f"{k}: {v}" for k, v in r["errors"].items()).replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['desc']} | {num(r['a_s'], '.2f')} | {num(r['m_s'], '.2f')} | "
                     f"{ratio(r['m_s'], r['a_s'])} | {num(r['a_mb'], '.0f')} | {num(r['m_mb'], '.0f')} | "
                     f"{ratio(r['m_mb'], r['a_mb'])} | {r['same']} | {r['diff']} | {err} |")
    table = "\n".join(lines)
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import importlib.metadata as md
        mk_version = md.version("mergekit")
    except Exception:  # noqa: BLE001
        mk_version = "?"
    header = [
        f"# Catalogue benchmark: alloy vs mergekit {mk_version}, every shared merge method", "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit[:70]}.", "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {ram_gb:.0f} GiB RAM, CPU only; torch {torch.__version__}, "
        f"Python {platform.python_version()}. Load average (1 min) {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (other work may have run beside it).", "",
        "Family: synthetic Llama, hidden 1024, intermediate 2816, 6 layers, vocab 16000, untied, bf16, one shard "
        "(~220 MB per model); a base and three fine-tunes (base + seeded N(0, 0.002) noise).", "",
        f"Each method: inputs read once (page cache warm), then {args.rounds} rounds alternating alloy and mergekit "
        "(order swapped each round), each a separate process: `alloy merge cfg.yml out --random-seed 0` against "
        "`mergekit-yaml cfg.yml out --random-seed 0 --no-copy-tokenizer --quiet`, both on CPU with their default "
        "threads and shard sizes. Wall seconds (including start-up: importing torch, planning) and peak RSS "
        "(rusage ru_maxrss, MB = 10^6 bytes) are medians over the rounds. Ratios above 1 mean alloy is faster / "
        "lighter. The last round's two outputs are compared tensor by tensor. Expected differences: DARE/DELLA "
        "draw random masks differently by design (alloy seeds per tensor); mergekit's arcee_fusion samples its "
        "quantiles at random; ties/breadcrumbs/sce differ only in which elements tied at the magnitude threshold "
        "are kept (alloy's default `--tie-break index`; with `--tie-break torch` ties and sce were checked "
        "bit-identical); model_stock differs by bf16 rounding.", "",
        "Rerun: `.venv/bin/python benchmarks/bench_catalogue.py` (options: `--methods linear,ties`, `--rounds N`, "
        "`--root /tmp/alloy-catalogue`, `--out benchmarks/CATALOGUE.md`). The family is generated under `--root` "
        "once and reused.", "",
    ]
    text = "\n".join(header) + "\n" + table + "\n"
    print("\n" + text, flush=True)
    Path(args.out).write_text(text)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
