"""alloy.registry on a real sqlite MLflow store: versions, lineage tags, the champion alias and quantisation blocks."""

import pytest

from alloy import registry


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One store for the module: creating an MLflow database runs its migrations (~10-20 s here).
    # Each test uses its own registered-model name.
    tmp_path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = registry.ensure_experiment(uri, "reg", tmp_path / "artifacts")
    return uri, exp, tmp_path


def logged_run(uri, exp, tmp_path, name, metrics):
    run = registry.start_run(uri, exp, name, tags={"alloy.role": "candidate"})
    registry.log(uri, run, metrics=metrics, params={"lambda": 0.5})
    model = tmp_path / f"model-{run}"
    model.mkdir()
    (model / "config.json").write_text("{}")
    registry.log_artifacts(uri, run, folders={"model": model})
    return run


def test_experiment_artifacts_go_where_asked(store):
    uri, exp, tmp_path = store
    c = registry.client(uri)
    assert c.get_experiment(exp).artifact_location == (tmp_path / "artifacts").as_uri()
    assert registry.ensure_experiment(uri, "reg") == exp  # found, not created twice


def test_champion_moves_only_on_a_win(store):
    uri, exp, tmp_path = store
    c = registry.client(uri)
    runs = {n: logged_run(uri, exp, tmp_path, n, {"mean_em": s}) for n, s in [("a", 0.5), ("b", 0.4), ("c", 0.5), ("d", 0.7)]}
    lineage = {"method": "ties", "parents": {"facts": {"digest": "f" * 64}}, "manifest_sha256": "m" * 64}

    first = registry.register_candidate(uri, "alloy-test", runs["a"], metric="mean_em", score=0.5, lineage=lineage)
    assert first.registered and first.champion and first.version == "1"
    worse = registry.register_candidate(uri, "alloy-test", runs["b"], metric="mean_em", score=0.4, lineage=lineage)
    assert worse.registered and not worse.champion and "stays version 1" in worse.reason
    tie = registry.register_candidate(uri, "alloy-test", runs["c"], metric="mean_em", score=0.5, lineage=lineage)
    assert not tie.champion  # equal is not better
    assert str(c.get_model_version_by_alias("alloy-test", "champion").version) == "1"
    better = registry.register_candidate(uri, "alloy-test", runs["d"], metric="mean_em", score=0.7, lineage=lineage)
    assert better.champion and better.previous_champion["version"] == "1"
    champ = c.get_model_version_by_alias("alloy-test", "champion")
    assert str(champ.version) == better.version and champ.run_id == runs["d"]
    assert champ.source == f"runs:/{runs['d']}/model"
    assert champ.tags["alloy.method"] == "ties" and champ.tags["alloy.manifest_sha256"] == "m" * 64
    assert '"digest": "' + "f" * 64 in champ.tags["alloy.parents"]
    assert c.get_run(runs["b"]).data.tags["alloy.registration"] == worse.reason


def test_lower_is_better_metric(store):
    uri, exp, tmp_path = store
    a = logged_run(uri, exp, tmp_path, "a", {"ppl": 12.0})
    b = logged_run(uri, exp, tmp_path, "b", {"ppl": 9.0})
    registry.register_candidate(uri, "ppl-test", a, metric="ppl", score=12.0, higher_is_better=False)
    r = registry.register_candidate(uri, "ppl-test", b, metric="ppl", score=9.0, higher_is_better=False)
    assert r.champion


def test_failed_quant_check_blocks_registration(store):
    uri, exp, tmp_path = store
    run = logged_run(uri, exp, tmp_path, "bad", {"mean_em": 0.99})
    r = registry.register_candidate(uri, "blocked", run, metric="mean_em", score=0.99, quant_passed=False,
                                    quant_reasons=["model.layers.0.mlp.up_proj.weight: RMS / peers' median RMS 2e4 > 50"])
    assert not r.registered and r.version is None
    assert "quantisation check failed" in r.reason and "layers.0.mlp.up_proj" in r.reason
    c = registry.client(uri)
    assert c.get_run(run).data.tags["alloy.registration"] == r.reason
    assert c.search_model_versions("name='blocked'") == []
    # the same check switched off in params (quant.block_registration: false) lets it through
    r = registry.register_candidate(uri, "blocked", run, metric="mean_em", score=0.99, quant_passed=False,
                                    block_on_quant=False)
    assert r.registered and r.champion


def test_no_score_registers_but_keeps_the_champion(store):
    uri, exp, tmp_path = store
    a = logged_run(uri, exp, tmp_path, "a", {"mean_em": 0.3})
    b = logged_run(uri, exp, tmp_path, "b", {})
    registry.register_candidate(uri, "noscore", a, metric="mean_em", score=0.3)
    r = registry.register_candidate(uri, "noscore", b, metric="mean_em", score=None)
    assert r.registered and not r.champion and "no mean_em score" in r.reason


def test_log_drops_non_finite_metrics_and_batches(store):
    uri, exp, _ = store
    run = registry.start_run(uri, exp, "many")
    metrics = {f"m{i}": float(i) for i in range(1200)} | {"nan": float("nan"), "inf": float("inf")}
    registry.log(uri, run, metrics=metrics, params={f"p{i}": i for i in range(150)})
    data = registry.client(uri).get_run(run).data
    assert len(data.metrics) == 1200 and "nan" not in data.metrics and len(data.params) == 150
