"""Text inputs as the project reads them (held-out documents, Gram-matrix examples, tune splits): UTF-8 text files
and JSON Lines, every fault an InputError naming file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from merging.errors import InputError


def read_text(path: str | Path) -> str:
    """A file's text as UTF-8 with universal newlines (as Path.read_text gives it); bytes that are not UTF-8 are an
    InputError naming the file, the line and the byte. A missing file raises FileNotFoundError (callers word that
    for their own input)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                         "save it as UTF-8") from None  # fmt: skip


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded row) for each non-blank line; a line that is not JSON (or not UTF-8) is an InputError
    naming file:line. A missing file raises FileNotFoundError (callers word that for their own input)."""
    path = Path(path)
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not JSON ({e.msg})") from None
