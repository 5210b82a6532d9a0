"""Atomic writes: a kill at any moment leaves either the old file or the new one under the final
name, never a mix. Data goes to a hidden temp file beside the target (same file system, so the
rename is atomic), is fsynced, then renamed over the target; the directory is fsynced so the
rename itself survives a power cut."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def _temp_pattern(path: Path) -> str:
    return f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), since setting it
    to read it back would briefly affect files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    """An existing file keeps its mode; a new one gets what ``open()`` would give it
    (``mkstemp`` makes temp files 0600, which would leave outputs unreadable to the group)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_open(path, remove_stale: bool = False) -> Iterator[BinaryIO]:
    """``with atomic_open(p) as f: f.write(...)`` publishes ``p`` only when the block completes;
    an exception removes the temp file and leaves any old ``p`` untouched.

    ``remove_stale``: first delete temp files that an earlier, killed writer of ``p`` left behind
    (SIGKILL gives no chance to clean up). Only for targets with a single writer at a time, or a
    concurrent writer's temp file would vanish under it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if remove_stale:
        for stale in path.parent.glob(_temp_pattern(path)):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, _target_mode(path))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def leftover_temp_files(path) -> list[Path]:
    """Temp files of interrupted writes of ``path`` (for checks and clean-up)."""
    path = Path(path)
    return sorted(path.parent.glob(_temp_pattern(path)))


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
