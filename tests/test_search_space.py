"""alloy.search without a model: the search space and the configs it suggests, the study's name, the tune split and
the params schema of `search:`. The end-to-end study is tests/flows/test_search.py."""

import json
from pathlib import Path

import pytest
import yaml

from alloy import search as S
from alloy.demo import skills as sk
from alloy.pipeline_params import parse_params
from merging.config import parse_config
from merging.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, **search):
    data = {
        "name": "t",
        "models": {"base": {"path": str(tmp_path)}, "a": {"path": str(tmp_path), "skill": "facts"},
                   "b": {"path": str(tmp_path), "skill": "words"}},
        "candidates": [{"name": "ta", "method": "task_arithmetic", "base_model": "base", "models": ["a", "b"],
                        "parameters": {"weight": 1.0}}],
        "search": search,
    }  # fmt: skip
    return parse_params(data, root=tmp_path, source="params.yaml")


def _fixed(values: dict):
    import optuna

    return optuna.trial.FixedTrial(values)


def test_suggested_configs_follow_each_methods_signature(tmp_path) -> None:
    p = _params(tmp_path, methods=["task_arithmetic", "ties", "della"], parameters={"normalize": False},
                layer_groups=3, gradient=["weight"])  # fmt: skip
    space = S.space_of(p)
    assert space.models == ("a", "b") and space.base == "base"
    w = {f"{m}.weight.g{g}": 0.5 + 0.1 * g for m in ("a", "b") for g in range(3)}

    ta = S.suggest_config(_fixed({"method": "task_arithmetic", "lambda": 0.8, **w}), space)
    assert ta["models"][0] == {"model": "a", "parameters": {"weight": [0.5, 0.6, 0.7]}}  # density: unused by TA
    assert ta["parameters"] == {"lambda": 0.8, "normalize": False}
    parse_config(ta)

    ties = S.suggest_config(_fixed({"method": "ties", "lambda": 1.0, "a.density": 0.4, "b.density": 0.9, **w}),
                            space)  # fmt: skip
    assert [m["parameters"]["density"] for m in ties["models"]] == [0.4, 0.9]
    assert ties["base_model"] == "base" and ties["merge_method"] == "ties"
    assert S.describe(ties) == "lambda 1 · weight [0.5,0.6,0.7]/[0.5,0.6,0.7] · density 0.4/0.9"

    # DELLA keeps elements with probability density +/- epsilon: near 1 the default 0.15 would leave (0, 1)
    della = S.suggest_config(_fixed({"method": "della", "lambda": 1.0, "a.density": 0.95, "b.density": 0.5,
                                            **w}), space)  # fmt: skip
    eps = [m["parameters"]["epsilon"] for m in della["models"]]
    assert eps[0] == pytest.approx(0.045) and eps[1] == 0.15
    from merging.checks import check_task_parameters

    check_task_parameters("della", ["a", "b"], {"density": [0.95, 0.5], "epsilon": eps}, {}, "t")


def test_study_name_is_the_search_not_its_budget(tmp_path) -> None:
    base = S.study_name(_params(tmp_path))
    assert base.startswith("t-")
    assert S.study_name(_params(tmp_path, trials=99, parallelism=4, heldout_limit=5, register_best=True)) == base
    assert S.study_name(_params(tmp_path, ranges={"weight": [0.1, 1.0]})) != base
    assert S.study_name(_params(tmp_path, objective={"facts_em": 2, "words_em": 1})) != base
    assert S.study_name(_params(tmp_path, seed=1)) != base
    # the same settings over other model bytes (a family retrained in place) are another study
    assert S.study_name(_params(tmp_path), {"a": "1" * 64}) != S.study_name(_params(tmp_path), {"a": "2" * 64})
    # the default storage lies beside the MLflow sqlite file
    assert S.storage_url(_params(tmp_path)) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"


def test_objective_defaults_to_mean_exact_match_of_the_searched_skills(tmp_path) -> None:
    p = _params(tmp_path)
    assert S.objective_weights(p) == {"facts_em": 1.0, "words_em": 1.0}
    assert S.tune_tasks(p) == ["facts_em_tune", "words_em_tune"]
    scores = {"facts_em_tune": {"exact_match": 0.5}, "words_em_tune": {"exact_match": 0.25}}
    assert S.weighted_score(scores, {"facts_em": 3.0, "words_em": 1.0}) == pytest.approx(0.4375)
    assert S.tune_tasks(_params(tmp_path, tune_split="heldout")) == ["facts_em", "words_em"]


def test_min_aggregate_scores_the_weakest_skill_and_names_another_study(tmp_path) -> None:
    scores = {"facts_em_tune": {"exact_match": 0.5}, "words_em_tune": {"exact_match": 0.25}}
    assert S.weighted_score(scores, {"facts_em": 1.0, "words_em": 1.0}, "min") == pytest.approx(0.25)
    # weights rescale before the minimum: 1 / a specialist's score turns it into the share kept
    assert S.weighted_score(scores, {"facts_em": 1.0, "words_em": 4.0}, "min") == pytest.approx(0.5)
    p = _params(tmp_path, aggregate="min")
    assert S.spec_of(p).aggregate == "min"
    assert S.study_name(p) != S.study_name(_params(tmp_path))
    with pytest.raises(ConfigError, match=r"search\.aggregate"):
        _params(tmp_path, aggregate="median")


@pytest.mark.parametrize("search, match", [
    ({"methods": ["tie"]}, r"search\.methods: 'tie' is not a merge method \(did you mean 'ties'\?\)"),
    ({"methods": ["linear"]}, r"search\.methods: 'linear' takes no base model"),
    ({"ranges": {"epsilon": [0.0, 0.1]}}, r"search\.ranges\.epsilon: none of the methods"),
    ({"ranges": {"weight": [1.0, 0.5]}}, r"search\.ranges\.weight: low 1\.0 is above high 0\.5"),
    ({"objective": {"heldout_ppl": 1}}, r"search\.objective\.heldout_ppl: expected a skill task"),
    ({"layer_groups": 2, "gradient": ["lambda2"]}, r"search\.gradient: 'lambda2' has no range"),
    ({"models": ["a", "nope"]}, r"search\.models: 'nope' is not one of the models"),
    ({"trails": 3}, r"search\.trails: unknown key \(did you mean 'trials'\?\)"),
])  # fmt: skip
def test_search_schema_names_the_culprit(tmp_path, search, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _params(tmp_path, **search)


def test_demo_params_declare_a_search() -> None:
    from alloy.pipeline_params import load_params

    for name in ("params.yaml", "params-tiny.yaml"):
        p = load_params(ROOT / name)
        assert p.search is not None and p.search.trials == 24
        space = S.space_of(p)
        assert space.base == "base" and set(space.models) == {"facts", "words", "addition"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tune_split_never_asks_a_held_out_prompt(tmp_path) -> None:
    paths = sk.write_skill_data(tmp_path / "d", seed=3, n_eval=60)
    again = sk.write_skill_data(tmp_path / "e", seed=3, n_eval=60)
    for s in sk.SKILLS:
        held, tune = _rows(paths[s]), _rows(paths[f"{s}_tune"])
        assert len(tune) == sk.N_TUNE and len({r["question"] for r in tune}) == sk.N_TUNE
        assert not {r["question"] for r in held} & {r["question"] for r in tune}
        assert all(r["choices"][r["label"]] == r["answer"] for r in tune)
        assert paths[f"{s}_tune"].read_bytes() == again[f"{s}_tune"].read_bytes()
    # a held-out a + b keeps b + a out of the tune split as well
    pairs = lambda rows: {tuple(sorted(r["question"][8:-1].split(" + "))) for r in rows}  # noqa: E731
    assert not pairs(_rows(paths["addition"])) & pairs(_rows(paths["addition_tune"]))
    # every table prompt held out: no facts/words tune file rather than an overlapping one
    full = sk.write_skill_data(tmp_path / "f", n_eval=80)
    assert "facts_tune" not in full and not (tmp_path / "f" / "facts.tune.jsonl").exists()


def test_tune_data_written_beside_a_family_that_lacks_it(tmp_path) -> None:
    data = tmp_path / "data"
    sk.write_skill_data(data, seed=0, n_eval=20)
    assert S.tune_data_dir(data, tmp_path / "fallback") == data.resolve()
    for f in data.glob("*.tune.jsonl"):  # a family built before the tune split existed
        f.unlink()
    out = S.tune_data_dir(data, tmp_path / "fallback")
    assert out.parent == (tmp_path / "fallback").resolve()
    assert not list(data.glob("*.tune.jsonl"))  # the family's folder is left as it was
    held, tune = _rows(data / "facts.jsonl"), _rows(out / "facts.tune.jsonl")
    assert tune and not {r["question"] for r in held} & {r["question"] for r in tune}
    assert S.tune_data_dir(data, tmp_path / "fallback") == out


def test_recipe_yaml_names_models_by_folder(tmp_path) -> None:
    cfg = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    path = S.write_recipe(tmp_path / "r" / "best.yml", cfg, {"base": "/m/base", "a": "/m/a"}, "study x\ntrial 3")
    text = path.read_text()
    assert text.startswith("# study x\n# trial 3\n")
    assert yaml.safe_load(text) == {"merge_method": "ties", "base_model": "/m/base",
                                    "models": [{"model": "/m/a", "parameters": {"weight": 1.0}}]}  # fmt: skip
    with pytest.raises(ConfigError):  # what could not be read back is not written
        S.write_recipe(tmp_path / "bad.yml", {"merge_method": "ties"}, {})
    assert not (tmp_path / "bad.yml").exists()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    from alloy.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": {"base": {"path": str(tmp_path)}, "a": {"path": str(tmp_path), "skill": "facts"}},
        "candidates": [{"name": "x", "method": "task_arithmetic", "base_model": "base", "models": ["a"],
                        "parameters": {"weight": 1.0}}]}))  # fmt: skip
    assert main(["search", "--params", str(params), "--set", "search.methods=[tie]"]) == 2
    assert "search.methods: 'tie' is not a merge method" in capsys.readouterr().err
    assert main(["search", "--params", str(params), "--trials", "0"]) == 2
    assert capsys.readouterr().err.strip() == "alloy: error: --trials 0: must be at least 1"


def test_regmean_trials_read_each_models_gram_file(tmp_path) -> None:
    p = _params(tmp_path, methods=["ties", "regmean"], ranges={"weight": [0.5, 1.0], "alpha": [0.1, 0.9]})
    space = S.space_of(p)
    files = {m: str((tmp_path / "models" / "grams" / f"{m}.safetensors").resolve()) for m in ("a", "b")}
    assert space.grams == files  # the pipeline's files (alloy.pipeline_params.gram_file), by absolute path
    specs = S.gram_specs(p)
    assert {m: g["data"] for m, g in specs.items()} == {"a": "skill:facts", "b": "skill:words"}

    rm = S.suggest_config(_fixed({"method": "regmean", "alpha": 0.3, "a.weight": 0.6, "b.weight": 0.9}), space)
    assert rm["models"][0] == {"model": "a", "parameters": {"weight": 0.6, "gram": files["a"]}}
    assert rm["parameters"] == {"alpha": 0.3}
    assert S.describe(rm) == "alpha 0.3 · weight 0.6/0.9"  # the paths stay out of the one-liner
    parse_config(rm)
    ties = S.suggest_config(_fixed({"method": "ties", "lambda": 1.0, "a.weight": 0.6, "b.weight": 0.9,
                                    "a.density": 0.5, "b.density": 0.5}), space)  # fmt: skip
    assert all("gram" not in m["parameters"] for m in ties["models"])

    # what the Grams are taken on is part of the study; a search without regmean has no Grams
    other = _params(tmp_path, methods=["ties", "regmean"], ranges={"weight": [0.5, 1.0], "alpha": [0.1, 0.9]},
                    grams={"data": {"a": "skill:addition"}})  # fmt: skip
    assert S.study_name(other) != S.study_name(p)
    assert S.space_of(_params(tmp_path)).grams == {} and S.gram_specs(_params(tmp_path)) == {}


@pytest.mark.parametrize(("search", "match"), [
    ({"grams": {"examples": 8}}, r"search\.grams: none of the methods \(task_arithmetic, ties, dare_ties, dare_linear\) reads"),
    ({"methods": ["regmean"], "ranges": {"weight": [0.5, 1]}, "grams": {"data": {"zz": "skill:facts"}}}, r"search\.grams\.data\.zz: not one of the searched"),
])  # fmt: skip
def test_search_grams_errors_name_the_key(tmp_path, search, match) -> None:
    with pytest.raises(ConfigError, match=match):
        S.space_of(_params(tmp_path, **search))


def test_regmean_search_needs_to_know_what_a_skill_less_model_is_taken_on(tmp_path) -> None:
    data = {"name": "t", "models": {"base": {"path": str(tmp_path)}, "a": {"path": str(tmp_path)}},
            "candidates": [{"name": "ta", "method": "task_arithmetic", "base_model": "base", "models": ["a"]}],
            "search": {"methods": ["regmean"], "models": ["a"], "ranges": {"weight": [0.5, 1.0]}}}  # fmt: skip
    p = parse_params(data, root=tmp_path, source="params.yaml")
    with pytest.raises(ConfigError, match=r"search\.grams\.data\.a: say what model 'a'"):
        S.space_of(p)
