"""Checking and preparing the photos a run trains on.

Every file in a photo folder is opened and fully decoded before anything trains, and every problem
(not an image, corrupt, unsupported format, too small, too large) is reported at once, by name, with
the fix.

Sizes are read from the file's header before any pixel is decoded: a photo over ``max_megapixels``
(:data:`MAX_MEGAPIXELS` by default) is refused without decoding it, so a small file that claims a huge
size (a decompression bomb, or a 16-bit PNG of one colour) costs no memory. A large JPEG is decoded
at a reduced scale (Pillow's ``draft``), never bigger than checking or training needs.
Usable photos are normalised the same way for checking and for training: EXIF orientation applied,
converted to RGB (transparency on white), then resized to cover the training size and centre-cropped
with Pillow. The training size is a ``resolution`` square, or with aspect-ratio buckets the bucket
nearest the photo's shape (:mod:`trainer.buckets`). Where a photo was cropped is kept
(:class:`CropGeometry`): SDXL is conditioned on each photo's original size and crop corner.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer._console import shown
from trainer.buckets import Size, nearest_bucket
from trainer.config import MAX_PHOTO_MEGAPIXELS
from trainer.errors import PhotoError

__all__ = [
    "MAX_MEGAPIXELS",
    "SUPPORTED_FORMATS",
    "CropGeometry",
    "Photo",
    "PhotoCheck",
    "PhotoProblem",
    "check_photo_folder",
    "check_photos",
    "crop_cut",
    "crop_geometry",
    "load_photo",
    "load_photo_with_geometry",
    "prepare_image",
    "to_rgb",
]

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
# The largest photo accepted, in millions of pixels (a 10000 x 6400 photo; --max-megapixels);
# larger ones are refused from their header, before decoding. Phone and DSLR photos (12-61 MP) fit.
MAX_MEGAPIXELS = MAX_PHOTO_MEGAPIXELS
# The size a check decodes JPEGs at (at least, per side): enough to find duplicates and damage.
_CHECK_DRAFT_SIZE = 512
# Files that operating systems drop into folders; never photos, never worth an error.
_IGNORED_NAMES = {"thumbs.db", "desktop.ini", "icon\r"}
# A crop that cuts more than this share of a photo's height or width is warned about.
_CROP_WARNING = 0.25


@dataclass(frozen=True)
class Photo:
    """A usable photo.

    Attributes:
        path: The file.
        width: Width after EXIF orientation.
        height: Height after EXIF orientation.
        format: ``JPEG``, ``PNG`` or ``WEBP``.
        mode: Pillow's colour mode as stored (``RGB``, ``RGBA``, ``CMYK``, ``L``, ...).
        rotated: Whether an EXIF orientation tag turned it.
        digest: SHA-256 of the normalised RGB pixels (duplicates share it).
        target: ``(height, width)`` it trains at: the ``resolution`` square, or its bucket.
    """

    path: Path
    width: int
    height: int
    format: str
    mode: str
    rotated: bool
    digest: str
    target: Size

    @property
    def geometry(self) -> CropGeometry:
        """How training resizes and crops it to :attr:`target`."""
        return crop_geometry(self.width, self.height, self.target)

    @property
    def notes(self) -> list[str]:
        """What normalisation did to the photo, for the ``check`` table."""
        notes = []
        if self.rotated:
            notes.append("EXIF-rotated")
        if self.mode != "RGB":
            notes.append(f"{self.mode} -> RGB")
        return notes


@dataclass(frozen=True)
class PhotoProblem:
    """A file or folder that cannot be used: why, and what to do about it."""

    path: Path
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{shown(self.path.name)}: {self.reason}. Fix: {self.fix}"


@dataclass
class PhotoCheck:
    """The result of checking one folder.

    Attributes:
        folder: The folder checked.
        photos: Usable photos, sorted by file name.
        problems: Unusable files (or the folder itself).
        duplicates: ``(duplicate, original)`` pairs of identical photos.
        buckets: Whether the photos were given aspect-ratio buckets (else the square).
    """

    folder: Path
    photos: list[Photo] = field(default_factory=list)
    problems: list[PhotoProblem] = field(default_factory=list)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)
    buckets: bool = False

    @property
    def warnings(self) -> list[str]:
        """Human-readable warnings (duplicates, photos the training crop cuts a lot of), one per line."""
        messages = [
            f"{shown(dup.name)} is the same picture as {shown(orig.name)} in {shown(self.folder)}: "
            "it will be seen twice as "
            "often; remove one copy unless that is intended."
            for dup, orig in self.duplicates
        ]
        for photo in self.photos:
            side, cut = crop_cut(photo.geometry)
            if cut > _CROP_WARNING:
                height, width = photo.target
                hint = "" if self.buckets else ", or train in aspect-ratio buckets (--aspect-buckets)"
                messages.append(
                    f"{shown(photo.path.name)}: its {width}x{height} training crop cuts {cut:.0%} of "
                    f"its {side}; keep the subject in the middle, crop the photo yourself{hint}."
                )
        return messages

    @property
    def bucket_counts(self) -> dict[Size, int]:
        """How many photos train at each size (``(height, width)``), largest count first."""
        return dict(Counter(photo.target for photo in self.photos).most_common())


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent areas become white.

    CMYK, greyscale (8/16-bit, float), palette and alpha images all come out as ``RGB``.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float greyscale: scale to 0-255 (Pillow's own conversion would clip), in float32
        # (4 bytes a pixel, not numpy's default 8: a 64 MP photo is big enough already).
        array = np.asarray(image).astype(np.float32, copy=False)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array *= 255.0 / top
        array += 0.5
        grey = np.clip(array, 0, 255, out=array).astype(np.uint8)
        del array
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class CropGeometry:
    """How a photo became a training image, in the terms SDXL is conditioned on.

    Attributes:
        original_size: ``(height, width)`` of the upright photo before resizing.
        resized_size: ``(height, width)`` after it was scaled to cover the target size.
        crop_top_left: ``(top, left)`` of the crop, in the resized image's pixels.
        target_size: ``(height, width)`` of the training image.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's ``add_time_ids``: original size, crop top-left, target size (heights first)."""
        return (*self.original_size, *self.crop_top_left, *self.target_size)


def _size(target: int | Size) -> Size:
    """``(height, width)`` of a training size given as a square's side or as ``(height, width)``."""
    return (target, target) if isinstance(target, int) else target


def crop_geometry(width: int, height: int, target: int | Size) -> CropGeometry:
    """Where :func:`prepare_image` resizes and crops a ``width`` x ``height`` image to ``target``
    (a square's side, or ``(height, width)``): scaled to cover it, then centre-cropped.

    >>> crop_geometry(80, 96, 64).time_ids
    (96, 80, 6, 0, 64, 64)
    >>> crop_geometry(80, 96, (80, 48)).time_ids
    (96, 80, 0, 9, 80, 48)
    """
    target_h, target_w = _size(target)
    scale = max(target_h / height, target_w / width)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return CropGeometry((height, width), (new_h, new_w), (top, left), (target_h, target_w))


def crop_cut(geometry: CropGeometry) -> tuple[str, float]:
    """Which side of a photo its crop cuts (``"height"`` or ``"width"``) and what share of it.

    >>> side, cut = crop_cut(crop_geometry(80, 96, 64))
    >>> side, round(cut, 3)
    ('height', 0.169)
    """
    (resized_h, resized_w), (target_h, target_w) = geometry.resized_size, geometry.target_size
    cut_h, cut_w = 1 - target_h / resized_h, 1 - target_w / resized_w
    return ("height", cut_h) if cut_h >= cut_w else ("width", cut_w)


def prepare_image(
    image: Image.Image, target: int | Size, geometry: CropGeometry | None = None
) -> Image.Image:
    """Resize to cover ``target`` (a square's side, or ``(height, width)``; Lanczos) and centre-crop
    to it.

    The input should already be upright RGB (see :func:`to_rgb`, ``ImageOps.exif_transpose``);
    :func:`crop_geometry` says where the crop falls. ``geometry`` is the crop of the photo at its
    full size, for an image decoded at a reduced scale (``draft``): it lands on the same pixels.
    """
    geometry = geometry or crop_geometry(*image.size, target)
    new_h, new_w = geometry.resized_size
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    top, left = geometry.crop_top_left
    target_h, target_w = geometry.target_size
    return image.crop((left, top, left + target_w, top + target_h))


def load_photo_with_geometry(
    path: Path, target: int | Size, *, max_megapixels: float = MAX_MEGAPIXELS
) -> tuple[Image.Image, CropGeometry]:
    """Open a photo and return it upright, RGB, at ``target`` (a square's side, or ``(height, width)``),
    and how it was cropped.

    A large JPEG is decoded at the smallest scale that still covers the resized photo; the crop is
    the one of the photo at full size.

    Raises:
        PhotoError: the file cannot be read (it changed since it was checked) or is too large.
    """
    try:
        with _open(path) as im:
            problem = _too_large(path, im, max_megapixels)
            if problem is None:
                stored_size = im.size  # before draft shrinks it
                orientation = _orientation(im)
                geometry = crop_geometry(*_upright_size(stored_size, orientation), target)
                if im.format == "JPEG":
                    # The smallest scale that still covers the target (sides in stored orientation);
                    # the photo's shape then covers its resized size too.
                    target_h, target_w = geometry.target_size
                    im.draft(im.mode, _upright_size((target_w, target_h), orientation))
                im.load()
                upright = to_rgb(ImageOps.exif_transpose(im))
                return prepare_image(upright, target, geometry), geometry
    except Image.DecompressionBombError as exc:
        problem = _bomb_problem(path, exc, max_megapixels)
    except (OSError, SyntaxError, ValueError) as exc:
        problem = PhotoProblem(path, f"cannot be read ({exc})", "re-copy or remove the file")
        raise PhotoError(_message([problem], total=1, folder=path.parent), [(path, problem.reason)]) from exc
    raise PhotoError(_message([problem], total=1, folder=path.parent), [(path, problem.reason)])


def load_photo(path: Path, resolution: int, *, max_megapixels: float = MAX_MEGAPIXELS) -> Image.Image:
    """Open a photo and return it upright, RGB, ``resolution`` x ``resolution``.

    Raises:
        PhotoError: the file cannot be read (it changed since it was checked) or is too large.
    """
    return load_photo_with_geometry(path, resolution, max_megapixels=max_megapixels)[0]


def _open(path: Path) -> Image.Image:
    """``Image.open`` (header only) without Pillow's bomb warning: :func:`_too_large` decides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _too_large(path: Path, image: Image.Image, max_megapixels: float) -> PhotoProblem | None:
    """The problem of a photo whose header claims more than ``max_megapixels``; checked before decoding."""
    width, height = image.size
    if width * height <= max_megapixels * 1_000_000:
        return None
    return PhotoProblem(
        path,
        f"too large: {width} x {height} px ({width * height / 1e6:.1f} megapixels)",
        f"resize it below {max_megapixels:g} megapixels",
    )


def _bomb_problem(path: Path, exc: Exception, max_megapixels: float) -> PhotoProblem:
    """Pillow refused to open the file at all (a decompression bomb): the same report as too large."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    size = f" ({int(match.group(1)) / 1e6:.1f} megapixels)" if match else ""
    return PhotoProblem(path, f"too large{size}", f"resize it below {max_megapixels:g} megapixels")


def _upright_size(stored_size: tuple[int, int], orientation: int | None) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation (5-8 turn the photo by a quarter)."""
    width, height = stored_size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# How ImageOps.exif_transpose turns each EXIF orientation upright.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _shrunk(image: Image.Image, shorter: int) -> Image.Image:
    """``image`` reduced by a whole factor (box average; every k-th pixel for 16-bit greyscale) while
    its shorter side stays at least ``shorter``; unchanged when it is not twice that big."""
    factor = min(image.size) // shorter
    if factor < 2:
        return image
    if image.mode.startswith("I;16"):  # Pillow cannot reduce these; a strided view costs nothing
        return Image.fromarray(np.ascontiguousarray(np.asarray(image)[::factor, ::factor]))
    try:
        return image.reduce(factor)
    except ValueError:  # palette and 1-bit images (1 byte a pixel at most) cannot be averaged
        return image


def _upright(image: Image.Image, orientation: int | None) -> Image.Image:
    """``image`` turned as its EXIF ``orientation`` says (like ``ImageOps.exif_transpose``)."""
    method = _TRANSPOSE.get(orientation or 1)
    return image if method is None else image.transpose(method)


def _check_file(
    path: Path, resolution: int, max_megapixels: float, buckets: Sequence[Size] | None
) -> Photo | PhotoProblem:
    try:
        with _open(path) as im:
            fmt = im.format or "unknown"
            if fmt not in SUPPORTED_FORMATS:
                return PhotoProblem(
                    path,
                    f"{fmt} images are not supported (JPEG, PNG and WebP are)",
                    "save it as JPEG or PNG",
                )
            too_large = _too_large(path, im, max_megapixels)
            if too_large is not None:
                return too_large
            mode = im.mode
            stored_size = im.size  # before draft shrinks it
            if fmt == "JPEG":  # decode at a reduced scale: the whole stream is still read and checked
                size = max(resolution, _CHECK_DRAFT_SIZE)
                im.draft(im.mode, (size, size))
            im.load()  # decode everything now: truncated or damaged data fails here
            orientation = _orientation(im)
            rotated = orientation not in (None, 1)
            width, height = _upright_size(stored_size, orientation)
            # Duplicates are found on a reduced copy: converting a large photo at full size would
            # cost several times its decoded size, for nothing the check needs.
            rgb = to_rgb(_upright(_shrunk(im, max(resolution, _CHECK_DRAFT_SIZE)), orientation))
    except UnidentifiedImageError:
        return PhotoProblem(path, "not an image (Pillow cannot identify it)", "remove it from the folder")
    except Image.DecompressionBombError as exc:
        return _bomb_problem(path, exc, max_megapixels)
    except (OSError, SyntaxError, ValueError) as exc:
        return PhotoProblem(
            path, f"corrupt or truncated ({exc})", "re-export or re-copy the photo, or remove it"
        )
    target = nearest_bucket(width, height, buckets) if buckets else (resolution, resolution)
    if width < target[1] or height < target[0]:  # it would have to be enlarged to cover its size
        if buckets:
            return PhotoProblem(
                path,
                f"{width}x{height} px is smaller than its training size {target[1]}x{target[0]} "
                f"(the aspect-ratio bucket nearest its shape at resolution {resolution})",
                "use a larger photo, or train at a lower --resolution",
            )
        return PhotoProblem(
            path,
            f"{width}x{height} px is smaller than the training resolution {resolution}x{resolution}",
            f"use a photo at least {resolution} px on its shorter side, or train at a lower --resolution",
        )
    digest = hashlib.sha256(f"{width}x{height}".encode() + rgb.tobytes()).hexdigest()
    return Photo(path, width, height, fmt, mode, rotated, digest, target)


def _orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(0x0112)
    except Exception:  # a broken EXIF block: exif_transpose already coped with it
        return None
    return int(value) if value is not None else None


def _candidates(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower() not in _IGNORED_NAMES
    )


def check_photo_folder(
    folder: Path,
    *,
    resolution: int,
    max_megapixels: float = MAX_MEGAPIXELS,
    buckets: Sequence[Size] | None = None,
) -> PhotoCheck:
    """Check every file in ``folder`` (not recursive; hidden files are skipped). Never raises.

    Args:
        folder: The photo folder.
        resolution: The training resolution: photos must be at least this big on their shorter side.
        max_megapixels: Photos with more pixels are refused (from their header, undecoded).
        buckets: The run's aspect-ratio buckets (see :func:`trainer.buckets.bucket_sizes`): each
            photo's ``target`` is the one nearest its shape. ``None``: the ``resolution`` square.

    Returns:
        The usable photos, the problems and the duplicates.
    """
    result = PhotoCheck(folder, buckets=bool(buckets))
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        problem = PhotoProblem(folder, f"the photo folder {shown(folder)} {what}", "check the path")
        result.problems.append(problem)
        return result
    files = _candidates(folder)
    if not files:
        result.problems.append(
            PhotoProblem(
                folder, f"the photo folder {shown(folder)} is empty", "put 5-20 photos of the subject in it"
            )
        )
        return result
    seen: dict[str, Path] = {}
    for path in files:
        checked = _check_file(path, resolution, max_megapixels, buckets)
        if isinstance(checked, PhotoProblem):
            result.problems.append(checked)
            continue
        result.photos.append(checked)
        if checked.digest in seen:
            result.duplicates.append((path, seen[checked.digest]))
        else:
            seen[checked.digest] = path
    return result


def _message(problems: Sequence[PhotoProblem], *, total: int, folder: Path | None = None) -> str:
    where = f" in {shown(folder)}" if folder is not None else ""
    head = f"{len(problems)} of {total} file(s){where} cannot be used for training:"
    lines = [head]
    for p in problems:
        lines.append(f"  - {shown(p.path)}: {p.reason}.\n      Fix: {p.fix}.")
    lines.append("Nothing was trained. Fix the files above and run again.")
    return "\n".join(lines)


def check_photos(
    folders: Iterable[Path],
    *,
    resolution: int,
    max_megapixels: float = MAX_MEGAPIXELS,
    buckets: Sequence[Size] | None = None,
) -> list[PhotoCheck]:
    """Check several photo folders and raise one error listing every problem in all of them.

    Args:
        folders: The instance folders of a run (one per concept).
        resolution: The training resolution.
        max_megapixels: Photos with more pixels are refused (from their header, undecoded).
        buckets: The aspect-ratio buckets the photos go to (``None``: the square).

    Returns:
        One :class:`PhotoCheck` per folder, every photo usable (duplicates only warned about).

    Raises:
        PhotoError: at least one file or folder cannot be used; the message lists them all.
    """
    checks = [
        check_photo_folder(Path(f), resolution=resolution, max_megapixels=max_megapixels, buckets=buckets)
        for f in folders
    ]
    problems = [p for c in checks for p in c.problems]
    if problems:
        total = sum(len(c.photos) + len([p for p in c.problems if p.path != c.folder]) for c in checks)
        total = max(total, len(problems))
        folder = checks[0].folder if len(checks) == 1 else None
        raise PhotoError(
            _message(problems, total=total, folder=folder), [(p.path, p.reason) for p in problems]
        )
    return checks
