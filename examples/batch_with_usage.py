"""Generate a batch of images with bounded concurrency, then report what it used.

``SDClient.generate_many`` sends at most ``--concurrency`` requests at a time, and requests that
meet a cold model share one wait instead of each polling it. A ``UsageTracker`` counts requests,
images, prompt characters, compute seconds, cold-start waits, retries and failures per model; with
``--usage-db`` the counts are kept in SQLite and add up across runs (and across processes).

Examples::

    python examples/batch_with_usage.py --model user/sd-raza --images-per-prompt 4 \\
        "abraza man as an astronaut" "abraza man in a renaissance painting"
    python examples/batch_with_usage.py --model http://127.0.0.1:7860/models/demo \\
        --prompts-file prompts.txt --concurrency 2 --usage-db usage.sqlite --report usage.json

Hosted inference bills compute time, with no cost header: pass ``--price-per-hour`` (the hourly
price of the hardware) for an estimate from the compute seconds the server reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sdclient import (
    GeneratedImage,
    GenerateRequest,
    GenerationEvent,
    ModelUsage,
    SDClient,
    SDClientError,
    UsageSnapshot,
    UsageTracker,
)

console = Console(stderr=True)


def slugify(text: str, max_length: int = 48) -> str:
    """Lower-case ASCII words of ``text`` joined by "-" ("Portrait of Ábraza" -> "portrait-of-abraza")."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        if len(slug) + len(word) + 1 > max_length:
            break
        slug = f"{slug}-{word}" if slug else word
    return slug or "image"


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p.strip() for p in args.prompts if p.strip()]
    if args.prompts_file is not None:
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate many images with bounded concurrency and print a usage report.",
        epilog="Environment: SD_MODEL (default --model), SD_BASE_URL, HF_TOKEN.",
    )
    parser.add_argument("prompts", nargs="*", help="prompts (or use --prompts-file)")
    parser.add_argument("--prompts-file", type=Path, help="a text file with one prompt a line (# comments)")
    parser.add_argument("--model", default=os.environ.get("SD_MODEL"), help="Hub id or URL ($SD_MODEL)")
    parser.add_argument(
        "--base-url", default=os.environ.get("SD_BASE_URL"), help="for Hub ids ($SD_BASE_URL)"
    )
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images for each prompt (default 1)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--negative-prompt", help="what to avoid, for every image")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8")
    parser.add_argument("--steps", type=int, help="denoising steps")
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--seed", type=int, help="first seed; image i uses seed+i (default: random seeds)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path("images"), help="where to save (default images/)"
    )
    parser.add_argument("--usage-db", type=Path, help="SQLite file that keeps usage across runs")
    parser.add_argument("--max-images", type=int, help="refuse to go past this many images in total")
    parser.add_argument("--report", type=Path, help="also write the usage report as JSON here")
    parser.add_argument("--price-per-hour", type=float, help="hardware price per hour, for a cost estimate")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("no model: pass --model user/name (or a URL), or set SD_MODEL")
    if args.prompts_file is not None and not args.prompts_file.is_file():
        parser.error(f"--prompts-file {args.prompts_file} does not exist")
    args.prompt_list = read_prompts(args)
    if not args.prompt_list:
        parser.error("no prompts: give some as arguments or in --prompts-file")
    if args.images_per_prompt < 1:
        parser.error("--images-per-prompt must be at least 1")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8 (e.g. 512), not {value}")
    return args


def build_requests(args: argparse.Namespace) -> list[GenerateRequest]:
    requests: list[GenerateRequest] = []
    for prompt in args.prompt_list:
        for _ in range(args.images_per_prompt):
            seed = None if args.seed is None else args.seed + len(requests)
            requests.append(
                GenerateRequest(
                    prompt=prompt,
                    negative_prompt=args.negative_prompt,
                    width=args.width,
                    height=args.height,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    seed=seed,
                )
            )
    return requests


async def run_batch(
    args: argparse.Namespace, requests: list[GenerateRequest], usage: UsageTracker
) -> tuple[list[GeneratedImage | SDClientError], UsageSnapshot]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("Generating", total=len(requests))

        def on_event(event: GenerationEvent) -> None:
            if event.kind in ("done", "failed"):
                progress.advance(task)
            elif event.kind == "loading" and event.eta_s is not None:
                progress.update(task, description=f"Model loading (about {event.eta_s:.0f} s)")
            elif event.kind == "sending":
                progress.update(task, description="Generating")

        async with SDClient(args.model, base_url=args.base_url, usage=usage, on_event=on_event) as client:
            results = await client.generate_many(
                requests, concurrency=args.concurrency, return_exceptions=True
            )
            return results, client.usage


def usage_table(snapshot: UsageSnapshot, price_per_hour: float | None) -> Table:
    """One row a counter, one column a model (plus the total when there are several)."""
    columns = list(snapshot.models.items())
    if len(columns) != 1:
        columns.append(("total", snapshot.total))
    table = Table(title="Usage", title_justify="left")
    table.add_column("")
    for name, _ in columns:
        table.add_column(name, justify="right", overflow="fold")

    def row(label: str, cell: Callable[[ModelUsage], str]) -> None:
        table.add_row(label, *(cell(usage) for _, usage in columns))

    row("requests", lambda u: str(u.requests))
    row("images", lambda u: str(u.images))
    row("prompt characters", lambda u: str(u.prompt_characters))
    row("compute seconds", lambda u: f"{u.compute_seconds:.2f}")
    row("cold-start waits", lambda u: f"{u.cold_start_waits} ({u.cold_start_wait_seconds:.1f} s)")
    row("retries", lambda u: str(u.retries))
    row("failures", lambda u: ", ".join(f"{k} {n}" for k, n in sorted(u.failures.items())) or "0")
    if price_per_hour is not None:
        row("estimated cost", lambda u: f"${u.compute_seconds / 3600 * price_per_hour:.4f}")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = build_requests(args)
    usage = UsageTracker(args.usage_db, max_images=args.max_images)
    results, snapshot = asyncio.run(run_batch(args, requests, usage))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for request, result in zip(requests, results, strict=True):
        if isinstance(result, SDClientError):
            failed += 1
            console.print(f"[red]failed[/red] {request.prompt!r}: {result}")
            continue
        path = result.save(args.out_dir / f"{slugify(request.prompt)}-{result.request.seed}.png")
        print(path)

    console.print(usage_table(snapshot, args.price_per_hour))
    console.print(f"{len(requests) - failed} of {len(requests)} images saved in {args.out_dir}")
    if args.report is not None:
        report = {
            "images_saved": len(requests) - failed,
            "images_failed": failed,
            "usage": snapshot.model_dump(mode="json"),
        }
        if args.price_per_hour is not None:
            report["estimated_cost"] = snapshot.total.compute_seconds / 3600 * args.price_per_hour
        args.report.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
