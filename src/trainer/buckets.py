"""Aspect-ratio buckets: a few training sizes of about ``resolution²`` pixels in several shapes.

Without buckets every photo is resized and centre-cropped to a ``resolution`` square, so portrait and
landscape photos lose their top and bottom or their sides. With buckets (the default for SDXL and
FLUX, as in kohya's scripts, ai-toolkit and diffusers' ``train_dreambooth_lora_flux.py``) each photo
trains at the bucket whose shape is nearest its own, resized to cover it and centre-cropped, so only
the rounding to the bucket's shape is cut off.

The sizes are diffusers' ladder (``generate_aspect_ratio_buckets``: 1:1, 4:5, 2:3, 3:4, 9:16, 1:2
and their landscape twins), each side a multiple of :data:`BUCKET_STEP`: 64 px for the UNets (SD's
downsamples its latents three times, 8 x 8 = 64 px; SDXL takes the same step, as kohya's scripts
do by default), 16 px for FLUX (the VAE's 8 x the 2 x 2 patches).

Sizes are ``(height, width)`` throughout, as diffusers and SDXL's time ids write them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from trainer.config import Architecture
from trainer.errors import ConfigError

__all__ = [
    "BUCKET_STEP",
    "Size",
    "bucket_sizes",
    "buckets_by_default",
    "describe_counts",
    "nearest_bucket",
    "run_buckets",
]

Size = tuple[int, int]
"""``(height, width)`` in pixels."""

# Every side of a bucket is a multiple of this, per architecture.
BUCKET_STEP: dict[Architecture, int] = {"sd1": 64, "sd2": 64, "sdxl": 64, "flux": 16}


def buckets_by_default(architecture: Architecture) -> bool:
    """Whether a run of ``architecture`` trains in aspect-ratio buckets unless told otherwise.

    SDXL and FLUX were trained on many aspect ratios (SDXL is told each photo's size and crop);
    SD 1.x and 2.x on squares, so they keep the square crop.
    """
    return architecture in ("sdxl", "flux")


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """The buckets of a run at ``resolution``: ``(height, width)`` pairs of about ``resolution²``
    pixels, sides multiples of ``step``, the square first.

    >>> bucket_sizes(64, 16)
    [(64, 64), (80, 48), (48, 80), (96, 48), (48, 96)]
    """
    from diffusers import training_utils

    ladder: Any = training_utils.generate_aspect_ratio_buckets  # untyped
    return [(int(h), int(w)) for h, w in ladder(resolution, step)]


def run_buckets(architecture: Architecture, resolution: int, choice: bool | None) -> list[Size] | None:
    """The buckets a run trains in, or ``None`` for the square crop.

    Args:
        architecture: The base model's (it decides the default and the step).
        resolution: The training resolution.
        choice: ``--aspect-buckets`` (``True``), ``--no-aspect-buckets`` (``False``) or not given.

    Raises:
        ConfigError: buckets are on and ``resolution`` is not a multiple of the step.
    """
    if not (buckets_by_default(architecture) if choice is None else choice):
        return None
    step = BUCKET_STEP[architecture]
    if resolution % step:
        lower = max(step, resolution - resolution % step)
        raise ConfigError(
            f"Aspect-ratio buckets have sides in multiples of {step} px here: use --resolution {lower} "
            f"(or {lower + step}), or --no-aspect-buckets for a square crop."
        )
    return bucket_sizes(resolution, step)


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest a ``width`` x ``height`` photo's (the first on a tie).

    Nearest in ``|log(h / w) - log(bucket h / bucket w)|``: covering the bucket and centre-cropping
    then cuts the least of the photo. (diffusers' ``find_nearest_bucket`` compares
    ``|h * bucket_w - w * bucket_h|``, which grows with the bucket's width and so leans to narrow
    buckets.)

    >>> nearest_bucket(80, 96, [(64, 64), (80, 48), (48, 80)])
    (64, 64)
    >>> nearest_bucket(60, 100, [(64, 64), (80, 48), (48, 80)])
    (80, 48)
    """
    ratio = math.log(height / width)
    return min(buckets, key=lambda size: abs(math.log(size[0] / size[1]) - ratio))


def describe_counts(counts: dict[Size, int]) -> str:
    """How many photos train at each size, for the console: width x height, as photo sizes are shown.

    >>> describe_counts({(80, 48): 3, (64, 64): 1})
    '3 photos at 48x80, 1 photo at 64x64 (width x height)'
    """
    parts = [f"{n} photo{'s' if n != 1 else ''} at {w}x{h}" for (h, w), n in counts.items()]
    return ", ".join(parts) + " (width x height)"
