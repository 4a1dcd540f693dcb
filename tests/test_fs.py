"""lorakit._fs: a target is replaced whole or left as it was; nothing temporary stays behind."""

from __future__ import annotations

import pytest

from lorakit._fs import atomic_folder, atomic_write, atomic_write_text
from lorakit.errors import LorakitError


def test_atomic_write_keeps_the_suffix_and_leaves_nothing_behind(tmp_path):
    seen = []
    atomic_write(tmp_path / "chart.png", lambda path: (seen.append(path), open(path, "w").write("x")))
    assert seen[0].endswith(".png") and (tmp_path / "chart.png").read_text() == "x"
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "chart.png"]
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == "0o644"


def test_a_failed_write_leaves_the_old_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")

    def fail(path):
        open(path, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(LorakitError, match=r"writing .*a\.txt failed \(disk full\).*unchanged"):
        atomic_write(tmp_path / "a.txt", fail)  # the OS error becomes one message naming the target
    assert (tmp_path / "a.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sub" / "out"
    with atomic_folder(out) as tmp:
        (tmp / "f").write_text("1")
        assert not out.exists()
    assert (out / "f").read_text() == "1" and oct(out.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "f").write_text("2")
            raise RuntimeError("crash")
    assert (out / "f").read_text() == "1" and [p.name for p in out.parent.iterdir()] == ["out"]
    with atomic_folder(out) as tmp:
        (tmp / "g").write_text("3")
    assert [p.name for p in out.iterdir()] == ["g"] and [p.name for p in out.parent.iterdir()] == ["out"]


def test_atomic_folder_names_its_temporary_folder_with_the_prefix(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, prefix=".tmp-out-") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-out-") and len(tmp.name) > len(".tmp-out-")
        (tmp / "f").write_text("1")
    with atomic_folder(out, prefix=".tmp-out-") as tmp:  # replacing: the old folder is moved aside under the prefix
        (tmp / "f").write_text("2")
    assert (out / "f").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_folder_with_fsync_flushes_files_the_folder_and_its_parent(tmp_path, monkeypatch):
    import os

    flushed = []  # inodes, in order (a renamed folder keeps its inode)
    real_fsync = os.fsync

    def fsync(fd):
        flushed.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    with atomic_folder(out, fsync=True) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("2")
    inode = {p.name: p.stat().st_ino for p in (out / "a", out / "b", out)}
    assert sorted(flushed[:2]) == sorted([inode["a"], inode["b"]])
    assert flushed[2:] == [inode["out"], tmp_path.stat().st_ino]
    flushed.clear()
    with atomic_folder(out) as tmp:
        (tmp / "c").write_text("3")
    assert flushed == []
