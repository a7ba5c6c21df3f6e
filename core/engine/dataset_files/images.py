"""Image files decoded with Pillow: the allowed formats only, a header read without decoding, pixels
as uint8 (greyscale H×W, everything else H×W×3), and a row of a C×H×W array written, resized if asked
(bilinear, antialiased when shrinking, aspect ratio not kept)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ..errors import DatasetError

# Pillow plugins allowed to parse uploads: the common raster formats only (no EPS/Ghostscript etc.).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
GREY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
RESIZE_FILTER = Image.Resampling.BILINEAR


def _open_image(data: bytes, where: str, max_side: int) -> Image.Image:
    """Pillow's lazy image: only the header is parsed until its pixels are asked for."""
    image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # Pillow's decompression-bomb guard runs here
    width, height = image.size
    if width > max_side or height > max_side:
        image.close()
        raise DatasetError(f"{where}: the image is {width}×{height} pixels; the limit is {max_side} a side")
    return image


@contextlib.contextmanager
def _image_errors(where: str) -> Iterator[None]:
    try:
        yield
    except DatasetError:
        raise
    except Image.UnidentifiedImageError as err:
        raise DatasetError(f"{where}: not an image file (accepted: {', '.join(IMAGE_FORMATS)}); remove it from the class folders") from err
    except Image.DecompressionBombError as err:
        raise DatasetError(f"{where}: the image is far too large ({err})") from err
    except Exception as err:  # Pillow decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise DatasetError(f"{where}: the image is truncated or corrupt ({type(err).__name__}: {err})") from err


def image_header(data: bytes, where: str, max_side: int) -> tuple[int, int, int]:
    """(height, width, channels it decodes to: 1 for greyscale, 3 for everything else), without decoding."""
    with _image_errors(where), _open_image(data, where, max_side) as image:
        return image.size[1], image.size[0], 1 if image.mode in GREY_MODES else 3


def decode_image(data: bytes, where: str, max_side: int) -> np.ndarray:
    """H×W uint8 for greyscale images, H×W×3 for everything else."""
    with _image_errors(where), _open_image(data, where, max_side) as image:
        if image.mode.startswith("I;16"):  # 16-bit grey: scale 0..65535 to 0..255 (convert('L') would clip)
            return ((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8)
        if image.mode in GREY_MODES:
            return np.asarray(image.convert("L"))
        return np.asarray(image.convert("RGB"))


def store(target: np.ndarray, pixels: np.ndarray, resize: tuple[int, int] | None) -> None:
    """Write H×W or H×W×3 uint8 pixels, resized if asked, into a C×H×W row (grey repeated over 3 channels)."""
    if resize is not None and pixels.shape[:2] != tuple(resize):
        resized = Image.fromarray(np.ascontiguousarray(pixels)).resize((resize[1], resize[0]), RESIZE_FILTER)
        pixels = np.asarray(resized)
    target[...] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
