"""Photo checks: every bad file reported at once, by name; every good one normalised the same way."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.errors import PhotoError
from trainer.photos import (
    check_photo_folder,
    check_photos,
    crop_geometry,
    load_photo,
    load_photo_with_geometry,
    prepare_image,
    to_rgb,
)

RES = 64


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def _exif_rotated(path: Path) -> Path:
    """A 96x80 JPEG, red on the left half, whose EXIF says 'rotate 90 degrees clockwise to view'."""
    image = Image.new("RGB", (96, 80), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 48, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees clockwise
    image.save(path, exif=exif, quality=95)
    return path


def test_every_bad_file_is_reported_at_once(photos: Path) -> None:
    (photos / "notes.txt").write_text("not a photo")
    good = (photos / "photo-0.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    _save(Image.new("RGB", (48, 200), "white"), photos / "small.png")
    _save(Image.new("RGB", (100, 100), "white"), photos / "anim.gif")
    (photos / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are not photos: ignored

    with pytest.raises(PhotoError) as info:
        check_photos([photos], resolution=RES)

    message = str(info.value)
    reported = {path.name for path, _ in info.value.problems}
    assert reported == {"notes.txt", "truncated.jpg", "garbage.png", "small.png", "anim.gif"}
    assert "5 of 9 file(s)" in message
    assert "notes.txt: not an image" in message
    assert "truncated.jpg: corrupt or truncated" in message
    assert "small.png: 48x200 px is smaller than the training resolution 64x64" in message
    assert "at least 64 px on its shorter side" in message
    assert "anim.gif: GIF images are not supported" in message
    assert message.count("Fix:") == 5
    assert "Nothing was trained" in message
    assert ".DS_Store" not in message


def test_problems_in_several_folders_are_reported_together(photos: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.md").write_text("# hi")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PhotoError) as info:
        check_photos([photos, other, empty, tmp_path / "missing"], resolution=RES)
    message = str(info.value)
    assert "readme.md: not an image" in message
    assert f"the photo folder {empty} is empty" in message
    assert f"the photo folder {tmp_path / 'missing'} does not exist" in message


def test_good_photos_pass_with_their_sizes(photos: Path) -> None:
    (check,) = check_photos([photos], resolution=RES)
    assert [p.path.name for p in check.photos] == ["photo-0.jpg", "photo-1.png", "photo-2.jpg", "photo-3.png"]
    assert all((p.width, p.height) == (80, 96) for p in check.photos)
    assert check.problems == [] and check.duplicates == []


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = _exif_rotated(tmp_path / "rotated.jpg")
    (photo,) = check_photo_folder(tmp_path, resolution=RES).photos
    assert photo.rotated and "EXIF-rotated" in photo.notes
    assert (photo.width, photo.height) == (80, 96)  # upright: portrait, not the stored landscape
    pixels = np.asarray(load_photo(path, RES)).astype(int)
    # Rotated clockwise, the red left half of the stored image is now the top half.
    assert pixels[8, 32, 0] > 200 and pixels[8, 32, 2] < 60
    assert pixels[56, 32, 2] > 200 and pixels[56, 32, 0] < 60


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # pure cyan-free red in CMYK
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # fully transparent: white, not black
        ("L", 128, (128, 128, 128)),
        ("LA", (50, 255), (50, 50, 50)),
        ("I;16", 65535, (255, 255, 255)),  # 16-bit grey scaled, not clipped
        ("P", 0, (0, 0, 0)),
    ],
)
def test_colour_modes_become_rgb(
    tmp_path: Path, mode: str, color: object, expected: tuple[int, int, int]
) -> None:
    image = Image.new(mode, (70, 70), color)  # type: ignore[arg-type]
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = _save(image, tmp_path / f"photo{suffix}")
    (photo,) = check_photo_folder(tmp_path, resolution=RES).photos
    assert photo.mode == mode
    rgb = load_photo(path, RES)
    assert rgb.mode == "RGB" and rgb.size == (RES, RES)
    assert np.abs(np.asarray(rgb)[10, 10].astype(int) - np.array(expected)).max() <= 3


def test_webp_is_supported(tmp_path: Path) -> None:
    _save(Image.new("RGB", (64, 64), "green"), tmp_path / "photo.webp")
    (photo,) = check_photo_folder(tmp_path, resolution=RES).photos
    assert photo.format == "WEBP"


def test_duplicates_are_warned_not_refused(photos: Path) -> None:
    shutil.copy(photos / "photo-1.png", photos / "copy-of-photo-1.png")
    # The same pixels in another container are duplicates too.
    with Image.open(photos / "photo-3.png") as im:
        im.save(photos / "photo-3-again.webp", lossless=True)
    (check,) = check_photos([photos], resolution=RES)
    assert len(check.photos) == 6
    assert sorted((d.name, o.name) for d, o in check.duplicates) == [
        ("photo-1.png", "copy-of-photo-1.png"),
        ("photo-3.png", "photo-3-again.webp"),  # names sort "-" before "."
    ]
    assert any("copy-of-photo-1.png" in w and "remove one copy" in w for w in check.warnings)


def test_prepare_image_resizes_the_short_side_and_centre_crops() -> None:
    image = Image.new("RGB", (300, 100), "black")
    image.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    out = prepare_image(image, 64)
    assert out.size == (64, 64)
    assert np.asarray(out).mean() > 250  # only the white centre is left


def test_to_rgb_keeps_rgb_untouched() -> None:
    image = Image.new("RGB", (4, 4), "red")
    assert to_rgb(image) is image


def _flat_png(path: Path, width: int, height: int) -> Path:
    """A 16-bit greyscale PNG of one colour, written row by row: tiny on disk, huge when decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x80\x00" * width  # filter byte, then 16-bit samples
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


# The child's peak resident memory (VmHWM: since its exec, not inherited from pytest), in MiB.
_PEAK_RSS = """
import re, sys
from pathlib import Path
from trainer.photos import check_photo_folder
check = check_photo_folder(Path(sys.argv[1]), resolution=64)
status = Path("/proc/self/status").read_text()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
print("\\n".join(str(p) for p in check.problems))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("size", [(12000, 12000), (20000, 10000)])  # under and over Pillow's own limit
def test_a_near_bomb_png_is_refused_from_its_header_without_decoding(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    bomb = _flat_png(folder / "flat.png", *size)
    assert bomb.stat().st_size < 1_000_000  # a few hundred KB that decode to gigabytes
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(folder)], capture_output=True, text=True, check=True
    )
    peak_mib, *problems = result.stdout.splitlines()
    assert int(peak_mib) < 250, f"checking used {peak_mib} MiB"
    (problem,) = problems
    assert problem.startswith("flat.png: too large")
    assert "resize it below 64 megapixels" in problem
    if size == (12000, 12000):
        assert "12000 x 12000 px" in problem


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_large_16_bit_png_under_the_limit_is_checked_on_a_reduced_copy(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _flat_png(folder / "flat.png", 8000, 7500)  # 60 megapixels, 120 MB decoded
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(folder)], capture_output=True, text=True, check=True
    )
    peak_mib, *problems = result.stdout.splitlines()
    assert problems in ([], [""])
    assert int(peak_mib) < 500, f"checking used {peak_mib} MiB"  # converting at full size: ~900


def test_the_pixel_limit_is_a_setting(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _save(Image.new("RGB", (1200, 1000), "white"), folder / "big.png")
    (check,) = check_photos([folder], resolution=RES, max_megapixels=2)
    assert [p.name for p in (photo.path for photo in check.photos)] == ["big.png"]
    too_large = r"(?s)big.png: too large: 1200 x 1000 px \(1.2 megapixels\).*resize it below 1 megapixels"
    with pytest.raises(PhotoError, match=too_large):
        check_photos([folder], resolution=RES, max_megapixels=1)
    with pytest.raises(PhotoError, match="too large"):
        load_photo(folder / "big.png", RES, max_megapixels=1)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_with_the_full_size_crop(tmp_path: Path) -> None:
    # 2048 x 1536: draft decodes it at 1/8 (256 x 192) for a 64 px crop; the geometry is the full size's.
    image = Image.new("RGB", (2048, 1536), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 1024, 1536))
    path = _save(image, tmp_path / "big.jpg", quality=95)
    (check,) = check_photos([tmp_path], resolution=RES)
    (photo,) = check.photos
    assert (photo.width, photo.height) == (2048, 1536)
    loaded, geometry = load_photo_with_geometry(path, RES)
    assert loaded.size == (RES, RES)
    assert geometry == crop_geometry(2048, 1536, RES)
    pixels = np.asarray(loaded).astype(int)
    assert pixels[32, 4, 0] > 200 and pixels[32, 60, 2] > 200  # red left half, blue right half


def test_a_large_rotated_jpeg_reports_its_upright_full_size(tmp_path: Path) -> None:
    image = Image.new("RGB", (2048, 1536), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(image, tmp_path / "turned.jpg", exif=exif, quality=90)
    (check,) = check_photos([tmp_path], resolution=RES)
    (photo,) = check.photos
    assert (photo.width, photo.height, photo.rotated) == (1536, 2048, True)
    assert load_photo_with_geometry(path, RES)[1] == crop_geometry(1536, 2048, RES)
