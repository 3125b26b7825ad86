"""Crash-safe file writes: write beside the target, fsync, then rename over it.

A rename within one folder is atomic on POSIX and Windows (``os.replace``), so a reader (or a
resumed run after a crash or SIGKILL) sees either the old complete file/folder or the new one,
never a half-written one. Leftover ``.tmp-*`` entries from a crash are ignored and cleaned up.

A full disk, a quota or a failing disk (ENOSPC, EDQUOT, EIO) during a write becomes one
:class:`~trainer.errors.StorageError` (see :func:`disk_errors`) that names the folder and how much
space was needed, instead of a traceback; the temporary file or folder is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer._console import shown
from trainer.errors import StorageError

__all__ = [
    "TMP_PREFIX",
    "atomic_write_bytes",
    "atomic_write_text",
    "disk_errors",
    "format_size",
    "fsync_tree",
    "tree_size",
    "publish_dir",
    "remove_stale_temp",
    "temp_sibling",
]

TMP_PREFIX = ".tmp-"

# What each disk errno means, for the message; EDQUOT does not exist everywhere (Windows).
_DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EIO: "the disk reported an input/output error (it may be failing or disconnected)",
}
if hasattr(errno, "EDQUOT"):
    _DISK_ERRNOS[errno.EDQUOT] = "the disk quota is exceeded"
# Libraries that write in native code report a full disk in their own exception types, by text.
_DISK_TEXTS = {
    "no space left on device": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "storagefull": errno.ENOSPC,
    "disk quota exceeded": getattr(errno, "EDQUOT", errno.ENOSPC),
    "input/output error": errno.EIO,
}
# torch.save's C++ writer says only that a write failed; on a disk with (almost) no free space left,
# that was a full disk.
_WRITER_FAILURES = ("pytorchstreamwriter failed", "file write failed", "unexpected pos", "iostream error")
_NEARLY_FULL = 64_000_000


def format_size(size: int) -> str:
    """``1536`` -> ``"1.5 KB"``: bytes in decimal units, as disk tools show them."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def tree_size(path: Path) -> int:
    """The bytes of every file under ``path`` (or of ``path`` itself); 0 if it is gone."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _free_space(folder: Path) -> int | None:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_errno(exc: BaseException, folder: Path, needed: int | None) -> int | None:
    """The disk errno behind ``exc`` (itself, what caused it, or its text), or ``None``."""
    seen: set[int] = set()
    writer_failed = False
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            return current.errno
        text = str(current).lower()
        for fragment, code in _DISK_TEXTS.items():
            if fragment in text:
                return code
        writer_failed = writer_failed or any(fragment in text for fragment in _WRITER_FAILURES)
        current = current.__cause__ or current.__context__
    if writer_failed:
        free = _free_space(folder)
        if free is not None and free < max(needed or 0, _NEARLY_FULL):
            return errno.ENOSPC
    return None


@contextmanager
def disk_errors(folder: Path, what: str, *, needed: int | None = None, then: str = "") -> Iterator[None]:
    """Turn a full, over-quota or failing disk while writing ``what`` in ``folder`` into a StorageError.

    Args:
        folder: Where the write went (the message names it and its free space).
        what: What was being written, e.g. ``"checkpoint-500"``.
        needed: Bytes the write needs, when known.
        then: A sentence on what is left and how to continue, appended to the message.

    Raises:
        StorageError: the write failed with ENOSPC, EDQUOT or EIO (any other error passes through).
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        code = _disk_errno(exc, folder, needed)
        if code is None:
            raise
        raise StorageError(
            _disk_message(folder, what, code, needed, then), folder=folder, needed=needed, errno=code
        ) from exc


def _disk_message(folder: Path, what: str, code: int, needed: int | None, then: str) -> str:
    space = _free_space(folder)
    free = "free space unknown" if space is None else f"{format_size(space)} free"
    need = f"it needs about {format_size(needed)}, {free}" if needed else free
    if code == errno.EIO:
        fix = "Check the disk (dmesg, SMART) or write to another one (--output)."
    else:
        fix = (
            "Free some space, keep fewer checkpoints (a lower --checkpoints-total-limit), "
            "or write to another disk (--output)."
        )
    message = f"Could not write {what} in {shown(folder)}: {_DISK_ERRNOS[code]} ({need}). {fix}"
    return f"{message} {then}" if then else message


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
    """Write ``data`` to ``path`` atomically and durably.

    Raises:
        StorageError: the disk is full, over its quota or failing; ``path`` is as it was.
    """
    then = f"{shown(path.name)} is unchanged." if path.exists() else ""
    with disk_errors(path.parent, shown(path.name), needed=len(data), then=then):
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
