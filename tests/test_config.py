"""Config validation: every bad-field class is refused with the field name and the allowed range."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.config import (
    CONFIG_DIR,
    apply_overrides,
    config_from_dict,
    load_config,
    upgrade_saved_config,
)
from trainers.options import ConfigError, flatten


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("method.reg=0", "method.reg", "> 0.0"),
        ("method.reg=-0.1", "method.reg", "> 0.0"),
        ("method.temperature=0", "method.temperature", "> 0.0"),
        ("method.temperature=-2", "method.temperature", "> 0.0"),
        ("method.num_sink_iter=0", "method.num_sink_iter", ">= 1"),
        ("method.top_k_sink=-1", "method.top_k_sink", ">= 0"),
        ("method.top_k_sink=257", "method.top_k_sink", "[0, 256]"),  # 2 targets x 64 x 2 workers
        ("method.name=swav", "method.name", "allowed"),
        ("model.backbone=resnet_does_not_exist", "model.backbone", "unknown timm model"),
        ("data.local_crop_size=32", "data.local_crop_size", "<= data.global_crop_size"),
        ("model.patch_size=5", "data.global_crop_size", "multiple of model.patch_size"),
        ("data.global_crop_scale=[0.9, 0.2]", "data.global_crop_scale", "0 < min <= max <= 1"),
        ("data.global_crop_size=4", "data.global_crop_size", ">= 8"),
        ("optim.optimizer=adam", "optim.optimizer", "one of ['adamw', 'lars', 'sgd']"),
        ("optim.lr=0", "optim.lr", "> 0.0"),
        ("optim.batch_size=1", "optim.batch_size", ">= 2"),
        ("optim.epochs=0", "optim.epochs", ">= 1"),
        ("eval.knn_train_fraction=1.5", "eval.knn_train_fraction", "<= 1.0"),
        ("train.precision=fp8", "train.precision", "one of"),
        ("train.workers=-1", "train.workers", ">= 0"),
        ("method.reg=.nan", "method.reg", "finite"),
        ("method.momentum=1.5", "method.momentum", "<= 1.0"),
    ],
)
def test_bad_values_name_field_and_range(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", [override])
    assert err.value.field == field, str(err.value)
    assert allowed in str(err.value)


def test_top_k_limit_scales_with_batch_and_workers():
    # 2 target crops x 32 per worker x 1 worker = 64 targets
    load_config("bam_fmnist", ["optim.batch_size=32", "train.workers=1", "method.top_k_sink=64"])
    with pytest.raises(ConfigError, match=r"\[0, 64\]"):
        load_config("bam_fmnist", ["optim.batch_size=32", "train.workers=1", "method.top_k_sink=65"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("method.reg=abc", "method.reg"),
        ("optim.batch_size=3.5", "optim.batch_size"),
        ("method.positive_masking=maybe", "method.positive_masking"),
        ("data.global_crop_scale=0.5", "data.global_crop_scale"),
    ],
)
def test_wrong_types(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", [override])
    assert err.value.field == field


def test_unknown_fields_and_sections():
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", ["method.regg=0.1"])
    assert err.value.field == "method.regg"
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", ["optim.lrr=0.1"])
    assert err.value.field == "optim.lrr"
    with pytest.raises(ConfigError) as err:
        config_from_dict({"optimiser": {"lr": 1}})
    assert err.value.field == "optimiser"


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        "bam_fmnist",
        [
            "method.reg=0.2",
            "method.num_sink_iter=5",
            "data.global_crop_scale=[0.3, 1.0]",
            "model.backbone=resnet18",
            "model.patch_size=null",
            "method.teacher=false",
        ],
    )
    assert cfg.method.reg == pytest.approx(0.2)
    assert cfg.method.num_sink_iter == 5 and isinstance(cfg.method.num_sink_iter, int)
    assert cfg.data.global_crop_scale == (0.3, 1.0)
    assert cfg.model.backbone == "resnet18" and cfg.model.patch_size is None
    assert cfg.method.teacher is False
    # int given for a float field is accepted and becomes a float
    assert isinstance(load_config("bam_fmnist", ["method.reg=1"]).method.reg, float)


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config("bam_fmnist", ["method.reg=0.07"])
    text = yaml.safe_dump(cfg.to_dict())
    path = tmp_path / "c.yaml"
    path.write_text(text)
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    flat = flatten(cfg.to_dict())
    assert flat["method.reg"] == pytest.approx(0.07) and flat["method.name"] == "bam"


def test_missing_config_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match="bam_fmnist"):
        load_config("no_such_config.yaml")


def test_apply_overrides_does_not_mutate_input():
    raw = {"method": {"reg": 0.1}}
    out = apply_overrides(raw, ["method.reg=0.3", "optim.lr=0.01"])
    assert raw == {"method": {"reg": 0.1}}
    assert out["method"]["reg"] == 0.3 and out["optim"]["lr"] == 0.01


def test_every_shipped_config_is_valid():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "bam_fmnist" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.method_name in name


def test_published_bam_defaults():
    """Our BAM defaults are the BAM README's (reg 0.05, temperature 0.1, 3 iterations, masking on, 2 targets)."""
    cfg = config_from_dict({"method": {"name": "bam"}})
    m = cfg.method
    assert (m.reg, m.temperature, m.num_sink_iter, m.top_k_sink, m.positive_masking, m.num_target_crops) == (
        0.05,
        0.1,
        3,
        0,
        True,
        2,
    )
    assert m.teacher is True


def test_debug_section_is_not_a_run_param():
    """Fault injection lives in ``debug:`` (not ``train:``) and is never logged as an MLflow param."""
    cfg = load_config("bam_fmnist", ["debug.fail_at_step=5", "debug.nan_at_step=7"])
    assert (cfg.debug.fail_at_step, cfg.debug.nan_at_step) == (5, 7)
    params = cfg.run_params()
    assert not [k for k in params if k.startswith("debug.") or k.endswith(("fail_at_step", "nan_at_step"))]
    assert set(flatten(cfg.to_dict())) - set(params) == {
        "debug.fail_at_step",
        "debug.nan_at_step",
        "debug.hold_at_step",
    }
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", ["train.fail_at_step=5"])
    assert err.value.field == "train.fail_at_step"


def test_saved_config_with_train_fault_fields_loads_into_debug():
    """Configs saved by runs before the debug section had the test hooks under ``train:``."""
    raw = load_config("bam_fmnist").to_dict()
    raw.pop("debug")
    raw["train"].update(fail_at_step=-1, nan_at_step=4)
    cfg = config_from_dict(upgrade_saved_config(raw))
    assert cfg.debug.nan_at_step == 4 and cfg.debug.fail_at_step == -1


@pytest.mark.parametrize(
    "field, text, expected",
    [
        ("optim.lr", "1e-3", 1e-3),
        ("optim.lr", "5e-4", 5e-4),
        ("optim.min_lr", "1.0e6", 1.0e6),
        ("optim.min_lr", "1_000", 1000.0),
        ("optim.lr", ".5", 0.5),
        ("optim.lr", "2", 2.0),
        ("optim.lr", "+3E-2", 3e-2),
        ("optim.epochs", "1_000", 1000),
        ("optim.epochs", "1e3", 1000),
        ("optim.epochs", "2.0", 2),
        ("method.temperature", "-2", ConfigError),  # a number, then refused by its range
        ("optim.lr", "1e-3x", ConfigError),
        ("optim.lr", "true", ConfigError),
        ("optim.lr", "1e999", ConfigError),  # not finite
        ("optim.epochs", "1.5", ConfigError),
        ("optim.epochs", "1e-3", ConfigError),
        ("optim.epochs", "ten", ConfigError),
    ],
)
def test_numbers_as_people_type_them(tmp_path, field, text, expected):
    """Every numeric form, from ``--set`` and from a YAML file (where YAML 1.1 reads 1e-3 as a string)."""
    section, name = field.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: {text}\n")
    for load in (lambda: load_config("bam_fmnist", [f"{field}={text}"]), lambda: load_config(path)):
        if expected is ConfigError:
            with pytest.raises(ConfigError) as err:
                load()
            assert err.value.field == field, str(err.value)
        else:
            value = flatten(load().to_dict())[field]
            assert value == pytest.approx(expected) and type(value) is type(expected)


@pytest.mark.parametrize(
    "overrides, field",
    [(["optim=3"], "optim"), (["method=3"], "method"), (["nosuch.field=1"], "nosuch")],
)
def test_a_section_set_to_a_scalar_or_unknown_is_a_config_error(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("bam_fmnist", overrides)
    assert err.value.field == field


def test_malformed_yaml_is_a_config_error_naming_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1,\n  epochs: 3\nmodel: {\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+") as err:
        load_config(path)
    assert err.value.field == str(path)
