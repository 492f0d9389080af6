"""The one epoch loop and the one feature extractor: every training and evaluation path goes through here.

:func:`train_one_epoch` (DINO's loop, pure torch) is run by the Ray Train worker and by the bench's bare
PyTorch loop; what differs between them (metric logging, fault injection, the batch source) comes in as
callbacks and an iterable. :func:`embed` turns uint8 batches into L2-normalised features for the online
k-NN, the linear probe and the quality benchmark.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from trainers.engine import Engine, NonFiniteLossError, crops_from_batch, normalise_uint8
from trainers.evaluation.knn import extract_features


@dataclasses.dataclass
class EpochStats:
    """What one epoch did: steps, summed loss, seconds (data waits included), the wait for its first batch,
    and the non-finite loss that ended it early, if one did."""

    steps: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0
    first_batch_s: float = 0.0
    nan_error: NonFiniteLossError | None = None
    #: summed per-step values of the method's ``epoch_logs`` keys, and how many steps each sum holds
    #: (their epoch means are reported; a resumed epoch may hold fewer than ``steps``)
    log_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    log_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def log_means(self) -> dict[str, float]:
        return {k: v / max(self.log_counts.get(k, 0), 1) for k, v in self.log_sums.items()}


def train_one_epoch(
    engine: Engine,
    batches: Iterable[dict[str, torch.Tensor]],
    data_cfg: Any,
    *,
    epoch: int,
    steps_per_epoch: int,
    global_batch: int,
    channels_last: bool = False,
    before_step: Callable[[dict[str, torch.Tensor]], None] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    synchronize: bool = False,
    stats: EpochStats | None = None,
) -> EpochStats:
    """Train ``engine`` on every batch of ``batches`` (uint8 crop columns, see ``crops_from_batch``).

    ``on_step(logs)`` gets the step's logs plus ``images_per_sec`` (global batch / time since the previous
    step ended, so data waits count), ``data_wait_s`` (blocked on the iterator) and ``epoch`` (fractional,
    0-based ``epoch`` + progress). A non-finite loss ends the epoch without applying that step: it is
    returned in ``EpochStats.nan_error``, the caller decides (retrying would only meet it again).
    ``synchronize``: wait for the device at the end of each step, so a step's GPU work is timed with it.
    ``stats``: an epoch resumed from a checkpoint taken inside it continues these counts (steps, loss,
    seconds); ``stats.seconds`` is kept current after every step, so ``on_step`` can checkpoint it.
    """
    stats = stats if stats is not None else EpochStats()
    seconds_before = stats.seconds
    method = engine.method
    t_epoch = t_prev = time.perf_counter()
    for batch in batches:
        t_batch = time.perf_counter()
        if stats.steps == 0:
            stats.first_batch_s = t_batch - t_epoch
        if before_step is not None:
            before_step(batch)
        crops = crops_from_batch(
            batch,
            data_cfg.mean,
            data_cfg.std,
            engine.device,
            crop_usage=method.crop_usage,
            channels_last=channels_last,
        )
        try:
            logs = engine.train_step(crops, loss_hook=loss_hook)
        except NonFiniteLossError as err:
            stats.nan_error = err
            break
        if synchronize and engine.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        logs["images_per_sec"] = global_batch / max(now - t_prev, 1e-9)
        logs["data_wait_s"] = t_batch - t_prev  # blocked on the stream: a step's share of it says data-bound
        logs["epoch"] = epoch + (stats.steps + 1) / steps_per_epoch
        t_prev = now
        stats.loss_sum += logs["loss"]
        for key in getattr(method, "epoch_logs", ()):
            if key in logs:
                stats.log_sums[key] = stats.log_sums.get(key, 0.0) + float(logs[key])
                stats.log_counts[key] = stats.log_counts.get(key, 0) + 1
        stats.steps += 1
        stats.seconds = seconds_before + now - t_epoch
        if on_step is not None:
            on_step(logs)
    stats.seconds = seconds_before + time.perf_counter() - t_epoch
    return stats


def embed(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    *,
    data_cfg: Any = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features of ``model`` (in eval mode) for uint8 ``(images, labels)`` batches, and the
    labels, on ``device``.

    Images are normalised with ``data_cfg.mean`` / ``std`` as in training; ``data_cfg=None`` gives
    pixels / 255 instead (the raw-pixel baseline with ``model = nn.Flatten()``)."""
    if data_cfg is None:
        prepared = ((torch.as_tensor(x).to(device, torch.float32) / 255.0, y) for x, y in batches)
    else:
        prepared = (
            (normalise_uint8(x, data_cfg.mean, data_cfg.std, device, channels_last=channels_last), y)
            for x, y in batches
        )
    return extract_features(model, prepared, device)
