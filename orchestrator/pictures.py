"""Pictures logged beside a run's metrics: what the augmentation fed the network, and at every evaluation
epoch where the backbone looks, how its features cluster and (BAM) what its targets look like.

A grid of the first batch's crops (``crops/first_batch.png`` of every run) shows at a glance whether crop
scales, flips and colour jitter look as intended, which no loss curve tells.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


def crop_grid(batch: Mapping[str, Any], max_images: int = 8, pad: int = 2):
    """A PIL image: one row per image of the batch, its global crops then its local crops (upscaled
    to the global size, nearest neighbour), so the augmentations can be eyeballed in the MLflow UI."""
    from PIL import Image

    g = np.asarray(batch["global"])[:max_images]  # (N, G, C, H, W) uint8
    local = batch.get("local")
    loc = np.asarray(local)[:max_images] if local is not None and np.asarray(local).shape[1] > 0 else None
    n, num_g, c, h, w = g.shape
    tiles_per_row = num_g + (loc.shape[1] if loc is not None else 0)
    canvas = np.full((n * (h + pad) + pad, tiles_per_row * (w + pad) + pad, 3), 255, dtype=np.uint8)

    def put(tile: np.ndarray, r: int, col: int) -> None:
        t = np.transpose(tile, (1, 2, 0))
        t = np.repeat(t, 3, axis=2) if t.shape[2] == 1 else t[..., :3]
        if t.shape[0] != h or t.shape[1] != w:
            t = np.asarray(Image.fromarray(t).resize((w, h), Image.NEAREST))
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = t

    for i in range(n):
        for v in range(num_g):
            put(g[i, v], i, v)
        if loc is not None:
            for v in range(loc.shape[1]):
                put(loc[i, v], i, num_g + v)
    img = Image.fromarray(canvas)
    scale = max(1, 256 // max(canvas.shape[0], 1))
    return img.resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST) if scale > 1 else img


# --------------------------------------------------------------------------------- per-evaluation pictures
# Drawn with matplotlib's Agg backend into PIL images (MLflow logs them as PNGs, by step, so the UI's image
# view steps through the epochs).


def _figure_to_image(fig: Any):
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 -> (H, W, 3)."""
    t = np.transpose(np.asarray(image), (1, 2, 0))
    return np.repeat(t, 3, axis=2) if t.shape[2] == 1 else t[..., :3]


def map_overlays(images: np.ndarray, maps: np.ndarray, kind: str, title: str, max_images: int = 6):
    """One row per image: the image, then each map (an attention head, or the one feature-norm map)
    upsampled to the image and overlaid. ``images`` (N, C, H, W) uint8, ``maps`` (N, K, h, w)."""
    import torch
    import torch.nn.functional as F

    plt = _plt()
    n = min(len(images), max_images)
    k = maps.shape[1]
    h, w = images.shape[-2:]
    up = F.interpolate(torch.as_tensor(maps[:n]).float(), size=(h, w), mode="bilinear", align_corners=False)
    up = up.numpy()
    fig, axes = plt.subplots(n, k + 1, figsize=(1.6 * (k + 1), 1.6 * n + 0.4), squeeze=False)
    label = "head" if kind == "attention" else "feature norm"
    for i in range(n):
        rgb = _rgb(images[i])
        axes[i, 0].imshow(rgb)
        for j in range(k):
            m = up[i, j]
            m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
            axes[i, j + 1].imshow(rgb)
            axes[i, j + 1].imshow(m, cmap="inferno", alpha=0.6)
            if i == 0:
                axes[i, j + 1].set_title(f"{label} {j}" if k > 1 else label, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _figure_to_image(fig)


def backbone_maps(model: Any, images: np.ndarray, mean: Any, std: Any, device: Any, note: str) -> tuple:
    """Where ``model`` looks in ``images`` (uint8 (N, C, H, W)): a ViT's last-block [CLS] attention per head,
    else a CNN's feature-map norm, labelled as such. The training run's pictures and ``bamray viz`` both
    draw it. Returns ``(picture, kind, maps shape)``."""
    import torch

    from trainers.engine import normalise_uint8
    from trainers.evaluation.maps import spatial_maps

    x = normalise_uint8(torch.as_tensor(images), mean, std, device)
    kind, maps = spatial_maps(model, x)
    what = "last block's [CLS] attention per head" if kind == "attention" else "feature-map norm (a CNN)"
    picture = map_overlays(images, maps.cpu().numpy(), kind, f"{what}; {note}", max_images=len(images))
    return picture, kind, tuple(maps.shape)


def embedding_map(points: np.ndarray, labels: np.ndarray, title: str):
    """A 2-D scatter of ``points`` (N, 2) coloured by class ``labels``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        sel = labels == c
        ax.scatter(points[sel, 0], points[sel, 1], s=5, color=cmap(i % cmap.N), label=str(int(c)))
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best", title="class", title_fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return _figure_to_image(fig)


#: packages whose numba functions :func:`_umap` has compiled to numba's on-disk cache
NUMBA_CACHED = ("umap", "pynndescent")

#: the dispatchers :func:`cache_numba_functions` turned caching on for
_CACHING: list[Any] = []


def numba_functions(packages: tuple[str, ...] = NUMBA_CACHED) -> Iterator[tuple[str, Any]]:
    """``(module.name, dispatcher)`` of every numba-jitted function the imported modules of ``packages``
    hold (a function imported into several modules comes once per module)."""
    import sys

    from numba.core.dispatcher import Dispatcher

    for name, module in list(sys.modules.items()):
        if module is None or name.split(".", 1)[0] not in packages:
            continue
        for key, value in list(vars(module).items()):
            if isinstance(value, Dispatcher):
                yield f"{name}.{key}", value


def cache_numba_functions(packages: tuple[str, ...] = NUMBA_CACHED) -> int:
    """Turn on numba's on-disk cache for the jitted functions of ``packages`` that were decorated without
    ``cache=True``; returns how many. Why: umap-learn's own functions are not cached, so the first UMAP fit
    of every process compiled them again, about 20 s of one core (measured here: 19.8 s for 300 points;
    the next process, with this cache: 0.5 s, the same points bit for bit). A training run pays it at its
    first evaluation epoch, in the training worker, once per run, resume and sweep trial. numba keeps the
    cache beside the package (``__pycache__``), or in its user-wide cache directory when that is read-only,
    and recompiles on its own when a source file changes."""
    from numba.core.caching import NullCache

    enabled = 0
    for _, fn in numba_functions(packages):
        if isinstance(fn._cache, NullCache):
            fn.enable_caching()
            _CACHING.append(fn)
            enabled += 1
    return enabled


def _stop_caching() -> None:
    """Back to compiling in memory only: numba raises the OSError of a cache it cannot write (a full disk,
    a directory that turned read-only) out of the compile, which would cost the picture."""
    from numba.core.caching import NullCache

    while _CACHING:
        _CACHING.pop()._cache = NullCache()


def _umap() -> Any:
    """``umap`` (umap-learn), with its numba functions cached on disk (:func:`cache_numba_functions`;
    best effort: with a numba without those internals, or no writable cache location (numba raises
    RuntimeError), it compiles as before)."""
    import umap

    try:
        cache_numba_functions()
    except (ImportError, AttributeError, RuntimeError, OSError):
        pass
    return umap


def project_2d(features: np.ndarray, how: str, seed: int = 0) -> tuple[np.ndarray, str]:
    """``(points (N, 2), how it was done)``: UMAP (cosine, 15 neighbours) through ``umap-learn`` when ``how``
    is ``umap`` and the package is installed, else the first two principal components."""
    x = np.asarray(features, dtype=np.float32)
    if how == "umap":
        try:
            umap = _umap()
        except ImportError:
            how = "pca"
        else:

            def fit() -> np.ndarray:
                reducer = umap.UMAP(n_neighbors=15, metric="cosine", random_state=seed, n_jobs=1)
                return np.asarray(reducer.fit_transform(x))

            try:
                return fit(), "UMAP"
            except OSError:  # numba could not write its cache: compile in memory, as before the cache
                _stop_caching()
                return fit(), "UMAP"
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "PCA"


def bam_matrices(p: np.ndarray, q: np.ndarray, stats: Mapping[str, float], title: str):
    """Heat maps of BAM's balanced target P and the source attention Q (rows: the global crops of a fixed
    batch, columns: the target crops), log-scaled, with their mean row entropies."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (name, m) in zip(axes, (("target P (Sinkhorn)", p), ("source attention Q", q))):
        im = ax.imshow(np.log10(np.maximum(m, 1e-6)), cmap="viridis", vmin=-6, vmax=0, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("target crop x image")
        ax.set_ylabel("global crop x image")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="log10 probability")
    ent = ", ".join(f"{k.removeprefix('bam_')} {v:.3f}" for k, v in stats.items())
    fig.suptitle(f"{title}\nmean row entropies (nats): {ent}", fontsize=9, y=1.02)
    return _figure_to_image(fig)


def parallel_coordinates(rows: list[Mapping[str, float]], params: list[str], metric: str, title: str):
    """One line per trial across its (numeric) hyper-parameters and ``metric``, each axis scaled to its
    own range, coloured by ``metric``."""
    plt = _plt()
    axes_names = [*params, metric]
    data = np.array([[float(r[a]) for a in axes_names] for r in rows], dtype=np.float64)
    lo, hi = data.min(axis=0), data.max(axis=0)
    scaled = (data - lo) / np.where(hi > lo, hi - lo, 1.0)
    fig, ax = plt.subplots(figsize=(1.8 * len(axes_names) + 1, 4))
    cmap = plt.get_cmap("viridis")
    order = np.argsort(data[:, -1])
    for i in order:
        ax.plot(range(len(axes_names)), scaled[i], color=cmap(scaled[i, -1]), alpha=0.8, lw=1.5)
    ax.set_xticks(range(len(axes_names)))
    ax.set_xticklabels(axes_names, rotation=15, fontsize=8)
    ax.set_yticks([])
    for j in range(len(axes_names)):
        ax.axvline(j, color="grey", lw=0.5)
        ax.text(j, -0.06, f"{lo[j]:.4g}", ha="center", va="top", fontsize=7)
        ax.text(j, 1.04, f"{hi[j]:.4g}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(-0.15, 1.15)
    ax.set_title(title, fontsize=9)
    return _figure_to_image(fig)
