"""Crash-safe file writes: write beside the target, fsync, then rename over it.

A rename within one folder is atomic on POSIX and Windows (``os.replace``), so a reader (or a
resumed run after a crash or SIGKILL) sees either the old complete file/folder or the new one,
never a half-written one. Leftover ``.tmp-*`` entries from a crash are ignored and cleaned up.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

__all__ = [
    "TMP_PREFIX",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_tree",
    "publish_dir",
    "remove_stale_temp",
    "temp_sibling",
]

TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(target: Path) -> Path:
    """A fresh temporary path in ``target``'s folder (same file system, so the rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk (before renaming it into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def publish_dir(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` to ``target``, replacing any previous ``target``.

    ``tmp`` must be a sibling of ``target`` (see :func:`temp_sibling`). The old folder is first
    renamed aside, so ``target`` is never a mix of old and new files.
    """
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = temp_sibling(target)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_stale_temp(folder: Path) -> None:
    """Delete ``.tmp-*`` leftovers of interrupted writes in ``folder``."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
