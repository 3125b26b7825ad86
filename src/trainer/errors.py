"""The errors the trainer raises on purpose, as one tree.

Every message says what is wrong and how to fix it; the command line prints it without a traceback.

```
TrainerError
 ├─ ConfigError            an option or the config file is invalid (names the field)
 ├─ PhotoError             photos that cannot be used (lists every bad file and why)
 ├─ MissingDependency      an optional package was asked for and is not installed or not usable
 ├─ TrainingError          training cannot start or continue (e.g. an incompatible checkpoint)
 ├─ StorageError           a write failed: the disk is full, over its quota, or failing
 └─ TrainingInterrupted    SIGINT/SIGTERM: a checkpoint was saved, the message says how to resume
```

``trainer.loading.ModelLoadError`` (a missing or unreadable base model) is separate: the loader is
shared with the export and serving code.
"""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = [
    "ConfigError",
    "MissingDependency",
    "PhotoError",
    "StorageError",
    "TrainerError",
    "TrainingError",
    "TrainingInterrupted",
]


class TrainerError(Exception):
    """Base class of the trainer's own errors."""


class ConfigError(TrainerError, ValueError):
    """The configuration (flags or ``--config`` file) is invalid; the message names each field."""


class PhotoError(TrainerError):
    """One or more photos cannot be used; the message lists every bad file, why, and the fix.

    Attributes:
        problems: ``(path, reason)`` for every unusable file or folder.
    """

    def __init__(self, message: str, problems: list[tuple[Path, str]]) -> None:
        super().__init__(message)
        self.problems = problems


class MissingDependency(TrainerError, ImportError):
    """An optional feature (8-bit Adam, xformers) was asked for but cannot be used here."""


class TrainingError(TrainerError, RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


class StorageError(TrainerError):
    """A write failed because the disk is full, over its quota, or failing (ENOSPC, EDQUOT, EIO).

    Nothing half-written is left behind: what was being written is removed, what was there before
    (the previous checkpoint, model or file) is untouched. The message names the folder, how much
    space was needed when it is known, and how to make room.

    Attributes:
        folder: The folder that was written to.
        needed: Bytes the write needed, when known (e.g. the size of the previous checkpoint).
        errno: ``errno.ENOSPC``, ``errno.EDQUOT`` or ``errno.EIO``.
    """

    def __init__(self, message: str, *, folder: Path, needed: int | None, errno: int) -> None:
        super().__init__(message)
        self.folder = folder
        self.needed = needed
        self.errno = errno


class TrainingInterrupted(TrainerError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint.

    Attributes:
        step: The optimizer step the checkpoint holds.
        checkpoint: The checkpoint folder.
        signum: The signal that stopped training.
    """

    def __init__(self, step: int, checkpoint: Path, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"Training stopped by {name} at step {step}; its state is saved in {checkpoint}. "
            "Run the same command again to continue from there (`--resume auto`, the default), "
            "or pass `--resume latest` to insist on resuming."
        )
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + the signal number."""
        return 128 + self.signum
