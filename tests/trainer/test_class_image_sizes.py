"""Class images at the sizes their concept's photos train at (aspect-ratio buckets): the plan, the
generated files, the pairing of class images with batches of their own size, and the fallback for a
cache of square images made before (resuming is tested with buckets in test_flux and test_sdxl)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_buckets import TALL, WIDE, OneProcess, _photo
from test_buckets import _prepared as _bucket_run
from typer.testing import CliRunner

from conftest import CLASS_PROMPT, make_photos, run_args
from trainer.cli import app
from trainer.config import Architecture, RunConfig, RunRecord
from trainer.run import PreparedRun, make_class_images, prepare_run, training_data
from trainer.sample import read_png_text
from trainer.train import TrainingData, micro_batch, training_images

SQUARE = (64, 64)
# At 128 px in multiples of 64 (the UNets' step): a 128x200 photo trains at 128x192 (width x height).
TALL_128, SQUARE_128 = (192, 128), (128, 128)


def _file_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file."""
    with Image.open(path) as image:
        return image.height, image.width


def _class_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A noise PNG of ``size`` ``(height, width)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# -- the plan --------------------------------------------------------------------------------------


def test_the_plan_shares_the_class_images_among_the_photos_sizes() -> None:
    from trainer.class_images import class_image_plan, describe_plan

    def shares(photo_sizes: list[tuple[int, int]], n: int) -> dict[tuple[int, int], int]:
        plan = class_image_plan(photo_sizes, n, 64)
        assert len(plan) == n
        return dict(Counter(plan))

    # In proportion to the photos.
    assert shares([TALL] * 3 + [SQUARE], 8) == {TALL: 6, SQUARE: 2}
    assert shares([TALL] * 3 + [SQUARE], 200) == {TALL: 150, SQUARE: 50}
    # Largest remainder: quotas 1.6, 1.6 and 0.8 of 4 give 1, 1, 1 and one more to a 1.6 (a tie:
    # the smaller (height, width) first).
    assert shares([TALL, TALL, WIDE, WIDE, SQUARE], 4) == {WIDE: 2, TALL: 1, SQUARE: 1}
    # 2 of 7 photos and 5 images: quotas 3.57 and 1.43 give 4 and 1.
    assert shares([TALL] * 5 + [SQUARE] * 2, 5) == {TALL: 4, SQUARE: 1}
    # Every size gets one when there are enough images: 10 photos to 1 and 4 images give 3 and 1 (not 4, 0).
    assert shares([TALL] * 10 + [SQUARE], 4) == {TALL: 3, SQUARE: 1}
    assert shares([TALL] * 10 + [WIDE, SQUARE], 3) == {TALL: 1, WIDE: 1, SQUARE: 1}
    # Fewer images than sizes: the sizes with the most photos get one each.
    assert shares([TALL] * 3 + [WIDE] * 2 + [SQUARE], 2) == {TALL: 1, WIDE: 1}
    # Same photos, any order: the same plan; the shares are interleaved, so a first part is in
    # proportion too (a folder filled to 100 then to 200 keeps the mix).
    photos = [TALL] * 3 + [SQUARE] + [WIDE] * 2
    plan = class_image_plan(photos, 12, 64)
    for _ in range(5):
        random.Random(_).shuffle(photos)
        assert class_image_plan(photos, 12, 64) == plan
    assert Counter(plan) == {TALL: 6, WIDE: 4, SQUARE: 2}
    assert Counter(plan[:6]) == {TALL: 3, WIDE: 2, SQUARE: 1}
    assert describe_plan(plan) == "6 at 48x80, 4 at 80x48, 2 at 64x64 (width x height)"
    # Without buckets every photo trains at the square, and so does every class image; no photos, too.
    assert class_image_plan([SQUARE] * 5, 3, 64) == [SQUARE] * 3
    assert class_image_plan([], 3, 64) == [SQUARE] * 3
    assert class_image_plan([TALL], 0, 64) == []


# -- pairing class images with batches of their size ------------------------------------------------


def _prepared(
    tmp_path: Path, architecture: Architecture, num_class_images: int, **options: Any
) -> PreparedRun:
    return _bucket_run(
        tmp_path, architecture, num_class_images=num_class_images, with_prior_preservation=True, **options
    )


@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_batch_gets_the_class_images_of_its_own_size(tmp_path: Path, batch_size: int) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, (w, h) in {
        "a": (64, 107),
        "b": (64, 110),
        "c": (60, 100),
        "d": (70, 70),
        "e": (107, 64),
    }.items():
        _photo(photos / f"{name}.png", w, h)  # 3 tall, 1 square, 1 wide
    # Class images generated for the tall and square photos (none is wide).
    for i, size in enumerate([TALL, TALL, SQUARE, TALL]):
        _class_image(tmp_path / "class" / f"{i:05d}.png", size, i)
    prepared = _prepared(tmp_path, "flux", 4, train_batch_size=batch_size)
    record = prepared.record
    data = training_data(record, prepared.checks)
    assert data.class_sizes == [[TALL, TALL, SQUARE, TALL]]  # read from the files
    classes = data.class_images[0]
    used: Counter[tuple[Path, tuple[int, int]]] = Counter()
    for step in range(30):
        batch = micro_batch(record, data, step, OneProcess())
        assert batch == micro_batch(record, data, step, OneProcess())  # a pure function of the step
        prior = batch.paths[batch_size:]
        assert len(prior) == batch_size
        if batch.size == WIDE:  # none of its size: all of them, cropped to it
            assert set(prior) <= set(classes)
        else:
            assert all(_file_size(p) == batch.size for p in prior), (batch.size, prior)
        used.update((p, batch.size) for p in prior)
    # Every class image is used, each at its own size (the wide batches take any).
    assert {p for p, s in used if s != WIDE} == set(classes)
    # Latent caching encodes only the pairs that can be used.
    keys = training_images(data, 64)
    class_keys = sorted((p.name, s) for p, s in keys if p.parent.name == "class")
    assert class_keys == sorted(
        [("00000.png", TALL), ("00001.png", TALL), ("00003.png", TALL), ("00002.png", SQUARE)]
        + [(f"{i:05d}.png", WIDE) for i in range(4)]
    )
    # Without the sizes (a TrainingData built by hand) every class image joins every batch.
    unsized = TrainingData(data.instance, data.class_images, data.sizes)
    assert unsized.class_images_at(0, TALL) == classes


def test_a_users_own_class_image_joins_the_batches_of_the_bucket_nearest_its_shape(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.png", 64, 107)  # trains at TALL
    _photo(photos / "b.png", 70, 70)  # trains at SQUARE
    # A user's own class images, of no bucket's exact size: a tall one and a square-ish one.
    _class_image(tmp_path / "class" / "mine-tall.png", (110, 66), 0)
    _class_image(tmp_path / "class" / "mine-square.png", (72, 75), 1)
    prepared = _prepared(tmp_path, "flux", 2)
    data = training_data(prepared.record, prepared.checks)
    tall, square = sorted(data.class_images[0], key=lambda p: p.name != "mine-tall.png")
    assert data.class_images_at(0, TALL) == [tall]
    assert data.class_images_at(0, SQUARE) == [square]


# -- generating at the buckets' sizes ---------------------------------------------------------------


def _bucket_args(base: Path, photos: Path, out: Path, **overrides: Any) -> list[str]:
    """A 128 px SD run in aspect-ratio buckets (128x128, 128x192, 192x128, ...), 1 step."""
    options: dict[str, Any] = {
        "resolution": 128,
        "max_train_steps": 1,
        "num_samples": 0,
        "method": "lora",
        **overrides,
    }
    return [*run_args(base, photos, out, **options), "--aspect-buckets"]


@pytest.mark.slow
def test_a_bucket_run_on_tall_photos_generates_tall_class_images(tiny_sd1: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, 2, size=(128, 200))
    result = CliRunner().invoke(
        app,
        ["train", *_bucket_args(tiny_sd1, photos, tmp_path / "run", num_class_images=3, class_image_steps=1)],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Aspect-ratio buckets: 2 photos at 128x192" in text
    assert (
        f"Class images of '{CLASS_PROMPT}' at the sizes of its photos: 3 at 128x192 (width x height)" in text
    )
    files = sorted((tmp_path / "run" / "class_images").rglob("*.png"))
    assert [p.name for p in files] == ["00000.png", "00001.png", "00002.png"]
    assert [_file_size(p) for p in files] == [TALL_128] * 3  # nothing to enlarge or cut
    assert [read_png_text(p)["seed"] for p in files] == ["7", "8", "9"]  # seed + i, as before


@pytest.mark.slow
def test_tall_and_square_photos_get_class_images_of_both_sizes_in_proportion(
    tiny_sd1: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, 3, size=(128, 200))
    (square,) = make_photos(tmp_path / "square", 1, size=(130, 130), seed=1)
    square.rename(photos / "square.jpg")
    config = RunConfig(
        base_model=str(tiny_sd1),
        concepts=[{"instance_dir": photos, "instance_prompt": "sks toy", "class_prompt": CLASS_PROMPT}],
        output_dir=tmp_path / "run",
        resolution=128,
        aspect_buckets=True,
        with_prior_preservation=True,
        num_class_images=4,
        class_batch_size=2,
        class_image_steps=1,
        train_batch_size=2,
    )
    prepared = prepare_run(config)
    record = prepared.record
    (result,) = make_class_images(record, prepared.checks)
    assert (result.generated, result.reused) == (4, 0)
    sizes = [_file_size(p) for p in result.images]
    assert Counter(sizes) == {TALL_128: 3, SQUARE_128: 1}
    # Image i has seed + i whatever its size (the sizes are generated one after the other).
    assert [read_png_text(p)["seed"] for p in result.images] == [str(record.seed + i) for i in range(4)]

    data = training_data(record, prepared.checks)
    seen = set()
    for step in range(12):
        batch = micro_batch(record, data, step, OneProcess())
        assert all(_file_size(p) == batch.size for p in batch.paths[2:]), (step, batch)
        seen.add(batch.size)
    assert seen == {TALL_128, SQUARE_128}
    keys = training_images(data, 128)
    assert all(_file_size(p) == size for p, size in keys if p.parent == record.concepts[0].class_dir)


@pytest.mark.slow
def test_a_cache_of_square_class_images_is_reused_as_it_is_and_still_trains(
    tiny_sd1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    make_photos(photos, 2, size=(128, 200))
    cache = tmp_path / "class"
    squares = [_class_image(cache / f"{i:05d}.png", SQUARE_128, i) for i in range(3)]
    before = [p.read_bytes() for p in squares]

    import trainer.loading

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a complete cache must not be regenerated, whatever its sizes")

    monkeypatch.setattr(trainer.loading, "load_pipeline", no_loading)
    args = _bucket_args(tiny_sd1, photos, tmp_path / "run", num_class_images=3, class_dir=cache)
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    assert "Reusing 3 class images" in " ".join(result.output.split())
    assert [p.read_bytes() for p in squares] == before and len(list(cache.iterdir())) == 3
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # They join the tall batches cropped, as before.
    record = RunRecord.read(tmp_path / "run" / "run.json")
    data = training_data(record, prepare_run(record).checks)
    for step in range(4):
        batch = micro_batch(record, data, step, OneProcess())
        assert batch.size == TALL_128 and batch.paths[1] in squares
    assert sorted(k for k in training_images(data, 128) if k[0].parent == cache) == [
        (p, TALL_128) for p in squares
    ]
