"""The trainer's console shows user-controlled text literally: no markup, control characters escaped."""

from __future__ import annotations

import io

import pytest

from trainer import _console
from trainer._console import error, progress_bar, shown, visible, warning


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Everything the console prints, as plain text."""
    out = io.StringIO()
    console = _console._LiteralConsole(file=out, width=200, highlight=False, markup=False, emoji=False)
    monkeypatch.setattr(_console, "console", console)
    return out


def test_visible_escapes_control_characters_only() -> None:
    assert visible("photo é 1.jpg") == "photo é 1.jpg"
    assert visible("a\x1b[31mb\x07\r\u202ec\x9b") == "a\\x1b[31mb\\x07\\r\\u202ec\\x9b"
    assert visible("two\nlines\tok") == "two\nlines\tok"
    assert shown("two\nlines") == "two\\nlines"


def test_plain_prints_show_markup_and_escapes_literally(recorded: io.StringIO) -> None:
    _console.console.print("a[/]b [bold]x \x1b[31mred")
    error("no photos in [/]c")
    warning("[red]w[/red]")
    assert recorded.getvalue().splitlines() == [
        "a[/]b [bold]x \\x1b[31mred",
        "Error: no photos in [/]c",
        "Warning: [red]w[/red]",
    ]


def test_progress_descriptions_are_literal() -> None:
    bar = progress_bar()
    task = bar.add_task("Samples '[/]\x1b[2J'", total=1)
    # Render the columns directly: what a terminal would be sent.
    rendered = bar.columns[1].render(bar.tasks[task])
    assert rendered.plain == "Samples '[/]\\x1b[2J'"


def test_no_module_styles_its_output_with_markup() -> None:
    # The console reads no markup: a "[red]" in a message would be printed as it is. Style with
    # styled()/error()/warning() or print(..., style=...) instead.
    import re
    from pathlib import Path

    import trainer

    tag = re.compile(r"\[/?(red|green|yellow|bold|dim|blue|cyan|magenta|italic)\]|\[/\]")
    offenders = [
        f"{path.name}:{number}"
        for path in Path(trainer.__file__).parent.glob("*.py")
        if path.name != "_console.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if tag.search(line)
    ]
    assert offenders == []
