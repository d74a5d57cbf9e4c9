"""Publishing a folder built aside: renamed into place, so that readers find the old folder or the new one, whole,
and a process killed at any point leaves one of them (an interrupted replace keeps the old one aside, never neither).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(new: Path, out: Path, *, aside: str = "replaced") -> None:
    """Move the finished folder `new` to `out`. An `out` already there is renamed to `.OUT.ASIDE-PID` beside it and
    removed once `new` stands in its place; if that rename fails, the old folder is put back. A folder already at the
    aside name (this process's leftover) makes it fail rather than be removed: it could be the user's."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.{aside}-{os.getpid()}")
    if old.exists():
        raise FileExistsError(f"{old}: in the way of replacing {out}")
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_once(new: Path, out: Path) -> bool:
    """Move the finished folder `new` to `out` unless another process published `out` first (a folder of the same
    bytes, for the callers here): then `new` is removed. True when `new` became `out`."""
    try:
        new.rename(out)
        return True
    except OSError:
        shutil.rmtree(new, ignore_errors=True)
        return False


def build_folder(out: Path, tag: str) -> Path:
    """An empty folder beside `out` to build it in, named for this process (`.OUT.TAG-PID`), for replace_folder to
    move into place. Those left by processes that are gone (killed mid-build) are removed first; a running one's
    is left alone."""
    for p in out.parent.glob(f".{out.name}.{tag}-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
    tmp = out.with_name(f".{out.name}.{tag}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
