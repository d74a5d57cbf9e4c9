"""Achieved memory bandwidth of the merge kernels on a CUDA GPU, against the GPU's HBM peak.

    python benchmarks/kernels_gpu.py                       # bf16, a 4096 x 14336 matrix, 3 models + base
    python benchmarks/kernels_gpu.py --dtype float32 --rows 8192 --cols 8192 --models 2 --json out.json

For each method in merging.kernels.KERNELS it first checks the kernel on the GPU (small tensors: same bytes as the
torch twin in merging.kernels.reference, and the distance to the registered torch method in ulps), then times:
- the fused pass alone (every input read once, the output written once): GB/s = those bytes / time;
- the whole call (host-side magnitude cuts, DARE's L1 pass, seed draw included);
- the registered torch method on the same GPU, for the speed-up.
The roofline is the HBM peak of the GPU (a table of datasheet figures, or --peak-gbps) and, measured here, a plain
device-to-device copy (torch's `copy_`), which is what a memory-bound kernel can reach in practice.
Exits with a message when no CUDA device is present (or when TRITON_INTERPRET is set: nothing to measure then).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# Datasheet HBM bandwidth, GB/s (10^9 bytes/s), by a substring of torch.cuda.get_device_name().
HBM_PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 80GB
    ("H800", 3350.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
]

CASES = {
    "linear": dict(normalize=True),
    "task_arithmetic": dict(lambda_=0.8),
    "ties": dict(density=0.5),
    "dare_linear": dict(density=0.5),
    "dare_ties": dict(density=0.5),
    "breadcrumbs": dict(density=0.5, gamma=0.01),
    "breadcrumbs_ties": dict(density=0.5, gamma=0.01),
    "slerp": dict(t=0.4),
}


def peak_gbps(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-gbps"
    for key, value in HBM_PEAK_GBPS:
        if key.lower() in name.lower():
            return value, f"datasheet ({key})"
    return None, "unknown GPU: pass --peak-gbps"


def cuda_time(fn, repeat: int, warmup: int = 3) -> float:
    """Median seconds per call, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def make_inputs(shape: tuple[int, ...], models: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).mul_(0.02)
    xs = [(base + torch.randn(shape, generator=g, device="cuda").mul_(0.002)).to(dtype) for _ in range(models)]
    return xs, base.to(dtype)


def call(fn, name: str, xs, base, models: int, seed: int = 0):
    kwargs = dict(CASES[name])
    if name != "slerp":
        kwargs["weight"] = [1.0 / models] * models if name == "linear" else [1.0] * models
    if name.startswith("dare"):
        kwargs["generator"] = torch.Generator(device="cuda").manual_seed(seed)
    if name == "linear":
        return fn(xs, **kwargs)
    if name == "slerp":
        return fn(xs[:1], base, **kwargs)
    return fn(xs, base, **kwargs)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    width = 32 if a.dtype == torch.float32 else 16
    ia, ib = a.view(view).long(), b.view(view).long()
    low = -(1 << (width - 1))
    ia = torch.where(ia < 0, low - ia, ia)
    ib = torch.where(ib < 0, low - ib, ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def check(name: str, dtype: torch.dtype, models: int) -> dict:
    """On small GPU tensors: kernel vs torch twin (bytes) and vs the registered method (ulps; DARE: kept share)."""
    from merging.kernels import KERNELS, reference
    from merging.methods import REGISTRY

    xs, base = make_inputs((257, 1031), models, dtype, seed=1)
    out = call(KERNELS[name], name, xs, base, models)
    ref = call(getattr(reference, name), name, xs, base, models)
    torch_out = call(REGISTRY[name].fn, name, xs, base, models)
    result = {"same_bytes_as_reference": bool(torch.equal(out.view(torch.uint8), ref.view(torch.uint8))),
              "max_ulps_vs_reference": ulps(out, ref)}
    if name.startswith("dare"):
        result["changed_share_kernel"] = float((out != base).float().mean())
        result["changed_share_torch"] = float((torch_out != base).float().mean())
    else:
        result["max_ulps_vs_torch_method"] = ulps(out, torch_out)
    return result


def fused_pass(name: str, xs, base, models: int):
    """The kernel's fused pass with its host-side preparation already done (None for slerp: see below)."""
    from merging.kernels import ops
    from merging.kernels.gta import GtaLaunch

    captured: list[GtaLaunch] = []
    original = GtaLaunch.run

    def capture(self):
        captured.append(self)
        return original(self)

    GtaLaunch.run = capture
    try:
        call(getattr(ops, name), name, xs, base, models)
    finally:
        GtaLaunch.run = original
    launch = captured[-1]
    return launch.run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=14336)
    p.add_argument("--models", type=int, default=3, help="models besides the base (slerp uses 1)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--peak-gbps", type=float, default=None, help="HBM peak of this GPU, GB/s")
    p.add_argument("--methods", nargs="*", default=list(CASES))
    p.add_argument("--no-torch", action="store_true", help="skip timing the torch methods")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels_gpu: TRITON_INTERPRET is set: the kernels would run in the CPU interpreter; unset it")
    if not torch.cuda.is_available():
        sys.exit("kernels_gpu: no CUDA device (torch.cuda.is_available() is False); this benchmark needs an NVIDIA "
                 "GPU and a CUDA build of torch")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from merging.kernels import KERNELS
    from merging.methods import REGISTRY

    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    shape = (args.rows, args.cols)
    n = args.rows * args.cols
    name = torch.cuda.get_device_name()
    peak, peak_src = peak_gbps(name, args.peak_gbps)

    src = torch.empty(n, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src), args.repeat)
    copy_gbps = 2 * n * elem / copy_s / 1e9
    del src, dst

    print(f"device: {name}; torch {torch.__version__}; dtype {args.dtype}; tensor {shape} ({n * elem / 1e6:.1f} MB); "
          f"{args.models} models + base")
    peak_text = f"{peak:.0f} GB/s" if peak else "?"
    print(f"HBM peak: {peak_text} [{peak_src}]; device copy: {copy_gbps:.0f} GB/s")
    header = (f"{'method':17s} {'check':22s} {'fused ms':>9s} {'GB/s':>7s} {'%peak':>6s} {'%copy':>6s} "
              f"{'call ms':>8s} {'torch ms':>9s} {'speedup':>8s}")
    print(header)
    results = {"device": name, "torch": torch.__version__, "dtype": args.dtype, "shape": list(shape),
               "models": args.models, "peak_gbps": peak, "peak_source": peak_src, "copy_gbps": copy_gbps,
               "methods": {}}
    xs, base = make_inputs(shape, args.models, dtype)
    for method in args.methods:
        models = 1 if method == "slerp" else args.models
        checked = check(method, dtype, models)
        ok = checked["same_bytes_as_reference"]
        note = "bytes=ref" if ok else f"ref±{checked['max_ulps_vs_reference']}ulp"
        if "max_ulps_vs_torch_method" in checked:
            note += f" torch±{checked['max_ulps_vs_torch_method']}"
        # minimal traffic of one fused pass: every input once, the output once
        reads = models + (0 if method == "linear" else 1)
        moved = (reads + 1) * n * elem
        if method == "slerp":
            from merging.kernels.slerp import dot_norms

            # slerp's passes: the reduction (reads 2) + the interpolation (reads 2, writes 1)
            fused = fused_pass(method, xs, base, models)
            red_s = cuda_time(lambda: dot_norms(base, xs[0]), args.repeat)
            fused_s = cuda_time(fused, args.repeat) + red_s
            moved = 5 * n * elem
        else:
            fused = fused_pass(method, xs, base, models)
            fused_s = cuda_time(fused, args.repeat)
        call_s = cuda_time(lambda: call(KERNELS[method], method, xs, base, models), args.repeat)
        torch_s = None
        if not args.no_torch:
            try:
                torch_s = cuda_time(lambda: call(REGISTRY[method].fn, method, xs, base, models),
                                    max(3, args.repeat // 4), warmup=1)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        gbps = moved / fused_s / 1e9
        row = {"check": checked, "bytes_fused_pass": moved, "fused_s": fused_s, "gbps": gbps,
               "pct_peak": 100 * gbps / peak if peak else None, "pct_copy": 100 * gbps / copy_gbps,
               "call_s": call_s, "torch_s": torch_s, "speedup_vs_torch": (torch_s / call_s) if torch_s else None}
        results["methods"][method] = row
        pct = f"{row['pct_peak']:.0f}" if peak else "?"
        torch_ms = f"{torch_s * 1e3:.2f}" if torch_s else "-"
        speedup = f"{row['speedup_vs_torch']:.1f}x" if torch_s else "-"
        print(f"{method:17s} {note:22s} {fused_s * 1e3:9.3f} {gbps:7.0f} {pct:>6s} {row['pct_copy']:6.0f} "
              f"{call_s * 1e3:8.2f} {torch_ms:>9s} {speedup:>8s}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"({time.time() - t0:.0f} s)")
    sys.exit(code)
