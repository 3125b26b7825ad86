"""The trainer's terminal output: one rich console on stderr, progress bars, plain logs otherwise.

Progress bars only draw on a terminal; when output goes to a file or a pipe (CI, ``nohup``), the
same progress is written as a plain line every few seconds so logs still show where a run is.

Everything printed is shown literally. Paths, file names, prompts and error messages come from users,
so the console never reads rich markup in them (a folder named ``a[/]b`` or ``[bold]x`` prints as
itself), and control characters (ANSI escapes, carriage returns, bidirectional overrides) are shown
as ``\\x1b``-style escapes instead of reaching the terminal. Styled lines are built with
:func:`styled`, :func:`error` and :func:`warning`; plain ``console.print(str)`` is always safe.
"""

from __future__ import annotations

import time
import unicodedata
from typing import Any

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

__all__ = ["StepProgress", "console", "error", "progress_bar", "shown", "styled", "visible", "warning"]

_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def visible(text: str, *, newlines: bool = True) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\r``, ``\\u202e``).

    Newlines (and tabs) are kept when ``newlines`` is true: messages span lines on purpose.
    Bidirectional overrides and line separators count as control characters too: they change what
    the terminal shows.
    """
    if text.isprintable():
        return text
    kept = "\n\t" if newlines else ""
    return "".join(
        repr(ch)[1:-1]
        if ch not in kept and (unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS)
        else ch
        for ch in text
    )


def shown(value: object) -> str:
    """A user-controlled name (a path, a file name, a prompt) on one line, control characters visible.

    Use it where a name is put into a message: even a newline in a file name stays visible, so a
    name cannot fake extra lines of output.
    """
    return visible(str(value), newlines=False)


class _LiteralConsole(Console):
    """A console that shows every string literally: no markup, control characters made visible.

    Strings reach the terminal through :meth:`render_str` (``print``, table titles and cells), so
    this is the one place that holds for all of them.
    """

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs["markup"] = False
        kwargs.setdefault("emoji", False)
        return super().render_str(visible(text), **kwargs)


# soft_wrap: long paths stay on one line in logs (terminals wrap them themselves).
console = _LiteralConsole(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain strings and ``(text, style)`` pairs, every part shown literally.

    >>> styled(("Error:", "red"), " ", "no photos in a[/]b").plain
    'Error: no photos in a[/]b'
    """
    text = Text()
    for part in parts:
        content, style = (part, "") if isinstance(part, str) else part
        text.append(visible(content), style=style)
    return text


def error(message: str) -> None:
    """Print ``Error: message`` (the label red, the message literal)."""
    console.print(styled(("Error:", "red"), " ", message))


def warning(message: str) -> None:
    """Print ``Warning: message`` (the label yellow, the message literal)."""
    console.print(styled(("Warning:", "yellow"), " ", message))


class _DescriptionColumn(ProgressColumn):
    """A task's description (it may hold a prompt), shown literally and cut to ``max_width``."""

    def __init__(self, max_width: int) -> None:
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis", max_width=max_width))

    def render(self, task: Task) -> Text:
        return Text(visible(task.description, newlines=False), style="progress.description")


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
        _DescriptionColumn(max_width=28),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        *extra,
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA", markup=False),
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
        self._progress = progress_bar(TextColumn("loss {task.fields[loss]}", markup=False))
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
