"""The synthetic skills: deterministic, well-formed, and with eval held out from training where the skill allows."""

from __future__ import annotations

import re

import pytest

from alloy.demo import skills
from merging.errors import AlloyError


@pytest.mark.parametrize("skill", skills.SKILLS)
@pytest.mark.parametrize("split", skills.SPLITS)
def test_examples_are_well_formed(skill: str, split: str) -> None:
    rows = skills.make_examples(skill, split, 50, seed=3)
    assert len(rows) == 50
    for r in rows:
        assert len(r["choices"]) == skills.N_CHOICES == len(set(r["choices"]))
        assert r["choices"][r["label"]] == r["answer"]
        assert r["prompt"] == f"Q: {r['question']}\nA:"
        assert r["text"] == r["prompt"] + " " + r["answer"]
    # Labels spread over positions: a model that always picks one slot must not score well.
    assert len({r["label"] for r in rows}) == skills.N_CHOICES


def test_answers_follow_the_tables() -> None:
    for r in skills.make_examples("facts", "eval", 80):
        name = re.search(r"of (\w+)\?|does (\w+) like", r["question"])
        assert name is not None
        assert skills.FACTS[name.group(1) or name.group(2)] == r["answer"]
    for r in skills.make_examples("words", "train", 100):
        word = re.search(r"word for (\w+)\?|say (\w+) in", r["question"])
        assert word is not None
        assert skills.WORDS[word.group(1) or word.group(2)] == r["answer"]
    for r in skills.make_examples("addition", "eval", 100):
        a, b = map(int, re.findall(r"\d+", r["question"]))
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert int(r["answer"]) == a + b


def test_tables_shape() -> None:
    assert len(skills.FACTS) == 40 and len(set(skills.FACTS.values())) == 8
    assert sorted(set(skills.FACTS.values())) == sorted(skills.COLOURS)
    assert len(skills.WORDS) == 40 and len(set(skills.WORDS.values())) == 40
    assert not set(skills.WORDS.values()) & set(skills.WORDS)


def test_addition_splits_are_disjoint_pairs() -> None:
    def pairs(split: str, n: int) -> set[frozenset[int]]:
        rows = skills.make_examples("addition", split, n, seed=1)
        return {frozenset(map(int, re.findall(r"\d+", r["question"]))) for r in rows}

    train, held = pairs("train", 3000), pairs("eval", 300)
    assert len(held) >= 295  # eval prompts are distinct (a pair and its swap may both appear)
    assert not train & held


def test_facts_eval_prompts_are_distinct_and_cover_table() -> None:
    rows = skills.make_examples("facts", "eval", 80)
    assert len({r["question"] for r in rows}) == 80
    with pytest.raises(AlloyError, match="n_eval=81"):
        skills.make_examples("facts", "eval", 81)


def test_bad_arguments_name_the_culprit() -> None:
    with pytest.raises(AlloyError, match="'spelling'"):
        skills.make_examples("spelling", "train", 1)
    with pytest.raises(AlloyError, match="'test'"):
        skills.make_examples("facts", "test", 1)


def test_seeds_change_draws_not_truth() -> None:
    a = skills.make_examples("facts", "eval", 20, seed=0)
    b = skills.make_examples("facts", "eval", 20, seed=1)
    assert [r["question"] for r in a] != [r["question"] for r in b]
    again = skills.make_examples("addition", "train", 20, seed=5)
    assert skills.make_examples("addition", "train", 20, seed=5) == again


def test_write_skill_data_is_byte_deterministic(tmp_path) -> None:
    p1 = skills.write_skill_data(tmp_path / "a", seed=7, n_eval=30)
    p2 = skills.write_skill_data(tmp_path / "b", seed=7, n_eval=30)
    p3 = skills.write_skill_data(tmp_path / "c", seed=8, n_eval=30)
    assert set(p1) == {*skills.SKILLS, *(f"{s}_tune" for s in skills.SKILLS), "heldout", "heldout_jsonl"}
    for key in p1:
        assert p1[key].read_bytes() == p2[key].read_bytes(), key
    assert p1["facts"].read_bytes() != p3["facts"].read_bytes()
    assert len(p1["addition"].read_text().splitlines()) == 30
    assert "Q: " in p1["heldout"].read_text()
