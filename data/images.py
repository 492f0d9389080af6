"""uint8 image tensors: decode shard bytes, convert any image to ``(C, H, W)``, the clean evaluation view.

The per-sample entry points shared by the Ray stream (:mod:`data.pipeline`), the torch twins
(:mod:`data.torch_dataset`) and the augmentation (:mod:`data.augment`), so every path turns the same
bytes into the same pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from data import tv_kernels
from data.bitdepth import HIGH_DEPTH_MODES, to_8bit


def decode_image(png_bytes: bytes | bytearray | memoryview | None, channels: int) -> torch.Tensor | None:
    """PNG (or JPEG) bytes -> uint8 ``(channels, H, W)`` tensor, or ``None`` when the bytes do not decode.

    ``None`` instead of an exception because a corrupt row must be skipped and counted, never crash a
    training run. torchvision's decoder is ~3x faster than PIL for small PNGs.
    """
    if png_bytes is None or len(png_bytes) == 0:
        return None
    mode = tv_kernels.READ_GRAY if channels == 1 else tv_kernels.READ_RGB
    try:
        data = torch.frombuffer(bytearray(png_bytes), dtype=torch.uint8)
        image = tv_kernels.decode_image(data, mode)
    except (RuntimeError, ValueError):
        return None
    if image.ndim != 3 or image.shape[0] != channels or image.shape[1] == 0 or image.shape[2] == 0:
        return None
    return image


def to_chw_uint8(image: Any, channels: int | None = None) -> torch.Tensor:
    """A PIL image, ``(H, W)`` / ``(C, H, W)`` / ``(H, W, C)`` array or tensor -> uint8 ``(C, H, W)`` tensor.

    With ``channels`` given, grayscale is repeated to RGB and RGB reduced to grayscale as needed.
    16-bit and float PIL images are rescaled to 8 bits (:mod:`data.bitdepth`).
    """
    if isinstance(image, Image.Image):
        if channels is None:
            channels = 1 if image.mode in ("L", "1") or image.mode in HIGH_DEPTH_MODES else 3
        image = to_8bit(image).convert("L" if channels == 1 else "RGB")  # 16-bit/float: rescaled, not clipped
        t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        if t.ndim == 3:  # PIL is always (H, W, C): no guessing, even for an image 3 or 4 pixels high
            t = t.permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        arr = np.ascontiguousarray(image)
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    elif isinstance(image, torch.Tensor):
        t = image
    else:
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {t.dtype}")
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (C, H, W) with C in 1/3/4, got {tuple(t.shape)}")
    if t.shape[0] == 4:  # RGBA: drop alpha
        t = t[:3]
    if channels is not None and t.shape[0] != channels:
        t = t.repeat(3, 1, 1) if channels == 3 else tv_kernels.rgb_to_grayscale(t, 1)
    return t.contiguous()


def clean_transform(image: Any, size: int, channels: int | None = None) -> torch.Tensor:
    """Evaluation view: resize the shorter side to ``size`` (antialiased) then centre-crop ``size`` x ``size``.

    No randomness at all, so k-NN / linear-probe features are reproducible.
    """
    t = to_chw_uint8(image, channels)
    if min(t.shape[-2:]) != size:
        t = tv_kernels.resize_shorter(t, size)
    if tuple(t.shape[-2:]) != (size, size):
        t = tv_kernels.center_crop(t, size)
    return t.contiguous()
