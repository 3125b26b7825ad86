"""Sample images from a trained model: PNGs that remember how they were made, plus a grid.

Each PNG carries its ``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``guidance_scale``,
``model`` and all of them as JSON in ``parameters`` as PNG text chunks, under the key names of
``sdclient.protocol.PngText`` (which ``sdclient``'s ``GeneratedImage.save`` writes too). Image ``i``
uses seed ``seed + i``; the generator runs on the CPU so the same seed gives the same picture on any
machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from sdclient.protocol import PngText
from trainer._console import console, progress_bar
from trainer._fs import atomic_write_bytes

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["SampleResult", "generate_samples", "make_grid", "png_bytes", "read_png_text"]


@dataclass(frozen=True)
class SampleResult:
    """The files :func:`generate_samples` wrote.

    Attributes:
        images: ``sample-00.png``, ``sample-01.png``, ...
        grid: ``grid.png``, all samples side by side.
    """

    images: list[Path]
    grid: Path


def png_bytes(image: Image.Image, text: dict[str, str]) -> bytes:
    """Encode ``image`` as PNG with ``text`` as tEXt/iTXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
    buffer = BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG (e.g. a sample's ``prompt`` and ``seed``)."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}))


def make_grid(images: list[Image.Image], *, columns: int | None = None) -> Image.Image:
    """Tile images (all the same size) into a grid, as square as possible."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def generate_samples(
    model: str | Path | StableDiffusionPipeline,
    out_dir: Path,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    num_images: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    resolution: int | None = None,
    device: str | None = None,
) -> SampleResult:
    """Generate ``num_images`` images of ``prompt`` and save them with their metadata, plus a grid.

    Args:
        model: A loaded pipeline, or a diffusers folder / single file / Hub id to load.
        out_dir: Folder for ``sample-NN.png`` and ``grid.png`` (created; files replaced).
        prompt: What to draw.
        negative_prompt: What to avoid.
        num_images: How many images (at least 1).
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance.
        seed: Image ``i`` uses seed ``seed + i``.
        resolution: Width and height; default the model's native size.
        device: Where to run when loading ``model``; default CUDA, then MPS, then the CPU.

    Returns:
        The written files.

    Raises:
        trainer.loading.ModelLoadError: ``model`` cannot be loaded.
        ValueError: ``num_images`` is below 1.
    """
    import torch

    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    if isinstance(model, str | Path):
        from trainer.loading import load_pipeline

        model_name = str(model)
        pipeline = load_pipeline(model, device=device)
    else:
        pipeline = model
        model_name = str(getattr(pipeline, "name_or_path", "") or "pipeline")
    pipe: Any = pipeline  # diffusers pipelines are untyped callables
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    images: list[Image.Image] = []
    with progress_bar() as progress:
        task = progress.add_task(f"Samples '{prompt}'", total=num_images)
        for i in range(num_images):
            image_seed = seed + i
            with torch.inference_mode():
                image = pipe(
                    prompt,
                    negative_prompt=negative_prompt,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(image_seed),
                ).images[0]
            parameters: dict[str, Any] = {
                "negative_prompt": negative_prompt,
                "seed": image_seed,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "width": image.width,
                "height": image.height,
            }
            text = {
                PngText.PROMPT: prompt,
                PngText.NEGATIVE_PROMPT: negative_prompt or "",
                PngText.SEED: str(image_seed),
                PngText.STEPS: str(num_inference_steps),
                PngText.GUIDANCE_SCALE: str(guidance_scale),
                PngText.MODEL: model_name,
                PngText.PARAMETERS: json.dumps(parameters),
            }
            path = atomic_write_bytes(out_dir / f"sample-{i:02d}.png", png_bytes(image, text))
            paths.append(path)
            images.append(image)
            progress.advance(task)
    grid_text = {PngText.PROMPT: prompt, PngText.SEED: str(seed), PngText.MODEL: model_name}
    grid = atomic_write_bytes(out_dir / "grid.png", png_bytes(make_grid(images), grid_text))
    console.print(f"Saved {num_images} samples and a grid in {out_dir}")
    return SampleResult(paths, grid)
