"""Where outputs may go: never onto, into or around what a command reads.

`--overwrite` replaces an output folder whole, so an output folder that is an input, holds one or lies inside one
would destroy the user's models (or config). A report file written over an input, or into a model's folder, changes
that model. These checks run before any work, on resolved paths (symbolic links and `..` followed)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from merging.errors import OutputError


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_folder(out: str | Path, inputs: Iterable[str | Path], *, option: str = "output folder") -> Path:
    """Refuse an output folder that is an input, holds one, or lies inside one; also one that is a file."""
    out_r = Path(out).expanduser().resolve()
    for inp in inputs:
        inp_r = Path(inp).expanduser().resolve()
        if _within(inp_r, out_r):
            what = "is" if inp_r == out_r else "holds"
            raise OutputError(f"{option} {out} {what} the input {inp}: replacing it would destroy that input; "
                              "choose another folder")
        if inp_r.is_dir() and _within(out_r, inp_r):
            raise OutputError(f"{option} {out} lies inside the input model folder {inp}: choose a folder outside it")
    if out_r.exists() and not out_r.is_dir():
        raise OutputError(f"{option} {out} is a file, not a folder: it is not replaced (remove it or choose a folder)")
    for parent in out_r.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option} {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{option} {out}: cannot write in {parent} (permission denied)")
            break
    return out_r


def check_output_file(out: str | Path, inputs: Iterable[str | Path], *, option: str = "--json") -> Path:
    """Refuse a report file that is an input, lies inside an input model folder, or is a folder."""
    out_r = Path(out).expanduser().resolve()
    for inp in inputs:
        inp_r = Path(inp).expanduser().resolve()
        if out_r == inp_r:
            raise OutputError(f"{option} {out} is an input of this command: writing there would replace it")
        if inp_r.is_dir() and _within(out_r, inp_r):
            raise OutputError(f"{option} {out} lies inside the input model folder {inp}: write it elsewhere")
    if out_r.is_dir():
        raise OutputError(f"{option} {out} is a folder; give a file path")
    for parent in out_r.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{option} {out}: {parent} is a file, not a folder")
            break
    return out_r


def write_report(out: str | Path, text: str, inputs: Iterable[str | Path] = (), *, option: str = "--json") -> Path:
    """Write a report file whole (a temp file renamed over it), its folders made; checked as check_output_file."""
    path = check_output_file(out, inputs, option=option)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{option} {out}: cannot write it ({e.strerror or e})") from None
    return path
