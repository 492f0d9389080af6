"""``bamray train --init-from <run id | directory>`` (``model.init_from``): a new run whose backbone starts
from exported weights, with its own schedule, optimiser and MLflow run. Unlike ``--resume`` nothing else
is carried over (lightly-train's ``checkpoint=``): use it to continue pretraining on other data, or to
fine-tune with another method.

The weights are checked against the network this config builds before Ray starts, naming
``model.init_from`` and the first mismatching keys, and shipped to the workers with the plan.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from trainers.options import ConfigError

FIELD = "model.init_from"


def init_weights(cfg: Any) -> dict[str, torch.Tensor] | None:
    """The backbone state ``cfg.model.init_from`` names, checked to fit ``cfg``'s backbone; None when
    unset. Raises ConfigError naming ``model.init_from``."""
    if not cfg.model.init_from:
        return None
    from safetensors.torch import load_file

    from orchestrator.checkpointing import BACKBONE_FILE
    from orchestrator.downstream.source import resolve_backbone
    from trainers.backbones import build_backbone
    from trainers.build import crop_sizes

    with tempfile.TemporaryDirectory() as tmp:
        src = resolve_backbone(
            cfg.model.init_from, tmp, tracking_uri=cfg.tracking.tracking_uri or None, flag=FIELD
        )
        state = load_file(str(src.directory / BACKBONE_FILE))
    module, _ = build_backbone(
        cfg.model,
        in_chans=cfg.data.channels,
        default_img_size=cfg.data.global_crop_size,
        crop_sizes=crop_sizes(cfg.data),
    )
    mismatch = describe_mismatch(module.state_dict(), state)
    if mismatch:
        raise ConfigError(
            FIELD,
            f"the weights of {src.label} ({src.cfg.model.backbone}, {src.cfg.data.channels} channel(s)) do "
            f"not fit model.backbone={cfg.model.backbone} with {cfg.data.channels} channel(s): {mismatch}",
        )
    return state


def describe_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], show: int = 3) -> str:
    """'' when ``got`` has exactly ``expected``'s keys and shapes, else the first differences in words."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{what}: {', '.join(items[:show])}{more}")
    return "; ".join(parts)
