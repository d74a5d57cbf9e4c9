"""The MLflow UI and the HTML report in a real headless Chromium, over a store a real pipeline run filled.

A real flow run (Prefect, tiny trained family, real merges, quantisation checks, lm-eval, registry) fills a sqlite
store; `alloy ui` serves it on loopback; Chromium, driven through chromedriver's W3C WebDriver HTTP API (plain
urllib: no Selenium needed), opens the experiment's runs, every candidate's run page, the compare view, the report
as MLflow shows it and the report file itself, and checks that every candidate and its metrics are on screen with
the values the store holds. Screenshots land in $ALLOY_TEST_ARTIFACTS/browser (default: test-artifacts/browser).

Debian's chromium and chromium-driver are installed by .ci/install-chromium.sh when missing (needs root or sudo).
"""

from __future__ import annotations

import base64
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "flows"))
from pipeline_env import isolate_env  # noqa: E402

isolate_env()

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = Path(os.environ.get("ALLOY_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars"]  # fmt: skip
TASKS = ["facts_mc", "words_em", "heldout_ppl"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key


# --------------------------------------------------------------------------------------------- a tiny client


class Browser:
    """Headless Chromium through chromedriver's WebDriver endpoint."""

    def __init__(self, width: int = 1600, height: int = 1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.driver = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self.profile = tempfile.mkdtemp(prefix="alloy-chromium-")
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.2)
        args = [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions":
                                                 {"binary": str(CHROMIUM), "args": args}}}}  # fmt: skip
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(self.base + path, method=method, headers={"Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read()[:400]!r}") from None

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def text(self) -> str:
        return self.js("return document.body ? document.body.innerText : ''") or ""

    def wait_for(self, what: str, check, timeout: float = 90.0):
        """Poll check() until it returns something truthy; fail with the page's text otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = check()
            except RuntimeError:  # the page was navigating: try again
                got = None
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the page shows:\n{self.text()[:3000]}")
            time.sleep(0.5)

    def wait_text(self, needles: list[str], timeout: float = 90.0) -> str:
        def check() -> str | None:
            text = self.text()
            return text if all(n in text for n in needles) else None

        return self.wait_for(f"{needles}", check, timeout)

    def find(self, css: str) -> dict | None:
        try:
            return self.cmd("POST", "/element", {"using": "css selector", "value": css})
        except RuntimeError:
            return None

    def click(self, element: dict) -> None:
        self.cmd("POST", f"/element/{element[ELEMENT]}/click", {})

    def frame(self, element: dict | None) -> None:
        if element is None:
            self.cmd("POST", "/frame/parent", {})
        else:
            self.cmd("POST", "/frame", {"id": element})

    def resize(self, width: int, height: int) -> None:
        self.cmd("POST", "/window/rect", {"width": width, "height": height})

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        assert path.stat().st_size > 10_000, f"{path}: suspiciously small screenshot"
        return path

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        except (RuntimeError, OSError):
            pass
        finally:
            try:
                os.killpg(self.driver.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.driver.wait(15)
            shutil.rmtree(self.profile, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's chromium + chromedriver, installed by the CI script when missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        res = subprocess.run(["bash", str(ROOT / ".ci" / "install-chromium.sh")], capture_output=True, text=True,
                             timeout=900)  # fmt: skip
        if res.returncode != 0:
            pytest.fail(f".ci/install-chromium.sh failed ({res.returncode}): {res.stderr[-2000:]}")
    assert CHROMIUM.exists() and CHROMEDRIVER.exists()
    return CHROMIUM


def write_params(tmp: Path, family) -> Path:
    params = {
        "name": "browser",
        "models": {"base": {"path": str(family.base)},
                   "facts": {"path": str(family.specialists["facts"]), "skill": "facts"},
                   "words": {"path": str(family.specialists["words"]), "skill": "words"}},
        "candidates": [
            {"name": "ta", "method": "task_arithmetic", "base_model": "base", "models": ["facts", "words"],
             "parameters": {"weight": 1.0}, "grid": {"lambda": [0.5, 1.0]}},
            # one MLP block scaled by 1e4: its quantisation check fails, so it is evaluated but not registered
            {"name": "broken", "method": "linear", "models": ["facts", "words"],
             "parameters": {"normalize": False, "weight": [{"filter": "layers.0.mlp", "value": 1.0e4}, {"value": 0.5}]}},
        ],
        "eval": {"tasks": TASKS, "limit": 4, "batch_size": 8, "data_dir": str(family.data_dir)},
        "quant": {"texts": str(family.data_dir / "heldout.txt"), "max_tokens": 128,
                  "thresholds": {"int8_kl_max": 0.05, "int8_top1_min": 0.8, "int8_ppl_ratio_max": 1.2,
                                 "int4_kl_max": 1.0, "int4_top1_min": 0.3, "int4_ppl_ratio_max": 3.0}},
        "mlflow": {"experiment": "browser", "registry_name": "browser-merge", "log_weights": False},
        "champion": {"metric": "heldout_ppl", "higher_is_better": False},
        "runner": {"kind": "thread", "max_workers": 2},
    }  # fmt: skip
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


class UI:
    """`alloy ui` in a subprocess; url is what it printed."""

    def __init__(self, params: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "alloy.cli", "ui", "--params", str(params), "--port", "0"],
                                     cwd=params.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_url(self, timeout: float = 240.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            m = re.search(r"MLflow UI: (\S+)", line)
            if m:
                return m.group(1)
        raise AssertionError(f"alloy ui printed no URL:\n{''.join(self.output)}")

    def stop(self) -> int:
        t0 = time.monotonic()
        try:
            return self._stop()
        finally:
            self.stop_seconds = time.monotonic() - t0

    def _stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # alloy ui stops its server on SIGTERM, as on Ctrl-C
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode


def _metrics_on_run_page(text: str) -> dict[str, str]:
    """{metric: value as shown} from a run page's 'Metrics (N)' table."""
    m = re.search(r"Metrics \((\d+)\)\nMetric\nValue\n(.*?)\nParameters \(", text, re.S)
    assert m, f"no metrics table on the run page:\n{text[:2000]}"
    lines = m.group(2).split("\n")
    pairs = dict(zip(lines[0::2], lines[1::2]))
    assert len(pairs) == int(m.group(1)), (m.group(1), pairs)
    return pairs


# ------------------------------------------------------------------------------------------------- the test


def test_mlflow_ui_and_report_in_chromium(chromium, tiny_family, tmp_path):
    from flows.pipeline import run_pipeline

    t0 = time.monotonic()
    params = write_params(tmp_path, tiny_family)
    summary = run_pipeline(params)
    print(f"pipeline run: {time.monotonic() - t0:.0f} s")
    check_ui_and_report(params, summary["tracking_uri"], summary["experiment_id"], summary["parent_run_id"],
                        "browser-merge", tmp_path)


def check_ui_and_report(params: Path, uri: str, exp_id: str, parent_id: str, registry_name: str, tmp_path: Path) -> None:
    """Everything after the pipeline run: `alloy ui`, then the browser."""
    from mlflow.tracking import MlflowClient

    from alloy.report import _fmt, write_report

    t0 = time.monotonic()
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if "report.html" not in {a.path for a in c.list_artifacts(parent_id)}:
        # what the flow's last step does once it calls the report (see flows/pipeline.py)
        write_report(parent_id, uri, tmp_path / "results" / "report.html")
    report_file = tmp_path / "report.html"
    write_report(parent_id, uri, report_file, log_artifact=False)
    parent_name = c.get_run(parent_id).info.run_name

    runs = c.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    cands = {r.data.tags["alloy.candidate"]: r for r in runs if r.data.tags.get("alloy.role") == "candidate"}
    models = {r.data.tags["alloy.model"]: r for r in runs if r.data.tags.get("alloy.role") == "parent"}
    assert set(cands) == {"ta-lambda0.5", "ta-lambda1", "broken"} and set(models) == {"base", "facts", "words"}
    champion = c.get_model_version_by_alias(registry_name, "champion")
    champ_name = next(n for n, r in cands.items() if r.info.run_id == champion.run_id)

    ui = UI(params)
    browser = None
    try:
        url = ui.wait_url()
        t_ui = time.monotonic() - t0
        origin = re.match(r"(http://127\.0\.0\.1:\d+)/", url).group(1)
        assert url == f"{origin}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        with urllib.request.urlopen(f"{origin}/health", timeout=10) as r:
            assert r.status == 200
        browser = Browser()

        # 1. the experiment's runs: expand the pipeline run; every candidate and input model is listed
        browser.get(url)
        browser.wait_text([parent_name])
        close = browser.find('button[aria-label="Close"], button[aria-label="close"]')
        if close:  # the assistant side panel only takes room
            try:
                browser.click(close)
            except RuntimeError:
                pass
        expander = browser.wait_for("the run's expand button",
                                    lambda: browser.find('button[data-component-id*="runnamecellrenderer"]'))  # fmt: skip
        browser.click(expander)
        names = [r.info.run_name for r in [*cands.values(), *models.values()]]
        page = browser.wait_text([parent_name, *names])
        assert "7 matching runs" in page
        browser.screenshot("01-experiment-runs.png")

        # 2. each candidate's run page: every metric the store holds, with its value
        for name, run in cands.items():
            browser.get(f"{origin}/#/experiments/{exp_id}/runs/{run.info.run_id}?workflowType=machine_learning")
            text = browser.wait_text([run.info.run_name, "Metrics (", "Parameters ("])
            shown = _metrics_on_run_page(text)
            assert set(shown) == set(run.data.metrics), name
            for key, value in run.data.metrics.items():
                assert math.isclose(float(shown[key]), value, rel_tol=1e-9, abs_tol=1e-12), (name, key, shown[key], value)
            for key in ("merge.seconds", "merge.peak_rss_gb", "quant.int8_kl", "quant.passed", *TASKS):
                assert key in shown, (name, key)
            for key, value in run.data.params.items():
                assert key in text and value.split("\n")[0][:40] in text, (name, key)
            if name == champ_name:
                assert "browser-merge" in text  # the registered model version is linked from its run
            browser.screenshot(f"02-run-{name}.png")

        # 3. the compare view of all candidates
        ids = [r.info.run_id for r in cands.values()]
        browser.get(f"{origin}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
                    f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}")  # fmt: skip
        text = browser.wait_text([f"Comparing {len(ids)} Runs", *[r.info.run_name for r in cands.values()]])
        for key in ("merge_method", "lambda", "parents"):
            assert key in text
        browser.screenshot("03-compare-candidates.png")

        # 4. the report as MLflow shows the artifact: the page inside MLflow's sandboxed iframe
        browser.get(f"{origin}/#/experiments/{exp_id}/runs/{parent_id}/artifacts/report.html?workflowType=machine_learning")
        frame = browser.wait_for("the report's iframe", lambda: browser.find("iframe.mlflow-html-iframe, iframe#html"))
        time.sleep(1)
        browser.screenshot("04-report-in-mlflow.png")
        browser.frame(frame)
        inner = browser.wait_text(["Merge report", *cands])
        assert f"Champion: {champ_name}" in inner
        browser.frame(None)

        # 5. the report file: a row per candidate with the store's scores, the champion highlighted, the plots drawn
        browser.get(report_file.as_uri())
        browser.wait_text(["Merge report", "Plots"])
        rows = browser.js("""return [...document.querySelectorAll('tr.candidate')].map(r => ({
            name: r.dataset.candidate, cls: r.className, run: r.dataset.runId,
            tasks: Object.fromEntries([...r.querySelectorAll('td[data-task]')].map(
                td => [td.dataset.task, td.childNodes[0].textContent.trim()]))}))""")
        assert [r["name"] for r in rows] == ["ta-lambda0.5", "ta-lambda1", "broken"]
        for r in rows:
            run = cands[r["name"]]
            assert r["run"] == run.info.run_id
            assert r["tasks"] == {t: _fmt(run.data.metrics.get(t)) for t in TASKS}, r["name"]
            assert ("champion" in r["cls"].split()) == (r["name"] == champ_name)
        figures = browser.js("return [...document.querySelectorAll('figure')].map(f => "
                             "[f.id, f.querySelector('svg') ? f.querySelector('svg').getBoundingClientRect().height : 0])")
        assert {f for f, h in figures if h > 100} >= {"plot-task-scores", "plot-quant", "plot-merge"}, figures
        height = browser.js("return document.documentElement.scrollHeight")
        browser.resize(1400, min(int(height) + 40, 6000))
        browser.screenshot("05-report.png")
        print(f"report written, alloy ui ready after {t_ui:.0f} s, browser {time.monotonic() - t0 - t_ui:.0f} s; "
              f"screenshots in {SHOTS}")
    finally:
        if browser is not None:
            browser.quit()
        rc = ui.stop()
    print(f"alloy ui stopped in {ui.stop_seconds:.1f} s")
    assert rc == 0, "".join(ui.output)
    with pytest.raises(OSError):  # the server went with alloy ui
        urllib.request.urlopen(f"{origin}/health", timeout=5)
