"""Environment for tests that run Prefect, MLflow or DVC: isolated, offline, quiet (see the recipes notes)."""

import os
import tempfile


def isolate_env() -> None:
    if os.environ.get("ALLOY_TEST_ENV") == str(os.getpid()):
        return  # once per process: prefect reads its settings when first imported
    home = tempfile.mkdtemp(prefix="alloy-prefect-home-")
    defaults = {
        "PREFECT_HOME": home,  # the temporary server's database lives here, not in ~/.prefect
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a cold start exceeded the default 20 s here
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ALLOY_TEST_ENV": str(os.getpid()),
    }
    os.environ.update(defaults)
    os.environ.pop("PREFECT_API_URL", None)  # a developer's server must not receive test runs
    os.environ.pop("MLFLOW_TRACKING_URI", None)
