"""``bamray viz attention``: where a trained backbone looks, on a user's own images (or the first test images
of the run's data set): the last block's per-head [CLS] attention of a ViT, the feature-map norm of a CNN
(labelled as such). Written to ``--out`` and logged to the run as ``viz/<name>``.

Each image is read with PIL, converted to the network's channels, resized (shorter side) and centre-cropped
to the run's global crop size, and normalised with the run's mean / std: the view its k-NN evaluates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainers.options import ConfigError

#: images drawn when none are given (the first test images of the run's data set)
DEFAULT_IMAGES = 6


def _fit(im: Any, channels: int, size: int) -> np.ndarray:
    """A PIL image -> uint8 ``(channels, size, size)``: resized (shorter side), centre-cropped."""
    from PIL import Image

    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return arr[None] if channels == 1 else np.transpose(arr, (2, 0, 1))


def load_images(paths: list[str], channels: int, size: int) -> np.ndarray:
    """uint8 ``(N, channels, size, size)`` from image files; an unreadable one is refused by name."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(_fit(im, channels, size))
        except (OSError, UnidentifiedImageError) as err:
            raise ConfigError("--images", f"cannot read {p!r} as an image: {err}") from err
    return np.stack(out)


def dataset_images(cfg: Any, n: int) -> np.ndarray:
    """The first ``n`` decodable test images (else train) of the run's prepared data set, as
    :func:`load_images` gives files."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image, UnidentifiedImageError

    from data.sources import read_meta

    meta = read_meta(cfg.data.path)
    split = "test" if int(meta.get("counts", {}).get("test", 0)) > 0 else "train"
    table = pq.read_table(Path(cfg.data.path) / split, columns=["image"]).slice(0, 4 * n)
    out = []
    for raw in table.column("image").to_pylist():
        try:
            with Image.open(io.BytesIO(raw)) as im:
                out.append(_fit(im, cfg.data.channels, cfg.data.global_crop_size))
        except (OSError, UnidentifiedImageError, TypeError):
            continue  # a corrupt row: passed over, as everywhere
        if len(out) == n:
            break
    if not out:
        raise ConfigError("--images", f"no decodable image in {cfg.data.path}/{split}: give --images")
    return np.stack(out)


def attention_command(backbone: Any, images: list[str] | None, out: str) -> dict[str, Any]:
    """Draw the maps of ``images`` (paths; None: the run's data set) for ``backbone``; save to ``out``."""
    from orchestrator import pictures, tracking

    cfg = backbone.cfg
    size, channels = cfg.data.global_crop_size, cfg.data.channels
    batch = load_images(images, channels, size) if images else dataset_images(cfg, DEFAULT_IMAGES)
    image, kind, shape = pictures.backbone_maps(
        backbone.load("cpu"), batch, cfg.data.mean, cfg.data.std, "cpu", backbone.label
    )
    path = Path(out).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    if backbone.run_id:
        tracking.client(backbone.tracking_uri).log_artifact(backbone.run_id, str(path), "viz")
    return {"path": str(path), "kind": kind, "images": len(batch), "maps": shape}
