"""Batched, batch-invariant pixel ops for :class:`data.augment.MultiCropAugment` (stage 2).

Each op works on a stack of views ``(K, C, H, W)`` uint8 with per-view parameters. A view's result never
depends on the other views in the batch, which the Ray pipeline / torch Dataset twin test relies on
(bit-for-bit equal samples): the ops use only element-wise float ops, exact integer reductions and
per-region ``roi_align``. Every photometric op reads and writes uint8 (as torchvision's uint8 kernels
do), which also makes the contrast mean an exact integer sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from data.tv_kernels import hsv_to_rgb, rgb_to_hsv, roi_align

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def resized_crops(imgs: list[torch.Tensor], boxes: np.ndarray, owner: np.ndarray, size: int) -> torch.Tensor:
    """All crop boxes resized to ``size`` with one roi_align call per distinct source image shape.

    roi_align with ``aligned=True`` and adaptive sampling is bilinear interpolation that averages
    ``ceil(box / size)`` samples per output pixel when shrinking (an antialiasing box filter).
    """
    c = imgs[0].shape[0] if imgs else 1
    out = torch.empty((len(boxes), c, size, size), dtype=torch.uint8)
    if len(boxes) == 0:
        return out
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(imgs):
        shapes.setdefault(tuple(im.shape), []).append(i)
    for members in shapes.values():
        slot = {img: k for k, img in enumerate(members)}
        rows = np.flatnonzero(np.isin(owner, members))
        stack = torch.stack([imgs[i] for i in members]).to(torch.float32)
        rois = torch.empty((len(rows), 5), dtype=torch.float32)
        rois[:, 0] = torch.tensor([slot[i] for i in owner[rows]], dtype=torch.float32)
        rois[:, 1:] = torch.from_numpy(boxes[rows]).to(torch.float32)
        crops = roi_align(stack, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out[torch.from_numpy(rows)] = to_uint8(crops)
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round, clamp to 0..255 and cast (in place on ``x``)."""
    return x.round_().clamp_(0, 255).to(torch.uint8)


def apply_where(
    x: torch.Tensor, mask: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn`` to the views where ``mask`` is true (a gather, the op, a scatter)."""
    if not mask.any():
        return x
    idx = torch.from_numpy(np.flatnonzero(mask))
    x[idx] = fn(x[idx])
    return x


def apply_where_params(
    x: torch.Tensor,
    mask: np.ndarray,
    values: np.ndarray,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Like :func:`apply_where` with a per-view parameter ``values[mask]`` (float32, shape (K, 1, 1, 1))."""
    if not mask.any():
        return x
    sel = np.flatnonzero(mask)
    idx = torch.from_numpy(sel)
    param = torch.from_numpy(values[sel].astype(np.float32)).view(-1, 1, 1, 1)
    x[idx] = fn(x[idx], param)
    return x


def _gray_floor(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel luma of uint8 RGB as whole numbers (floor, as torchvision's uint8 kernels)."""
    r, g, b = x.to(torch.float32).unbind(dim=-3)
    return (
        r.mul(_GRAY_WEIGHTS[0])
        .add_(g.mul(_GRAY_WEIGHTS[1]))
        .add_(b.mul(_GRAY_WEIGHTS[2]))
        .floor_()
        .unsqueeze(-3)
    )


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``x * ratio + other * (1 - ratio)`` in float32, rounded back to uint8 (element-wise, exact per view)."""
    return to_uint8(x.to(torch.float32).mul(ratio).add_(other.mul(1.0 - ratio)))


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return to_uint8(x.to(torch.float32).mul(f))


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the view's mean luma. The mean is an exact integer sum (uint8 input), so it cannot
    depend on how the reduction is split across the batch."""
    gray = x if x.shape[1] == 1 else _gray_floor(x)
    total = gray.to(torch.int64).sum(dim=(1, 2, 3), keepdim=True)
    mean = (total.to(torch.float64) / float(gray[0].numel())).to(torch.float32)
    return _blend(x, mean, f)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray_floor(x), f)


def hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    hsv = rgb_to_hsv(x.to(torch.float32).div_(255.0))
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(f.view(-1, 1, 1)).remainder_(1.0)
    rgb = hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return to_uint8(rgb.mul_(255.0))


#: ColorJitter's ops in the order of ``ViewParams.factors`` / ``ViewParams.order`` ids.
JITTER_OPS = (brightness, contrast, saturation, hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-view sigma, reflect padding, as shifted multiply-adds.

    The kernel radius is ``ceil(3 * max_sigma)`` (the configured maximum, never the batch's maximum,
    so the truncation of a view's kernel cannot depend on its batch). Written as a fixed sequence of
    element-wise ops (rather than a grouped conv2d whose summation order may change with the batch
    shape) so a view's result never depends on its batch.
    """
    k, _, height, width = x.shape
    radius = int(min(math.ceil(3.0 * max_sigma), height - 1, width - 1))
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32).view(1, -1)
    weights = torch.exp(-(offsets**2) / (2.0 * sigma.view(-1, 1) ** 2))  # (K, 2r+1)
    norm = weights[:, 0].clone()
    for j in range(1, weights.shape[1]):
        norm += weights[:, j]
    weights = weights / norm.view(-1, 1)
    y = x.to(torch.float32)
    for dim in (3, 2):  # horizontal, then vertical
        pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
        padded = torch.nn.functional.pad(y, pad, mode="reflect")
        n = width if dim == 3 else height
        acc = padded.narrow(dim, 0, n) * weights[:, 0].view(k, 1, 1, 1)
        for j in range(1, 2 * radius + 1):
            acc += padded.narrow(dim, j, n) * weights[:, j].view(k, 1, 1, 1)
        y = acc
    return to_uint8(y)
