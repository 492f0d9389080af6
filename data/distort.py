"""Strong copy distortions for ``bamray eval copydetect``, in the spirit of Copydays "strong".

Copydays' strong set holds prints, scans, paintings and blurred, cropped, re-encoded copies; a detector must
find the original among distractors. We cannot print and scan, so each query is an original put through a
seeded, random subset (at least :data:`MIN_DISTORTIONS`) of the operations below, always in this order:

========== ==================================================================================
crop       keep 40-80 % of the area (aspect 3/4 to 4/3), resized back to the original size
rescale    down to 40-70 % of the side and back up (resolution loss)
rotate     10-30 degrees either way, corners filled black
colour     brightness and contrast x 0.6-1.4 (RGB: saturation x 0.5-1.5, hue +-0.05 as well)
paste      a 15-30 %-area patch of another image pasted at a random place
blur       Gaussian, sigma 0.5-1.5 px per 28 px of side
noise      Gaussian, std 8-20 grey levels
jpeg       re-encoded at quality 10-40
========== ==================================================================================

Everything is a function of ``(seed, query id)`` (``numpy.random.default_rng``), so a benchmark is
rebuilt identically on any machine. Works on uint8 ``(C, H, W)`` tensors of any size and 1 or 3 channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

OPERATIONS = ("crop", "rescale", "rotate", "colour", "paste", "blur", "noise", "jpeg")
MIN_DISTORTIONS = 3


def choose_operations(rng: np.random.Generator) -> list[str]:
    """A random subset of :data:`OPERATIONS` of at least :data:`MIN_DISTORTIONS`, in the fixed order."""
    while True:
        mask = rng.random(len(OPERATIONS)) < 0.5
        if mask.sum() >= MIN_DISTORTIONS:
            return [op for op, on in zip(OPERATIONS, mask) if on]


def distort(
    image: torch.Tensor, other: torch.Tensor, seed: int, query_id: int
) -> tuple[torch.Tensor, list[str]]:
    """The strong copy of ``image`` for query ``query_id`` (``other``: where the pasted patch comes from);
    returns ``(uint8 tensor of the same shape, the operations applied)``."""
    rng = np.random.default_rng([int(seed), int(query_id)])
    ops = choose_operations(rng)
    x = image.clone()
    c, h, w = x.shape
    for op in ops:
        x = _APPLY[op](x, rng, other)
    assert x.shape == (c, h, w) and x.dtype == torch.uint8
    return x, ops


def _crop(x: torch.Tensor, rng: np.random.Generator, _other: torch.Tensor) -> torch.Tensor:
    _, h, w = x.shape
    area = rng.uniform(0.4, 0.8) * h * w
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = max(1, min(h, round(math.sqrt(area / aspect))))
    cw = max(1, min(w, round(math.sqrt(area * aspect))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return F.resized_crop(x, top, left, ch, cw, [h, w], antialias=True)


def _rescale(x: torch.Tensor, rng: np.random.Generator, _other: torch.Tensor) -> torch.Tensor:
    _, h, w = x.shape
    f = rng.uniform(0.4, 0.7)
    small = F.resize(x, [max(1, round(h * f)), max(1, round(w * f))], antialias=True)
    return F.resize(small, [h, w], antialias=True)


def _rotate(x: torch.Tensor, rng: np.random.Generator, _other: torch.Tensor) -> torch.Tensor:
    angle = float(rng.uniform(10, 30) * rng.choice([-1, 1]))
    return F.rotate(x, angle, interpolation=F.InterpolationMode.BILINEAR, fill=0)


def _colour(x: torch.Tensor, rng: np.random.Generator, _other: torch.Tensor) -> torch.Tensor:
    x = F.adjust_brightness(x, float(rng.uniform(0.6, 1.4)))
    x = F.adjust_contrast(x, float(rng.uniform(0.6, 1.4)))
    if x.shape[0] == 3:
        x = F.adjust_saturation(x, float(rng.uniform(0.5, 1.5)))
        x = F.adjust_hue(x, float(rng.uniform(-0.05, 0.05)))
    return x


def _paste(x: torch.Tensor, rng: np.random.Generator, other: torch.Tensor) -> torch.Tensor:
    _, h, w = x.shape
    src = F.resize(other, [h, w], antialias=True) if tuple(other.shape[1:]) != (h, w) else other
    side = math.sqrt(rng.uniform(0.15, 0.3))
    ph, pw = max(1, round(h * side)), max(1, round(w * side))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out = x.clone()
    out[:, ty : ty + ph, tx : tx + pw] = src[: x.shape[0], sy : sy + ph, sx : sx + pw]
    return out


def _blur(x: torch.Tensor, rng: np.random.Generator, _other: torch.Tensor) -> torch.Tensor:
    sigma = float(rng.uniform(0.5, 1.5)) * max(x.shape[1:]) / 28
    k = max(3, 2 * math.ceil(3 * sigma) + 1)
    return F.gaussian_blur(x, [k, k], [sigma, sigma])


def _noise(x: torch.Tensor, rng: np.random.Generator, _other: torch.Tensor) -> torch.Tensor:
    std = float(rng.uniform(8, 20))
    noise = torch.from_numpy(rng.normal(0.0, std, size=tuple(x.shape))).float()
    return (x.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _jpeg(x: torch.Tensor, rng: np.random.Generator, _other: torch.Tensor) -> torch.Tensor:
    return decode_jpeg(encode_jpeg(x.contiguous(), quality=int(rng.integers(10, 41))))


_APPLY = {
    "crop": _crop,
    "rescale": _rescale,
    "rotate": _rotate,
    "colour": _colour,
    "paste": _paste,
    "blur": _blur,
    "noise": _noise,
    "jpeg": _jpeg,
}
