"""Stage 1 of the multi-crop augmentation: every random choice of every view, drawn per sample.

Every choice for image ``index`` in epoch ``epoch`` comes from ``numpy.random.default_rng([seed, epoch,
index])`` and nothing else (see :mod:`data.augment` for why), as a fixed number of uniform draws that
:class:`ViewSampler` turns into :class:`ViewParams` with batched, correctly rounded numpy arithmetic, so a
sample's parameters never depend on the batch it is drawn in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from data.config import DataConfig
from trainers.options import ConfigError

#: View kinds: DINO's first global view (blur p=1), second global view (blur p=0.1, solarise) and locals.
GLOBAL_1, GLOBAL_2, LOCAL = 0, 1, 2
#: Aspect-ratio range of the random resized crop (torchvision's default).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Crop-box attempts before falling back to a centre crop (torchvision's RandomResizedCrop uses 10).
CROP_ATTEMPTS = 10
#: Blur sigmas in ``cfg.blur_sigma`` are pixels of a 224-px global view (DINO's numbers).
BLUR_REFERENCE_SIZE = 224
# Uniform draws per view: crop attempts (area, aspect), crop position (2), flip/jitter/gray/blur/solarize/
# sigma (6), jitter factors (4), jitter order keys (4).
_DRAWS_PER_VIEW = 2 * CROP_ATTEMPTS + 2 + 6 + 4 + 4


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


def _check(cfg: DataConfig) -> tuple[float, float]:
    """Reject crop scales, blur sigmas and jitter strengths out of range; returns ``cfg.blur_sigma``."""
    for name in ("global_crop_scale", "local_crop_scale"):
        lo, hi = getattr(cfg, name)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"data.{name}", f"got ({lo}, {hi}); need 0 < min <= max <= 1")
    sigma = tuple(getattr(cfg, "blur_sigma", (0.1, 2.0)))
    if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1]:
        raise ConfigError("data.blur_sigma", f"got {sigma}; need 0 < min <= max")
    b, c, s, h = cfg.color_jitter
    if min(b, c, s) < 0 or not 0.0 <= h <= 0.5:
        raise ConfigError(
            "data.color_jitter", f"got {cfg.color_jitter}; need b, c, s >= 0 and 0 <= hue <= 0.5"
        )
    return sigma


class ViewSampler:
    """Draws :class:`ViewParams` for ``cfg.global_crops`` global and ``cfg.local_crops`` local views.

    With more than two globals, even-numbered globals follow global 1's recipe (blur ``blur_p[0]``) and
    odd-numbered ones global 2's (blur ``blur_p[1]``, solarisation ``solarize_p``).
    """

    def __init__(self, cfg: DataConfig):
        sigma = _check(cfg)
        b, c, s, h = cfg.color_jitter
        self.cfg = cfg
        self.channels = cfg.channels
        self.num_global = cfg.global_crops
        self.num_local = cfg.local_crops
        scale = cfg.global_crop_size / BLUR_REFERENCE_SIZE
        self.sigma_range = (sigma[0] * scale, sigma[1] * scale)
        kinds = [GLOBAL_1 if i % 2 == 0 else GLOBAL_2 for i in range(self.num_global)] + [
            LOCAL
        ] * self.num_local
        self._kinds = np.asarray(kinds, dtype=np.int64)
        self._blur_p = np.asarray(cfg.blur_p, dtype=np.float64)[self._kinds]
        self._solarize_p = np.where(self._kinds == GLOBAL_2, cfg.solarize_p, 0.0)
        self._jitter_lo = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        self._jitter_hi = np.array([1 + b, 1 + c, 1 + s, h])
        lo_scale = np.array(
            [cfg.global_crop_scale[0]] * self.num_global + [cfg.local_crop_scale[0]] * self.num_local
        )
        hi_scale = np.array(
            [cfg.global_crop_scale[1]] * self.num_global + [cfg.local_crop_scale[1]] * self.num_local
        )
        self._scale_lo, self._scale_hi = lo_scale, hi_scale

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    def batch_params(
        self, seed: int, epoch: int, indices: Sequence[int], heights: Sequence[int], widths: Sequence[int]
    ) -> ViewParams:
        """Parameters of many samples, flattened image-major (sample i's views are rows i*V .. i*V+V-1)."""
        draws = [self._draws(seed, epoch, idx) for idx in indices]
        v = self.num_views
        r = np.stack([d[0] for d in draws]) if draws else np.zeros((0, v, _DRAWS_PER_VIEW))
        aspect = np.stack([d[1] for d in draws]) if draws else np.zeros((0, v, CROP_ATTEMPTS))
        return self._params(
            r, aspect, np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
        )

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

    def _params(
        self, r: np.ndarray, aspect: np.ndarray, heights: np.ndarray, widths: np.ndarray
    ) -> ViewParams:
        """Draws ``(N, V, D)`` -> parameters."""
        n, v, _ = r.shape
        u = r[:, :, 2 * CROP_ATTEMPTS + 2 : 2 * CROP_ATTEMPTS + 8]
        fac_u = r[:, :, 2 * CROP_ATTEMPTS + 8 : 2 * CROP_ATTEMPTS + 12]
        order = np.argsort(r[:, :, 2 * CROP_ATTEMPTS + 12 :], axis=-1)
        boxes = self._crop_boxes(r, aspect, heights, widths)
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

    def _crop_boxes(
        self, r: np.ndarray, aspect: np.ndarray, heights: np.ndarray, widths: np.ndarray
    ) -> np.ndarray:
        """Crop boxes ``(N, V, 4)`` as torchvision's RandomResizedCrop draws them (the first of
        ``CROP_ATTEMPTS`` (area, aspect) draws that fits, else the largest centred box within the ratio
        range) but continuous: roi_align resamples sub-pixel boxes, no rounding needed."""
        n, v, _ = r.shape
        area_u = r[:, :, 0 : 2 * CROP_ATTEMPTS : 2]  # (N, V, A)
        pos_u = r[:, :, 2 * CROP_ATTEMPTS : 2 * CROP_ATTEMPTS + 2]
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
        fw = np.where(
            in_ratio < CROP_RATIO[0], ww, np.where(in_ratio > CROP_RATIO[1], hh * CROP_RATIO[1], ww)
        )
        fh = np.where(in_ratio < CROP_RATIO[0], ww / CROP_RATIO[0], hh)
        w = np.where(has, w, fw)
        h = np.where(has, h, fh)
        left = np.where(has, (ww - w) * pos_u[..., 0], (ww - w) / 2)
        top = np.where(has, (hh - h) * pos_u[..., 1], (hh - h) / 2)
        return np.stack([left, top, left + w, top + h], axis=-1)
