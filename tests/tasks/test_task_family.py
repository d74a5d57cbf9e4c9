"""tasks.family.build_family: a family built once is reused while its settings and its folder's bytes stand."""

from __future__ import annotations

import hashlib
import json

from tasks.family import LEGACY_STAMP, build_family, stamp_path

OPTIONS = {"size": "test", "base_steps": 6, "specialist_steps": 3, "skills": ["facts"], "n_eval": 4}


def test_family_is_reused_only_while_settings_and_folder_match(tmp_path):
    root = tmp_path / "models" / "tiny"
    first = build_family("tiny", root, seed=0, options=OPTIONS)
    assert not first["reused"] and (root / "facts" / "config.json").is_file()
    # the stamp lies beside the folder: the folder holds exactly what the builder wrote (dvc's `family` output)
    assert stamp_path(root).is_file() and not any(p.name.startswith(".alloy") for p in root.iterdir())
    before = (root / "family.json").read_bytes()

    again = build_family("tiny", root, seed=0, options=OPTIONS)
    assert again["reused"] and again["specialists"] == first["specialists"]

    # other settings rebuild
    other = build_family("tiny", root, seed=0, options={**OPTIONS, "specialist_steps": 4})
    assert not other["reused"] and json.loads((root / "family.json").read_text()) != json.loads(before)

    # a folder rebuilt by something else (dvc's stage, another params file) is not taken for the stamped one
    (root / "family.json").write_text((root / "family.json").read_text() + " ")
    assert not build_family("tiny", root, seed=0, options={**OPTIONS, "specialist_steps": 4})["reused"]
    digest = hashlib.sha256((root / "family.json").read_bytes()).hexdigest()
    assert json.loads(stamp_path(root).read_text())["family_json"] == digest


def test_a_family_stamped_by_an_earlier_version_is_reused_not_rebuilt(tmp_path):
    root = tmp_path / "tiny"
    build_family("tiny", root, seed=0, options=OPTIONS)
    stamp = json.loads(stamp_path(root).read_text())
    stamp.pop("family_json")
    stamp_path(root).unlink()
    (root / LEGACY_STAMP).write_text(json.dumps(stamp))  # the old layout: the stamp inside, no digest
    mtime = (root / "facts" / "config.json").stat().st_mtime_ns
    assert build_family("tiny", root, seed=0, options=OPTIONS)["reused"]
    assert (root / "facts" / "config.json").stat().st_mtime_ns == mtime
    assert stamp_path(root).is_file() and not (root / LEGACY_STAMP).exists()
