"""The torchvision image kernels that a Ray Data map task runs, without importing torchvision.

Why: ``import torchvision`` imports its models, datasets and ops, and through ``torchvision.ops.roi_align``
``torch._dynamo`` with sympy. Measured here (``/usr/bin/time python -c "import ray, ray.data, torch"``
and the same with ``torchvision``): 3.8 s of CPU without it, 6.4 s with it, paid by every new process that
runs a map task: the per-epoch stream's, the k-NN sets', and before a run's first batch, beside the
training worker's own imports on the same cores. A map task needs a few kernels only:

* the two C++ operators, the image decoder and ``roi_align``, loaded from torchvision's own extension
  libraries with ``torch.ops.load_library`` (what ``import torchvision`` does; where the libraries are not
  found, torchvision is imported instead);
* six tensor functions, transcribed from torchvision 0.29's ``transforms.v2.functional`` (BSD-3-Clause),
  for uint8 ``(..., C, H, W)`` tensors.

``tests/test_tv_kernels.py`` checks every one against torchvision on random images, bit for bit.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import platform
import sys

import torch
from torch.nn.functional import interpolate
from torch.nn.functional import pad as torch_pad

#: torchvision's ``ImageReadMode`` values (the decoder's ``mode`` argument)
READ_GRAY, READ_RGB = 1, 3
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@functools.cache
def _load(*names: str) -> None:
    """Register the operators of torchvision's extension library ``names[0]`` (or an older name) with torch."""
    if "torchvision" in sys.modules:  # its import has loaded both libraries
        return
    spec = importlib.util.find_spec("torchvision")
    locations = list(spec.submodule_search_locations or []) if spec else []
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for directory in locations:
        finder = importlib.machinery.FileFinder(directory, loader)
        for name in names:
            found = finder.find_spec(name)
            if found is not None and found.origin:
                torch.ops.load_library(found.origin)
                return
    import torchvision  # noqa: F401 - another layout: its own import registers the operators


def decode_image(data: torch.Tensor, mode: int) -> torch.Tensor:
    """``torchvision.io.decode_image(data, mode)`` for a 1-D uint8 tensor of PNG / JPEG / GIF / WebP bytes;
    ``mode`` :data:`READ_GRAY` or :data:`READ_RGB`. Raises RuntimeError on bytes that do not decode."""
    _load("image_stable", "image")
    return torch.ops.image.decode_image(data, mode, False)


def roi_align(
    stack: torch.Tensor,
    rois: torch.Tensor,
    size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """``torchvision.ops.roi_align`` for a float ``(N, C, H, W)`` stack and ``(K, 5)`` rois tensor."""
    _load("_C_stable", "_C")
    return torch.ops.torchvision.roi_align(
        stack, rois, spatial_scale, size[0], size[1], sampling_ratio, aligned
    )


def horizontal_flip(image: torch.Tensor) -> torch.Tensor:
    return image.flip(-1)


def rgb_to_grayscale(image: torch.Tensor, num_output_channels: int = 1) -> torch.Tensor:
    """torchvision's luma (0.2989 R + 0.587 G + 0.114 B in float32, truncated back to the input's dtype)."""
    if image.shape[-3] == 1:
        return image.clone() if num_output_channels == 1 else image.repeat_interleave(3, dim=-3)
    r, g, b = image.unbind(dim=-3)
    luma = r.mul(_GRAY_WEIGHTS[0]).add_(g, alpha=_GRAY_WEIGHTS[1]).add_(b, alpha=_GRAY_WEIGHTS[2])
    luma = luma.unsqueeze(dim=-3).to(image.dtype)
    return luma.expand(image.shape) if num_output_channels == 3 else luma


def solarize(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """uint8 pixels at or above ``threshold`` inverted."""
    if image.dtype != torch.uint8 or threshold > 255:
        raise TypeError(
            f"solarize takes uint8 pixels and a threshold <= 255, got {image.dtype} and {threshold}"
        )
    return torch.where(image >= threshold, image.bitwise_not(), image)


def rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1] ``(..., 3, H, W)`` -> HSV (Pillow's algorithm, as torchvision's ``_rgb_to_hsv``)."""
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc  # grey pixels: S and H are 0, and no division by zero
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze_(dim=-3)
    rc, gc, bc = ((maxc.unsqueeze(dim=-3) - image) / divisor).unbind(dim=-3)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub_(gc).mul_(~maxc_neq_r)
    hb = gc.add_(4.0).sub_(rc).mul_(maxc_neq_r.logical_and_(maxc_eq_g.logical_not_()))
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


_HSV_SELECT = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long)


def hsv_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv` (torchvision's ``_hsv_to_rgb``)."""
    h, s, v = image.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = _HSV_SELECT.to(device=image.device)[:, i]
    if select.ndim > 3:  # (C, B, ..., H, W) -> (B, ..., C, H, W)
        select = select.moveaxis(0, -3)
    return vpqt.gather(-3, select)


def _native_uint8_bilinear() -> bool:
    """Whether torchvision resizes uint8 bilinearly without a float round trip on this CPU."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """``F.resize(image, size, antialias=True)`` (bilinear): the shorter side to ``size``, the aspect kept
    (the longer side truncated), for a uint8 ``(..., C, H, W)`` tensor."""
    shape = image.shape
    channels, height, width = shape[-3:]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_h, new_w) == (height, width):
        return image
    if image.numel() == 0:
        return image.reshape(shape[:-3] + (channels, new_h, new_w))
    dtype = image.dtype
    x = image.reshape(-1, channels, height, width)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] == 1 and image.numel() != strides[0]:
        # as torchvision: keep a single channels-last image channels-last through interpolate
        x = x.as_strided((1, channels, height, width), [image.numel(), *strides[1:]])
    cast = dtype not in (torch.float32, torch.float64) and not (
        dtype == torch.uint8 and _native_uint8_bilinear()
    )
    if cast:
        x = x.to(torch.float32)
    x = interpolate(x, size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True)
    if cast:
        x = x.round_().to(dtype) if not dtype.is_floating_point else x.to(dtype)
    return x.reshape(shape[:-3] + (channels, new_h, new_w))


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """``F.center_crop(image, [size, size])``: zero-padded first where the image is smaller."""
    height, width = image.shape[-2:]
    if image.numel() == 0:
        return image.reshape(image.shape[:-2] + (size, size))
    if size > height or size > width:
        left = (size - width) // 2 if size > width else 0
        top = (size - height) // 2 if size > height else 0
        right = (size - width + 1) // 2 if size > width else 0
        bottom = (size - height + 1) // 2 if size > height else 0
        image = torch_pad(image, [left, right, top, bottom], value=0.0)
        height, width = image.shape[-2:]
        if (height, width) == (size, size):
            return image
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image[..., top : top + size, left : left + size]
