"""The ``sdclient`` command: ``sdclient generate ...`` and ``sdclient usage``.

Tokens never go on the command line (where shell history and ``ps`` would show them): they come
from ``HF_TOKEN``, from ``hf auth login``, or from the environment variable named by
``--token-env``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from ._client import EventHook, SDClient
from ._constants import DEFAULT_MAX_RETRIES, DEFAULT_MAX_WAIT_FOR_MODEL
from ._exceptions import SDClientError
from ._models import GenerateRequest, GenerationEvent, image_filename
from ._providers import ProviderName
from ._usage import ModelUsage, UsageTracker
from ._version import __version__
from .protocol import HUB_ENDPOINT, MAX_GUIDANCE_SCALE, MAX_IMAGE_SIDE, MAX_STEPS, MIN_IMAGE_SIDE, ROUTER_URL

__all__ = ["app", "default_usage_file", "main"]

app = typer.Typer(
    name="sdclient",
    help="Generate images with a text-to-image model (Hub id or endpoint URL) and track usage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False, soft_wrap=True)


def default_usage_file() -> Path:
    """``$SDCLIENT_USAGE_FILE``, else ``$XDG_CACHE_HOME/sdclient/usage.sqlite`` (``~/.cache/...``)."""
    explicit = os.environ.get("SDCLIENT_USAGE_FILE")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sdclient" / "usage.sqlite"


def _fail(message: str, code: int = 1) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        _out.print(f"sdclient {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Generate images with a text-to-image model and track usage."""


class _StatusColumn(ProgressColumn):
    """Per-image status; counts a cold start down between server updates."""

    def render(self, task: Task) -> Text:
        status = str(task.fields.get("status", ""))
        ready_at = task.fields.get("ready_at")
        if isinstance(ready_at, float):
            left = max(0.0, ready_at - time.monotonic())
            status = f"model loading, ~{left:.0f} s left"
        return Text(status, style=str(task.fields.get("style", "")))


def _event_hook(progress: Progress, task: TaskID) -> EventHook:
    def hook(event: GenerationEvent) -> None:
        if event.kind == "loading":
            if event.eta_s is None:
                progress.update(task, status="model loading", ready_at=None, style="yellow")
            else:
                progress.update(task, ready_at=time.monotonic() + event.eta_s, style="yellow")
        elif event.kind == "sending":
            label = "generating" if event.attempt <= 1 else f"generating (attempt {event.attempt})"
            progress.update(task, status=label, ready_at=None, style="")
        elif event.kind == "retrying":
            reason = (event.message or "").split(". ")[0][:80]
            progress.update(
                task,
                status=f"retrying in {event.delay_s or 0:.1f} s: {reason}",
                ready_at=None,
                style="yellow",
            )
        elif event.kind == "queued":
            progress.update(task, status="queued", ready_at=None)

    return hook


async def _generate_all(
    client: SDClient,
    prompt: str,
    seeds: list[int | None],
    output_dir: Path,
    concurrency: int,
    request: GenerateRequest,
    quiet: bool,
) -> list[tuple[int, Path | SDClientError]]:
    slots = asyncio.Semaphore(concurrency)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        _StatusColumn(),
        console=_err,
        transient=False,
        disable=quiet,
    )

    async def one(index: int, seed: int | None) -> tuple[int, Path | SDClientError]:
        label = f"image {index + 1}" + (f" (seed {seed})" if seed is not None else "")
        task = progress.add_task(label, total=1, status="queued")
        async with slots:
            try:
                image = await client.generate_request(
                    request.model_copy(update={"seed": seed}), on_event=_event_hook(progress, task)
                )
            except SDClientError as exc:
                progress.update(task, status="failed", ready_at=None, style="red")
                return index, exc
        path = await asyncio.to_thread(image.save, output_dir / image_filename(prompt, image.seed))
        wait = (
            f", waited {image.timings.cold_start_wait_s:.0f} s for the model"
            if image.timings.cold_start_wait_s
            else ""
        )
        progress.update(
            task,
            completed=1,
            status=f"{path.name} ({image.width}x{image.height}, {image.timings.total_s:.1f} s{wait})",
            ready_at=None,
            style="green",
        )
        return index, path

    with progress:
        return list(await asyncio.gather(*(one(i, seed) for i, seed in enumerate(seeds))))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", envvar="SDCLIENT_MODEL", help="Hub model id (user/name) or full endpoint URL."
        ),
    ],
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", min=1, max=1000, help="Images to make.")
    ] = 1,
    seed: Annotated[
        int | None,
        typer.Option(min=0, help="Seed of the first image (the next ones use seed+1, ...); random if unset."),
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="What to avoid.")] = None,
    width: Annotated[
        int | None, typer.Option(min=MIN_IMAGE_SIDE, max=MAX_IMAGE_SIDE, help="Width in pixels.")
    ] = None,
    height: Annotated[
        int | None, typer.Option(min=MIN_IMAGE_SIDE, max=MAX_IMAGE_SIDE, help="Height in pixels.")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=MAX_STEPS, help="Inference steps.")] = None,
    guidance: Annotated[
        float | None, typer.Option(min=0.0, max=MAX_GUIDANCE_SCALE, help="Guidance scale.")
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="Diffusers scheduler class name.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Requests in flight at once.")] = 4,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder for the PNGs.")] = Path("."),
    provider: Annotated[
        ProviderName,
        typer.Option(help="Inference Provider for a Hub id; auto: the first live one the Hub lists."),
    ] = "auto",
    base_url: Annotated[
        str | None,
        typer.Option(help="A server of the hf-inference protocol for Hub ids (instead of a provider)."),
    ] = None,
    router_url: Annotated[str, typer.Option(help="Hugging Face's router.")] = ROUTER_URL,
    hub_url: Annotated[
        str, typer.Option(help="The Hub (provider mappings, LoRA weight URLs).")
    ] = HUB_ENDPOINT,
    token_env: Annotated[
        str | None,
        typer.Option(
            "--token-env",
            metavar="NAME",
            help="Read the token from this environment variable (default: HF_TOKEN, then `hf auth login`).",
        ),
    ] = None,
    max_wait: Annotated[
        float, typer.Option(min=0.1, help="Seconds to wait for a cold start per image.")
    ] = DEFAULT_MAX_WAIT_FOR_MODEL,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per HTTP request.")] = 120.0,
    max_retries: Annotated[
        int, typer.Option(min=0, help="Retries of transient failures.")
    ] = DEFAULT_MAX_RETRIES,
    usage_file: Annotated[
        Path | None,
        typer.Option(
            help="SQLite file to count usage in [default: $SDCLIENT_USAGE_FILE or ~/.cache/sdclient]."
        ),
    ] = None,
    no_usage: Annotated[bool, typer.Option("--no-usage", help="Do not record usage.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
) -> None:
    """Generate images and save them as PNGs named after the prompt and seed.

    Example: sdclient generate "a red fox in the snow" -m user/sd-model -n 4 --seed 42 -o out/
    """
    token: str | None = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise _fail(f"environment variable {token_env} (from --token-env) is not set or empty", 2)
    seeds: list[int | None] = [seed + i if seed is not None else None for i in range(num_images)]
    if not prompt.strip():
        raise _fail('the prompt is empty: say what to draw, e.g. sdclient generate "a red fox" -m ...', 2)
    try:
        request = GenerateRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            scheduler=scheduler,
        )
    except ValidationError as exc:
        detail = exc.errors()[0]
        raise _fail(f"{'.'.join(map(str, detail['loc']))}: {detail['msg']}", 2) from None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(f"cannot create the output folder {output_dir}: {exc.strerror}", 2) from None
    try:
        tracker = None if no_usage else UsageTracker(usage_file or default_usage_file())
    except Exception as exc:  # sqlite3.Error, OSError
        raise _fail(f"cannot open the usage file {usage_file or default_usage_file()}: {exc}", 2) from None

    async def run() -> list[tuple[int, Path | SDClientError]]:
        async with SDClient(
            model,
            provider=provider,
            token=token,
            base_url=base_url,
            router_url=router_url,
            hub_url=hub_url,
            timeout=timeout,
            max_wait_for_model=max_wait,
            max_retries=max_retries,
            usage=tracker,
        ) as client:
            return await _generate_all(client, prompt, seeds, output_dir, concurrency, request, quiet)

    try:
        results = asyncio.run(run())
    except ValueError as exc:  # a malformed model id/URL, contradictory options
        raise _fail(str(exc).splitlines()[0], 2) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    finally:
        if tracker is not None:
            tracker.close()

    failures = [(i, r) for i, r in results if isinstance(r, SDClientError)]
    for _, result in results:
        if isinstance(result, Path):
            _out.print(str(result))
    if failures:
        prefix = f"{len(failures)} of {len(results)} images failed; " if len(results) > 1 else ""
        raise _fail(f"{prefix}{failures[0][1]}")


def _seconds(value: float) -> str:
    """Seconds for the table: a short call must not read as 0 (``0.043``, ``12.5``)."""
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2g}"


def _usage_table(models: dict[str, ModelUsage], total: ModelUsage) -> Table:
    """Counters as rows, one column per model (model ids and URLs are long), plus a total."""
    columns = dict(models)
    if len(models) > 1:
        columns["total"] = total
    table = Table(title="sdclient usage")
    table.add_column("", no_wrap=True)
    for name in columns:
        table.add_column(name, justify="right", overflow="fold")
    rows: list[tuple[str, list[str]]] = [
        ("requests", [str(u.requests) for u in columns.values()]),
        ("images", [str(u.images) for u in columns.values()]),
        ("prompt characters", [str(u.prompt_characters) for u in columns.values()]),
        ("compute seconds", [_seconds(u.compute_seconds) for u in columns.values()]),
        (
            "cold starts",
            [f"{u.cold_start_waits} ({u.cold_start_wait_seconds:.0f} s)" for u in columns.values()],
        ),
        ("retries", [str(u.retries) for u in columns.values()]),
    ]
    for label, values in rows:
        table.add_row(label, *values)
    kinds = sorted({kind for u in columns.values() for kind in u.failures})
    if not kinds:
        table.add_row("failures", *["0" for _ in columns])
    for kind in kinds:
        table.add_row(f"failures: {kind}", *[str(u.failures.get(kind, 0)) for u in columns.values()])
    return table


@app.command()
def usage(
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Usage file [default: $SDCLIENT_USAGE_FILE or ~/.cache/sdclient]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print the usage recorded in a usage file, per model."""
    path = file or default_usage_file()
    if not path.is_file():
        raise _fail(f"no usage file at {path} (`sdclient generate` creates it; pick another with --file)")
    try:
        tracker = UsageTracker(path)
        snapshot = tracker.snapshot()
        tracker.close()
    except Exception as exc:  # sqlite3.DatabaseError for a file that is not a usage database
        raise _fail(f"cannot read usage from {path}: {exc}") from None
    if as_json:
        _out.print(json.dumps(snapshot.model_dump(mode="json"), indent=2), markup=False)
        return
    if not snapshot.models:
        _out.print(f"no usage recorded yet in {path}", markup=False)
        return
    _out.print(_usage_table(snapshot.models, snapshot.total))


def main() -> None:
    """Entry point of the ``sdclient`` console script."""
    app()
