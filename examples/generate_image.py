"""Generate one image with a Stable Diffusion model and save it with the settings that made it.

The model is a Hub id (``user/sd-raza``, sent to the Hugging Face router) or a full URL: a
dedicated Inference Endpoint, or ``sdtrain serve`` running on your machine
(``http://127.0.0.1:7860/models/demo``). The token comes from ``HF_TOKEN`` or ``hf auth login``
and is only sent to Hugging Face hosts.

Examples::

    export HF_TOKEN=hf_...   # or run `hf auth login` once
    python examples/generate_image.py --model user/sd-raza "portrait of abraza man in a tweed cap"
    python examples/generate_image.py --model http://127.0.0.1:7860/models/demo \\
        --seed 1234 --steps 20 "a red fox"

The PNG keeps the prompt, negative prompt, seed, parameters and model as text chunks; read them back
with ``PIL.Image.open(path).text``. The path of the file is printed on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import unicodedata
from pathlib import Path

from sdclient import GeneratedImage, GenerationEvent, SDClient, SDClientError


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


def show_event(event: GenerationEvent) -> None:
    """Tell the user why they are waiting (cold starts can take a minute or more)."""
    if event.kind == "loading":
        eta = f", about {event.eta_s:.0f} s left" if event.eta_s is not None else ""
        print(f"The model is loading{eta}: waiting for it.", file=sys.stderr)
    elif event.kind == "retrying":
        delay = f" in {event.delay_s:.1f} s" if event.delay_s is not None else ""
        print(f"Retrying{delay} ({event.message or 'transient error'}).", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate one image and save it as a PNG with its prompt, seed and parameters.",
        epilog="Environment: SD_MODEL (default --model), SD_BASE_URL, HF_TOKEN.",
    )
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument(
        "--model",
        default=os.environ.get("SD_MODEL"),
        help="Hub id (user/sd-raza) or full URL of the model (default: $SD_MODEL)",
    )
    parser.add_argument(
        "--base-url",
        default=os.environ.get("SD_BASE_URL"),
        help="where Hub ids are sent (default: $SD_BASE_URL, else the Hugging Face router)",
    )
    parser.add_argument("--negative-prompt", help="what to avoid, e.g. 'blurry, low quality'")
    parser.add_argument("--width", type=int, help="image width in pixels, a multiple of 8")
    parser.add_argument("--height", type=int, help="image height in pixels, a multiple of 8")
    parser.add_argument("--steps", type=int, help="denoising steps (more is slower and finer)")
    parser.add_argument("--guidance", type=float, help="guidance scale (how closely to follow the prompt)")
    parser.add_argument("--seed", type=int, help="seed for a reproducible image (default: random, recorded)")
    parser.add_argument("--out", type=Path, help="file to write (default: <prompt>-<seed>.png in --out-dir)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the default file name")
    parser.add_argument(
        "--max-wait", type=float, default=300.0, help="seconds to wait for a cold model (default: 300)"
    )
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("no model: pass --model user/name (or a URL), or set SD_MODEL")
    if not args.prompt.strip():
        parser.error("the prompt is empty: say what to draw")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8 (e.g. 512), not {value}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, not {args.steps}")
    if args.out is not None and args.out.suffix.lower() != ".png":
        parser.error(f"--out must end in .png (the metadata is stored as PNG text chunks), not {args.out}")
    return args


async def generate(args: argparse.Namespace) -> GeneratedImage:
    async with SDClient(
        args.model, base_url=args.base_url, max_wait_for_model=args.max_wait, on_event=show_event
    ) as client:
        return await client.generate(
            args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        image = asyncio.run(generate(args))
    except SDClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    seed = image.request.seed
    path = args.out or args.out_dir / f"{slugify(args.prompt)}-{seed}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = image.save(path)

    timings = image.timings
    compute = f", {timings.compute_s:.2f} s compute" if timings.compute_s is not None else ""
    waited = f", {timings.cold_start_wait_s:.1f} s waiting for the model" if timings.cold_start_wait_s else ""
    print(
        f"{image.width}x{image.height} {image.format} from {image.model}, seed {seed}: "
        f"{timings.total_s:.2f} s total{compute}{waited}, {image.attempts} attempt(s)",
        file=sys.stderr,
    )
    print(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
