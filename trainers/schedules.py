"""Every schedule of a run, in one place: lr and weight decay (per-iteration arrays, DINO style), the
teacher's EMA momentum, BAM's ``reg`` warm-up and DINO's teacher-temperature warm-up.

All are functions of the *global* step (or of the fractional epoch derived from it), which the engine
keeps in its checkpointed state, so a resumed run continues every schedule exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup_value`` to ``base_value``, then cosine to ``final_value``.

    Returns one value per iteration (``epochs * steps_per_epoch``)."""
    total = max(1, epochs * steps_per_epoch)
    warmup_iters = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False)
    iters = np.arange(total - warmup_iters)
    denom = max(len(iters), 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / denom))
    out = np.concatenate((warmup, cosine))
    assert len(out) == total
    return out


@dataclasses.dataclass
class Schedules:
    """lr and weight decay per iteration; applied to the optimiser's groups by ``apply``."""

    lr: np.ndarray
    weight_decay: np.ndarray

    @classmethod
    def build(cls, cfg: Any, steps_per_epoch: int, global_batch: int) -> Schedules:
        """From an ``OptimConfig``: the peak lr scales with the global batch (``lr * batch / 256``), warms
        up linearly over ``warmup_epochs`` and decays by cosine to ``min_lr``; weight decay goes by cosine
        from ``weight_decay`` to ``weight_decay_end``."""
        peak = cfg.lr * global_batch / 256.0
        return cls(
            lr=cosine_schedule(peak, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs),
            weight_decay=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch),
        )

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        """Set ``step``'s lr and weight decay on every group (clamped to the last value past the end; groups
        marked ``no_weight_decay`` keep 0) and return them."""
        i = min(max(step, 0), len(self.lr) - 1)
        lr, wd = float(self.lr[i]), float(self.weight_decay[i])
        for g in optimizer.param_groups:
            g["lr"] = lr
            g["weight_decay"] = 0.0 if g.get("no_weight_decay") else wd
        return lr, wd


def teacher_momentum(base: float, step: int, total_steps: int) -> float:
    """Cosine from ``base`` to 1 over the run (BYOL, DINO, BAM teacher): the EMA teacher freezes as
    training ends."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def reg_schedule(reg: float, reg_final: float | None, warmup_epochs: int, epoch: float) -> float:
    """BAM: linear warm-up of ``reg`` to ``reg_final`` over ``warmup_epochs`` (official: 30), then constant;
    ``reg`` throughout when there is no ``reg_final`` or no warm-up."""
    if reg_final is None or warmup_epochs <= 0:
        return reg
    t = min(max(epoch / warmup_epochs, 0.0), 1.0)
    return reg + t * (reg_final - reg)


def teacher_temperature(epoch: float, warmup_temp: float, final_temp: float, warmup_epochs: float) -> float:
    """DINO: linear warm-up of the teacher temperature from ``warmup_temp`` to ``final_temp`` over
    ``warmup_epochs`` (fractional epochs, so it moves every step), then constant.

    The official code steps it once per epoch; a high teacher temperature at the start keeps the
    targets soft while the student is still random (DINO: 0.04 -> 0.07 over 30 epochs)."""
    if warmup_epochs <= 0:
        return final_temp
    t = min(max(epoch / warmup_epochs, 0.0), 1.0)
    return warmup_temp + t * (final_temp - warmup_temp)
