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
   (:class:`data.view_params.ViewSampler`, :meth:`MultiCropAugment.batch_params`);
2. per batch (few torch calls for the whole batch): the random resized crops of all views in one
   ``torchvision.ops.roi_align`` call per image size and crop size, then flip, colour jitter, grayscale,
   Gaussian blur and solarisation applied to the whole stack of views with per-view parameters
   (:mod:`data.augment_ops`).

Stage 2 is batch-invariant by construction, which the Ray pipeline / torch Dataset twin test relies on
(bit-for-bit equal samples): it uses only element-wise float ops, exact integer reductions and
per-region ``roi_align``, whose value for one view never depends on the other views in the batch. Every
photometric op reads and writes uint8 (as torchvision's uint8 kernels do), which also makes the
contrast mean an exact integer sum.

Throughput knobs (see ``data.pipeline``): ``augment_batch`` over a few hundred images amortises the
per-call overhead; one thread per process is best (the tensors are too small to split).

The image helpers (``decode_image``, ``to_chw_uint8``, ``clean_transform``) live in
:mod:`data.images` and are re-exported here, as are the view-parameter names of :mod:`data.view_params`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from data import tv_kernels
from data.augment_ops import JITTER_OPS, apply_where, apply_where_params, gaussian_blur, resized_crops
from data.config import DataConfig
from data.images import clean_transform, decode_image, to_chw_uint8
from data.view_params import (
    BLUR_REFERENCE_SIZE,
    CROP_ATTEMPTS,
    CROP_RATIO,
    GLOBAL_1,
    GLOBAL_2,
    LOCAL,
    ViewParams,
    ViewSampler,
)

__all__ = [
    "BLUR_REFERENCE_SIZE",
    "CROP_ATTEMPTS",
    "CROP_RATIO",
    "GLOBAL_1",
    "GLOBAL_2",
    "LOCAL",
    "SOLARIZE_THRESHOLD",
    "MultiCropAugment",
    "ViewParams",
    "ViewSampler",
    "clean_transform",
    "decode_image",
    "to_chw_uint8",
]

SOLARIZE_THRESHOLD = 128


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
        self.sampler = ViewSampler(cfg)  # validates cfg (ConfigError names the field)
        self.cfg = cfg
        self.channels = cfg.channels
        self.num_global = cfg.global_crops
        self.num_local = cfg.local_crops
        self.global_size = cfg.global_crop_size
        self.local_size = cfg.local_crop_size
        self.sigma_range = self.sampler.sigma_range
        # Ops that can change pixels: saturation/hue are identities on grayscale (PIL's behaviour).
        b, c, s, h = cfg.color_jitter
        strengths = (b, c, s, h) if self.channels == 3 else (b, c, 0.0, 0.0)
        self._active_jitter_ops = [k for k, v in enumerate(strengths) if v > 0]

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    def batch_params(
        self, seed: int, epoch: int, indices: Sequence[int], heights: Sequence[int], widths: Sequence[int]
    ) -> ViewParams:
        """Stage 1: parameters of many samples, flattened image-major (sample i's views are rows i*V ..)."""
        return self.sampler.batch_params(seed, epoch, indices, heights, widths)

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
        p = self.batch_params(
            seed, epoch, indices, [im.shape[1] for im in imgs], [im.shape[2] for im in imgs]
        )
        g, v = self.num_global, self.num_views
        gsel = np.concatenate([np.arange(i * v, i * v + g) for i in range(n)]) if n else np.zeros(0, np.int64)
        lsel = (
            np.concatenate([np.arange(i * v + g, (i + 1) * v) for i in range(n)])
            if n
            else np.zeros(0, np.int64)
        )
        out_g = self._views(imgs, p, gsel, self.global_size).view(n, g, c, self.global_size, self.global_size)
        if self.num_local:
            out_l = self._views(imgs, p, lsel, self.local_size).view(
                n, self.num_local, c, self.local_size, self.local_size
            )
        else:
            out_l = torch.zeros((n, 0, c, self.local_size, self.local_size), dtype=torch.uint8)
        return out_g, out_l

    def _views(self, imgs: list[torch.Tensor], p: ViewParams, sel: np.ndarray, size: int) -> torch.Tensor:
        """Stage 2: crop + photometric ops for the views ``sel`` (flat view ids, image-major) at one size."""
        x = resized_crops(imgs, p.boxes[sel], sel // self.num_views, size)
        x = apply_where(x, p.flip[sel], tv_kernels.horizontal_flip)
        x = self._color_jitter(x, p.jitter[sel], p.factors[sel], p.order[sel])
        if self.channels == 3:
            x = apply_where(x, p.gray[sel], lambda t: tv_kernels.rgb_to_grayscale(t, 3))
        x = apply_where_params(x, p.blur[sel], p.sigma[sel], self._blur)
        x = apply_where(x, p.solarize[sel], lambda t: tv_kernels.solarize(t, SOLARIZE_THRESHOLD))
        return x

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(x, sigma, self.sigma_range[1])

    def _color_jitter(
        self, x: torch.Tensor, apply: np.ndarray, factors: np.ndarray, order: np.ndarray
    ) -> torch.Tensor:
        """ColorJitter with per-view factors and per-view op order (one pass per order position and op)."""
        if not apply.any() or not self._active_jitter_ops:
            return x
        for position in range(4):
            for op in self._active_jitter_ops:
                mask = apply & (order[:, position] == op)
                x = apply_where_params(x, mask, factors[:, op], JITTER_OPS[op])
        return x
