"""BYOL/DINO multi-crop augmentation on uint8 images, seeded per sample by ``(seed, epoch, index)``.

Why per-sample seeds: every random choice for image ``index`` in epoch ``epoch`` comes from
``numpy.random.default_rng([seed, epoch, index])`` and nothing else (no global RNG, no worker state), so
the same image gets the same views whether it is augmented by one Ray Data actor, eight of them, a
PyTorch DataLoader worker or the main process, and a resumed run sees exactly the views it would have
seen without the interruption.

Why batched: at 28 px the work per view is tiny and the cost is Python/dispatch overhead (a
torchvision op on one 1x28x28 view costs 10-100 us whatever it computes). So the augmentation works in
two stages:

1. per sample (cheap numpy): draw every parameter of every view from the sample's own generator
   (:meth:`MultiCropAugment.batch_params`);
2. per batch (few torch calls for the whole batch): the random resized crops of all views in one
   ``torchvision.ops.roi_align`` call per image size and crop size, then flip, colour jitter, grayscale,
   Gaussian blur and solarisation applied to the whole stack of views with per-view parameters.

Stage 2 is batch-invariant by construction, which the Ray pipeline / torch Dataset twin test relies on
(bit-for-bit equal samples): it uses only element-wise float ops, exact integer reductions and
per-region ``roi_align``, whose value for one view never depends on the other views in the batch. Every
photometric op reads and writes uint8 (as torchvision's uint8 kernels do), which also makes the
contrast mean an exact integer sum.

Throughput knobs (see ``data.pipeline``): ``augment_batch`` over a few hundred images amortises the
per-call overhead; one thread per process is best (the tensors are too small to split).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode_image
from torchvision.ops import roi_align

from data.config import DataConfig
from trainers.options import ConfigError

try:  # batched HSV conversion (element-wise); per-view F.adjust_hue is the fallback
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
except ImportError:  # pragma: no cover - depends on the torchvision version
    _hsv_to_rgb = _rgb_to_hsv = None

#: View kinds: DINO's first global view (blur p=1), second global view (blur p=0.1, solarise) and locals.
GLOBAL_1, GLOBAL_2, LOCAL = 0, 1, 2
#: Aspect-ratio range of the random resized crop (torchvision's default).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Crop-box attempts before falling back to a centre crop (torchvision's RandomResizedCrop uses 10).
CROP_ATTEMPTS = 10
#: Blur sigmas in ``cfg.blur_sigma`` are pixels of a 224-px global view (DINO's numbers).
BLUR_REFERENCE_SIZE = 224
SOLARIZE_THRESHOLD = 128
# Uniform draws per view: crop attempts (area, aspect), crop position (2), flip/jitter/gray/blur/solarize/
# sigma (6), jitter factors (4), jitter order keys (4).
_DRAWS_PER_VIEW = 2 * CROP_ATTEMPTS + 2 + 6 + 4 + 4

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def decode_image(png_bytes: bytes | bytearray | memoryview | None, channels: int) -> torch.Tensor | None:
    """PNG (or JPEG) bytes -> uint8 ``(channels, H, W)`` tensor, or ``None`` when the bytes do not decode.

    ``None`` instead of an exception because a corrupt row must be skipped and counted, never crash a
    training run. torchvision's decoder is ~3x faster than PIL for small PNGs.
    """
    if png_bytes is None or len(png_bytes) == 0:
        return None
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        data = torch.frombuffer(bytearray(png_bytes), dtype=torch.uint8)
        image = _tv_decode_image(data, mode=mode)
    except (RuntimeError, ValueError):
        return None
    if image.ndim != 3 or image.shape[0] != channels or image.shape[1] == 0 or image.shape[2] == 0:
        return None
    return image


def to_chw_uint8(image: Any, channels: int | None = None) -> torch.Tensor:
    """A PIL image, ``(H, W)`` / ``(C, H, W)`` / ``(H, W, C)`` array or tensor -> uint8 ``(C, H, W)`` tensor.

    With ``channels`` given, grayscale is repeated to RGB and RGB reduced to grayscale as needed.
    """
    if isinstance(image, Image.Image):
        if channels is None:
            channels = 1 if image.mode in ("L", "1", "I", "I;16", "F") else 3
        image = image.convert("L" if channels == 1 else "RGB")
        t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
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
        t = t.repeat(3, 1, 1) if channels == 3 else F.rgb_to_grayscale(t, num_output_channels=1)
    return t.contiguous()


def clean_transform(image: Any, size: int, channels: int | None = None) -> torch.Tensor:
    """Evaluation view: resize the shorter side to ``size`` (antialiased) then centre-crop ``size`` x ``size``.

    No randomness at all, so k-NN / linear-probe features are reproducible.
    """
    t = to_chw_uint8(image, channels)
    if min(t.shape[-2:]) != size:
        t = F.resize(t, size, antialias=True)
    if tuple(t.shape[-2:]) != (size, size):
        t = F.center_crop(t, [size, size])
    return t.contiguous()


@dataclasses.dataclass
class ViewParams:
    """Every random choice for the views of one sample (globals first), drawn before any pixel work."""

    boxes: np.ndarray  # (V, 4) float64 crop boxes x1, y1, x2, y2 in pixel units of the source image
    flip: np.ndarray  # (V,) bool
    jitter: np.ndarray  # (V,) bool: colour jitter applied at all
    factors: np.ndarray  # (V, 4) float64 brightness, contrast, saturation, hue
    order: np.ndarray  # (V, 4) int64: a permutation of the four jitter ops (ColorJitter's random order)
    gray: np.ndarray  # (V,) bool
    blur: np.ndarray  # (V,) bool
    sigma: np.ndarray  # (V,) float64 blur sigma in output pixels
    solarize: np.ndarray  # (V,) bool


class MultiCropAugment:
    """DINO/BYOL multi-crop: ``cfg.global_crops`` global and ``cfg.local_crops`` local views of an image.

    Per view, in DINO's order: random resized crop (``*_crop_scale``, aspect 3/4..4/3) to
    ``*_crop_size``, horizontal flip (``flip_p``), colour jitter with probability ``color_jitter_p``
    (brightness and contrast; saturation and hue only for 3 channels; ops in random order), grayscale
    (``grayscale_p``, 3 channels only), Gaussian blur (``blur_p`` = global 1, global 2, locals), and
    solarisation (``solarize_p``) on the second global view. With more than two globals, even-numbered
    globals follow global 1's recipe and odd-numbered ones global 2's.

    ``__call__`` augments one image; :meth:`augment_batch` many at once (the fast path) with identical
    results per sample.
    """

    def __init__(self, cfg: DataConfig):
        for name in ("global_crop_scale", "local_crop_scale"):
            lo, hi = getattr(cfg, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"data.{name}", f"got ({lo}, {hi}); need 0 < min <= max <= 1")
        sigma = tuple(getattr(cfg, "blur_sigma", (0.1, 2.0)))
        if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1]:
            raise ConfigError("data.blur_sigma", f"got {sigma}; need 0 < min <= max")
        b, c, s, h = cfg.color_jitter
        if min(b, c, s) < 0 or not 0.0 <= h <= 0.5:
            raise ConfigError("data.color_jitter", f"got {cfg.color_jitter}; need b, c, s >= 0 and 0 <= hue <= 0.5")
        self.cfg = cfg
        self.channels = cfg.channels
        self.num_global = cfg.global_crops
        self.num_local = cfg.local_crops
        self.global_size = cfg.global_crop_size
        self.local_size = cfg.local_crop_size
        scale = cfg.global_crop_size / BLUR_REFERENCE_SIZE
        self.sigma_range = (sigma[0] * scale, sigma[1] * scale)
        kinds = [GLOBAL_1 if i % 2 == 0 else GLOBAL_2 for i in range(self.num_global)] + [LOCAL] * self.num_local
        self._kinds = np.asarray(kinds, dtype=np.int64)
        self._blur_p = np.asarray(cfg.blur_p, dtype=np.float64)[self._kinds]
        self._solarize_p = np.where(self._kinds == GLOBAL_2, cfg.solarize_p, 0.0)
        self._jitter_lo = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        self._jitter_hi = np.array([1 + b, 1 + c, 1 + s, h])
        # Ops that can change pixels: saturation/hue are identities on grayscale (PIL's behaviour).
        strengths = (b, c, s, h) if self.channels == 3 else (b, c, 0.0, 0.0)
        self._active_jitter_ops = [k for k, v in enumerate(strengths) if v > 0]
        lo_scale = np.array([cfg.global_crop_scale[0]] * self.num_global + [cfg.local_crop_scale[0]] * self.num_local)
        hi_scale = np.array([cfg.global_crop_scale[1]] * self.num_global + [cfg.local_crop_scale[1]] * self.num_local)
        self._scale_lo, self._scale_hi = lo_scale, hi_scale

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    # ---------------------------------------------------------------- stage 1: parameters (per sample)
    def batch_params(self, seed: int, epoch: int, indices: Sequence[int], heights: Sequence[int],
                     widths: Sequence[int]) -> ViewParams:
        """Parameters of many samples, flattened image-major (sample i's views are rows i*V .. i*V+V-1)."""
        draws = [self._draws(seed, epoch, idx) for idx in indices]
        v = self.num_views
        r = np.stack([d[0] for d in draws]) if draws else np.zeros((0, v, _DRAWS_PER_VIEW))
        aspect = np.stack([d[1] for d in draws]) if draws else np.zeros((0, v, CROP_ATTEMPTS))
        return self._params(r, aspect, np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64))

    def _draws(self, seed: int, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """All uniform draws of one sample from ``default_rng([seed, epoch, index])`` (one call: numpy's
        per-call overhead dominates at this size). The number of draws is fixed, never data dependent.

        ``exp`` is evaluated here, per sample on a fixed-shape array, because numpy's SIMD ``exp`` is not
        guaranteed to round identically at every array position; everything computed batched in
        :meth:`_params` is correctly rounded IEEE arithmetic (+, -, *, /, sqrt, comparisons), so a
        sample's parameters never depend on its batch.
        """
        rng = np.random.default_rng([int(seed), int(epoch), int(index)])
        r = rng.random((self.num_views, _DRAWS_PER_VIEW))
        log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        aspect = np.exp(log_lo + (log_hi - log_lo) * r[:, 1 : 2 * CROP_ATTEMPTS : 2])
        return r, aspect

    def _params(self, r: np.ndarray, aspect: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> ViewParams:
        """Draws ``(N, V, D)`` -> parameters. Crop boxes follow torchvision's RandomResizedCrop (first of
        ``CROP_ATTEMPTS`` (area, aspect) draws that fits, else the largest centred box within the ratio
        range) but are continuous: roi_align resamples sub-pixel boxes, no rounding needed."""
        n, v, _ = r.shape
        area_u = r[:, :, 0 : 2 * CROP_ATTEMPTS : 2]  # (N, V, A)
        pos_u = r[:, :, 2 * CROP_ATTEMPTS : 2 * CROP_ATTEMPTS + 2]
        u = r[:, :, 2 * CROP_ATTEMPTS + 2 : 2 * CROP_ATTEMPTS + 8]
        fac_u = r[:, :, 2 * CROP_ATTEMPTS + 8 : 2 * CROP_ATTEMPTS + 12]
        order = np.argsort(r[:, :, 2 * CROP_ATTEMPTS + 12 :], axis=-1)

        hh = heights.astype(np.float64).reshape(n, 1, 1)
        ww = widths.astype(np.float64).reshape(n, 1, 1)
        span = (self._scale_hi - self._scale_lo).reshape(1, v, 1)
        target = (hh * ww) * (self._scale_lo.reshape(1, v, 1) + span * area_u)
        w_try = np.sqrt(target * aspect)
        h_try = np.sqrt(target / aspect)
        ok = (w_try <= ww) & (h_try <= hh)
        first = ok.argmax(axis=-1)[..., None]
        w = np.take_along_axis(w_try, first, axis=-1)[..., 0]
        h = np.take_along_axis(h_try, first, axis=-1)[..., 0]
        has = ok.any(axis=-1)
        hh, ww = hh[..., 0], ww[..., 0]  # (N, 1)
        in_ratio = ww / hh
        fw = np.where(in_ratio < CROP_RATIO[0], ww, np.where(in_ratio > CROP_RATIO[1], hh * CROP_RATIO[1], ww))
        fh = np.where(in_ratio < CROP_RATIO[0], ww / CROP_RATIO[0], hh)
        w = np.where(has, w, fw)
        h = np.where(has, h, fh)
        left = np.where(has, (ww - w) * pos_u[..., 0], (ww - w) / 2)
        top = np.where(has, (hh - h) * pos_u[..., 1], (hh - h) / 2)
        boxes = np.stack([left, top, left + w, top + h], axis=-1)

        sigma = self.sigma_range[0] + (self.sigma_range[1] - self.sigma_range[0]) * u[..., 5]
        flat = n * v
        return ViewParams(
            boxes=boxes.reshape(flat, 4),
            flip=(u[..., 0] < self.cfg.flip_p).reshape(flat),
            jitter=(u[..., 1] < self.cfg.color_jitter_p).reshape(flat),
            factors=(self._jitter_lo + (self._jitter_hi - self._jitter_lo) * fac_u).reshape(flat, 4),
            order=order.reshape(flat, 4),
            gray=((u[..., 2] < self.cfg.grayscale_p) & (self.channels == 3)).reshape(flat),
            blur=(u[..., 3] < self._blur_p).reshape(flat),
            sigma=sigma.reshape(flat),
            solarize=(u[..., 4] < self._solarize_p).reshape(flat),
        )

    # ---------------------------------------------------------------- stage 2: pixels (per batch)
    def __call__(self, image: Any, seed: int, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image -> ``(globals uint8 (G, C, H, W), locals uint8 (L, C, h, w))``."""
        g, loc = self.augment_batch([image], seed, epoch, [index])
        return g[0], loc[0]

    def augment_batch(
        self, images: Sequence[Any], seed: int, epoch: int, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Many images (any sizes) -> ``(globals (N, G, C, H, W), locals (N, L, C, h, w))`` uint8.

        Sample ``i`` is seeded by ``(seed, epoch, indices[i])``; its views equal ``self(images[i], ...)``.
        """
        if len(images) != len(indices):
            raise ValueError(f"got {len(images)} images but {len(indices)} indices")
        c, n = self.channels, len(images)
        imgs = [to_chw_uint8(im, c) for im in images]
        p = self.batch_params(seed, epoch, indices, [im.shape[1] for im in imgs], [im.shape[2] for im in imgs])
        g, v = self.num_global, self.num_views
        gsel = np.concatenate([np.arange(i * v, i * v + g) for i in range(n)]) if n else np.zeros(0, np.int64)
        lsel = np.concatenate([np.arange(i * v + g, (i + 1) * v) for i in range(n)]) if n else np.zeros(0, np.int64)
        out_g = self._views(imgs, p, gsel, self.global_size).view(n, g, c, self.global_size, self.global_size)
        if self.num_local:
            out_l = self._views(imgs, p, lsel, self.local_size).view(n, self.num_local, c, self.local_size,
                                                                       self.local_size)
        else:
            out_l = torch.zeros((n, 0, c, self.local_size, self.local_size), dtype=torch.uint8)
        return out_g, out_l

    def _views(self, imgs: list[torch.Tensor], p: ViewParams, sel: np.ndarray, size: int) -> torch.Tensor:
        """Crop + photometric ops for the views ``sel`` (flat view ids, image-major) at one output size."""
        x = _resized_crops(imgs, p.boxes[sel], sel // self.num_views, size)
        x = _where(x, p.flip[sel], lambda t: F.horizontal_flip(t))
        x = self._color_jitter(x, p.jitter[sel], p.factors[sel], p.order[sel])
        if self.channels == 3:
            x = _where(x, p.gray[sel], lambda t: F.rgb_to_grayscale(t, num_output_channels=3))
        x = _where_params(x, p.blur[sel], p.sigma[sel], self._blur)
        x = _where(x, p.solarize[sel], lambda t: F.solarize(t, threshold=SOLARIZE_THRESHOLD))
        return x

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return _gaussian_blur(x, sigma, self.sigma_range[1])

    def _color_jitter(self, x: torch.Tensor, apply: np.ndarray, factors: np.ndarray,
                      order: np.ndarray) -> torch.Tensor:
        """ColorJitter with per-view factors and per-view op order (one pass per order position and op)."""
        if not apply.any() or not self._active_jitter_ops:
            return x
        ops = (_brightness, _contrast, _saturation, _hue)
        for position in range(4):
            for op in self._active_jitter_ops:
                mask = apply & (order[:, position] == op)
                x = _where_params(x, mask, factors[:, op], ops[op])
        return x


# -------------------------------------------------------------------- batched kernels (batch-invariant)
def _resized_crops(imgs: list[torch.Tensor], boxes: np.ndarray, owner: np.ndarray, size: int) -> torch.Tensor:
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
        out[torch.from_numpy(rows)] = _to_uint8(crops)
    return out


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _where(x: torch.Tensor, mask: np.ndarray, fn) -> torch.Tensor:
    """Apply ``fn`` to the views where ``mask`` is true (a gather, the op, a scatter)."""
    if not mask.any():
        return x
    idx = torch.from_numpy(np.flatnonzero(mask))
    x[idx] = fn(x[idx])
    return x


def _where_params(x: torch.Tensor, mask: np.ndarray, values: np.ndarray, fn) -> torch.Tensor:
    """Like :func:`_where` with a per-view parameter ``values[mask]`` (float32, shape (K, 1, 1, 1))."""
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
    return r.mul(_GRAY_WEIGHTS[0]).add_(g.mul(_GRAY_WEIGHTS[1])).add_(b.mul(_GRAY_WEIGHTS[2])).floor_().unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``x * ratio + other * (1 - ratio)`` in float32, rounded back to uint8 (element-wise, exact per view)."""
    return _to_uint8(x.to(torch.float32).mul(ratio).add_(other.mul(1.0 - ratio)))


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _to_uint8(x.to(torch.float32).mul(f))


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the view's mean luma. The mean is an exact integer sum (uint8 input), so it cannot
    depend on how the reduction is split across the batch."""
    gray = x if x.shape[1] == 1 else _gray_floor(x)
    total = gray.to(torch.int64).sum(dim=(1, 2, 3), keepdim=True)
    mean = (total.to(torch.float64) / float(gray[0].numel())).to(torch.float32)
    return _blend(x, mean, f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray_floor(x), f)


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    if _rgb_to_hsv is None:  # pragma: no cover - older/newer torchvision without the helpers
        return torch.stack([F.adjust_hue(v, float(h)) for v, h in zip(x, f.view(-1))])
    hsv = _rgb_to_hsv(x.to(torch.float32).div_(255.0))
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(f.view(-1, 1, 1)).remainder_(1.0)
    rgb = _hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return _to_uint8(rgb.mul_(255.0))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-view sigma, reflect padding, as shifted multiply-adds.

    The kernel radius is ``ceil(3 * max_sigma)`` (the configured maximum, never the batch's maximum,
    so the truncation of a view's kernel cannot depend on its batch). Written as a fixed sequence of element-wise ops (rather than a grouped conv2d whose summation order
    may change with the batch shape) so a view's result never depends on its batch.
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
    return _to_uint8(y)


def png_bytes(image: Any) -> bytes:
    """uint8 image -> PNG bytes (lossless; used by tests and sources)."""
    t = to_chw_uint8(image)
    arr = t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
