"""cd2p._atomic: outputs appear complete or not at all, with umask-respecting permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from cd2p._atomic import (
    atomic_directory,
    atomic_output,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writers_create_parents_and_leave_only_the_final_file(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "a" / "j.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    text = (tmp_path / "a" / "j.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.endswith("}\n")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "j.json", "t.txt"]


def test_rewrite_replaces_the_previous_contents(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_output(tmp_path / "g.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "inner").write_text("x")
            # safetensors creates its files 0600 itself; the published ones get the usual mode.
            (tmp / "sub").mkdir(mode=0o700)
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
        with atomic_output(tmp_path / "m.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.txt") == 0o666 & ~umask
    assert _mode(tmp_path / "g.bin") == 0o666 & ~umask
    assert _mode(tmp_path / "d") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / "sub") == 0o777 & ~umask
    assert _mode(tmp_path / "d" / "sub" / "w.safetensors") == 0o666 & ~umask
    assert _mode(tmp_path / "m.safetensors") == 0o666 & ~umask


def test_json_never_holds_a_bare_nan(tmp_path):
    # NaN / Infinity are not JSON: other readers (jq, browsers, the Hub) refuse the file.
    data = {"acc": float("nan"), "loss": [1.0, float("inf"), -float("inf")], "n": 3}
    atomic_write_json(tmp_path / "m.json", data)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"acc": None, "loss": [1.0, None, None], "n": 3}


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    atomic_write_bytes(path, b"previous")
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_output(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.")
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("writer crashed")
    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path]


def test_failed_first_write_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "plot.png", ".png") as tmp:
        assert tmp.suffix == ".png" and tmp.name.endswith(".tmp.png")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_output_temporaries_are_distinct_and_hidden(tmp_path):
    path = tmp_path / "out.json"
    with atomic_output(path) as first, atomic_output(path) as second:
        assert first != second
        assert first.name.startswith(".") and second.name.startswith(".")
        first.write_text("1")
        second.write_text("2")
    assert path.read_text() == "1"  # the outer block renamed last
    assert list(tmp_path.iterdir()) == [path]


def test_directory_appears_complete_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "run" / "model"
    with atomic_directory(out) as tmp:
        assert not out.exists()
        (tmp / "weights").write_text("v1")
    assert (out / "weights").read_text() == "v1"
    with atomic_directory(out) as tmp:
        (tmp / "weights2").write_text("v2")
    assert [p.name for p in out.iterdir()] == ["weights2"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]


def test_failed_directory_keeps_the_previous_one_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(OSError, match="disk full"), atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v2 (partial)")
        raise OSError("disk full")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_directory_replaces_an_empty_directory_or_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a directory")
    for name in ("empty", "file"):
        with atomic_directory(tmp_path / name) as tmp:
            (tmp / "x").write_text(name)
        assert (tmp_path / name / "x").read_text() == name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]
