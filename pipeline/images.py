"""Turning whatever a user hands us into a checked RGB image, or a clear InputError."""

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

# 40 megapixels: a large phone photo is ~12-50 MP; anything above is refused before decoding.
MAX_PIXELS = int(os.environ.get("ZIPCHAT_MAX_PIXELS", 40_000_000))


def load_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """PIL image, path, bytes or HxWx3 array -> a fully decoded RGB PIL image."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise InputError(f"That array is not an image (shape {source.shape}).")
        image = Image.fromarray(source.astype(np.uint8))
    elif isinstance(source, (bytes, bytearray)):
        image = _open(io.BytesIO(source), "the uploaded data")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"No such image file: {path.name}")
        image = _open(path, path.name)
    else:
        raise InputError(f"Expected an image, got {type(source).__name__}.")

    width, height = image.size
    if width == 0 or height == 0:
        raise InputError("The image is empty (zero width or height).")
    if width * height > max_pixels:
        raise InputError(
            f"The image is too large: {width}x{height} = {width * height / 1e6:.1f} MP, "
            f"the limit is {max_pixels / 1e6:.0f} MP. Please downscale it and upload again."
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"The image is corrupt or truncated ({e}). Please upload it again.") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _open(fp, what: str) -> Image.Image:
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image PIL can read (PNG, JPEG, WebP, ...).") from None
    except Image.DecompressionBombError:
        raise InputError(f"{what} is too large to decode safely. Please downscale it.") from None
    except OSError as e:
        raise InputError(f"{what} is corrupt or truncated ({e}). Please upload it again.") from None


def image_digest(image: Image.Image) -> str:
    """Content hash of a decoded image: the key of the compress-once cache."""
    h = hashlib.sha256()
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]
