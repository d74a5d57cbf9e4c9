"""eval.texts: the JSON Lines reader behind held-out texts, Gram-matrix examples and tune splits."""

from __future__ import annotations

import pytest

from eval.texts import jsonl_rows
from merging.errors import InputError


def test_rows_with_their_line_numbers_skipping_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "x"}\n\n  \n[1, 2]\n"s"\n')
    assert list(jsonl_rows(f)) == [(1, {"text": "x"}), (4, [1, 2]), (5, "s")]


def test_a_bad_line_is_named(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(InputError, match=r"b\.jsonl:2: not JSON"):
        list(jsonl_rows(f))
    with pytest.raises(FileNotFoundError):
        list(jsonl_rows(tmp_path / "missing.jsonl"))


def test_not_utf8_is_named_with_line_and_byte(tmp_path):
    from eval.texts import read_text

    f = tmp_path / "latin1.txt"
    f.write_bytes("first line\nsecond: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt:2: not UTF-8 text \(byte 22: b'\\xe9'\)"):
        read_text(f)
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(InputError, match=r"rows\.jsonl:2: not UTF-8"):
        list(jsonl_rows(rows))
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"a\r\nb\rc\n")
    assert read_text(crlf) == "a\nb\nc\n"  # universal newlines, as Path.read_text gives them
