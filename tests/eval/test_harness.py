"""eval.harness through real lm-eval on the tiny family: real scores, the cache, the bundled task YAMLs, the CLI."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import yaml

from eval import harness
from eval import skills as bundled
from merging.errors import InputError

LIMIT = 40  # prompts per task: 0.25 (chance) vs 0.5 is over 3 standard errors apart at this size


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def scores(tiny_family, cache_dir):
    """Base and facts specialist on the facts skill (both ways) and held-out perplexity, timed."""
    out = {}
    for name, path in (("base", tiny_family.base), ("facts", tiny_family.specialists["facts"])):
        t0 = time.perf_counter()
        out[name] = harness.evaluate_detailed(path, ["facts_mc", "facts_em", "heldout_ppl"], limit=LIMIT,
                                              data_dir=tiny_family.data_dir, cache_dir=cache_dir)  # fmt: skip
        out[name]["wall"] = time.perf_counter() - t0
    return out


def test_specialist_clearly_above_chance_and_base_not(scores) -> None:
    base, spec = scores["base"]["scores"], scores["facts"]["scores"]
    assert spec["facts_mc"]["acc"] >= 0.5, spec
    assert base["facts_mc"]["acc"] <= 0.4, base
    assert spec["facts_mc"]["acc"] - base["facts_mc"]["acc"] >= 0.25
    # Exact match is harder; it must still move from the base's guessing (1 colour in 8) upwards.
    assert spec["facts_em"]["exact_match"] > base["facts_em"]["exact_match"]
    for s in (base, spec):
        assert set(s) == {"facts_mc", "facts_em", "heldout_ppl"}
        assert 0.0 <= s["facts_mc"]["acc_norm"] <= 1.0
        ppl = s["heldout_ppl"]
        assert math.isfinite(ppl["word_perplexity"]) and ppl["word_perplexity"] > 1.0
        assert 0.0 < ppl["bits_per_byte"] < 7.0  # below uniform over the character set
    assert spec["heldout_ppl"]["word_perplexity"] != base["heldout_ppl"]["word_perplexity"]
    assert scores["base"]["cached"] == []


def test_second_call_is_served_from_cache(tiny_family, cache_dir, scores, monkeypatch) -> None:
    import lm_eval

    def boom(*a, **k):
        raise AssertionError("lm-eval ran again for cached tasks")

    monkeypatch.setattr(lm_eval, "simple_evaluate", boom)
    # A byte-identical copy elsewhere shares the entries: the key is the content hash, not the path.
    copy = cache_dir.parent / "facts-copy"
    shutil.copytree(tiny_family.specialists["facts"], copy, dirs_exist_ok=True)
    t0 = time.perf_counter()
    again = harness.evaluate_detailed(copy, ["facts_em", "facts_mc"], limit=LIMIT, data_dir=tiny_family.data_dir,
                                      cache_dir=cache_dir)  # fmt: skip
    assert time.perf_counter() - t0 < 5.0
    assert again["cached"] == ["facts_em", "facts_mc"]
    assert again["scores"]["facts_mc"] == scores["facts"]["scores"]["facts_mc"]
    assert again["model_hash"] == scores["facts"]["model_hash"] != scores["base"]["model_hash"]
    # Another limit or other data is another key: it would run (and here, hit the patched lm-eval).
    with pytest.raises(AssertionError, match="ran again"):
        harness.evaluate(copy, ["facts_mc"], limit=LIMIT - 1, data_dir=tiny_family.data_dir, cache_dir=cache_dir)


def test_task_yamls_point_at_the_data(tiny_family, tmp_path) -> None:
    out = bundled.write_task_yamls(tiny_family.data_dir, tmp_path / "tasks")
    names = sorted(p.stem for p in out.glob("*.yaml"))
    assert names == sorted(bundled.BUNDLED_TASKS)
    em = yaml.safe_load((out / "addition_em.yaml").read_text())
    assert em["output_type"] == "generate_until"
    assert em["dataset_kwargs"]["data_files"]["test"] == str((tiny_family.data_dir / "addition.jsonl").resolve())
    assert em["generation_kwargs"]["until"] == ["\n"] and not em["generation_kwargs"]["do_sample"]
    mc = yaml.safe_load((out / "words_mc.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and mc["doc_to_choice"] == "{{choices}}"
    ppl = yaml.safe_load((out / "heldout_ppl.yaml").read_text())
    assert ppl["output_type"] == "loglikelihood_rolling"
    assert bundled.expand_tasks(["skills_mc", "facts_mc", "hellaswag"]) == ["facts_mc", "words_mc", "addition_mc",
                                                                           "hellaswag"]  # fmt: skip


def test_bad_inputs_name_the_culprit(tiny_family, tmp_path, cache_dir) -> None:
    with pytest.raises(InputError, match="no config.json"):
        harness.evaluate(tmp_path, ["facts_mc"], cache_dir=cache_dir)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weight files"):
        harness.evaluate(tmp_path, ["facts_mc"], data_dir=tiny_family.data_dir, cache_dir=cache_dir)
    empty = tmp_path / "nodata"
    empty.mkdir()
    with pytest.raises(InputError, match=r"facts\.jsonl"):
        harness.evaluate(tiny_family.base, ["facts_mc"], data_dir=empty, cache_dir=cache_dir)
    with pytest.raises(InputError, match="heldout.jsonl"):
        bundled.write_task_yamls(empty, tmp_path / "t", ["heldout_ppl"])
    with pytest.raises(InputError, match="limit"):
        harness.evaluate(tiny_family.base, ["facts_mc"], limit=0, cache_dir=cache_dir)


def test_cli_compares_with_parents_and_writes_json(tiny_family, cache_dir, scores, tmp_path, capsys) -> None:
    from alloy.cli import main

    out = tmp_path / "res.json"
    spec, base = tiny_family.specialists["facts"], tiny_family.base
    rc = main(["eval", str(spec), "--tasks", "facts_mc,facts_em", "--limit", str(LIMIT), "--data-dir",
               str(tiny_family.data_dir), "--cache-dir", str(cache_dir), "--parents", str(base), str(spec),
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["cached"] == ["facts_mc", "facts_em"]
    rows = {r["task"]: r for r in doc["comparison"]}
    mc = rows["facts_mc"]
    assert mc["best_parent"] == "facts" and mc["vs_best"] == 0.0
    want_mean = (scores["base"]["scores"]["facts_mc"]["acc"] + scores["facts"]["scores"]["facts_mc"]["acc"]) / 2
    assert mc["mean_parents"] == pytest.approx(want_mean)
    assert set(doc["parents"]) == {"base", "facts"}
    printed = capsys.readouterr().out
    assert "facts_mc" in printed and "best parent" in printed
