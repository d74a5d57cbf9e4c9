"""`alloy report [RUN_ID]` (the HTML report of a pipeline run) and `alloy ui` (the MLflow UI on the project's store).

Both find the store as the pipeline does: `--tracking-uri`, else params.yaml's mlflow.tracking_uri, else
$MLFLOW_TRACKING_URI, else sqlite:///<params folder>/mlflow.db; the experiment is params.yaml's mlflow.experiment.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from merging.errors import AlloyError, InputError

_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a progress bar per small JSON read back is noise
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


@dataclass
class Store:
    tracking_uri: str
    experiment: str
    results_dir: Path | None  # where reports are written by default (params.yaml's paths.results)
    artifacts_dir: Path | None  # params.yaml's mlflow.artifact_location, for experiments the UI creates


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=None, help="the pipeline's params file (default: params.yaml if present)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: as the pipeline: params.yaml, "
                   "$MLFLOW_TRACKING_URI, sqlite:///<project>/mlflow.db)")  # fmt: skip
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: params.yaml's, else 'alloy')")


def resolve_store(params: str | None, tracking_uri: str | None = None, experiment: str | None = None) -> Store:
    """The store and experiment the pipeline would use, from params.yaml when there is one."""
    path = Path(params or "params.yaml")
    if path.is_file():
        from alloy.pipeline_params import load_params

        p = load_params(path)
        return Store(tracking_uri or p.tracking_uri(), experiment or p.mlflow.experiment, p.path(p.paths.results),
                     p.path(p.mlflow.artifact_location).resolve())  # fmt: skip
    if params:
        raise InputError(f"--params: {path} does not exist")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    return Store(uri, experiment or "alloy", None, None)


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


# what MLflow's tracking stores take (mlflow.tracking._tracking_service.utils): databases through SQLAlchemy,
# tracking servers, Databricks, and folders (file: URIs or plain paths)
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_SCHEMES = (*_DB_SCHEMES, "http", "https", "databricks", "databricks-uc", "uc", "file")


def _store_folder(uri: str) -> Path | None:
    """The folder of a file store (a plain path or file: URI); None for other stores."""
    from urllib.parse import urlparse

    if uri.split(":")[0] in ("databricks", "databricks-uc", "uc"):  # profile URIs: databricks, databricks://PROFILE
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if not parsed.scheme or len(parsed.scheme) == 1:  # a path (a Windows drive letter reads as a scheme)
        return Path(uri)
    return None


def _check_store_exists(uri: str) -> None:
    """An unsupported scheme, or a local store that is not there, refused in one line before MLflow is asked."""
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme and scheme not in _SCHEMES:
        raise InputError(f"MLflow store {uri}: unsupported scheme {scheme!r} (expected sqlite:///FILE, "
                         "http(s)://HOST, postgresql://, mysql://, mssql://, databricks or a folder)")  # fmt: skip
    f = _sqlite_file(uri)
    if f is not None and str(f) != ":memory:" and not f.is_file():
        raise InputError(f"MLflow store {uri}: {f} does not exist (run the pipeline first: alloy run)")
    folder = _store_folder(uri)
    if folder is not None and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise InputError(f"MLflow store {uri}: {folder} {what} (run the pipeline first: alloy run, or give "
                         "sqlite:///FILE)")  # fmt: skip


def _store_inputs(store: Store, params: str | None) -> list[Path]:
    """What the report file may not replace or go into: the params file and a local store (database file or
    folder)."""
    out = [Path(params or "params.yaml")]
    f = _sqlite_file(store.tracking_uri)
    folder = _store_folder(store.tracking_uri)
    out += [p for p in (f, folder) if p is not None and str(p) != ":memory:"]
    return out


# ------------------------------------------------------------------------------------------------ alloy report


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy report", description="Build the HTML report of a pipeline run (candidates "
                                "against their parents and the base, plots, the champion) and log it on the run.")  # fmt: skip
    p.add_argument("run_id", nargs="?", default=None,
                   help="the pipeline (parent) run, or one of its candidates (default: the latest pipeline run)")
    p.add_argument("--out", default=None, help="HTML file to write (default: <results>/reports/<run id>.html)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as an artifact of the run")
    _common(p)
    return p


def main(argv: list[str]) -> int:
    args = report_parser().parse_args(argv)
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    store = resolve_store(args.params, args.tracking_uri, args.experiment)
    _check_store_exists(store.tracking_uri)
    from mlflow.exceptions import MlflowException

    from alloy.report import latest_pipeline_run, write_report
    from merging.guard import check_output_file

    inputs = _store_inputs(store, args.params)
    if args.out:  # before MLflow is read: the page may not replace the store or the params file
        check_output_file(args.out, inputs, option="--out")
    try:
        run_id = args.run_id or latest_pipeline_run(store.tracking_uri, store.experiment)
        if args.out:
            out = Path(args.out)
        else:
            out = (store.results_dir or Path.cwd()) / "reports" / f"{run_id}.html"
            check_output_file(out, inputs, option="report")
        written = write_report(run_id, store.tracking_uri, out, log_artifact=not args.no_log)
    except MlflowException as e:
        msg = " ".join(str(e).split())
        raise InputError(f"MLflow store {store.tracking_uri}: {msg if len(msg) <= 700 else msg[:700] + ' ...'}") from None
    print(f"report: {written}")
    if not args.no_log:
        print(f"logged as report.html on run {run_id} in {store.tracking_uri}")
    return 0


# ---------------------------------------------------------------------------------------------------- alloy ui


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _mlflow_command() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]


def start_mlflow_server(tracking_uri: str, *, host: str = "127.0.0.1", port: int = 5000,
                        artifacts_dir: str | os.PathLike | None = None, log_file: str | os.PathLike | None = None,
                        cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """`mlflow server` on host:port over the store, in its own process group (stop it with stop_server)."""
    if _port_in_use(host, port):
        raise AlloyError(f"--port {port}: {host}:{port} is in use (pick another, or --port 0 for a free one)")
    cmd = [*_mlflow_command(), "server", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port),
           "--workers", "1"]  # fmt: skip
    if artifacts_dir is not None:  # where artifacts of experiments created from the UI go (not ./mlartifacts)
        cmd += ["--artifacts-destination", str(artifacts_dir)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it open)
    try:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, start_new_session=True)  # fmt: skip
    finally:
        if log_file:
            out.close()


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> float:
    """Seconds until GET url/health answers 200; AlloyError when the server exits or the time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AlloyError(f"mlflow server exited with code {proc.returncode} before answering {url}/health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AlloyError(f"mlflow server did not answer {url}/health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the server and the workers it started (its whole process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def ui_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy ui", description="Start the MLflow UI (mlflow server) on the project's "
                                "store, on loopback, and print its URL. Ctrl-C stops it.")  # fmt: skip
    p.add_argument("--port", type=int, default=5000, help="port (default 5000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the server to answer")
    _common(p)
    return p


def _experiment_fragment(uri: str, name: str) -> str:
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
        # the runs table: a fresh browser profile would open MLflow 3's GenAI overview instead
        return f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" if exp is not None else ""
    except Exception:  # an empty or unreadable store: the front page will do
        return ""


def ui(argv: list[str]) -> int:
    args = ui_parser().parse_args(argv)
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    store = resolve_store(args.params, args.tracking_uri, args.experiment)
    uri = store.tracking_uri
    if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
        print(f"MLflow UI: {uri.rstrip('/')}/ (the tracking URI is a server already)", flush=True)
        return 0
    f = _sqlite_file(uri)
    if f is not None and not f.is_file():
        print(f"alloy ui: note: {f} does not exist yet; the UI starts on an empty store", file=sys.stderr, flush=True)
    port = free_port(args.host) if args.port == 0 else args.port
    url = f"http://{args.host}:{port}"
    print(f"starting mlflow server on {url} over {uri} ...", flush=True)
    proc = start_mlflow_server(uri, host=args.host, port=port, artifacts_dir=store.artifacts_dir)

    def _stop(signum, frame):  # SIGTERM: clean up the server like Ctrl-C does
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _stop)
    try:
        secs = wait_healthy(url, proc, args.start_timeout)
        page = f"{url}/{_experiment_fragment(uri, store.experiment)}"
        print(f"MLflow UI: {page}  (experiment {store.experiment!r}, ready in {secs:.0f} s; Ctrl-C stops it)", flush=True)
        return proc.wait() and 1
    except KeyboardInterrupt:
        print("alloy ui: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        stop_server(proc)
