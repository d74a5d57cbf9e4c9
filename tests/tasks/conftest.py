import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
from pipeline_env import isolate_env  # noqa: E402

isolate_env()
