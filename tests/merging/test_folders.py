import os

import pytest

from merging.folders import build_folder, publish_once, replace_folder


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "f").write_text(text)
    return path


def test_replace_folder_puts_the_new_folder_in_place_and_leaves_nothing_beside_it(tmp_path):
    out = _folder(tmp_path / "out", "old")
    replace_folder(_folder(tmp_path / ".new", "new"), out)
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_creates_the_parent_when_nothing_is_there(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    replace_folder(_folder(tmp_path / ".new", "new"), out)
    assert (out / "f").read_text() == "new"


def test_a_failed_replace_puts_the_old_folder_back(tmp_path):
    out = _folder(tmp_path / "out", "old")
    with pytest.raises(FileNotFoundError):
        replace_folder(tmp_path / ".missing", out)  # the rename into place fails once the old one is aside
    assert (out / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_never_removes_a_folder_at_its_aside_name(tmp_path):
    out = _folder(tmp_path / "out", "old")
    theirs = _folder(tmp_path / f".out.replaced-{os.getpid()}", "someone's")
    new = _folder(tmp_path / ".new", "new")
    with pytest.raises(FileExistsError, match="in the way"):
        replace_folder(new, out)
    assert (theirs / "f").read_text() == "someone's"
    assert (out / "f").read_text() == "old" and (new / "f").read_text() == "new"


def test_publish_once_keeps_the_folder_another_process_published_first(tmp_path):
    out = _folder(tmp_path / "out", "first")
    new = _folder(tmp_path / ".mine", "second")
    assert publish_once(new, out) is False
    assert (out / "f").read_text() == "first" and not new.exists()
    assert publish_once(_folder(tmp_path / ".other", "x"), tmp_path / "fresh") is True
    assert (tmp_path / "fresh" / "f").read_text() == "x"


def test_build_folder_sweeps_what_dead_processes_left_and_spares_live_ones(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited: its pid is free
    out = tmp_path / "out"
    left = tmp_path / f".out.moe-{dead}"
    (left / "model.safetensors").parent.mkdir(parents=True)
    (left / "model.safetensors").write_text("half")
    live = tmp_path / f".out.moe-{os.getppid()}"  # a running process (this one's parent)
    live.mkdir()
    other = tmp_path / ".other.moe-1"  # another output's: not ours to judge
    other.mkdir()
    tmp = build_folder(out, "moe")
    assert tmp == tmp_path / f".out.moe-{os.getpid()}" and tmp.is_dir() and not any(tmp.iterdir())
    assert not left.exists() and live.exists() and other.exists()
