"""Turning whatever a user hands us into a checked RGB image, or a clear InputError."""

import functools
import hashlib
import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import InputError

try:  # iPhone photos (HEIC/HEIF): pillow-heif registers a decoder with PIL (requirements.txt installs it)
    from pillow_heif import register_heif_opener
    register_heif_opener()
    HEIF = True
except ImportError:
    HEIF = False
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")  # `ftyp` brands

# 40 megapixels: a large phone photo is ~12-50 MP; anything above is refused before decoding.
MAX_PIXELS = int(os.environ.get("ZIPCHAT_MAX_PIXELS", 40_000_000))


def load_image(source, max_pixels: int = MAX_PIXELS, fit=None) -> Image.Image:
    """PIL image, path, bytes or array -> a fully decoded 8-bit RGB PIL image, turned the way its EXIF
    orientation says (a phone photo as the person sees it). `fit`: (width, height) as seen -> the size
    to keep it at (Family.compact_size); a JPEG is then decoded at 1/2, 1/4 or 1/8 scale where that is
    still at least that size (a 40 MP photo needs 30 MB instead of 120 MB), and resized to it."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = from_array(source)
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
        orientation = image.getexif().get(ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, struct.error):  # unreadable metadata: load() says what is wrong
        orientation = 1
    target = None
    if fit is not None:
        turned = orientation in (5, 6, 7, 8)  # stored sideways: width and height swap when shown
        shown = (height, width) if turned else (width, height)
        target = tuple(fit(shown))
        if target != shown:
            image.draft(image.mode, target[::-1] if turned else target)  # JPEG only; a no-op elsewhere
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"The image is corrupt or truncated ({e}). Please upload it again.") from None
    if orientation in range(2, 9):  # stored sideways or mirrored: as displayed
        image = ImageOps.exif_transpose(image)
    image = to_rgb8(image)
    if target is not None and image.size != target:
        image = image.resize(target, Image.BICUBIC, reducing_gap=3.0)
    return image


ORIENTATION = 0x0112  # the EXIF tag


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit sRGB, as an image viewer shows it: an embedded colour profile converted to
    sRGB, transparency (an alpha channel or a transparent colour) composited onto white; 16-bit
    greyscale (I;16, I;16B, I;16L) divided by 257, 32-bit integer (I) and float (F) images stretched over
    their own min..max; the rest by PIL's conversion."""
    if image.mode.startswith("I;16"):
        grey = (np.asarray(image).astype(np.uint32) // 257).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("I", "F"):
        return Image.fromarray(stretch(np.asarray(image))).convert("RGB")
    profile = image.info.get("icc_profile")
    alpha = None
    if image.mode == "La":  # premultiplied grey + alpha, which PIL converts to no other mode: un-premultiply
        la = np.asarray(image).astype(np.float64)  # (H, W, 2)
        grey = np.where(la[..., 1] > 0, la[..., 0] * 255 / np.maximum(la[..., 1], 1), 0)
        image = Image.fromarray(np.stack([grey.clip(0, 255), la[..., 1]], -1).round().astype(np.uint8), "LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # (a palette's or a colour key's transparency becomes alpha)
        alpha = rgba.getchannel("A")
        image = image.convert("L") if image.mode in ("L", "LA") else rgba.convert("RGB")
    elif image.mode == "P":
        image = image.convert("RGB")
    rgb = to_srgb(image, profile) if profile else None
    rgb = rgb or (image if image.mode == "RGB" else image.convert("RGB"))
    if alpha is not None and alpha.getextrema() != (255, 255):
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), alpha)
    return rgb


@functools.lru_cache(maxsize=1)
def srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_srgb(image: Image.Image, profile: bytes) -> Image.Image | None:
    """Colours in the embedded ICC `profile` -> sRGB (relative colorimetric, as browsers show tagged images),
    or None when the profile cannot be used with this image (unreadable, or of another colour space)."""
    if image.mode not in ("RGB", "L", "CMYK"):
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.profileToProfile(image, source, srgb_profile(), renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                         outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def stretch(values: np.ndarray) -> np.ndarray:
    """Numbers of any dtype -> uint8 over their own min..max (a constant array keeps its value, clipped)."""
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(v.min()), float(v.max())
    if high > low:
        return np.round((v - low) * (255 / (high - low))).astype(np.uint8)
    return np.full(v.shape, np.clip(low, 0, 255), dtype=np.uint8)


def from_array(a: np.ndarray) -> Image.Image:
    """H x W (grey), H x W x 1, 3 (RGB) or 4 (RGBA) array -> PIL image. uint8 as it is, booleans as black
    and white, any other dtype stretched over its own min..max (a uint16 array never wraps)."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.size == 0 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise InputError(f"That array is not an image (shape {a.shape}): send H x W, H x W x 3 or H x W x 4.")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise InputError(f"That array is not an image (dtype {a.dtype}).")
        a = stretch(a)
    return Image.fromarray(np.ascontiguousarray(a))


def _open(fp, what: str) -> Image.Image:
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        if not HEIF and is_heif(fp):
            raise InputError(f"{what} is a HEIC/HEIF photo, and this server has no HEIF decoder "
                             "(pip install pillow-heif). Please send it as JPEG or PNG.") from None
        raise InputError(f"{what} is not an image zipchat can read (JPEG, PNG, WebP, HEIC, GIF, BMP, TIFF, "
                         "...).") from None
    except Image.DecompressionBombError:
        raise InputError(f"{what} is too large to decode safely. Please downscale it.") from None
    except OSError as e:
        raise InputError(f"{what} is corrupt or truncated ({e}). Please upload it again.") from None


BROWSER_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "ICO", "AVIF"}  # what a browser shows as it is


def web_copy(path, image: Image.Image) -> Path | None:
    """For a file a browser cannot show (HEIC, TIFF, ...): `image` (the photo as the model sees it) saved
    as a JPEG beside it, for the chat to show -> its path; None when the browser shows the file itself."""
    try:
        with Image.open(path) as f:
            if f.format in BROWSER_FORMATS:
                return None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    target = Path(path).with_name(Path(path).stem + ".shown.jpg")
    image.save(target, "JPEG", quality=90)
    return target


def is_heif(fp) -> bool:
    """Whether a file (path or binary file object) starts like a HEIF container (ISO BMFF `ftyp` box)."""
    if isinstance(fp, (str, Path)):
        with open(fp, "rb") as f:
            head = f.read(12)
    else:
        fp.seek(0)
        head = fp.read(12)
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def image_digest(image: Image.Image) -> str:
    """Content hash of a decoded image: the key of the compress-once cache."""
    h = hashlib.sha256()
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]
