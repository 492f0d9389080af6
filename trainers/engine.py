"""The one training step every loop uses: the Ray Train worker, the local loop and bench's bare loop.

Schedules are indexed by the global step stored in the engine's state, so a run resumed from a
checkpoint continues its lr / weight-decay / teacher-momentum schedules exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from trainers.methods.base import Method
from trainers.optim import build_optimizer
from trainers.optim_config import OptimConfig
from trainers.schedules import Schedules


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the step was not applied, so the weights are still the last good ones."""

    def __init__(self, step: int, value: float):
        super().__init__(
            f"non-finite loss {value} at step {step}; stopping (weights of the previous step kept)"
        )
        self.step = step
        self.value = value


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it).

    Why it matters: there, bf16 autocast runs a small CNN's training step 2-3x faster than fp32; on
    CPUs without it bf16 is emulated and slower than fp32. The check is a private torch op, so any
    failure reads as "no"."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` = bf16 autocast on GPU and on CPUs with native bf16 (no loss scaling needed), else fp32."""
    if precision != "auto":
        return precision
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def normalise_uint8(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> ``(x / 255 - mean) / std`` in ``dtype`` on ``device`` (the first C
    channels of ``mean``/``std``). Done on the device so the data stream stays compact uint8.
    ``channels_last``: 4-D results in NHWC memory order, the layout a channels-last model wants."""
    x = torch.as_tensor(images).to(device, non_blocking=True)
    c = x.shape[-3]
    m = torch.tensor(list(mean)[:c], device=device, dtype=dtype).view(c, 1, 1)
    s = torch.tensor(list(std)[:c], device=device, dtype=dtype).view(c, 1, 1)
    out = (x.to(dtype) / 255.0 - m) / s
    if channels_last and out.ndim == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def crops_from_batch(
    batch: dict[str, torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    crop_usage: str = "multi",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> list[torch.Tensor]:
    """uint8 crop columns -> list of normalised float crops on ``device``, global crops first.

    ``batch['global']`` is ``(B, G, C, H, W)`` uint8, ``batch['local']`` (optional) ``(B, L, C, h, w)``.
    Normalising on the device keeps the data stream in compact uint8.
    """
    groups = [batch["global"]]
    if (
        crop_usage == "multi"
        and "local" in batch
        and batch["local"] is not None
        and batch["local"].shape[1] > 0
    ):
        groups.append(batch["local"])
    crops = []
    for grp in groups:
        grp = normalise_uint8(grp, mean, std, device, dtype)
        views = (grp[:, v] for v in range(grp.shape[1]))
        crops.extend(v.contiguous(memory_format=torch.channels_last) if channels_last else v for v in views)
    if crop_usage == "single":
        return crops[:1]
    return crops


def autocast_context(device: torch.device | str, precision: str):
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device_type, dtype=torch.float16)
    return contextlib.nullcontext()


class Engine:
    """Owns optimiser, schedules, grad scaler and the global step of one method.

    ``module`` is what is called forward (the DDP-wrapped method under Ray Train); ``method`` is the
    bare method (for teacher updates, evaluation and checkpoints).
    """

    def __init__(
        self,
        method: Method,
        optim_cfg: OptimConfig,
        steps_per_epoch: int,
        global_batch: int,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        module: nn.Module | None = None,
    ):
        self.method = method
        self.module = module if module is not None else method
        self.cfg = optim_cfg
        self.device = torch.device(device)
        self.precision = precision
        self.optimizer = build_optimizer(method, optim_cfg)
        self.schedules = Schedules.build(optim_cfg, steps_per_epoch, global_batch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(precision == "fp16"))
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self.step = 0

    def set_epochs(self, epochs: int) -> None:
        """Refit every step-indexed schedule (lr, weight decay, teacher momentum) to a run of ``epochs``
        epochs. A time-budgeted run fixes its length after its first epoch; the warm-up steps do not
        depend on the length, so the steps already taken keep their values."""
        self.cfg = dataclasses.replace(self.cfg, epochs=epochs)
        self.schedules = Schedules.build(self.cfg, self.steps_per_epoch, self.global_batch)
        self.method.ctx.epochs = epochs

    def train_step(self, crops: list[torch.Tensor], loss_hook=None) -> dict[str, float]:
        """Forward, backward, clip, optimiser step, teacher EMA. Raises NonFiniteLossError before
        touching the weights when the loss is NaN/Inf. ``loss_hook(step, loss)`` (tests) may alter it."""
        lr, wd = self.schedules.apply(self.optimizer, self.step)
        self.module.train()
        with autocast_context(self.device, self.precision):
            loss, logs = self.module(crops, self.step)
        if loss_hook is not None:
            loss = loss_hook(self.step, loss)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(self.step, value)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        momentum = self.method.update_teacher(self.step)
        self.step += 1
        out = {"loss": value, "lr": lr, "weight_decay": wd}
        if momentum is not None:
            out["teacher_momentum"] = momentum
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        out.update({k: float(v) for k, v in logs.items()})
        return out

    def state_dict(self) -> dict:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
