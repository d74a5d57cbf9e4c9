"""params.yaml: the shipped files load, grids expand into checked configs, and every mistake names its key path."""

import itertools
from pathlib import Path

import pytest
import yaml

from alloy.pipeline_params import apply_overrides, expand_candidates, load_params, parse_params
from merging.errors import AlloyError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["params.yaml", "params-tiny.yaml"])
def test_shipped_params_load_and_expand(name):
    raw = yaml.safe_load((ROOT / name).read_text())
    params = load_params(ROOT / name)
    cands = expand_candidates(params)
    want = sum(len(list(itertools.product(*c.get("grid", {}).values()))) or 1 for c in raw["candidates"].values())
    assert len(cands) == want
    assert len({c.name for c in cands}) == len(cands)
    # every model a candidate names exists: the family's members were added
    models = params.all_models()
    assert {p for c in cands for p in c.parents()} <= set(models)
    assert models["facts"].skill == "facts" and models["base"].family == "base"
    assert params.tracking_uri() == f"sqlite:///{ROOT / 'mlflow.db'}"


def test_smol_demo_covers_the_methods_issue_12_asks_for():
    cands = expand_candidates(load_params(ROOT / "params.yaml"))
    methods = [c.method for c in cands]
    assert methods.count("task_arithmetic") >= 3 and "ties" in methods and "dare_ties" in methods
    ta_lambdas = {c.config["parameters"]["lambda"] for c in cands if c.group == "ta"}
    assert len(ta_lambdas) >= 3
    ties = next(c for c in cands if c.method == "ties")
    per_model = {m["model"]: m["parameters"] for m in ties.config["models"]}
    assert len({(p["weight"], p["density"]) for p in per_model.values()}) > 1  # per-model weights and densities


BASE = {
    "models": {"base": {"path": "b"}, "a": {"path": "a"}, "c": {"path": "c"}},
    "candidates": {"ties": {"method": "ties", "base_model": "base", "models": ["a", "c"],
                            "parameters": {"weight": 1.0}, "grid": {"density": [0.3, 0.6], "a.weight": [0.5, 1.0]}}},
}


def test_grid_expansion_names_and_configs():
    cands = expand_candidates(parse_params(BASE))
    assert [c.name for c in cands] == ["ties-density0.3-a_weight0.5", "ties-density0.3-a_weight1",
                                       "ties-density0.6-a_weight0.5", "ties-density0.6-a_weight1"]
    c = cands[1]
    assert c.config["parameters"] == {"weight": 1.0, "density": 0.3}
    assert c.config["models"][0] == {"model": "a", "parameters": {"weight": 1.0}}
    assert c.run_name() == "ties density=0.3 a.weight=1 weight=1"
    assert c.parents() == ["base", "a", "c"]


def test_raw_mergekit_config_candidate():
    data = {**BASE, "candidates": [{"name": "raw", "config": {
        "merge_method": "slerp", "base_model": "a",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "c", "layer_range": [0, 2]}]}],
        "parameters": {"t": 0.5}}}]}
    (c,) = expand_candidates(parse_params(data))
    assert c.method == "slerp" and c.parents() == ["a", "c"]


def err(data) -> str:
    with pytest.raises(AlloyError) as e:
        expand_candidates(parse_params(data, source="params.yaml"))
    return str(e.value)


def test_errors_name_the_key_path():
    assert "params.yaml: candidates.ties.gird: unknown key (did you mean 'grid'?)" in err(
        {**BASE, "candidates": {"ties": {**BASE["candidates"]["ties"], "gird": {}}}})
    assert "eval.limt: unknown key (did you mean 'limit'?)" in err({**BASE, "eval": {"limt": 3}})
    assert "models.a: give exactly one of path, hub, gguf, family" in err(
        {**BASE, "models": {**BASE["models"], "a": {"path": "a", "hub": "x/y"}}})
    assert "candidates.ties.grid.lambda: give at least one value" in err(
        {**BASE, "candidates": {"ties": {**BASE["candidates"]["ties"], "grid": {"lambda": []}}}})
    assert "candidates.ties: model 'zz' is not defined under models" in err(
        {**BASE, "candidates": {"ties": {**BASE["candidates"]["ties"], "models": ["a", "zz"]}}})
    assert "candidates.ties.grid.q.weight: no model 'q'" in err(
        {**BASE, "candidates": {"ties": {**BASE["candidates"]["ties"], "grid": {"q.weight": [1]}}}})
    # the engine's own config check runs at load time, with the candidate named
    msg = err({**BASE, "candidates": {"x": {"method": "ties", "models": ["a"], "dtype": "float8"}}})
    assert msg.startswith("params.yaml: candidates.x") and "float8" in msg
    assert "models.a: lora_revision only applies with lora" in err(
        {**BASE, "models": {**BASE["models"], "a": {"path": "a", "lora_revision": "abc"}}})
    assert "runner.kind" in err({**BASE, "runner": {"kind": "spark"}})
    assert "expected a mapping" in err([1, 2])


def test_overrides_like_dvc_exp_run_set():
    data = apply_overrides(BASE, ["eval.limit=5", "candidates.ties.grid.density=[0.9]", "runner.kind=dask"])
    params = parse_params(data)
    assert params.eval.limit == 5 and params.runner.kind == "dask"
    assert len(expand_candidates(params)) == 2
    assert BASE["candidates"]["ties"]["grid"]["density"] == [0.3, 0.6]  # the original is untouched
    with pytest.raises(AlloyError, match="KEY=VALUE"):
        apply_overrides(BASE, ["eval.limit"])


def test_family_members_become_models():
    params = parse_params({"family": {"kind": "tiny", "out": "fam", "skills": ["facts", "words"], "steps": 5},
                           "candidates": {"ta": {"method": "task_arithmetic", "base_model": "base",
                                                 "models": ["facts", "words"], "parameters": {"weight": 1}}}},
                          root="/r")  # fmt: skip
    assert sorted(params.all_models()) == ["base", "facts", "words"]
    assert params.family_dir() == Path("/r/fam")
    assert params.family.builder_kwargs() == {"n_eval": 60, "skills": ["facts", "words"], "specialist_steps": 5}


def test_regmean_candidates_get_the_pipelines_gram_files():
    from alloy.pipeline_params import needed_grams

    data = {"family": {"kind": "tiny", "out": "fam", "skills": ["facts", "words"], "steps": 5},
            "models": {"other": {"path": "o"}},
            "candidates": {"rm": {"method": "regmean", "base_model": "base", "models": ["facts", "words"],
                                  "parameters": {"alpha": 0.9}, "grams": {"examples": 64},
                                  "grid": {"alpha": [0.5, 0.9]}}}}  # fmt: skip
    cands = expand_candidates(parse_params(data, root="/r"))
    assert [c.name for c in cands] == ["rm-alpha0.5", "rm-alpha0.9"]
    models = {m["model"]: m["parameters"] for m in cands[0].config["models"]}
    assert models == {"facts": {"gram": "models/grams/facts.safetensors"},
                      "words": {"gram": "models/grams/words.safetensors"}}
    assert needed_grams(cands)["words"] == {"file": "models/grams/words.safetensors", "data": "skill:words",
                                            "examples": 64, "seed": 0}
    assert cands[0].run_name() == "regmean alpha=0.5"
    # a model with no skill needs its data named; data of one model must agree across candidates
    bad = {**data, "candidates": {"rm": {"method": "regmean", "models": ["facts", "other"]}}}
    with pytest.raises(AlloyError, match=r"candidates.rm.grams.data.other"):
        expand_candidates(parse_params(bad, root="/r"))
    two = {**data, "candidates": {
        "a": {"method": "regmean", "models": ["facts", "words"]},
        "b": {"method": "regmean", "models": ["facts", "words"], "grams": {"data": {"facts": "f.jsonl"}}}}}
    with pytest.raises(AlloyError, match="model 'facts'"):
        expand_candidates(parse_params(two, root="/r"))
    wrong = {**data, "candidates": {"ta": {"method": "task_arithmetic", "base_model": "base", "models": ["facts"],
                                           "parameters": {"weight": 1}, "grams": {"examples": 3}}}}
    with pytest.raises(AlloyError, match="candidates.ta.grams: method 'task_arithmetic' reads no Gram"):
        expand_candidates(parse_params(wrong, root="/r"))
