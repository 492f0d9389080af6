"""Checkpoint files of a training run, and the exported backbone (safetensors + config.yaml).

A Ray Train checkpoint directory holds:

- ``state.pt`` (rank 0): the engine state (method incl. teacher, optimiser, grad scaler, global step),
  the number of completed epochs, the MLflow run id, the resolved config as a plain dict and small
  bookkeeping values (best k-NN so far);
- ``rng_rank{r}.pt`` (every rank): that worker's torch / numpy / python RNG states, so a restarted
  worker continues its own random stream (Ray merges every rank's files into one directory);
- ``backbone.safetensors`` + ``config.yaml`` (rank 0): the evaluated backbone, the artifact MLflow
  keeps ("final" and "best_knn"), enough to rebuild it with ``trainers.backbones.build_backbone``.

Everything in the ``.pt`` files is tensors and primitive containers, so they load with
``torch.load(weights_only=True)``: loading a checkpoint never executes pickled code. Every file is
written to a temporary name and moved into place with ``os.replace`` (atomic on POSIX), and Ray
registers the directory only after the whole upload finished, so a crash never leaves a half
checkpoint that a resume would pick up.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model
from torch import nn

from trainers.fileio import atomic_write  # noqa: F401 - re-exported: checkpoints are written through it

STATE_FILE = "state.pt"
#: the epoch a checkpoint was written after, readable without loading the weights (PBT tags, listings)
EPOCH_FILE = "epoch.json"
BACKBONE_FILE = "backbone.safetensors"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FORMAT = 1
from orchestrator.metric_names import SCORE_KEY  # noqa: F401,E402 - re-exported: the workers' reports carry it


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---------------------------------------------------------------------------------------------- atomic io
# atomic_write (trainers.fileio) is re-exported here: checkpoints are written through it.
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_pt(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and primitive containers (no arbitrary unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """torch (CPU + CUDA), numpy and python RNG states as tensors / lists (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": [int(x) for x in py_internal],
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- checkpoints
def save_training_state(
    directory: str | os.PathLike,
    *,
    engine_state: dict[str, Any],
    epoch: int,
    mlflow_run_id: str | None,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``state.pt`` (rank 0). ``epoch`` = number of completed epochs (training resumes there)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "engine": engine_state,
        "epoch": int(epoch),
        "mlflow_run_id": mlflow_run_id or "",
        "config": config,
        "extra": dict(extra or {}),
    }
    out = atomic_torch_save(state, Path(directory) / STATE_FILE)
    atomic_write(
        Path(directory) / EPOCH_FILE, lambda tmp: Path(tmp).write_text(f'{{"epoch": {int(epoch)}}}\n')
    )
    return out


def read_checkpoint_epoch(directory: str | os.PathLike) -> int:
    """Completed epochs of the checkpoint in ``directory`` (from its small ``epoch.json``)."""
    import json

    return int(json.loads((Path(directory) / EPOCH_FILE).read_text())["epoch"])


def save_rng_state(directory: str | os.PathLike, rank: int) -> Path:
    return atomic_torch_save(rng_state(), Path(directory) / rng_file(rank))


def load_training_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``state.pt``; raises FileNotFoundError naming the directory when it is not a checkpoint."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a bamray checkpoint (no {STATE_FILE})")
    state = load_pt(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


def load_rng_state(directory: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """This rank's RNG states, or None when the checkpoint came from fewer workers."""
    path = Path(directory) / rng_file(rank)
    return load_pt(path) if path.exists() else None


# ---------------------------------------------------------------------------------------------- backbone export
def export_backbone(method: nn.Module, cfg: Any, out_dir: str | os.PathLike) -> Path:
    """Save ``method.eval_backbone()`` (the teacher's backbone when there is one) as safetensors plus the
    resolved experiment ``config.yaml``: its ``model`` section, ``data.channels`` and
    ``data.global_crop_size`` are what :func:`load_backbone` needs to rebuild the network."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = method.eval_backbone()
    feat_dim = int(getattr(backbone, "num_features", 0))
    which = "teacher" if backbone is not getattr(method, "backbone", backbone) else "student"
    saved = built_model_section(cfg, backbone)
    metadata = {
        "feat_dim": str(feat_dim),
        "network": which,
        "backbone": str(cfg.model.backbone),
        "method": str(cfg.method_name),
        "in_chans": str(cfg.data.channels),
        "img_size": str(cfg.data.global_crop_size),
        "stem": saved["stem"],
        "patch_size": str(saved["patch_size"] or ""),
    }
    atomic_write(out / BACKBONE_FILE, lambda tmp: save_model(backbone, tmp, metadata=metadata))
    text = yaml.safe_dump({**cfg.to_dict(), "model": saved}, sort_keys=False)
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return out


def built_model_section(cfg: Any, backbone: nn.Module) -> dict[str, Any]:
    """``cfg``'s model section with what was built written out: the stem ``auto`` chose and, for a ViT,
    its patch size. An export then rebuilds the same network even if ``auto``'s rule changes later."""
    from trainers.backbones import resolve_stem

    model = cfg.to_dict()["model"]
    model["stem"] = resolve_stem(cfg.model.stem, cfg.data.global_crop_size)
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "patch_size", None) is not None:
        model["patch_size"] = int(patch_embed.patch_size[0])
    return model


def load_backbone(export_dir: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild an exported backbone: ``(module in eval mode, ExperimentConfig)``."""
    from orchestrator.config import config_from_dict, upgrade_saved_config
    from trainers.backbones import build_backbone
    from trainers.build import crop_sizes

    export_dir = Path(export_dir)
    with open(export_dir / CONFIG_FILE) as f:
        cfg = config_from_dict(upgrade_saved_config(yaml.safe_load(f)))
    module, _ = build_backbone(
        cfg.model,
        in_chans=cfg.data.channels,
        default_img_size=cfg.data.global_crop_size,
        crop_sizes=crop_sizes(cfg.data),
    )
    missing, unexpected = load_model(module, str(export_dir / BACKBONE_FILE), strict=True)
    if missing or unexpected:  # strict=True already raises; kept for clarity of the contract
        raise RuntimeError(f"backbone weights do not match: missing={missing} unexpected={unexpected}")
    return module.to(device).eval(), cfg
