"""`alloy search` end to end on the tiny trained family: a real Prefect flow (temporary server), a real sqlite MLflow
store and Optuna storage, in-memory merges scored by real lm-eval; then a resumed study, and the best recipe through
the pipeline as `search-best`."""

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)

LIMIT = 6


def write_params(tmp: Path, fam) -> Path:
    params = {
        "name": "tiny-search",
        "models": {
            "base": {"path": str(fam.base)},
            "facts": {"path": str(fam.specialists["facts"]), "skill": "facts"},
            "words": {"path": str(fam.specialists["words"]), "skill": "words"},
        },
        "candidates": {"ta": {"method": "task_arithmetic", "base_model": "base", "models": ["facts", "words"],
                              "parameters": {"weight": 1.0}}},
        "eval": {"tasks": ["facts_em", "words_em"], "limit": LIMIT, "batch_size": 8, "data_dir": str(fam.data_dir),
                 "parents": False},
        "quant": {"texts": str(fam.data_dir / "heldout.txt"), "max_tokens": 128,
                  # an undertrained tiny model is far noisier under int4 than a real one
                  "thresholds": {"int4_kl_max": 1.0, "int4_top1_min": 0.3, "int4_ppl_ratio_max": 3.0}},
        "mlflow": {"experiment": "search", "registry_name": "tiny-search"},
        "runner": {"kind": "thread", "max_workers": 2},
        "search": {"trials": 3, "methods": ["task_arithmetic", "ties", "dare_ties"], "limit": LIMIT,
                   "heldout_limit": LIMIT, "startup_trials": 2, "parallelism": 2, "parameters": {"normalize": False}},
    }  # fmt: skip
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _runs(uri: str, parent: str) -> dict[int, object]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    p = c.get_run(parent)
    kids = c.search_runs([p.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=100)
    return {int(r.data.tags["alloy.trial"]): r for r in kids if r.data.tags.get("alloy.role") == "trial"}


def test_search_end_to_end_resume_and_promote(tmp_path, tiny_family) -> None:
    import optuna

    from alloy.pipeline_params import load_params
    from flows.search import run_search
    from merging.config import load_config
    from merging.engine import merge_to_state_dict

    params_file = write_params(tmp_path, tiny_family)
    first = run_search(params_file)
    uri = first["tracking_uri"]
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert first["storage"] == f"sqlite:///{tmp_path / 'optuna.db'}" and (tmp_path / "optuna.db").is_file()
    assert first["ran"] == [0, 1, 2]

    # --- MLflow: one parent run (the study), a finished child run per trial with its scores and merge time
    runs = _runs(uri, first["parent_run_id"])
    assert sorted(runs) == [0, 1, 2]
    for n, r in runs.items():
        assert r.info.status == "FINISHED"
        m = r.data.metrics
        assert 0.0 <= m["objective"] <= 1.0 and 0.0 <= m["heldout_objective"] <= 1.0
        assert m["merge.seconds"] > 0 and {"tune.facts_em_tune", "heldout.words_em"} <= set(m)
        assert r.data.params["merge_method"] in ("task_arithmetic", "ties", "dare_ties")
    # the search merged in memory: no merge folder, no safetensors outside the family
    assert not (tmp_path / "merges").exists()
    assert not list(tmp_path.rglob("*.safetensors"))

    # --- the best recipe: a mergekit YAML over the model folders that loads (alloy and mergekit) and merges
    best = first["best"]
    recipe = Path(best["recipe"])
    assert recipe.is_file() and recipe.parent == tmp_path / "results" / "search" / first["study"]
    cfg = load_config(recipe)
    assert cfg.merge_method == best["config"]["merge_method"]
    assert str(cfg.base_model) == str(tiny_family.base)
    mergekit = pytest.importorskip("mergekit.config")
    theirs = mergekit.MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    assert theirs.merge_method == cfg.merge_method and len(theirs.models) == 2
    merged = merge_to_state_dict(recipe, seed=0)
    assert merged.n_tensors > 0 and merged.out_dir is None
    top = max((r for r in first["trials"] if r["state"] == "COMPLETE"), key=lambda r: (r["tune"], -r["trial"]))
    assert best["trial"] == top["trial"] and best["objective"] == top["tune"]

    # --- a killed run leaves a trial RUNNING: the next run marks it failed and does not count it
    assert first["study"].startswith(load_params(params_file).name + "-")
    study = optuna.load_study(study_name=first["study"], storage=first["storage"])
    study.ask()  # trial 3, never told

    # --- resume with a larger budget: the three finished trials are kept, one new trial runs, same parent run;
    # then the best recipe goes through merge -> quant-check -> evaluate -> register as `search-best`
    second = run_search(params_file, trials=4, register=True)
    assert second["study"] == first["study"] and second["parent_run_id"] == first["parent_run_id"]
    assert second["ran"] == [4]
    states = {r["trial"]: r["state"] for r in second["trials"]}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE", 3: "FAIL", 4: "COMPLETE"}
    for old, new in zip(first["trials"], second["trials"][:3]):
        assert (old["tune"], old["heldout"], old["recipe"]) == (new["tune"], new["heldout"], new["recipe"])
    runs2 = _runs(uri, first["parent_run_id"])
    assert sorted(runs2) == [0, 1, 2, 4]
    assert all(runs2[n].info.run_id == runs[n].info.run_id for n in (0, 1, 2))

    promoted = second["promoted"]
    assert not promoted.get("error"), promoted
    # the pipeline scored the merge it wrote to disk: the same held-out numbers as the in-memory trial
    b = second["best"]
    trial_scores = next(r for r in second["trials"] if r["trial"] == b["trial"])
    held = {t: promoted["metrics"][t] for t in ("facts_em", "words_em")}
    assert sum(held.values()) / 2 == pytest.approx(trial_scores["heldout"], abs=1e-9)
    assert promoted["registration"]["registered"] is True


def test_regmean_search_takes_each_models_grams_and_its_recipe_reads_them(tmp_path, tiny_family) -> None:
    import torch

    from flows.search import run_search
    from merging.config import parse_config
    from merging.engine import merge_to_state_dict

    params_file = write_params(tmp_path, tiny_family)
    params = yaml.safe_load(params_file.read_text())
    params["search"] = {"trials": 2, "methods": ["regmean"], "ranges": {"weight": [0.5, 1.0], "alpha": [0.1, 0.9]},
                        "grams": {"examples": 8}, "limit": LIMIT, "heldout": False, "startup_trials": 2,
                        "parallelism": 2}  # fmt: skip
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = run_search(params_file)
    assert out["ran"] == [0, 1] and all(r["state"] == "COMPLETE" for r in out["trials"])
    grams = {m: tmp_path / "models" / "grams" / f"{m}.safetensors" for m in ("facts", "words")}
    assert all(f.is_file() for f in grams.values())

    recipe = yaml.safe_load(Path(out["best"]["recipe"]).read_text())
    assert recipe["merge_method"] == "regmean"
    assert [m["parameters"]["gram"] for m in recipe["models"]] == [str(grams["facts"]), str(grams["words"])]
    # the Grams are what makes it RegMean: its linear layers are not the weighted average of the same weights
    with_grams = merge_to_state_dict(parse_config(recipe, "recipe"), seed=0).state_dict
    linear = {"merge_method": "linear", "models": [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}}
                                                   for m in recipe["models"]]}  # fmt: skip
    plain = merge_to_state_dict(parse_config(linear, "linear"), seed=0).state_dict
    name = next(n for n in with_grams if n.endswith("q_proj.weight"))
    assert not torch.allclose(with_grams[name].float(), plain[name].float(), atol=1e-3)
