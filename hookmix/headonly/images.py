"""How hookmix reads an image file: as 8-bit RGB, whatever its pixel mode, or a one-line reason why not.

Fine-tuning, ``hookmix predict`` and :meth:`hookmix.FinetunedModel.predict` all read images through
:func:`read_rgb`, so a model sees at prediction time the pixels it was trained on. Pixel modes: 16-bit images
(``I;16``, and ``I``, as which PIL reads 16-bit data) are scaled to 8 bit (``round(v / 257)``: 65535 -> 255)
rather than clipped — ``convert("RGB")`` alone turns them almost white; 32-bit float images (``F``) have no
known range and are refused; the rest go through ``convert("RGB")``. :func:`image_problem` finds an
unreadable file from its header alone (a format PIL reads, a size under PIL's decompression-bomb limit, a
pixel mode hookmix can turn into RGB), cheaply enough to check a whole folder before any image is decoded.
EXIF orientation is not applied (as torchvision's and timm's readers do not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["UnreadableImage", "image_problem", "read_rgb", "to_rgb"]

_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
"""Modes of 16-bit pixels (PIL reads 16-bit PNG and TIFF data as ``I;16*``, some paths as 32-bit ``I``)."""
_RGB_READY = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
"""Modes that ``convert("RGB")`` turns into 8-bit RGB as they are."""
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises for a file it cannot open or decode (``DecompressionBombError`` is none of the others)."""


class UnreadableImage(Exception):
    """An image file that cannot be read as RGB; the message is the reason, one line, without the path."""


def _mode_problem(mode: str) -> str | None:
    if mode == "F":
        return "32-bit float pixels (mode F) have no known range; save the image with 8- or 16-bit pixels"
    if mode not in _RGB_READY + _SIXTEEN_BIT:
        return f"pixel mode {mode} cannot be read as RGB"
    return None


def _reason(exc: BaseException, path: str | Path) -> str:
    """A one-line reason for a PIL error, without PIL's repetition of the path."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL reads"
    if isinstance(exc, Image.DecompressionBombError):
        return f"{str(exc).rstrip('.')} (PIL.Image.MAX_IMAGE_PIXELS); shrink the image"
    return (str(exc) or type(exc).__name__).replace(str(path), "the file").splitlines()[0]


def _sixteen_to_rgb(image: Image.Image) -> Image.Image:
    """A 16-bit grey image as 8-bit RGB, each value v as round(v / 257) (0 -> 0, 65535 -> 255)."""
    pixels = np.asarray(image).astype(np.int64)
    low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
    if low < 0 or high > 65535:
        raise UnreadableImage(
            f"32-bit integer pixels from {low} to {high}, outside the 16-bit range 0..65535; save the image "
            "with 8- or 16-bit pixels"
        )
    return Image.fromarray(np.rint(pixels / 257.0).astype(np.uint8), "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB PIL image (16-bit pixels scaled, see the module); raises
    :class:`UnreadableImage` with the reason for a pixel mode that cannot be read so."""
    problem = _mode_problem(image.mode)
    if problem is not None:
        raise UnreadableImage(problem)
    return _sixteen_to_rgb(image) if image.mode in _SIXTEEN_BIT else image.convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """The image file ``path`` as an 8-bit RGB PIL image (:func:`to_rgb`); raises :class:`UnreadableImage`
    with the reason for a file that cannot be read so."""
    try:
        with open(path, "rb") as file, Image.open(file) as image:
            return to_rgb(image)
    except _PIL_ERRORS as exc:
        raise UnreadableImage(_reason(exc, path)) from None


def image_problem(path: str | Path, *, verify: bool = False) -> str | None:
    """Why ``path`` cannot be read as an image, from its header alone (format, size against PIL's
    decompression-bomb limit, pixel mode), or ``None`` when it looks readable. ``verify`` also reads the
    file through (``PIL.Image.verify``: PNG checksums, truncation), at about 1.4x the cost on small PNGs."""
    try:
        with Image.open(path) as image:
            problem = _mode_problem(image.mode)
            if problem is None and verify:
                image.verify()
    except _PIL_ERRORS as exc:
        return _reason(exc, path)
    return problem
