"""The tiny from-scratch family: loadable HF checkpoints, deterministic bytes, specialists that moved."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alloy.demo import tiny
from merging.errors import ConfigError, OutputError

MICRO = tiny.TinySize(hidden=32, layers=1, heads=2, intermediate=64, batch_size=8)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path) -> None:
    kw = dict(base_steps=6, specialist_steps=4, skills=("facts", "addition"), size=MICRO, n_eval=10)
    a = tiny.build_tiny_family(tmp_path / "a", seed=3, **kw)
    b = tiny.build_tiny_family(tmp_path / "b", seed=3, **kw)
    c = tiny.build_tiny_family(tmp_path / "c", seed=4, **kw)
    fa, fb, fc = _files(a["root"]), _files(b["root"]), _files(c["root"])
    assert fa.keys() == fb.keys()
    assert {"base/model.safetensors", "base/config.json", "base/tokenizer.json", "base/generation_config.json",
            "facts/model.safetensors", "addition/model.safetensors", "data/facts.jsonl", "family.json"} <= set(fa)
    for name in fa:
        assert fa[name] == fb[name], name
    assert fa["base/model.safetensors"] != fc["base/model.safetensors"]
    assert a["specialists"] == {"facts": a["root"] / "facts", "addition": a["root"] / "addition"}
    assert a["data_files"]["facts"] == a["root"] / "data" / "facts.jsonl"
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary build folders are gone


def test_checkpoint_loads_with_auto_classes_and_generates(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = tiny.build_tiny_family(tmp_path / "f", base_steps=2, specialist_steps=1, skills=("words",), size=MICRO)
    tok = AutoTokenizer.from_pretrained(fam["base"])
    text = "Q: What is 123 + 456?\nA: 579"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    model = AutoModelForCausalLM.from_pretrained(fam["specialists"]["words"], dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, len(ids) + 3)


def test_refuses_bad_skill_and_existing_output(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'spelling'"):
        tiny.build_tiny_family(tmp_path / "x", skills=("spelling",), size=MICRO)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="full"):
        tiny.build_tiny_family(tmp_path / "full", base_steps=1, specialist_steps=1, size=MICRO)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_base_corpus_avoids_the_specialist_skills() -> None:
    from alloy.demo import skills

    texts = tiny.base_texts(2000, seed=0)
    joined = "\n".join(texts)
    assert not any(name in joined for name in skills.FACTS)
    assert skills.LANGUAGE not in joined
    assert not any(len(n) == 3 for t in texts for n in t.split("What is ")[-1].rstrip("?").split(" + ") if n.isdigit())


def test_shared_family_specialists_moved_away_from_base(tiny_family) -> None:
    base = load_file(tiny_family.base / "model.safetensors")
    info = json.loads((tiny_family.root / "family.json").read_text())
    assert set(tiny_family.specialists) == set(info["skills"]) == {"facts", "words", "addition"}
    deltas = {}
    for skill, path in tiny_family.specialists.items():
        spec = load_file(path / "model.safetensors")
        assert spec.keys() == base.keys()
        deltas[skill] = torch.cat([(spec[k] - base[k]).flatten() for k in sorted(base)])
        assert deltas[skill].norm() > 0.01 * torch.cat([v.flatten() for v in base.values()]).norm()
    # Different skills pull in different directions: the task vectors are far from parallel.
    cos = torch.nn.functional.cosine_similarity(deltas["facts"], deltas["addition"], dim=0)
    assert cos < 0.9
    assert (tiny_family.data_dir / "facts.jsonl").is_file()
