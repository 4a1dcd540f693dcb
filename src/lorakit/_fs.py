"""Writing files and folders so that a crash never leaves a half-written one in place.

Every file lorakit writes for a user goes through here: it is written under a temporary name
beside its target and renamed into place in one step, so a reader sees the old file or the new
one, never part of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(target: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` beside ``target``, then rename the file into place.

    The temporary name keeps ``target``'s suffix, for writers that choose a format by it
    (matplotlib's ``savefig``).
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary, shareable files
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write(target, lambda path: Path(path).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, prefix: str | None = None, fsync: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill; when the block ends without an error it
    replaces ``target`` in one rename, otherwise it is removed and ``target`` stays as it was.

    Args:
        target: the folder to create or replace.
        prefix: the temporary folder's name up to a random suffix (default ``.<name>.``), for
            callers that recognise their own leftovers by name (``.tmp-…``).
        fsync: flush every file and folder inside it, the folder itself and, after the rename,
            its parent to disk: a power loss then leaves the old folder or the complete new one
            (meant for training checkpoints).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f".{target.name}."
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if fsync:
            for path in sorted(tmp.rglob("*"), reverse=True):  # a folder after what it holds
                _fsync(path)
            _fsync(tmp)
        replace_folder(tmp, target, old=target.parent / f"{prefix}old-{os.getpid()}")
        if fsync:
            _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, target: Path, old: Path | None = None) -> None:
    """Move the finished folder ``new`` to ``target``, replacing an existing one (moved aside to
    ``old`` first, default ``.<name>.old-<pid>``, then removed)."""
    if target.exists():
        old = old or target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def _fsync(path: Path) -> None:
    # Best effort: some file systems cannot open or flush a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
