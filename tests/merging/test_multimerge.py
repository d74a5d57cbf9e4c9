"""Recipes that merge each other's outputs (mergekit-multi's YAML), against mergekit-multi and against the same
merges run one by one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merging.engine import run_merge
from merging.errors import ConfigError
from merging.multimerge import load_recipes, run_multimerge
from test_parity import assert_same, load_dir
from family import write_cfg


def _docs(fam: dict[str, Path], final_t: float = 0.4) -> list[dict]:
    # listed final first: the order comes from the references, not from the file
    return [
        {"merge_method": "slerp", "base_model": "soup", "dtype": "float32", "parameters": {"t": final_t},
         "models": [{"model": "soup"}, {"model": "tuned"}]},
        {"name": "soup", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": str(fam["ft0"]), "parameters": {"weight": 1.0}},
                    {"model": str(fam["ft1"]), "parameters": {"weight": 2.0}}]},
        {"name": "tuned", "merge_method": "ties", "base_model": str(fam["base"]), "dtype": "float32",
         "parameters": {"density": 0.5, "weight": 1.0},
         "models": [{"model": str(fam["ft1"])}, {"model": "soup"}]},
    ]


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_recipes_merge_in_order_as_one_by_one(family_fp32, tmp_path):
    file = _write(tmp_path / "multi.yml", _docs(family_fp32))
    assert [r.name for r in load_recipes(file)] == ["soup", "tuned", None]
    steps = run_multimerge(file, tmp_path / "inter", tmp_path / "final", progress=False, copy_tokenizer=False)
    assert [s.action for s in steps] == ["merge", "merge", "merge"]
    # by hand: each recipe with the earlier outputs' folders in place of their names
    soup, tuned, final = (tmp_path / "hand" / n for n in ("soup", "tuned", "final"))
    docs = _docs(family_fp32)
    for doc, out in ((docs[1], soup), (docs[2], tuned), (docs[0], final)):
        text = yaml.safe_dump({k: v for k, v in doc.items() if k != "name"})
        for name, folder in (("soup", soup), ("tuned", tuned)):
            text = text.replace(f"model: {name}\n", f"model: {folder}\n").replace(f"base_model: {name}\n",
                                                                                f"base_model: {folder}\n")
        run_merge(write_cfg(tmp_path, yaml.safe_load(text), f"{out.name}.yml"), out, progress=False,
                  copy_tokenizer=False)
    for name, out in (("inter/soup", soup), ("inter/tuned", tuned), ("final", final)):
        ours, theirs = load_dir(tmp_path / name), load_dir(out)
        assert set(ours) == set(theirs)
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), (name, k)


def test_same_numbers_as_mergekit_multi(family_fp32, tmp_path):
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main as mergekit_multi

    file = _write(tmp_path / "multi.yml", _docs(family_fp32))
    run_multimerge(file, tmp_path / "inter", tmp_path / "ours", progress=False, copy_tokenizer=False,
                   tie_break="torch")
    res = CliRunner().invoke(mergekit_multi, [str(file), "-I", str(tmp_path / "mk_inter"), "--out-path",
                                              str(tmp_path / "theirs"), "--no-copy-tokenizer", "--quiet"])
    assert res.exit_code == 0, res.output
    assert_same(load_dir(tmp_path / "ours"), load_dir(tmp_path / "theirs"), torch.float32)
    assert_same(load_dir(tmp_path / "inter" / "tuned"), load_dir(tmp_path / "mk_inter" / "tuned"), torch.float32)


def test_lazy_keeps_what_is_merged_and_refuses_a_stale_output(family_fp32, tmp_path):
    file = _write(tmp_path / "multi.yml", _docs(family_fp32))
    kw = dict(progress=False, copy_tokenizer=False)
    run_multimerge(file, tmp_path / "inter", tmp_path / "final", **kw)
    stamp = (tmp_path / "inter" / "soup" / "model.safetensors").stat().st_mtime_ns
    # the final merge changed: the named ones are kept, and the final one needs --overwrite
    _write(file, _docs(family_fp32, final_t=0.6))
    with pytest.raises(ConfigError, match=r"final merge's output exists \(it was merged from another version of its "
                                          r"config\); pass --overwrite"):
        run_multimerge(file, tmp_path / "inter", tmp_path / "final", **kw)
    steps = run_multimerge(file, tmp_path / "inter", tmp_path / "final", overwrite=True, **kw)
    assert [s.action for s in steps] == ["skip", "skip", "remerge"]
    assert (tmp_path / "inter" / "soup" / "model.safetensors").stat().st_mtime_ns == stamp
    # a named recipe edited since its output was written is merged again (not silently reused, as mergekit-multi
    # does), and so is what builds on it
    docs = _docs(family_fp32, final_t=0.6)
    docs[1]["models"][1]["parameters"]["weight"] = 3.0
    _write(file, docs)
    with pytest.raises(ConfigError, match=r"its input soup is merged again\); pass --overwrite"):
        run_multimerge(file, tmp_path / "inter", tmp_path / "final", **kw)
    steps = run_multimerge(file, tmp_path / "inter", tmp_path / "final", overwrite=True, **kw)
    assert [(s.action, s.why) for s in steps] == [
        ("remerge", "it was merged from another version of its config"), ("remerge", "its input soup is merged again"),
        ("remerge", "its input soup is merged again")]
    a, b = (load_dir(family_fp32[k]) for k in ("ft0", "ft1"))
    soup = load_dir(tmp_path / "inter" / "soup")
    torch.testing.assert_close(soup["model.norm.weight"], (a["model.norm.weight"] + 3 * b["model.norm.weight"]) / 4)
    assert [s.action for s in run_multimerge(file, tmp_path / "inter", tmp_path / "final", **kw)] == ["skip"] * 3
    steps = run_multimerge(file, tmp_path / "inter", tmp_path / "final", lazy=False, overwrite=True, **kw)
    assert [s.action for s in steps] == ["remerge"] * 3


@pytest.mark.parametrize("docs,message", [
    ([{"name": "a", "merge_method": "linear", "models": [{"model": "b"}]},
      {"name": "b", "merge_method": "linear", "models": [{"model": "a"}]}], "in a circle: a -> b -> a"),
    ([{"name": "a", "merge_method": "linear", "models": [{"model": "x"}]},
      {"name": "a", "merge_method": "linear", "models": [{"model": "y"}]}], "document 2: name: 'a' is used twice"),
    ([{"merge_method": "linear", "models": [{"model": "x"}]},
      {"merge_method": "linear", "models": [{"model": "y"}]}], "document 2: a second document without a name"),
    ([{"name": "a", "merge_method": "linear", "models": [{"model": "x"}]},
      {"name": "b", "merge_method": "linaer", "models": [{"model": "a"}]}], "document 2 (b): "),
    ([{"name": "../up", "merge_method": "linear", "models": [{"model": "x"}]}], "is not a folder name"),
])
def test_bad_files_are_refused_before_anything_is_merged(tmp_path, docs, message):
    file = _write(tmp_path / "multi.yml", docs)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_multimerge(file, tmp_path / "inter", tmp_path / "final")
    assert not (tmp_path / "inter").exists()


def test_final_merge_needs_an_out_path_and_a_foreign_folder_is_kept(family_fp32, tmp_path):
    file = _write(tmp_path / "multi.yml", _docs(family_fp32))
    with pytest.raises(ConfigError, match="--out-path"):
        run_multimerge(file, tmp_path / "inter")
    (tmp_path / "inter" / "tuned").mkdir(parents=True)
    (tmp_path / "inter" / "tuned" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"inter/tuned: exists, and is not an alloy merge output"):
        run_multimerge(file, tmp_path / "inter", tmp_path / "final", progress=False)
    assert (tmp_path / "inter" / "tuned" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "inter" / "soup").exists()  # refused before the first merge


def test_command_line(family_fp32, tmp_path):
    file = _write(tmp_path / "multi.yml", _docs(family_fp32))
    cmd = [sys.executable, "-m", "alloy", "multimerge", str(file), "-I", str(tmp_path / "inter"), "--out-path",
           str(tmp_path / "final"), "--no-copy-tokenizer"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "soup: merged" in r.stdout and (tmp_path / "final" / "model.safetensors").exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("kept") == 3, r.stdout
    r = subprocess.run(cmd[:-3], capture_output=True, text=True)  # no --out-path
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--out-path" in r.stderr, r.stderr


def test_a_killed_run_resumes_the_recipe_it_was_merging(family_fp32, tmp_path):
    """kill -9 while the second recipe is half written, then the same command again: the first recipe is kept, the
    second continues from its verified shards, and every output is byte-identical to an uninterrupted run."""
    from test_reliability import _kill_after_shards

    file = _write(tmp_path / "multi.yml", _docs(family_fp32))
    run_multimerge(file, tmp_path / "ref", tmp_path / "ref_final", progress=False, copy_tokenizer=False,
                   shard_size=20_000)
    cmd = [sys.executable, "-m", "alloy", "multimerge", str(file), "-I", str(tmp_path / "inter"), "--out-path",
           str(tmp_path / "final"), "--no-copy-tokenizer", "--shard-size", "20KB"]
    partial = tmp_path / "inter" / ".tuned.alloy-partial"
    _kill_after_shards(cmd, partial, 2)
    kept = sorted(json.loads((partial / "alloy_journal.json").read_text())["shards"])
    stamps = {f: (partial / f).stat().st_mtime_ns for f in kept}
    assert (tmp_path / "inter" / "soup").exists() and not (tmp_path / "inter" / "tuned").exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "soup: already merged" in r.stderr and "tuned: resuming into" in r.stderr
    assert all((tmp_path / "inter" / "tuned" / f).stat().st_mtime_ns == stamps[f] for f in kept)
    for ours, ref in (("inter/soup", "ref/soup"), ("inter/tuned", "ref/tuned"), ("final", "ref_final")):
        files = sorted(p.name for p in (tmp_path / ref).iterdir())
        assert sorted(p.name for p in (tmp_path / ours).iterdir()) == files
        for f in files:
            assert (tmp_path / ours / f).read_bytes() == (tmp_path / ref / f).read_bytes(), (ours, f)
