"""The engine's kernel path (what --device cuda runs) gives the torch path's output, checked under the Triton
interpreter in a subprocess so TRITON_INTERPRET=1 is set before triton is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

SCRIPT = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from merging.engine import run_merge
cfg, out = Path(sys.argv[1]), Path(sys.argv[2])
run_merge(cfg, out / "torch", progress=False, seed=5)
run_merge(cfg, out / "kernel", progress=False, seed=5, kernels=True)
a, b = load_file(out / "torch" / "model.safetensors"), load_file(out / "kernel" / "model.safetensors")
worst = 0.0
for k in a:
    d = (a[k].float() - b[k].float()).abs().max().item() / max(a[k].float().abs().max().item(), 1e-12)
    worst = max(worst, d)
print("WORST", worst)
"""


def _run(tmp_path: Path, cfg: dict) -> float:
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "c.yml"), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return float(r.stdout.split("WORST")[1])


def test_engine_kernel_path_matches_torch_path(tmp_path):
    from family import make_family

    fam = make_family(tmp_path / "fam", layers=1, hidden=16, n_finetunes=2)
    cfg = {"merge_method": "ties", "base_model": str(fam["base"]), "models": [
        {"model": str(fam["ft0"]), "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": str(fam["ft1"]), "parameters": {"weight": 0.6, "density": 0.7}}]}
    assert _run(tmp_path, cfg) < 1e-6
