"""Aspect-ratio buckets: which bucket a photo goes to, how it is cropped, one bucket per batch,
the default per architecture, the run record, ``sdtrain check``; SD 1.x keeps its square crop."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_photos
from trainer.buckets import BUCKET_STEP, bucket_sizes, buckets_by_default, nearest_bucket, run_buckets
from trainer.cli import app
from trainer.config import Architecture, RunConfig, RunRecord
from trainer.errors import ConfigError
from trainer.photos import check_photo_folder, crop_geometry, load_photo_with_geometry
from trainer.run import BaseModelInfo, PreparedRun, prepare_run, training_data
from trainer.train import TrainingData, batch_positions, micro_batch, training_images

# The buckets at 64 px in multiples of 16 (FLUX) and at 1024 px in multiples of 64 (SDXL).
FLUX_64 = [(64, 64), (80, 48), (48, 80), (96, 48), (48, 96)]
TALL, WIDE = (80, 48), (48, 80)  # (height, width)


class OneProcess:
    num_processes = 1
    process_index = 0


def _photo(path: Path, width: int, height: int) -> Path:
    """A photo with a gradient from top to bottom and left to right (every crop shows)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * y // height, 255 * x // width, np.full_like(x, 128)], axis=-1)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


# -- the ladder and the choice of bucket -------------------------------------------------------------


def test_the_ladder_is_about_resolution_squared_in_multiples_of_the_step() -> None:
    assert bucket_sizes(64, 16) == FLUX_64
    for resolution, step in ((1024, BUCKET_STEP["sdxl"]), (1024, BUCKET_STEP["flux"]), (512, 64)):
        sizes = bucket_sizes(resolution, step)
        assert sizes[0] == (resolution, resolution)
        assert len(sizes) >= 7 and len(set(sizes)) == len(sizes)
        for h, w in sizes:
            assert h % step == 0 and w % step == 0
            assert 0.8 < h * w / resolution**2 < 1.25, (h, w)
    assert BUCKET_STEP == {"sd1": 64, "sd2": 64, "sdxl": 64, "flux": 16}


@pytest.mark.parametrize(
    ("width", "height", "bucket"),
    [
        (64, 64, (64, 64)),
        (300, 300, (64, 64)),
        (80, 96, (64, 64)),  # 5:6 is nearer the square than 3:5
        (64, 110, TALL),
        (110, 64, WIDE),
        (60, 100, TALL),  # exactly 3:5
        (64, 128, (96, 48)),  # 1:2
        (64, 1000, (96, 48)),  # beyond the ladder: its tallest bucket
        (1000, 64, (48, 96)),
    ],
)
def test_a_photo_goes_to_the_bucket_nearest_its_shape(
    width: int, height: int, bucket: tuple[int, int]
) -> None:
    assert nearest_bucket(width, height, FLUX_64) == bucket


def test_the_nearest_bucket_is_the_one_that_crops_least() -> None:
    sizes = bucket_sizes(1024, 64)

    def kept(width: int, height: int, size: tuple[int, int]) -> float:
        """The share of the photo a crop to ``size`` keeps."""
        geometry = crop_geometry(width, height, size)
        (rh, rw), (th, tw) = geometry.resized_size, geometry.target_size
        return th * tw / (rh * rw)

    for width, height in ((3024, 4032), (4032, 3024), (1080, 1920), (2000, 3000), (1000, 1400)):
        best = kept(width, height, nearest_bucket(width, height, sizes))
        assert best == pytest.approx(max(kept(width, height, s) for s in sizes), abs=0.01), (width, height)
        assert best > 0.9  # a square crop keeps 0.56 to 0.75 of these


def test_buckets_are_on_for_sdxl_and_flux_and_off_for_sd1_and_sd2() -> None:
    assert [buckets_by_default(a) for a in ("sd1", "sd2", "sdxl", "flux")] == [False, False, True, True]
    assert run_buckets("sdxl", 1024, None) == bucket_sizes(1024, 64)
    assert run_buckets("flux", 64, None) == FLUX_64
    assert run_buckets("sd1", 512, None) is None and run_buckets("sd2", 768, None) is None
    assert run_buckets("sdxl", 1024, False) is None
    assert run_buckets("sd1", 512, True) == bucket_sizes(512, 64)
    with pytest.raises(ConfigError, match="use --resolution 960 .or 1024., or --no-aspect-buckets"):
        run_buckets("sdxl", 1000, None)
    assert run_buckets("sdxl", 1000, False) is None  # a square crop takes any multiple of 8


# -- the crop ----------------------------------------------------------------------------------------


def test_a_tall_photo_keeps_its_full_height(tmp_path: Path) -> None:
    path = _photo(tmp_path / "tall.png", 60, 100)
    image, geometry = load_photo_with_geometry(path, nearest_bucket(60, 100, FLUX_64))
    assert image.size == (48, 80)
    assert geometry.time_ids == (100, 60, 0, 0, 80, 48)  # scaled to 48 x 80, nothing cropped
    with Image.open(path) as photo:
        whole = photo.resize((48, 80), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(whole))
    # The square crop cuts 40% of its height.
    square, square_geometry = load_photo_with_geometry(path, 64)
    assert square.size == (64, 64) and square_geometry.crop_top_left == (21, 0)


def test_a_bucket_crop_is_centred_and_only_the_rounding_is_cut(tmp_path: Path) -> None:
    path = _photo(tmp_path / "tall.png", 64, 110)  # 0.58 wide per unit of height; the bucket 0.6
    image, geometry = load_photo_with_geometry(path, TALL)
    assert image.size == (48, 80)
    assert geometry.time_ids == (110, 64, 1, 0, 80, 48)  # scaled to 48 x 82, 1 px cut top and bottom
    with Image.open(path) as photo:
        resized = photo.resize((48, 82), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(resized)[1:81])


def test_a_large_jpeg_bucket_crop_is_decoded_at_a_reduced_scale_with_the_full_size_crop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1536, 2560), "teal").save(path, quality=90)
    image, geometry = load_photo_with_geometry(path, TALL)
    assert image.size == (48, 80)
    assert geometry == crop_geometry(1536, 2560, TALL)


def test_the_check_gives_each_photo_its_bucket_and_warns_about_big_crops(tmp_path: Path) -> None:
    _photo(tmp_path / "tall.png", 64, 107)
    _photo(tmp_path / "wide.png", 107, 64)
    _photo(tmp_path / "square.png", 70, 70)
    squares = check_photo_folder(tmp_path, resolution=64)
    assert [p.target for p in squares.photos] == [(64, 64)] * 3
    assert not squares.buckets
    square_warnings = " ".join(squares.warnings)
    assert "tall.png: its 64x64 training crop cuts 40% of its height" in square_warnings
    assert "wide.png: its 64x64 training crop cuts 40% of its width" in square_warnings
    assert "--aspect-buckets" in square_warnings and "square.png" not in square_warnings

    bucketed = check_photo_folder(tmp_path, resolution=64, buckets=FLUX_64)
    assert {p.path.name: p.target for p in bucketed.photos} == {
        "square.png": (64, 64),
        "tall.png": TALL,
        "wide.png": WIDE,
    }
    assert bucketed.buckets and bucketed.warnings == []  # the bucket crops nothing here
    assert bucketed.bucket_counts == {(64, 64): 1, TALL: 1, WIDE: 1}


def test_with_buckets_a_photo_must_cover_its_bucket_not_the_square(tmp_path: Path) -> None:
    _photo(tmp_path / "narrow.png", 56, 100)  # shorter than 64 px, yet it covers its 48x80 bucket
    _photo(tmp_path / "small.png", 40, 70)  # its bucket is 48x80 too: it would be enlarged
    bucketed = check_photo_folder(tmp_path, resolution=64, buckets=FLUX_64)
    assert [(p.path.name, p.target) for p in bucketed.photos] == [("narrow.png", (80, 48))]
    (problem,) = bucketed.problems
    assert problem.path.name == "small.png"
    assert "40x70 px is smaller than its training size 48x80" in str(problem)
    squares = check_photo_folder(tmp_path, resolution=64)
    assert not squares.photos
    assert all("smaller than the training resolution 64x64" in str(p) for p in squares.problems)


def test_sdtrain_check_says_which_bucket_each_photo_goes_to(tmp_path: Path) -> None:
    for i, (w, h) in enumerate([(128, 200), (128, 192), (200, 128), (130, 128)]):
        _photo(tmp_path / f"p{i}.png", w, h)
    result = CliRunner().invoke(app, ["check", str(tmp_path), "--resolution", "128", "--aspect-buckets"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "128 px training size in aspect-ratio buckets" in text
    assert "p0.png 128x200 PNG 128x192, 4% of height cut" in text
    assert "p1.png 128x192 PNG 128x192" in text
    assert "p2.png 200x128 PNG 192x128" in text
    assert "Buckets: 2 photos at 128x192, 1 photo at 192x128, 1 photo at 128x128 (width x height)" in text

    square = CliRunner().invoke(app, ["check", str(tmp_path), "--resolution", "128"])
    text = " ".join(square.output.replace("│", " ").split())
    assert "training size in aspect-ratio buckets" not in text and "Buckets:" not in text
    assert "p2.png 200x128 PNG 128x128, 36% of width cut" in text


# -- one bucket per batch ----------------------------------------------------------------------------


def _old_batch_positions(micro_step: int, *, seed: int, n: int, batch: int, procs: int, rank: int) -> Any:
    """The data order before buckets existed (every run without them must keep it)."""
    steps = math.ceil(n / (batch * procs))
    epoch, slot = divmod(micro_step, steps)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    start = slot * batch * procs + rank * batch
    return [(epoch, (start + j) % n, int(order[(start + j) % n])) for j in range(batch)]


@pytest.mark.parametrize(("n", "batch", "procs"), [(7, 1, 1), (7, 2, 2), (5, 3, 1), (2, 4, 1)])
def test_without_buckets_or_with_one_the_order_is_unchanged(n: int, batch: int, procs: int) -> None:
    for step in range(12):
        for rank in range(procs):
            old = _old_batch_positions(step, seed=11, n=n, batch=batch, procs=procs, rank=rank)
            kwargs: dict[str, Any] = {"seed": 11, "num_examples": n, "batch_size": batch}
            kwargs.update(num_processes=procs, process_index=rank)
            assert batch_positions(step, **kwargs) == old
            assert batch_positions(step, **kwargs, buckets=[(64, 64)] * n) == old


def test_every_batch_holds_one_bucket_and_every_epoch_visits_every_photo() -> None:
    buckets = ["a", "b", "a", "c", "b", "a", "a", "b"]  # a: 4, b: 3, c: 1
    batch, procs = 2, 2  # global batches of 4: a 1, b 1, c 1 per epoch
    steps_per_epoch = 3
    orders = []
    for epoch in range(4):
        seen = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            picks = [
                p
                for rank in range(procs)
                for p in batch_positions(
                    step,
                    seed=5,
                    num_examples=len(buckets),
                    batch_size=batch,
                    num_processes=procs,
                    process_index=rank,
                    buckets=buckets,
                )
            ]
            assert len(picks) == 4 and {e for e, _, _ in picks} == {epoch}
            assert len({buckets[example] for _, _, example in picks}) == 1, picks
            seen += [example for _, _, example in picks]
        assert set(seen) == set(range(len(buckets)))  # small buckets wrap around within themselves
        orders.append(seen)
    assert len({tuple(o) for o in orders}) > 1  # a new order each epoch

    def run(seed: int) -> list[Any]:
        kwargs: dict[str, Any] = {"seed": seed, "num_examples": 8, "batch_size": 1, "buckets": buckets}
        return [batch_positions(s, **kwargs) for s in range(24)]

    assert run(5) == run(5) and run(5) != run(6)
    # Batch size 1: each epoch is exactly the seeded permutation, buckets or not.
    for ((epoch, pos, example),) in run(5)[:8]:
        assert (epoch, example) == (0, int(np.random.default_rng([5, 0]).permutation(8)[pos]))
    assert sorted(pos for ((_, pos, _),) in run(5)[:8]) == list(range(8))


def _prepared(
    tmp_path: Path, architecture: Architecture = "sd1", *, num_class_images: int = 3, **options: Any
) -> PreparedRun:
    """A run at 64 px on the photos in ``tmp_path/photos`` (e.g. :func:`_bucket_photos`), with
    ``num_class_images`` class images in ``tmp_path/class``."""
    config = RunConfig(
        base_model=str(tmp_path / "base"),
        concepts=[
            {
                "instance_dir": tmp_path / "photos",
                "instance_prompt": "sks",
                "class_prompt": "toy",
                "class_dir": tmp_path / "class",
            }
        ],
        output_dir=tmp_path / "out",
        resolution=64,
        num_class_images=num_class_images,
        **options,
    )
    prediction = "flow_matching" if architecture == "flux" else "epsilon"
    return prepare_run(config, info=BaseModelInfo(64, prediction, None, architecture))


def _bucket_photos(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _photo(folder / "a-tall.png", 64, 107)
    _photo(folder / "b-wide.png", 107, 64)
    _photo(folder / "c-tall.png", 64, 110)
    make_photos(tmp_path / "class", 3, size=(64, 64))


def test_class_images_are_cropped_to_the_bucket_of_their_batch(tmp_path: Path) -> None:
    _bucket_photos(tmp_path)
    prepared = _prepared(tmp_path, "flux", train_batch_size=2, with_prior_preservation=True)
    record = prepared.record
    assert record.aspect_buckets and record.training_fingerprint()["aspect_buckets"] is True
    data = training_data(record, prepared.checks)
    assert data.sizes == [TALL, WIDE, TALL]
    photos = [path for path, _ in data.instance]
    for step in range(8):
        batch = micro_batch(record, data, step, OneProcess())
        instance, prior = batch.paths[:2], batch.paths[2:]
        assert {data.sizes[photos.index(p)] for p in instance} == {batch.size}  # one bucket
        assert batch.size == (WIDE if instance[0].name == "b-wide.png" else TALL)
        assert len(prior) == 2 and all(p.parent == tmp_path / "class" for p in prior)
        assert batch.keys == [(p, batch.size) for p in batch.paths]  # class images at that bucket too
    # Latent caching encodes every photo at its bucket and every class image at both buckets.
    keys = training_images(data, 64)
    assert sorted((p.name, s) for p, s in keys if p.parent.name == "photos") == [
        ("a-tall.png", TALL),
        ("b-wide.png", WIDE),
        ("c-tall.png", TALL),
    ]
    class_keys = [(p.name, s) for p, s in keys if p.parent.name == "class"]
    assert len(class_keys) == 6 and {s for _, s in class_keys} == {TALL, WIDE}


def test_sd1_keeps_the_square_crop_by_default(tmp_path: Path) -> None:
    _bucket_photos(tmp_path)
    prepared = _prepared(tmp_path, train_batch_size=2)
    record = prepared.record
    assert record.architecture == "sd1" and not record.aspect_buckets
    assert record.training_fingerprint()["aspect_buckets"] is None  # as older checkpoints have it
    data = training_data(record, prepared.checks)
    assert data.sizes == [(64, 64)] * 3
    assert {micro_batch(record, data, s, OneProcess()).size for s in range(6)} == {(64, 64)}
    assert training_images(data, 64) == [
        (p, (64, 64)) for p in [*(p for p, _ in data.instance), *data.class_images[0]]
    ]
    assert TrainingData(data.instance, data.class_images).size_of(0, 64) == (64, 64)


def test_the_record_says_whether_buckets_are_on(tmp_path: Path) -> None:
    _bucket_photos(tmp_path)
    cases: list[tuple[Architecture, bool | None, bool]] = [
        ("sdxl", None, True),
        ("sdxl", False, False),
        ("flux", None, True),
    ]
    for architecture, flag, on in cases:
        config = RunConfig(
            base_model=str(tmp_path / "base"),
            concepts=[{"instance_dir": tmp_path / "photos", "instance_prompt": "sks"}],
            output_dir=tmp_path / "out",
            resolution=64,
            with_prior_preservation=False,
            aspect_buckets=flag,
        )
        prediction = "flow_matching" if architecture == "flux" else "epsilon"
        info = BaseModelInfo(64, prediction, None, architecture)
        prepared = prepare_run(config, info=info)
        assert prepared.record.aspect_buckets is on
        targets = [p.target for p in prepared.checks[0].photos]
        if architecture == "flux":
            assert targets == [TALL, WIDE, TALL]
        else:  # 64 px in multiples of 64: only the square
            assert targets == [(64, 64)] * 3
        assert prepared.record.training_fingerprint()["aspect_buckets"] is (True if on else None)
    # A run.json written before buckets existed: square.
    legacy = prepared.record.model_dump(mode="json")
    del legacy["aspect_buckets"]
    assert RunRecord.model_validate(legacy).aspect_buckets is False


def test_a_rotated_photo_goes_to_the_bucket_of_its_upright_shape(tmp_path: Path) -> None:
    image = Image.new("RGB", (1600, 960), (0, 0, 255))  # stored wide, red on the left
    image.paste((255, 0, 0), (0, 0, 800, 960))
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise: upright it is 960 wide, 1600 tall
    image.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    (photo,) = check_photo_folder(tmp_path, resolution=64, buckets=FLUX_64).photos
    assert (photo.width, photo.height, photo.target) == (960, 1600, TALL)
    loaded, geometry = load_photo_with_geometry(photo.path, photo.target)
    assert loaded.size == (48, 80) and geometry == crop_geometry(960, 1600, TALL)
    assert geometry.crop_top_left == (0, 0)  # 3:5 exactly: nothing cut
    pixels = np.asarray(loaded).astype(int)
    assert pixels[10, 24, 0] > 200 and pixels[70, 24, 2] > 200  # red on top, blue below once upright
