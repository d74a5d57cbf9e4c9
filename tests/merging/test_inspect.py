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


def _config(tmp_path: Path, fam, method: str = "ties", ft1: Path | None = None) -> Path:
    cfg = {"merge_method": method, "base_model": str(fam["base"]), "parameters": {"density": 0.5, "weight": 1.0},
           "models": [{"model": str(fam["ft0"])}, {"model": str(ft1 or fam["ft1"])}]}
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("alloy: error:") and "\n" not in err, err
    return err


def test_unknown_method_is_refused_as_merge_refuses_it(family_fp32, tmp_path, capsys):
    from alloy.cli import main

    cfg = _config(tmp_path, family_fp32, "tiez")
    assert main(["inspect", str(cfg)]) == 2
    assert _one_line_error(capsys) == "alloy: error: merge_method: unknown method 'tiez' (did you mean 'ties'?)"


def test_report_never_over_the_config_or_into_a_model(family_fp32, tmp_path, capsys, monkeypatch):
    import merging.inspect as mi
    from alloy.cli import main

    cfg = _config(tmp_path, family_fp32)
    text = cfg.read_text()

    def no_work(*a, **k):
        raise AssertionError("inspected before the output was refused")

    monkeypatch.setattr(mi, "inspect_merge", no_work)
    (tmp_path / "a_file").write_text("x")
    for out, said in [(cfg, "is an input of this command"),
                      (family_fp32["ft0"] / "r.json", "lies inside the input model folder"),
                      (family_fp32["base"] / "config.json", "lies inside the input model folder"),
                      (tmp_path, "is a folder"),
                      (tmp_path / "a_file" / "r.json", "is a file, not a folder")]:  # fmt: skip
        assert main(["inspect", str(cfg), "--json", str(out)]) == 2
        assert said in _one_line_error(capsys)
    assert cfg.read_text() == text and not (family_fp32["ft0"] / "r.json").exists()


def test_nan_refused_by_default_or_left_out_with_warn(family_fp32, tmp_path, capsys):
    import shutil

    from alloy.cli import main

    bad = tmp_path / "nan"
    shutil.copytree(family_fp32["ft1"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = sorted(k for k in tensors if ".layers.1." in k and k.endswith("up_proj.weight"))[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    cfg = _config(tmp_path, family_fp32, ft1=bad)
    assert main(["inspect", str(cfg)]) == 2
    err = _one_line_error(capsys)
    assert str(bad) in err and name in err and "--nan-policy warn" in err
    # the option the message names exists, and leaves that tensor out of the statistics
    out = tmp_path / "sub" / "r.json"
    assert main(["inspect", str(cfg), "--nan-policy", "warn", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "left out" in captured.out and name in captured.out
    assert "1 tensor(s) hold NaN/Inf" in captured.err
    report = json.loads(out.read_text())
    assert report["nonfinite"] == [name]
    assert all(v["cosine"] == v["cosine"] for v in report["overall"]["pairs"].values())  # no NaN statistics
