"""The trainer's terminal output: one rich console on stderr, progress bars, plain logs otherwise.

Progress bars only draw on a terminal; when output goes to a file or a pipe (CI, ``nohup``), the
same progress is written as a plain line every few seconds so logs still show where a run is.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

__all__ = ["StepProgress", "console", "progress_bar"]

# soft_wrap: long paths stay on one line in logs (terminals wrap them themselves).
console = Console(stderr=True, highlight=False, soft_wrap=True)


class _RateColumn(ProgressColumn):
    """Iterations per second (or seconds per iteration when slower than 1 it/s)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- it/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.2f} it/s", style="progress.data.speed")
        return Text(f"{1 / speed:.1f} s/it", style="progress.data.speed")


def progress_bar(*extra: ProgressColumn, transient: bool = False) -> Progress:
    """A rich progress bar with count, rate, elapsed time and ETA (plus ``extra`` columns)."""
    return Progress(
        SpinnerColumn(),
        # Long descriptions (a prompt) are cut, so the figures never wrap on a narrow console.
        TextColumn(
            "[progress.description]{task.description}",
            table_column=Column(no_wrap=True, overflow="ellipsis", max_width=28),
        ),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        *extra,
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


class StepProgress:
    """A progress bar with the loss, that falls back to a log line every ``log_every_s`` seconds.

    Use as a context manager; call :meth:`advance` after each step.
    """

    def __init__(
        self, description: str, total: int, *, completed: int = 0, log_every_s: float = 10.0
    ) -> None:
        self._progress = progress_bar(TextColumn("loss {task.fields[loss]}"))
        self._description = description
        self._total = total
        self._completed = completed
        self._start_completed = completed
        self._log_every_s = log_every_s
        self._last_log = 0.0
        self._started = 0.0
        self._task = self._progress.add_task(description, total=total, completed=completed, loss="-")

    def __enter__(self) -> StepProgress:
        self._started = self._last_log = time.monotonic()
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def advance(self, loss: float) -> None:
        """Record one finished step and its loss."""
        self._completed += 1
        self._progress.update(self._task, advance=1, loss=f"{loss:.4f}")
        now = time.monotonic()
        if not console.is_terminal and (
            now - self._last_log >= self._log_every_s or self._completed == self._total
        ):
            self._last_log = now
            done = self._completed - self._start_completed
            rate = done / max(now - self._started, 1e-9)
            eta = (self._total - self._completed) / rate if rate else float("inf")
            console.print(
                f"{self._description}: step {self._completed}/{self._total}, loss {loss:.4f}, "
                f"{rate:.2f} it/s, ETA {eta:.0f} s"
            )
