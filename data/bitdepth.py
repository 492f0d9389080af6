"""High-bit-depth images -> 8 bits by their range, never by clipping.

PIL's ``convert("L")`` clips 16-bit (``I;16``, ``I``) and float (``F``) pixels to 0..255, so a 16-bit PNG
gradient 0..65535 came out as a 0/255 mask and a float image in 0..1 as black. Shards hold 8-bit PNGs,
so every importer and the in-memory conversion (:func:`data.images.to_chw_uint8`) go through
:func:`to_8bit`, which rescales instead:

- 16-bit modes (``I;16*``, PNG/TIFF/PGM 16-bit): ``0..2**bits-1 -> 0..255`` where ``bits`` is the
  file's declared depth (TIFF ``BitsPerSample``, e.g. 12) or 16; values are rounded, so 65535 -> 255.
- ``I`` (32-bit integers, which is how PIL holds 16-bit PGM and some TIFFs): the same 16-bit scale when
  every value fits in 0..65535, else the image's own min..max (there is no nominal range to use).
- ``F`` (float): the smallest usual range that holds the values -- 0..1, 0..255 or 0..65535 -- else
  min..max; NaN becomes 0.

16-bit RGB(A) needs nothing here: PIL already reduces it to 8 bits per channel (the high byte) when it
opens the file. numpy and PIL only, so the importers do not import torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Single-channel modes whose pixels do not fit in 8 bits.
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def nominal_bits(image: Image.Image) -> int | None:
    """The bit depth an opened file declares per sample (TIFF ``BitsPerSample``), or ``None``.

    Read before any transform: a copied image loses the TIFF tags.
    """
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    if isinstance(bits, (tuple, list)):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None


def _scale(arr: np.ndarray, top: float) -> np.ndarray:
    """``0..top`` -> uint8 ``0..255``, rounded to nearest."""
    return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return _scale(arr - lo, hi - lo)


def high_depth_to_uint8(arr: np.ndarray, mode: str, bits: int | None = None) -> np.ndarray:
    """The pixels of a ``mode`` image (see :data:`HIGH_DEPTH_MODES`) as uint8, by the rules above."""
    if mode == "F":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=np.finfo(np.float64).max, neginf=0.0)
        if a.size == 0:
            return a.astype(np.uint8)
        lo, hi = float(a.min()), float(a.max())
        for top in (1.0, 255.0, 65535.0):
            if lo >= 0.0 and hi <= top:
                return _scale(a, top)
        return _min_max(a)
    a = arr.astype(np.int64)
    top = float(2 ** (bits if bits and 8 < bits <= 16 else 16) - 1)
    if mode.startswith("I;16") or a.size == 0 or (a.min() >= 0 and a.max() <= 65535):
        return _scale(np.minimum(a, top).astype(np.float64), top)
    return _min_max(a.astype(np.float64))


def to_8bit(image: Image.Image, bits: int | None = None) -> Image.Image:
    """``image`` with a high-depth single-channel mode rescaled to an ``L`` image; others unchanged.

    ``bits`` is the declared depth from :func:`nominal_bits` of the opened file (``None``: 16).
    """
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    return Image.fromarray(high_depth_to_uint8(np.asarray(image), image.mode, bits))
