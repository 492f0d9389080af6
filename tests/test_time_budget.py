"""A time-budgeted run: how many epochs it plans, and that refitting the schedules keeps the steps taken."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.config import load_config
from orchestrator.training.plan import plan_epochs
from trainers.build import build_engine, build_method


@pytest.mark.parametrize(
    "budget_s, first_epoch_s, max_epochs, expected",
    [
        (1800, 200, 100, 9),  # 9 x 200 s = 30 min
        (1800, 211, 100, 9),
        (1800, 190, 100, 9),  # 8.53 and 9.47: the nearest whole number
        (600, 200.8, 100, 3),  # 2.99: 602 s, where floor would train 402 s of 600
        (600, 240, 100, 3),
        (600, 241, 100, 2),  # the half-epoch boundary: 2.5 rounds up, 2.49 down
        (1800, 200, 5, 5),  # never more than optim.epochs
        (60, 200, 100, 1),  # at least the epoch already trained
    ],
)
def test_plan_epochs(budget_s, first_epoch_s, max_epochs, expected):
    assert plan_epochs(budget_s, first_epoch_s, max_epochs) == expected


def test_set_epochs_refits_schedules_and_keeps_the_warm_up():
    cfg = load_config(
        "bam_fmnist",
        [
            "model.backbone_kwargs={layers: [1, 1], channels: [8, 16]}",
            "method.proj_hidden_dim=16",
            "method.proj_out_dim=8",
            "method.top_k_sink=0",
            "optim.epochs=10",
            "optim.warmup_epochs=1",
            "optim.min_lr=0.0",
        ],
    )
    steps = 20
    method = build_method(cfg, device="cpu", steps_per_epoch=steps, batch_size=8)
    engine = build_engine(cfg, method, device="cpu", steps_per_epoch=steps, global_batch=8)
    before_lr, before_wd = np.array(engine.schedules.lr), np.array(engine.schedules.weight_decay)
    engine.set_epochs(3)
    lr, wd = np.array(engine.schedules.lr), np.array(engine.schedules.weight_decay)
    assert len(lr) == len(wd) == 3 * steps
    np.testing.assert_array_equal(lr[:steps], before_lr[:steps])  # the warm-up epoch is unchanged
    assert (
        lr[-1] < 0.01 * lr[steps] and before_lr[3 * steps - 1] > 0.5 * lr[steps]
    )  # the cosine now ends at 3
    assert wd[0] == before_wd[0] and wd[-1] == pytest.approx(cfg.optim.weight_decay_end, rel=1e-3)
    assert method.ctx.total_steps == 3 * steps  # the teacher momentum reaches 1 at the new end
    assert method.teacher_momentum(3 * steps) == 1.0
