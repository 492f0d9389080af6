"""Every registered method through the one training step (``trainers.engine.Engine``).

Parametrised over ``available_methods()`` so a new method file is tested without editing this file.
Backbone: timm ``vit_tiny_patch16_224`` with 4 px patches on 1-channel 28 px globals / 12 px locals,
cut to 2 blocks so 30 optimiser steps per method stay well under the time budget on 2 CPUs (the shipped
configs are exercised at full depth by ``test_shipped_config_builds_and_steps``).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMNIST_DATA

from orchestrator.config import load_config
from trainers.backbones import ModelConfig, build_backbone
from trainers.build import build_engine, build_method
from trainers.engine import Engine, crops_from_batch
from trainers.methods import MethodContext, available_methods, get_method, get_options
from trainers.methods.options import BY_METHOD
from trainers.optim_config import OptimConfig
from trainers.options import ConfigError

METHODS = available_methods()
B, G, L, STEPS = 8, 2, 2, 30
MEAN, STD = (0.2860,), (0.3530,)
# Peak lr per method for the toy runs (BAM's Sinkhorn targets overshoot at 1e-3 on 8 images).
LR = {"bam": 1e-4, "byol": 1e-3, "dino": 1e-3, "mae": 1e-3, "simclr": 1e-3}
# DINO on a fixed batch: the centre keeps flattening the targets, so its cross-entropy *rises* toward
# log K even while the student learns; with the centre frozen (momentum 1) and the prototype layer
# trainable the targets are (nearly) fixed and the student's cross-entropy must fall.
DECREASE_OPTIONS = {"dino": {"center_momentum": 1.0, "freeze_last_layer_epochs": 0.0}}
SMALL_HEADS = {"dino": {"out_dim": 1024}}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning worker threads make these
    small ViT steps up to ~40x slower when other processes hold the cores; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, seed: int = 0, depth: int = 2, steps_per_epoch: int = STEPS, **overrides):
    """Method + Engine with a tiny ViT; ``overrides`` replace option defaults."""
    torch.manual_seed(seed)
    cls = get_method(name)
    backbone, feat_dim = build_backbone(
        ModelConfig(patch_size=4, backbone_kwargs={"depth": depth}), in_chans=1, default_img_size=28
    )
    ctx = MethodContext(
        backbone=backbone,
        feat_dim=feat_dim,
        num_global_crops=G,
        num_local_crops=L,
        batch_size=B,
        steps_per_epoch=steps_per_epoch,
        epochs=1,
        in_chans=1,
        image_size=28,
    )
    options = dataclasses.replace(cls.Options(), **{**SMALL_HEADS.get(name, {}), **overrides})
    method = cls(options, ctx)
    optim = OptimConfig(lr=LR.get(name, 1e-4) * 256 / B, warmup_epochs=0, epochs=1, min_lr=1e-6, batch_size=B)
    return method, Engine(method, optim, steps_per_epoch=steps_per_epoch, global_batch=B)


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "global": torch.randint(0, 256, (B, G, 1, 28, 28), dtype=torch.uint8, generator=g),
        "local": torch.randint(0, 256, (B, L, 1, 12, 12), dtype=torch.uint8, generator=g),
        "label": torch.zeros(B, dtype=torch.int64),
        "index": torch.arange(B),
    }


def fmnist_batch(src: Path) -> dict[str, torch.Tensor]:
    """Real Fashion-MNIST images, fixed views: image + its mirror (globals), two 12 px corners (locals)."""
    with gzip.open(src / "train-images-idx3-ubyte.gz") as f:
        raw = f.read(16 + B * 28 * 28)
    x = torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(B, 1, 28, 28).copy())
    return {
        "global": torch.stack([x, x.flip(-1)], 1),
        "local": torch.stack([x[..., 2:14, 2:14], x[..., 14:26, 14:26]], 1),
    }


def crops_for(method, batch):
    return crops_from_batch(batch, MEAN, STD, "cpu", method.crop_usage)


def test_registry_has_the_baselines():
    assert {"bam", "byol", "dino", "simclr", "mae"} <= set(METHODS)
    for name in METHODS:
        cls = get_method(name)
        assert cls.name == name
        assert cls.crop_usage in ("multi", "global", "single")
        assert dataclasses.is_dataclass(cls.Options)


def test_the_options_table_names_each_methods_own_section():
    """The config finds a shipped method's section in ``options.BY_METHOD`` without importing the method:
    a method renamed, added or given another section there must agree with its class."""
    assert set(BY_METHOD) == set(METHODS)
    for name in METHODS:
        assert get_options(name) is get_method(name).Options, name
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        get_options("nope")


@pytest.mark.parametrize("name", METHODS)
def test_training_step_finite_and_gradients_reach_backbone(name):
    method, engine = build(name)
    crops = crops_for(method, random_batch())
    expected_views = {"multi": G + L, "global": G, "single": 1}[method.crop_usage]
    assert len(crops) == expected_views
    logs = engine.train_step(crops)
    assert math.isfinite(logs["loss"])
    assert engine.step == 1
    grads = [p.grad for p in method.backbone.parameters() if p.grad is not None]
    assert grads, "no backbone parameter received a gradient"
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert isinstance(method.eval_backbone(), torch.nn.Module)


@pytest.mark.parametrize("name", METHODS)
def test_teacher_is_ema_of_online_after_engine_step(name):
    has_momentum = "momentum" in {f.name for f in dataclasses.fields(get_method(name).Options)}
    method, engine = build(name, **({"momentum": 0.5} if has_momentum else {}))
    pairs = method.momentum_pairs()
    crops = crops_for(method, random_batch())
    if not pairs:
        assert method.update_teacher(0) is None
        assert "teacher_momentum" not in engine.train_step(crops)
        return
    with torch.no_grad():  # make teacher != online so the check tells m*old_teacher from (1-m)*online
        for _, target in pairs:
            for p in target.parameters():
                p.add_(0.01 * torch.randn_like(p))
    old = [[p.detach().clone() for p in target.parameters()] for _, target in pairs]
    logs = engine.train_step(crops)
    m = logs["teacher_momentum"]
    assert m == pytest.approx(0.5)  # cosine schedule starts at options.momentum at step 0
    changed = False
    for (online, target), old_params in zip(pairs, old):
        for p_online, p_target, p_old in zip(online.parameters(), target.parameters(), old_params):
            expected = m * p_old + (1.0 - m) * p_online.detach()
            assert torch.allclose(p_target, expected, rtol=0, atol=1e-6)
            changed |= not torch.equal(p_target, p_old)
            assert not p_target.requires_grad
        for b_online, b_target in zip(online.buffers(), target.buffers()):
            assert torch.equal(b_online, b_target)  # BN statistics are copied, not averaged
    assert changed


@pytest.mark.parametrize("name", METHODS)
def test_loss_decreases_on_a_fixed_batch(name, fmnist_src):
    method, engine = build(name, **DECREASE_OPTIONS.get(name, {}))
    crops = crops_for(method, fmnist_batch(fmnist_src))
    losses = [engine.train_step(crops)["loss"] for _ in range(STEPS)]
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_reproduces_next_step(name):
    method_a, engine_a = build(name, seed=0)
    crops = crops_for(method_a, random_batch())
    for _ in range(3):
        engine_a.train_step(crops)
    buf = io.BytesIO()
    torch.save(engine_a.state_dict(), buf)  # as a checkpoint would
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    method_b, engine_b = build(name, seed=1)  # different initial weights
    torch.manual_seed(7)
    before = engine_b.train_step(crops)["loss"]
    method_b, engine_b = build(name, seed=1)
    engine_b.load_state_dict(state)
    assert engine_b.step == 3
    for _ in range(2):  # two steps: the teacher / centre / optimiser moments must all carry over
        torch.manual_seed(7)  # MAE's masks come from the global RNG
        loss_a = engine_a.train_step(crops)["loss"]
        torch.manual_seed(7)
        loss_b = engine_b.train_step(crops)["loss"]
        assert loss_a == loss_b
    assert before != loss_a


# ------------------------------------------------------------------------------ method-specific checks
def test_byol_heads_and_eval_backbone():
    method, _ = build("byol")
    for head in (method.projector, method.predictor):
        kinds = [type(m).__name__ for m in head.net]
        assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]  # 2 layers, BN + ReLU
    assert method.eval_backbone() is method.backbone  # Algorithm 1 outputs the online encoder f_theta
    assert method.teacher_momentum(0) == pytest.approx(0.99)
    assert method.teacher_momentum(STEPS) == pytest.approx(1.0)
    assert method.teacher_momentum(STEPS // 2) == pytest.approx(1 - 0.01 * 0.5)


def test_dino_teacher_temperature_schedule_and_centre():
    method, engine = build(
        "dino",
        steps_per_epoch=10,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=3.0,
    )
    crops = crops_for(method, random_batch())
    with torch.no_grad():
        assert method(crops, 0)[1]["teacher_temp"] == pytest.approx(0.04)
        assert method(crops, 15)[1]["teacher_temp"] == pytest.approx(0.055)  # epoch 1.5 of 3
        assert method(crops, 45)[1]["teacher_temp"] == pytest.approx(0.07)
    assert method.criterion.center.abs().sum() > 0  # the centre moved
    assert "criterion.center" in method.state_dict()
    assert method.eval_backbone() is method.teacher_backbone


def test_dino_last_layer_frozen_during_first_epoch():
    method, engine = build("dino", steps_per_epoch=2, freeze_last_layer_epochs=1.0)
    crops = crops_for(method, random_batch())
    w0 = method.head.last_layer.weight.detach().clone()
    mlp0 = method.head.mlp.net[0].weight.detach().clone()
    engine.train_step(crops)
    engine.train_step(crops)  # steps 0 and 1 are in epoch 0
    assert torch.allclose(method.head.last_layer.weight, w0, atol=1e-6)
    assert not torch.allclose(method.head.mlp.net[0].weight, mlp0)
    engine.train_step(crops)  # epoch 1: prototypes train
    assert not torch.allclose(method.head.last_layer.weight, w0, atol=1e-6)


def test_mae_encoder_sees_only_visible_patches():
    method, engine = build("mae", mask_ratio=0.75)
    seen = []
    method.backbone.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    engine.train_step(crops_for(method, random_batch()))
    npt = method.backbone.num_prefix_tokens
    assert seen == [torch.Size([B, npt + 12, 192])]  # 49 patches, int(49 * 0.25) = 12 visible


def test_mae_learned_decoder_pos_embed_trains():
    method, engine = build("mae", decoder_pos_embed="learned")
    before = method.decoder_pos_embed.detach().clone()
    engine.train_step(crops_for(method, random_batch()))
    assert not torch.equal(before, method.decoder_pos_embed)


def test_mae_refuses_a_cnn_backbone():
    backbone, feat_dim = build_backbone(ModelConfig(backbone="resnet18"), in_chans=1, default_img_size=28)
    ctx = MethodContext(backbone=backbone, feat_dim=feat_dim, in_chans=1, image_size=28)
    with pytest.raises(ConfigError) as err:
        get_method("mae")(get_method("mae").Options(), ctx)
    assert err.value.field == "model.backbone"


# ------------------------------------------------------------------------------------ configs / options
SHIPPED = ["bam", "byol", "dino", "simclr", "mae"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_builds_and_steps(name):
    """Each shipped recipe builds as the worker builds it (precision, memory layout, stem) and steps."""
    assert load_config(f"{name}_fmnist").data.channels == 0  # left to the data set's meta
    cfg = load_config(f"{name}_fmnist", list(FMNIST_DATA))
    assert cfg.method_name == name
    d = cfg.data
    assert (d.channels, d.global_crop_size, cfg.train.workers, cfg.model.stem) == (1, 28, 2, "auto")
    method = build_method(cfg, device="cpu", steps_per_epoch=10, batch_size=4)
    bb = method.backbone
    if name == "mae":  # MAE needs a ViT (it drops masked patch tokens): 4 blocks, mean patch token
        assert cfg.model.backbone == "vit_tiny_patch16_224" and cfg.model.patch_size is None
        assert bb.patch_embed.patch_size == (4, 4)  # chosen by the small-image stem: a 7x7 grid
        assert cfg.model.backbone_kwargs == {"depth": 4, "global_pool": "avg", "final_norm": False}
    else:  # the small ResNet of the recipes: small stem, one block per stage, residual branches not zeroed
        assert cfg.model.backbone == "resnet18" and isinstance(bb.maxpool, torch.nn.Identity)
        assert bb.conv1.stride == (1, 1) and bb.num_features == 256 and len(bb.layer1) == 1
        assert bool((bb.layer1[0].bn2.weight != 0).all())
    engine = build_engine(cfg, method, device="cpu", steps_per_epoch=10, global_batch=4)
    batch = {"global": torch.randint(0, 256, (4, d.global_crops, 1, 28, 28), dtype=torch.uint8)}
    if d.local_crops:
        batch["local"] = torch.randint(
            0, 256, (4, d.local_crops, 1, d.local_crop_size, d.local_crop_size), dtype=torch.uint8
        )
    logs = engine.train_step(
        crops_from_batch(
            batch, d.mean, d.std, "cpu", method.crop_usage, channels_last=cfg.train.channels_last
        )
    )
    assert math.isfinite(logs["loss"])
    if (
        name == "mae"
    ):  # DDP fails on a parameter the loss never reaches (seen: timm's fc_norm under global_pool=avg)
        unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == []


def test_mae_refuses_a_pooled_norm_it_would_never_train():
    with pytest.raises(ConfigError) as err:
        load_config("mae_fmnist", ["model.backbone_kwargs={depth: 4, global_pool: avg}"])
    assert err.value.field == "model.backbone_kwargs" and "final_norm: false" in str(err.value)
    load_config("mae_fmnist", ["model.backbone_kwargs={depth: 4, global_pool: avg, fc_norm: false}"])
    load_config("mae_fmnist", ["model.backbone_kwargs={depth: 4, global_pool: avg, final_norm: false}"])
    load_config("mae_fmnist", ["model.backbone_kwargs={depth: 4}"])  # class token: timm keeps the token norm


BAD_VALUES = [
    ("byol", "momentum", 1.5),
    ("byol", "momentum", -0.1),
    ("byol", "proj_hidden_dim", 0),
    ("byol", "pred_hidden_dim", -3),
    ("byol", "proj_out_dim", "wide"),
    ("dino", "out_dim", 1),
    ("dino", "teacher_temp", 0),
    ("dino", "warmup_teacher_temp", 2.0),
    ("dino", "student_temp", -0.1),
    ("dino", "center_momentum", 1.5),
    ("dino", "momentum", 2),
    ("dino", "warmup_teacher_temp_epochs", -1),
    ("dino", "freeze_last_layer_epochs", -1),
    ("dino", "norm_last_layer", "maybe"),
    ("simclr", "temperature", 0),
    ("simclr", "temperature", ".nan"),
    ("simclr", "proj_layers", 0),
    ("simclr", "gather_distributed", "maybe"),
    ("mae", "mask_ratio", 1.0),
    ("mae", "mask_ratio", 0),
    ("mae", "decoder_pos_embed", "rope"),
    ("mae", "decoder_depth", 0),
    ("mae", "decoder_dim", 4),
    ("mae", "decoder_heads", 5),  # cross-field: must divide decoder_dim (128)
    ("mae", "mask_ratio", 0.99),  # cross-field: int(49 * 0.01) = 0 visible patches
    ("bam", "reg", 0),
    ("bam", "top_k_sink", 100000),
]


@pytest.mark.parametrize(("name", "field", "bad"), BAD_VALUES)
def test_bad_option_names_the_field(name, field, bad):
    with pytest.raises(ConfigError) as err:
        load_config(f"{name}_fmnist", [f"method.{field}={bad}"])
    assert err.value.field == f"method.{field}"
    assert str(bad).lstrip(".") in str(err.value).lower() or "expected" in str(err.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_unknown_option_is_refused(name):
    with pytest.raises(ConfigError) as err:
        load_config(f"{name}_fmnist", ["method.nonsense=1"])
    assert err.value.field == "method.nonsense"


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("byol", ["data.global_crops=3"], "data.global_crops"),
        ("simclr", ["data.global_crops=1"], "data.global_crops"),
        ("dino", ["data.global_crops=1", "data.local_crops=0"], "data.local_crops"),
    ],
)
def test_crop_rules(name, overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(f"{name}_fmnist", overrides)
    assert err.value.field == field
