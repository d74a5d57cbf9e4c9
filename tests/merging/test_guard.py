"""Outputs never land onto, into or around the inputs they are made from."""

from __future__ import annotations

import pytest

from merging.errors import OutputError
from merging.guard import check_output_file, check_output_folder, write_report


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "models" / "ft0").mkdir(parents=True)
    (tmp_path / "models" / "ft0" / "config.json").write_text("{}")
    (tmp_path / "c.yml").write_text("merge_method: linear\n")
    (tmp_path / "afile").write_text("data")
    return tmp_path


@pytest.mark.parametrize(("out", "match"), [
    ("models/ft0", "is the input"),  # the output is an input
    ("models", "holds the input"),  # --overwrite would delete every model under it
    (".", "holds the input"),
    ("models/ft0/sub", "inside the input model folder"),
    ("afile", "is a file"),
    ("afile/out", "is a file, not a folder"),
])
def test_output_folder_refused(tree, out, match):
    inputs = [tree / "models" / "ft0", tree / "c.yml"]
    with pytest.raises(OutputError, match=match):
        check_output_folder(tree / out, inputs)
    assert (tree / "models" / "ft0" / "config.json").read_text() == "{}"


def test_output_folder_beside_inputs_is_fine(tree):
    assert check_output_folder(tree / "out" / "merge", [tree / "models" / "ft0"]) == (tree / "out" / "merge").resolve()


def test_output_folder_through_a_link_is_resolved(tree):
    (tree / "link").symlink_to(tree / "models")
    with pytest.raises(OutputError, match="holds the input"):
        check_output_folder(tree / "link", [tree / "models" / "ft0"])


@pytest.mark.parametrize(("out", "match"), [
    ("c.yml", "is an input"),
    ("models/ft0/config.json", "inside the input model folder"),
    ("models", "is a folder"),
    ("afile/r.json", "is a file, not a folder"),
])
def test_report_file_refused(tree, out, match):
    with pytest.raises(OutputError, match=match):
        write_report(tree / out, "{}", [tree / "c.yml", tree / "models" / "ft0"])
    assert (tree / "c.yml").read_text().startswith("merge_method")


def test_report_written_whole_with_its_folders(tree):
    path = write_report(tree / "reports" / "deep" / "r.json", '{"a": 1}\n', [tree / "c.yml"])
    assert path.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temp file left
    assert check_output_file(tree / "r2.json", []) == (tree / "r2.json").resolve()
