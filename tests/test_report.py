"""alloy report: a pipeline run read back from a real sqlite MLflow store, rendered to one self-contained page.

The store is filled here through MlflowClient with the structure flows/pipeline.py logs (parent run, a child run per
input model and per candidate, the registry's champion alias), so each number on the page can be checked against a
value chosen here; tests/test_browser.py does the same on a store a real pipeline run filled.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "flows"))
from pipeline_env import isolate_env  # noqa: E402

isolate_env()

from alloy import cli  # noqa: E402
from alloy.report import collect, deltas, render_html, write_report  # noqa: E402

TASKS = ["facts_em", "words_em", "heldout_ppl"]
# input models: the base, and two specialists that are each good at their own skill
MODELS = {
    "base": (None, {"facts_em": 0.0, "words_em": 0.0, "heldout_ppl": 10.0}),
    "facts": ("facts", {"facts_em": 0.9, "words_em": 0.1, "heldout_ppl": 12.0}),
    "words": ("words", {"facts_em": 0.0, "words_em": 0.8, "heldout_ppl": 15.0}),
}
# candidates in params.yaml order; `broken` failed its quantisation check, `crashed` failed outright
CANDIDATES = {
    "ta-lambda0.5": {"method": "task_arithmetic", "base": "base", "scores": {"facts_em": 0.6, "words_em": 0.5, "heldout_ppl": 11.0},
                     "quant": {"passed": 1.0, "int8_kl": 1e-5, "int4_kl": 2e-3, "int8_ppl_ratio": 1.001, "int4_ppl_ratio": 1.03},
                     "merge": {"seconds": 1.5, "gb_per_s": 0.8, "peak_rss_gb": 0.4}, "version": "1"},
    "ties": {"method": "ties", "base": "base", "scores": {"facts_em": 0.7, "words_em": 0.6, "heldout_ppl": 10.5},
             "quant": {"passed": 1.0, "int8_kl": 2e-5, "int4_kl": 3e-3, "int8_ppl_ratio": 1.002, "int4_ppl_ratio": 1.05},
             "merge": {"seconds": 2.5, "gb_per_s": 0.5, "peak_rss_gb": 0.6}, "version": "2"},
    "broken": {"method": "linear", "base": None, "scores": {"facts_em": 0.0, "words_em": 0.0, "heldout_ppl": 900.0},
               "quant": {"passed": 0.0, "int8_kl": 0.5, "int4_kl": 4.0, "int8_ppl_ratio": 1.9, "int4_ppl_ratio": 9.0},
               "merge": {"seconds": 1.0, "gb_per_s": 1.1, "peak_rss_gb": 0.3}, "version": None},
    "crashed": {"method": "dare_ties", "base": "base", "scores": None, "quant": None, "merge": None, "version": None},
}


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _derived(scores: dict[str, float]) -> dict[str, float]:
    ems = [v for t, v in scores.items() if t.endswith("_em")]
    out = {**scores, "mean_em": sum(ems) / len(ems), "eval.seconds": 1.0}
    out.update({f"eval.{t}.{'word_perplexity' if t.endswith('ppl') else 'exact_match'}": v for t, v in scores.items()})
    return out


def fill_store(root: Path, *, inspect: dict | None = None, base_tag: bool = False) -> dict:
    """A store shaped like one pipeline run's; returns {uri, experiment_id, parent, runs: {name: run id}}."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = _client(uri)
    exp = c.create_experiment("alloy-test", artifact_location=(root / "artifacts").as_uri())
    params = {"name": "report-test", "mlflow": {"experiment": "alloy-test", "registry_name": "test-merge"},
              "champion": {"metric": "mean_em", "higher_is_better": True},
              "quant": {"thresholds": {"int8_kl_max": 0.01}}}  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    parent = c.create_run(exp, run_name="report-test pipeline", tags={
        "alloy.role": "pipeline", "alloy.params_file": str(root / "params.yaml"),
        "alloy.candidates": ", ".join(CANDIDATES), "alloy.git_revision": "abc123"}).info.run_id  # fmt: skip
    c.log_artifact(parent, str(root / "params.yaml"))
    runs = {}
    for name, (skill, scores) in MODELS.items():
        r = c.create_run(exp, run_name=f"parent: {name}", tags={"mlflow.parentRunId": parent, "alloy.role": "parent",
                                                                "alloy.model": name, "alloy.source": f"/models/{name}"})  # fmt: skip
        for k, v in _derived(scores).items():
            c.log_metric(r.info.run_id, k, v)
        c.set_terminated(r.info.run_id)
        runs[name] = r.info.run_id
    summary = {"registry_name": "test-merge", "parents": {n: {"skill": s} for n, (s, _) in MODELS.items()},
               "candidates": {}}  # fmt: skip
    c.create_registered_model("test-merge")
    for name, spec in CANDIDATES.items():
        parents = ([spec["base"]] if spec["base"] else []) + ["facts", "words"]
        tags = {"mlflow.parentRunId": parent, "alloy.role": "candidate", "alloy.candidate": name,
                "alloy.method": spec["method"], "alloy.parents": ", ".join(parents)}  # fmt: skip
        if base_tag and spec["base"]:
            tags["alloy.base_model"] = spec["base"]
        r = c.create_run(exp, run_name=f"{spec['method']} {name}", tags=tags).info.run_id
        runs[name] = r
        cfg = {"merge_method": spec["method"], "models": [{"model": "facts"}, {"model": "words"}]}
        if spec["base"]:
            cfg["base_model"] = spec["base"]
        c.log_text(r, yaml.safe_dump(cfg), "config.yml")
        metrics = {}
        if spec["scores"]:
            metrics.update(_derived(spec["scores"]))
        metrics.update({f"quant.{k}": v for k, v in (spec["quant"] or {}).items()})
        metrics.update({f"merge.{k}": v for k, v in (spec["merge"] or {}).items()})
        for k, v in metrics.items():
            c.log_metric(r, k, v)
        if spec["quant"] and not spec["quant"]["passed"]:
            c.set_tag(r, "alloy.quant", "FAILED: model.layers.0.mlp.up_proj.weight: RMS / peers' median RMS 2e4")
            c.set_tag(r, "alloy.registration", "not registered: quantisation check failed: layers.0.mlp")
        if spec["version"]:
            mv = c.create_model_version("test-merge", source=f"runs:/{r}/model", run_id=r,
                                        tags={"alloy.score.mean_em": repr(metrics["mean_em"])})  # fmt: skip
            c.set_tag(r, "alloy.model_version", mv.version)
            c.set_tag(r, "alloy.registration", f"registered as version {mv.version}")
        if name == "crashed":
            c.set_tag(r, "alloy.error", "merge: out of memory reading facts/model.safetensors")
        c.set_terminated(r, status="FAILED" if name == "crashed" else "FINISHED")
        summary["candidates"][name] = {"config": cfg}
    # ties has the best mean_em: it holds the alias
    c.set_registered_model_alias("test-merge", "champion", "2")
    if inspect is not None:
        c.log_dict(runs["ties"], inspect, "inspect.json")
    c.log_dict(parent, summary, "summary.json")
    c.log_metric(parent, "pipeline.seconds", 42.0)
    c.set_terminated(parent)
    return {"uri": uri, "experiment_id": exp, "parent": parent, "runs": runs}


def fake_inspect(models: list[str], layers: int = 3) -> dict:
    """The shape of merging.inspect.inspect_merge's report (checked against the real one below)."""
    def summ(shift: float) -> dict:
        pairs = {f"{a} | {b}": {"cosine": 0.1 + shift, "sign_conflict": 0.45 - shift}
                 for i, a in enumerate(models) for b in models[i + 1:]}  # fmt: skip
        return {"params": 100, "pairs": pairs,
                "models": {m: {"norm": 1.0, "trimmed_energy": 0.2, "survives_ties": 0.7} for m in models}}  # fmt: skip

    return {"method": "ties", "base": "/models/base", "models": models, "overall": summ(0.0),
            "layers": {str(i): summ(0.05 * i) for i in range(layers)}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return fill_store(tmp_path_factory.mktemp("store"), inspect=fake_inspect(["/models/facts", "/models/words"]))


@pytest.fixture(scope="module")
def page(store) -> str:
    return render_html(collect(store["parent"], store["uri"]))


def _row(page: str, attr: str, name: str) -> tuple[set[str], str]:
    """(the row's classes, its cells) of one model or candidate in the table."""
    m = re.search(rf'<tr class="([^"]*)" {attr}="{re.escape(name)}"[^>]*>(.*?)</tr>', page, re.S)
    assert m, f"no table row for {name}"
    return set(m.group(1).split()), m.group(2)


def test_collect_reads_the_run_structure(store):
    data = collect(store["parent"], store["uri"])
    assert [c.name for c in data.candidates] == list(CANDIDATES)  # params.yaml's order, not start time
    assert set(data.models) == set(MODELS)
    assert data.tasks == TASKS  # eval.skills' order: skill by skill, perplexity last
    assert data.lower_is_better == {"heldout_ppl"}
    by = {c.name: c for c in data.candidates}
    # the base comes from summary.json's config; the base is not a merged parent
    assert by["ties"].base == "base" and by["ties"].merged == ["facts", "words"]
    assert by["broken"].base is None and by["broken"].merged == ["facts", "words"]
    assert data.models["facts"].skill == "facts" and data.models["base"].skill is None
    assert data.champion["candidate"] == "ties" and data.champion["version"] == "2"
    assert data.champion["score"] == pytest.approx(0.65)
    assert data.thresholds["int8_kl_max"] == 0.01  # params.yaml's override over eval.quant's defaults
    # a candidate's run id reports on its pipeline run
    assert collect(store["runs"]["ties"], store["uri"]).parent.info.run_id == store["parent"]


def test_deltas_against_the_merged_parents_not_the_base(store):
    data = collect(store["parent"], store["uri"])
    ta = next(c for c in data.candidates if c.name == "ta-lambda0.5")
    d_best, d_mean, best = deltas(data, ta, "facts_em")
    assert best == "facts" and d_best == pytest.approx(0.6 - 0.9) and d_mean == pytest.approx(0.6 - 0.45)
    # perplexity: lower is better, so the best parent is the lowest (12, facts), not the base's 10
    d_best, d_mean, best = deltas(data, ta, "heldout_ppl")
    assert best == "facts" and d_best == pytest.approx(11.0 - 12.0) and d_mean == pytest.approx(11.0 - 13.5)
    crashed = next(c for c in data.candidates if c.name == "crashed")
    assert deltas(data, crashed, "facts_em") == (None, None, None)


def test_page_is_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "<link" not in page and "@import" not in page
    # every src/href points inside the page (matplotlib's SVG references its own clip paths as #id)
    refs = re.findall(r'\b(?:src|href|xlink:href)\s*=\s*["\']([^"\']*)', page)
    assert refs and all(r.startswith("#") or r.startswith("data:") for r in refs), [r for r in refs if not r.startswith("#")]
    assert not re.search(r"url\((?!#)", page)


def test_page_table_scores_deltas_and_champion(page):
    for name, (_, scores) in MODELS.items():
        _, row = _row(page, "data-model", name)
        assert re.findall(r"<td>([^<]*)</td>", row)[:3] == [f"{scores[t]:.3g}" if scores[t] else "0" for t in TASKS]
    ta_cls, ta = _row(page, "data-candidate", "ta-lambda0.5")
    assert "Δbest -0.3" in ta and "Δmean +0.15" in ta  # facts_em: 0.6 vs facts 0.9, mean 0.45
    assert "Δbest -1" in ta and "Δmean -2.5" in ta  # heldout_ppl, lower is better
    assert 'class="up"' in ta and 'class="down"' in ta  # ppl -1 is good, facts -0.3 is bad
    ties_cls, ties = _row(page, "data-candidate", "ties")
    assert ties_cls == {"candidate", "champion"} and "★ champion" in ties and ">v2<" in ties
    assert ta_cls == {"candidate"} and "★" not in ta and ">v1<" in ta
    _, broken = _row(page, "data-candidate", "broken")
    assert ">FAIL<" in broken and "not registered" in broken and "RMS / peers" in broken
    crashed_cls, crashed = _row(page, "data-candidate", "crashed")
    assert "failed" in crashed_cls and "out of memory reading facts/model.safetensors" in crashed
    assert re.search(r'id="champion"[^>]*>.*Champion: ties.*mean_em = <b>0\.65</b>.*models:/test-merge@champion',
                     page, re.S)  # fmt: skip


def test_page_plots(page):
    figs = dict(re.findall(r'<figure id="([^"]+)">(.*?)</figure>', page, re.S))
    assert {"plot-task-scores", "plot-quant", "plot-merge", "plot-inspect-0"} <= set(figs)
    for svg in figs.values():
        assert svg.lstrip().startswith("<svg")
    scores = figs["plot-task-scores"]
    for t in TASKS:
        assert t in scores  # a panel per task, text kept as text
    assert "★ ties" in scores and "broken ✗" in scores  # champion marked, failed quant marked
    assert "words (base)" not in scores and "base (base)" in scores  # the legend names the input models' lines
    # crashed logged no merge or quant metrics: it is in the table but has no bar in those plots
    assert "crashed" not in figs["plot-quant"] and "crashed" not in figs["plot-merge"]
    assert "ta-lambda0.5" in figs["plot-merge"]
    inspect = figs["plot-inspect-0"]
    assert "facts" in inspect and "words" in inspect and "sign-conflict rate" in inspect


def test_real_inspect_report_plots(tmp_path):
    """The heat map reads merging.inspect's real output, not only the shape this file fakes."""
    spec = importlib.util.spec_from_file_location("merging_family", Path(__file__).parent / "merging" / "family.py")
    fam = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fam)
    models = fam.make_family(tmp_path / "fam", n_finetunes=2, layers=2, hidden=32)
    from merging.inspect import inspect_merge

    cfg = {"merge_method": "ties", "base_model": str(models["base"]), "parameters": {"density": 0.5, "weight": 1.0},
           "models": [{"model": str(models["ft0"])}, {"model": str(models["ft1"])}]}  # fmt: skip
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    real = inspect_merge(tmp_path / "c.yml")
    assert set(real) >= set(fake_inspect(["a", "b"]))
    st = fill_store(tmp_path / "store", inspect=real, base_tag=True)
    data = collect(st["parent"], st["uri"])
    assert [label for label, _ in data.inspect] == ["ties"]
    from alloy.report_plots import inspect_plots

    (fid, svg, cap), = inspect_plots(data)
    pair = next(iter(real["overall"]["pairs"].values()))
    assert f"{pair['cosine']:.2f}" in svg and f"{pair['sign_conflict']:.0%} conflict" in svg
    assert "ft0" in svg and "ft1" in svg


def test_write_report_logs_the_artifact_and_cli_rebuilds_latest(store, tmp_path, capsys):
    out = write_report(store["runs"]["ta-lambda0.5"], store["uri"], tmp_path / "r" / "report.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    c = _client(store["uri"])
    assert "report.html" in {a.path for a in c.list_artifacts(store["parent"])}  # on the pipeline run
    logged = Path(c.download_artifacts(store["parent"], "report.html", str(tmp_path))).read_text()
    assert 'data-candidate="ties"' in logged

    # a second, newer pipeline run without candidates yet: `alloy report` picks it by default
    newer = c.create_run(store["experiment_id"], run_name="later", tags={"alloy.role": "pipeline"}).info.run_id
    rc = cli.main(["report", "--tracking-uri", store["uri"], "--experiment", "alloy-test", "--out",
                   str(tmp_path / "latest.html"), "--no-log"])  # fmt: skip
    assert rc == 0
    assert f"report: {tmp_path / 'latest.html'}" in capsys.readouterr().out
    latest = (tmp_path / "latest.html").read_text()
    assert newer in latest and "This run logged no candidates" in latest
    assert "No champion: no model registry information" in latest  # no summary.json or params.yaml to name it
    rc = cli.main(["report", store["parent"], "--tracking-uri", store["uri"], "--out", str(tmp_path / "old.html"), "--no-log"])
    assert rc == 0 and 'data-candidate="broken"' in (tmp_path / "old.html").read_text()


def test_cli_report_reads_params_and_errors_in_one_line(store, tmp_path, capsys):
    # params.yaml decides the store and experiment, as for `alloy run`
    (tmp_path / "m").mkdir()
    params = {"models": {"a": {"path": "m"}, "b": {"path": "m"}},
              "candidates": [{"name": "lin", "method": "linear", "models": ["a", "b"], "parameters": {"weight": 0.5}}],
              "mlflow": {"tracking_uri": store["uri"], "experiment": "alloy-test"}, "paths": {"results": "res"}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["report", store["parent"], "--params", str(tmp_path / "params.yaml"), "--no-log"]) == 0
    assert (tmp_path / "res" / "reports" / f"{store['parent']}.html").is_file()

    capsys.readouterr()
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert cli.main(["report", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and "alloy run" in err
    assert cli.main(["report", "--tracking-uri", store["uri"], "--experiment", "no-such"]) == 2
    assert "'no-such'" in capsys.readouterr().err
    assert cli.main(["report", "0" * 32, "--tracking-uri", store["uri"]]) == 2
    assert "0" * 32 in capsys.readouterr().err


def test_cli_report_bad_stores_and_outputs_in_one_line(store, tmp_path, capsys):
    def one_line() -> str:
        err = capsys.readouterr().err.strip()
        assert err.startswith("alloy: error:") and "\n" not in err, err
        return err

    assert cli.main(["report", "--tracking-uri", "foo://bar"]) == 2
    assert "unsupported scheme 'foo'" in one_line()
    assert cli.main(["report", "--tracking-uri", "/nonexistent/dir"]) == 2
    assert "/nonexistent/dir does not exist" in one_line()
    (tmp_path / "a_file").write_text("x")
    assert cli.main(["report", "--tracking-uri", f"file://{tmp_path / 'a_file'}"]) == 2
    assert "is not a folder" in one_line()

    # the page may not replace the store (or go where it cannot be written), refused before MLflow is read
    db = Path(store["uri"].removeprefix("sqlite:///"))
    before = db.stat().st_size, db.stat().st_mtime_ns
    assert cli.main(["report", store["parent"], "--tracking-uri", store["uri"], "--out", str(db), "--no-log"]) == 2
    assert "is an input of this command" in one_line()
    assert (db.stat().st_size, db.stat().st_mtime_ns) == before
    assert cli.main(["report", store["parent"], "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-log"]) == 2
    assert "is a folder" in one_line()
    out = tmp_path / "a_file" / "r.html"
    assert cli.main(["report", store["parent"], "--tracking-uri", store["uri"], "--out", str(out), "--no-log"]) == 2
    assert "is a file, not a folder" in one_line()
