"""inspect: related fine-tunes agree (high cosine, few sign conflicts); unrelated ones conflict near chance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from merging.inspect import inspect_merge


def _variant(src: Path, dst: Path, base: Path, *, mix: float, seed: int) -> Path:
    """dst = base + mix * (src - base) + (1 - mix) * fresh noise: mix near 1 makes a 'same skill' sibling."""
    import shutil

    shutil.copytree(src, dst)
    b, s = load_file(base / "model.safetensors"), load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in s.items():
        d = v - b[k]
        out[k] = b[k] + mix * d + (1 - mix) * d.std() * torch.randn(d.shape, generator=g)
    save_file(out, str(dst / "model.safetensors"))
    return dst


def test_same_skill_siblings_conflict_less_than_unrelated(family_fp32, tmp_path):
    sib = _variant(family_fp32["ft0"], tmp_path / "sib", family_fp32["base"], mix=0.9, seed=5)
    cfg = {"merge_method": "ties", "base_model": str(family_fp32["base"]), "parameters": {"density": 0.5, "weight": 1.0},
           "models": [{"model": str(family_fp32["ft0"])}, {"model": str(sib)}, {"model": str(family_fp32["ft1"])}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    rep = inspect_merge(tmp_path / "c.yml")
    pairs = rep["overall"]["pairs"]
    same = pairs[f"{family_fp32['ft0']} | {sib}"]
    other = pairs[f"{family_fp32['ft0']} | {family_fp32['ft1']}"]
    assert same["cosine"] > 0.8 and abs(other["cosine"]) < 0.1
    assert same["sign_conflict"] < 0.2 < 0.4 < other["sign_conflict"]
    for m in rep["overall"]["models"].values():
        assert 0 < m["trimmed_energy"] < 0.5  # trimming half the entries by magnitude removes far less than half the energy
        assert 0.3 < m["survives_ties"] <= 1.0
    assert set(rep["layers"]) == {"0", "1", "2"}

    r = subprocess.run([sys.executable, "-m", "alloy", "inspect", str(tmp_path / "c.yml"), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "sign conflict" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["overall"]["pairs"].keys() == pairs.keys()
