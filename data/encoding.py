"""Source image -> PNG bytes for the shards (:mod:`data.shards`), or the reason it cannot be written.

Image size bound: PIL refuses images above ~179 M pixels as "decompression bombs", which made a valid
14000x14000 PNG look corrupt. Importers accept up to ``BAMRAY_MAX_IMAGE_PIXELS`` pixels (environment
variable, default 300 M, i.e. ~0.9 GB of RGB pixels while one image is converted) and skip a larger one
with reason ``too large``, naming its size. High-bit-depth images are rescaled to 8 bits by
:mod:`data.bitdepth`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.bitdepth import nominal_bits, to_8bit

MAX_PIXELS_ENV = "BAMRAY_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 300_000_000
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
    EOFError,
    TypeError,
)


@dataclass(frozen=True)
class Skip:
    """Why an image was not written: a short fixed ``reason`` (counted) and a free-form ``detail``."""

    reason: str
    detail: str = ""


def max_image_pixels() -> int:
    """The largest image (width x height) the importers accept: ``$BAMRAY_MAX_IMAGE_PIXELS`` or 300 M."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value == int(value)):
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels >= 1 (e.g. 300000000)")
    return int(value)


def encode_png(
    image: Image.Image | np.ndarray, bits: int | None = None
) -> tuple[bytes, tuple[int, int], str]:
    """Image -> (PNG bytes, (height, width), mode). Modes other than L/RGB become L or RGB.

    16-bit / 32-bit / float grayscale is rescaled to 8 bits (:func:`data.bitdepth.to_8bit`, ``bits`` the
    file's declared depth), never clipped.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = to_8bit(image, bits)
    if image.mode in ("1", "LA", "La"):
        image = image.convert("L")
    elif image.mode == "P":  # palette (maybe with transparency): via RGBA, as PIL recommends
        image = image.convert("RGBA").convert("RGB")
    elif image.mode != "L" and image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), (image.height, image.width), image.mode


def encode_or_skip(
    data: bytes | str | Path, max_pixels: int | None = None
) -> tuple[bytes, tuple[int, int], str] | Skip:
    """Fully decode an image (file path or bytes) and re-encode it as PNG, or say why not (:class:`Skip`).

    ``Image.open`` only reads the header; ``load()`` decodes every pixel, which is what catches
    truncated and garbled files. EXIF rotation is applied so the stored pixels look like the photo.
    The size bound (``max_pixels``, default :func:`max_image_pixels`) is checked on the header, before
    any pixel is decoded; PIL's own decompression-bomb limit is lifted meanwhile (not thread-safe: the
    importers convert one image at a time).
    """
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    w = h = 0
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with Image.open(src) as im:
            w, h = im.size
            if w < 1 or h < 1:
                return Skip("corrupt", f"empty image {w}x{h}")
            if w * h > limit:
                return Skip("too large", f"{w}x{h} = {w * h} pixels > {limit} (raise {MAX_PIXELS_ENV})")
            im.load()
            bits = nominal_bits(im)
            return encode_png(ImageOps.exif_transpose(im), bits)
    except MemoryError:
        return Skip("out of memory", f"{w}x{h} pixels; lower {MAX_PIXELS_ENV} to skip such images early")
    except _DECODE_ERRORS as err:
        return Skip("corrupt", f"{type(err).__name__}: {err}")
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def verify_and_encode(
    data: bytes | str | Path, max_pixels: int | None = None
) -> tuple[bytes, tuple[int, int], str] | None:
    """:func:`encode_or_skip` without the reason: ``None`` when the image cannot be written."""
    enc = encode_or_skip(data, max_pixels)
    return None if isinstance(enc, Skip) else enc
