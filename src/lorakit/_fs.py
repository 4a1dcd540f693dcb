"""Writing files and folders so that a crash never leaves a half-written one in place.

Every file lorakit writes for a user goes through here: it is written under a temporary name
beside its target and renamed into place in one step, so a reader sees the old file or the new
one, never part of one. Also where lorakit keeps its caches (:func:`cache_dir`: converted models,
tokenised data, Spectrum scans).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lorakit.errors import LorakitError


def atomic_write(target: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(temp_path)`` beside ``target``, then rename the file into place.

    The temporary name keeps ``target``'s suffix, for writers that choose a format by it
    (matplotlib's ``savefig``).
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    try:
        with write_failures(target):
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
        with write_failures(target):
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


@contextlib.contextmanager
def write_failures(target: str | Path) -> Iterator[None]:
    """Turn a failed write inside the block (disk full, file-size limit, permissions; safetensors
    reports these as its own error type) into a :class:`LorakitError` naming ``target``, saying
    that what was there before is unchanged."""
    try:
        yield
    except LorakitError:
        raise
    except Exception as err:
        failure = write_failure(target, err)
        if failure is None:
            raise
        raise failure from err


def write_failure(target: str | Path, err: BaseException | None) -> LorakitError | None:
    """The :class:`LorakitError` for ``err`` when it is a failed write of ``target`` (what failed,
    the likely cause, that the previous ``target`` is unchanged); None for any other error."""
    if not (isinstance(err, OSError) or type(err).__name__ == "SafetensorError"):
        return None
    reason = " ".join(str(err.strerror if isinstance(err, OSError) and err.strerror else err).split())[:200]
    lowered = reason.lower()
    hint = ("the file-size limit (ulimit -f) was hit; raise it" if "too large" in lowered or "efbig" in lowered
            else "the disk is full; free space" if "no space" in lowered
            else "check the folder's permissions and free space")
    return LorakitError(f"writing {target} failed ({reason}); {hint} or write elsewhere — the previous "
                        f"{Path(target).name} (if any) is unchanged and nothing half-written was left")


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


def cache_dir() -> Path:
    """The lorakit cache folder: ``$LORAKIT_CACHE``, else ``~/.cache/lorakit``; created on demand.

    Returns:
        The folder (it exists when this returns).

    Raises:
        LorakitError: when the folder cannot be created.
    """
    root = Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LorakitError(f"cannot create the lorakit cache folder {root}: {e}; "
                           "set LORAKIT_CACHE to a writable folder") from e
    return root
