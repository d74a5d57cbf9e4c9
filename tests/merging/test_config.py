"""Config parsing: mergekit's YAML accepted as is; errors carry the key path; parameter precedence and gradients."""

from __future__ import annotations

import pytest

from merging.config import evaluate, load_config, parse_config
from merging.errors import ConfigError
from merging.plan import _Params


def test_mergekit_examples_parse_unchanged():
    cfg = parse_config({
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 32]}, {"model": "b@rev1", "layer_range": [0, 32]}]}],
        "merge_method": "slerp", "base_model": "a",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "bfloat16", "tokenizer_source": "base", "chat_template": "auto",
    })
    assert cfg.slices[0].sources[1].model.revision == "rev1"
    assert [str(m) for m in cfg.referenced_models()] == ["a", "b@rev1"]
    again = parse_config(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("data, where", [
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": {"bad": 1}}}]}, "models[0].parameters.weight"),
    ({"merge_method": "ties", "models": [{"model": "a", "paramters": {}}]}, "models[0].paramters"),
    ({"merge_method": "slerp", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]}, "slices[0].sources[0].layer_range"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}, "exactly one of"),
    ({"merge_method": "ties", "models": [{"model": "a"}], "dtype": "float8"}, "dtype"),
    ({"models": [{"model": "a"}]}, "merge_method"),
    ({"merge_method": "linear", "models": [{"model": "a+b+c"}]}, "models[0].model: model 'a+b+c' has more than one '+'"),
    ({"merge_method": "linear", "models": [{"model": "a@1@2"}]}, "models[0].model: model 'a@1@2' has more than one '@'"),
    ({"merge_method": "linear", "models": [{"model": {"model": "a", "override_architecture": "X"}}]},
     "models[0].model: override_architecture is not supported"),
    ({"merge_method": "linear", "models": [{"model": {"model": "a", "lroa": "b"}}]}, "unknown key(s) ['lroa']"),
])
def test_errors_name_the_key(data, where):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yml")
    assert where in str(info.value) and str(info.value).startswith("cfg.yml:")


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml")
    (tmp_path / "list.yml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yml")


def test_gradient_interpolates_like_mergekit():
    g = [0.0, 1.0, 0.5]
    assert evaluate(g, "x", 0.0) == 0.0
    assert evaluate(g, "x", 0.25) == pytest.approx(0.5)
    assert evaluate(g, "x", 0.5) == pytest.approx(1.0)
    assert evaluate(g, "x", 0.75) == pytest.approx(0.75)
    assert evaluate(g, "x", 1.0) == pytest.approx(0.5)


def test_filters_first_match_wins_and_fall_through():
    cfg = parse_config({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "a", "parameters": {"density": [{"filter": "mlp", "value": 0.9}]}}],
        "parameters": {"density": 0.3, "weight": [{"filter": "attn", "value": 2.0}, {"value": 1.0}]}})
    from merging.config import InputSlice, OutputSlice

    sl = OutputSlice(sources=[InputSlice(model=m.model, layer_range=(0, 1), parameters=m.parameters) for m in cfg.models])
    p = _Params(cfg, sl)
    a = cfg.models[0].model
    assert p.get("density", "model.layers.0.mlp.up_proj.weight", 0, a) == 0.9  # model scope wins
    assert p.get("density", "model.layers.0.self_attn.q_proj.weight", 0, a) == 0.3  # no filter match: falls through
    assert p.get("weight", "model.layers.0.self_attn.q_proj.weight", 0, a) == 2.0
    assert p.get("weight", "model.norm.weight", 0, a) == 1.0


@pytest.mark.parametrize("ref", [
    "a@r1+ad@r2",
    {"model": "a@r1", "lora": "ad@r2"},
    {"model": {"path": "a", "revision": "r1"}, "lora": {"path": "ad", "revision": "r2"}},  # mergekit's dump
])
def test_lora_references_in_every_mergekit_spelling(ref):
    cfg = parse_config({"merge_method": "linear", "models": [{"model": ref}, {"model": "b"}]})
    m = cfg.models[0].model
    assert (m.path, m.revision, m.lora.path, m.lora.revision) == ("a", "r1", "ad", "r2")
    assert str(m) == "a@r1+ad@r2" and str(m.base) == "a@r1"
    assert [str(r) for r in cfg.referenced_models()] == ["a@r1+ad@r2", "b"]
    again = parse_config(__import__("yaml").safe_load(cfg.to_yaml()))  # written back as `a@r1+ad@r2`
    assert again == cfg and "a@r1+ad@r2" in cfg.to_yaml()


def test_yaml_errors_name_the_file_and_the_place_once(tmp_path):
    from merging.config import read_yaml

    bad = tmp_path / "c.yml"
    bad.write_text("merge_method: linear\nmodels: [a, b\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value).startswith(f"{bad}: line 3, column 1: YAML syntax error: ")
    bad.write_text("a: \x07\n")  # a control character: PyYAML's reader error carries no line and column
    with pytest.raises(ConfigError) as e:
        read_yaml(bad, "params file")
    assert str(e.value).startswith(f"{bad}: YAML syntax error: ")
    with pytest.raises(ConfigError, match=r"^params file .*gone\.yml does not exist$"):
        read_yaml(tmp_path / "gone.yml", "params file")
