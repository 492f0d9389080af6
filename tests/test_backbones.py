"""Backbones for small images: the ``model.stem`` option, its ViT patch choice, exports that rebuild the
same network (old ones included), and the precision / memory-layout choices that make CPU training fast."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import FMNIST_DATA
from torch import nn

from orchestrator import checkpointing as ckpt
from orchestrator.config import config_from_dict, load_config, upgrade_saved_config
from trainers.backbones import ModelConfig, build_backbone, resolve_stem, small_patch_size
from trainers.build import build_method, crop_sizes
from trainers.engine import cpu_has_native_bf16, crops_from_batch, resolve_precision
from trainers.options import ConfigError

TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}


def _resnet(stem: str, size: int = 28, kwargs: dict | None = None) -> nn.Module:
    cfg = ModelConfig(
        backbone="resnet18", stem=stem, backbone_kwargs=dict(TINY_RESNET if kwargs is None else kwargs)
    )
    model, _ = build_backbone(cfg, in_chans=1, default_img_size=size)
    return model


@pytest.mark.parametrize(
    "size, expected", [(28, "small"), (32, "small"), (64, "small"), (96, "imagenet"), (224, "imagenet")]
)
def test_auto_stem_picks_by_image_size(size, expected):
    assert resolve_stem("auto", size) == expected
    assert resolve_stem("imagenet", 28) == "imagenet" and resolve_stem("small", 224) == "small"


def test_small_resnet_stem_keeps_resolution_and_feature_size():
    small, imagenet = _resnet("small"), _resnet("imagenet")
    assert isinstance(small.maxpool, nn.Identity)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        # three stride-2 stages after the stem: 28 -> 14 -> 7 -> 4 with the small stem, 1x1 with ImageNet's
        assert small.forward_features(x).shape == (2, 64, 4, 4)
        assert imagenet.forward_features(x).shape == (2, 64, 1, 1)
        assert small(x).shape == imagenet(x).shape == (2, 64)  # same pooled feature size
    assert small.num_features == 64


def test_auto_stem_is_small_at_28px_and_timm_constructor_arguments_pass_through():
    model = _resnet("auto", kwargs={"layers": [1, 1], "channels": [8, 16]})
    assert isinstance(model.maxpool, nn.Identity)
    assert model.num_features == 16 and not hasattr(model, "layer3")


def test_deep_stem_resnets_get_the_small_stem_too():
    cfg = ModelConfig(
        backbone="resnet26d", stem="small", backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}
    )
    model, dim = build_backbone(cfg, in_chans=3, default_img_size=32)
    assert model.conv1.out_channels == model.bn1.num_features == 16  # deep stem: 2 x stem_width
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4


@pytest.mark.parametrize(
    "sizes, patch", [((28, 12), 4), ((32,), 4), ((32, 16), 4), ((64, 32), 8), ((224, 96), 16), ((30,), 2)]
)
def test_small_patch_divides_every_crop_and_leaves_a_7x7_grid(sizes, patch):
    assert small_patch_size(sizes) == patch
    assert all(s % patch == 0 for s in sizes) and sizes[0] // patch >= 7


def test_vit_gets_a_fitting_patch_unless_the_user_set_one():
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", stem="auto", backbone_kwargs={"depth": 1})
    model, dim = build_backbone(cfg, in_chans=1, default_img_size=28, crop_sizes=(28, 12))
    assert model.patch_embed.patch_size == (4, 4) and dim == 192
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 192)
        assert model(torch.randn(2, 1, 12, 12)).shape == (2, 192)  # local crops: 3x3 patches
    explicit = ModelConfig(backbone="vit_tiny_patch16_224", patch_size=7, backbone_kwargs={"depth": 1})
    model, _ = build_backbone(explicit, in_chans=1, default_img_size=28)
    assert model.patch_embed.patch_size == (7, 7)


def test_small_stem_on_an_unsupported_family_is_a_config_error_and_auto_leaves_it_alone():
    cfg = ModelConfig(backbone="efficientnet_b0", stem="small")
    with pytest.raises(ConfigError, match="model.stem"):
        build_backbone(cfg, in_chans=1, default_img_size=28)
    model, _ = build_backbone(
        ModelConfig(backbone="efficientnet_b0", stem="auto"), in_chans=1, default_img_size=28
    )
    assert model.conv_stem.stride == (2, 2)  # timm's own


def test_stem_is_a_checked_config_field():
    with pytest.raises(ConfigError, match="model.stem"):
        load_config("bam_fmnist", ["model.stem=tiny"])


def _tiny_bam_cfg(extra=()):
    return load_config(
        "bam_fmnist",
        [
            "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 64]}",
            "method.proj_hidden_dim=32",
            "method.proj_out_dim=16",
            "method.top_k_sink=0",
            "optim.batch_size=4",
            "train.workers=1",
            *FMNIST_DATA,
            *extra,
        ],
    )


def test_export_records_the_stem_it_built_and_reloads_to_the_same_outputs(tmp_path):
    cfg = _tiny_bam_cfg()
    assert cfg.model.stem == "auto"
    method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=4)
    ckpt.export_backbone(method, cfg, tmp_path)
    saved = yaml.safe_load((tmp_path / ckpt.CONFIG_FILE).read_text())
    assert saved["model"]["stem"] == "small"  # auto, written out as what it chose
    model, loaded_cfg = ckpt.load_backbone(tmp_path)
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(3, 1, 28, 28)
    ref = method.eval_backbone().eval()
    for key, value in ref.state_dict().items():  # the very same weights ...
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():  # ... and outputs equal up to the kernel order (the trained copy is channels_last)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_training_checkpoint_of_a_small_stem_run_resumes_to_the_same_next_step(tmp_path):
    """state.pt of a small-stem run (saved config, weights_only load) rebuilds the same network, and the
    step after the resume equals the step the uninterrupted run takes."""
    from trainers.build import build_engine

    cfg = _tiny_bam_cfg(["train.precision=fp32"])
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(4, 1, 28, 28, generator=gen) for _ in range(2)] + [
        torch.randn(4, 1, 12, 12, generator=gen) for _ in range(2)
    ]

    def fresh(c):
        m = build_method(c, device="cpu", steps_per_epoch=4, batch_size=4)
        return m, build_engine(c, m, device="cpu", steps_per_epoch=4, global_batch=4)

    method, engine = fresh(cfg)
    engine.train_step(crops)
    ckpt.save_training_state(
        tmp_path, engine_state=engine.state_dict(), epoch=1, mlflow_run_id=None, config=cfg.to_dict()
    )
    expected = engine.train_step(crops)["loss"]

    state = ckpt.load_training_state(tmp_path)
    restored_cfg = config_from_dict(upgrade_saved_config(state["config"]))
    assert (
        restored_cfg.model.stem == "auto" and restored_cfg.model.backbone_kwargs == cfg.model.backbone_kwargs
    )
    method2, engine2 = fresh(restored_cfg)
    assert isinstance(method2.backbone.maxpool, nn.Identity) and method2.backbone.conv1.stride == (1, 1)
    engine2.load_state_dict(state["engine"])
    assert engine2.step == 1
    assert engine2.train_step(crops)["loss"] == pytest.approx(expected, rel=1e-5)


def test_exports_from_before_the_stem_option_rebuild_the_imagenet_stem(tmp_path):
    cfg = _tiny_bam_cfg(["model.stem=imagenet"])
    method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=4)
    ckpt.export_backbone(method, cfg, tmp_path)
    old = yaml.safe_load((tmp_path / ckpt.CONFIG_FILE).read_text())
    del old["model"]["stem"]  # what an older bamray wrote
    (tmp_path / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(old))
    model, loaded = ckpt.load_backbone(tmp_path)
    assert loaded.model.stem == "imagenet" and model.conv1.kernel_size == (7, 7)


def test_vit_export_records_its_patch(tmp_path):
    cfg = _tiny_bam_cfg(["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={depth: 1}"])
    method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=4)
    ckpt.export_backbone(method, cfg, tmp_path)
    saved = yaml.safe_load((tmp_path / ckpt.CONFIG_FILE).read_text())
    assert saved["model"]["patch_size"] == 4 and crop_sizes(cfg.data) == (28, 12)
    model, _ = ckpt.load_backbone(tmp_path)
    assert model.patch_embed.patch_size == (4, 4)


def test_auto_precision_is_bf16_exactly_where_the_cpu_computes_it_natively():
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_channels_last_changes_the_layout_not_the_step():
    """One fp32 step of the same method from the same seed: NHWC and NCHW give the same loss and weights."""
    images = torch.randint(0, 256, (4, 2, 1, 28, 28), dtype=torch.uint8)
    batch = {"global": images, "local": images[..., :12, :12].contiguous()}
    results = []
    for layout in (True, False):
        cfg = _tiny_bam_cfg([f"train.channels_last={str(layout).lower()}", "train.precision=fp32"])
        method = build_method(cfg, device="cpu", steps_per_epoch=2, batch_size=4)
        from trainers.build import build_engine

        engine = build_engine(cfg, method, device="cpu", steps_per_epoch=2, global_batch=4)
        crops = crops_from_batch(batch, cfg.data.mean, cfg.data.std, "cpu", channels_last=layout)
        assert crops[0].is_contiguous(memory_format=torch.channels_last) == layout
        if layout:
            assert method.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        loss = engine.train_step(crops)["loss"]
        results.append((loss, method.backbone.conv1.weight.detach().contiguous().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_backbone_name_cache_only_ever_lets_names_through(tmp_path, monkeypatch):
    """A stale cache (an older list of this timm version's names) sends an unknown name to timm itself,
    which then refreshes the cache; a name timm does not know still fails, naming the field."""
    import json

    from trainers import backbones
    from trainers.options import ConfigError

    monkeypatch.setenv("BAMRAY_CACHE_DIR", str(tmp_path))
    cache = backbones._names_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(["resnet18"]))
    backbones._known_models.cache_clear()
    backbones.check_backbone_name("resnet18")
    backbones.check_backbone_name("vit_tiny_patch16_224")  # not cached: timm knows it
    assert "vit_tiny_patch16_224" in json.loads(cache.read_text())
    with pytest.raises(ConfigError, match="model.backbone"):
        backbones.check_backbone_name("resnet_does_not_exist")
    cache.write_text("not json")  # a damaged cache is only slower
    backbones.check_backbone_name("resnet18")
