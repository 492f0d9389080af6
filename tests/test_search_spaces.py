"""Search spaces: the shipped ones load against their method's config, bad spaces are refused before any
Ray job starts (naming the space param and the field's allowed range), top_k_sink is clipped to the
targets in the global batch. No Ray cluster needed."""

from __future__ import annotations

import math

import pytest
import yaml

from orchestrator.config import load_config
from orchestrator.sweep.settings import sweep_space as load_space
from search_spaces import available_spaces, space_from_dict
from trainers.options import ConfigError

SHIPPED = {
    "bam_sinkhorn": "bam_fmnist",
    "dino": "dino_fmnist",
    "byol": "byol_fmnist",
    "simclr": "simclr_fmnist",
    "mae": "mae_fmnist",
}


def bam_cfg(*overrides: str):
    return load_config("bam_fmnist", ["method.top_k_sink=0", *overrides])


def test_every_baseline_has_a_named_space():
    assert set(SHIPPED) <= set(available_spaces())


@pytest.mark.parametrize("name, config", sorted(SHIPPED.items()))
def test_shipped_space_loads_and_converts_to_tune(name, config):
    from ray import tune
    from ray.tune.search.sample import Domain

    space = load_space(name, load_config(config))
    assert space.name == name and space.description and space.params
    assert all(k.startswith("method.") for k in space.params)
    domains = space.to_tune("random")
    assert set(domains) == set(space.params)
    assert all(isinstance(d, Domain) for d in domains.values())
    # every declared range survives the conversion (the sampler draws inside it)
    for key, p in space.params.items():
        for _ in range(20):
            v = domains[key].sample()
            if p.type in ("choice", "grid"):
                assert v in p.values
            else:
                assert p.low <= v <= p.high
    del tune


def test_bam_sinkhorn_declares_the_requested_ranges():
    space = load_space(
        "bam_sinkhorn", bam_cfg()
    )  # batch 128 x 2 workers x 2 targets = 512 targets: no clipping
    p = space.params
    assert (p["method.reg"].type, p["method.reg"].low, p["method.reg"].high) == ("loguniform", 0.01, 0.3)
    assert (p["method.temperature"].type, p["method.temperature"].low, p["method.temperature"].high) == (
        "loguniform",
        0.03,
        0.5,
    )
    assert p["method.num_sink_iter"].values == (1, 2, 3, 5, 10)
    assert p["method.top_k_sink"].values == (0, 32, 64, 128)


def test_loguniform_samples_are_log_spread():
    """loguniform(0.01, 0.3): the median of log-uniform draws is the geometric mean sqrt(0.01 * 0.3)."""
    import numpy as np

    space = load_space("bam_sinkhorn", bam_cfg())
    dom = space.to_tune()["method.reg"]
    draws = np.array(dom.sample(size=4000, random_state=np.random.default_rng(0)))
    assert draws.min() >= 0.01 and draws.max() <= 0.3
    assert abs(np.median(draws) - math.sqrt(0.01 * 0.3)) < 0.006  # a uniform draw's median would be 0.155


@pytest.mark.parametrize(
    "batch, workers, targets, expected",
    [
        (128, 2, 512, (0, 32, 64, 128)),  # nothing to clip
        (32, 1, 64, (0, 32, 64)),  # 128 -> 64 merges with the existing 64
        (8, 1, 16, (0, 16)),  # 32, 64, 128 all become 16
        (16, 2, 64, (0, 32, 64)),  # workers count: 2 targets x 16 x 2
    ],
)
def test_top_k_sink_is_clipped_to_the_targets_in_the_global_batch(batch, workers, targets, expected):
    cfg = bam_cfg(f"optim.batch_size={batch}", f"train.workers={workers}")
    assert cfg.method.num_target_crops * batch * workers == targets
    space = load_space("bam_sinkhorn", cfg)
    assert space.params["method.top_k_sink"].values == expected
    assert max(expected) <= targets


def test_clip_is_recomputed_per_trial_when_the_batch_is_searched_too():
    space = load_space(
        {
            "name": "b",
            "params": {
                "optim.batch_size": {"type": "choice", "values": [8, 64]},
                "method.top_k_sink": {"type": "choice", "values": [0, 128], "clip": "bam_targets"},
            },
        },
        bam_cfg("train.workers=1"),
    )
    base = bam_cfg("train.workers=1").to_dict()
    from orchestrator.config import apply_overrides

    small = space.clip_values(
        {"optim.batch_size": 8, "method.top_k_sink": 128}, apply_overrides(base, {"optim.batch_size": 8})
    )
    big = space.clip_values(
        {"optim.batch_size": 64, "method.top_k_sink": 128}, apply_overrides(base, {"optim.batch_size": 64})
    )
    assert small["method.top_k_sink"] == 16  # 2 targets x 8
    assert big["method.top_k_sink"] == 128  # 2 x 64 = 128: unchanged


BAD_SPACES = [
    # (params, field named, text in the message)
    ({"method.reg": {"type": "loguniform", "low": 0.3, "high": 0.01}}, "method.reg", "low=0.3 >= high=0.01"),
    ({"method.reg": {"type": "uniform", "low": 0.1, "high": 0.1}}, "method.reg", "need low < high"),
    (
        {"method.num_sink_iter": {"type": "randint", "low": 5, "high": 2}},
        "method.num_sink_iter",
        "low=5 > high=2",
    ),
    (
        {"method.num_sink_iter": {"type": "choice", "values": []}},
        "method.num_sink_iter",
        "non-empty 'values'",
    ),
    ({"method.num_sink_iter": {"type": "grid", "values": []}}, "method.num_sink_iter", "non-empty 'values'"),
    (
        {"method.no_such_knob": {"type": "uniform", "low": 0.1, "high": 0.2}},
        "method.no_such_knob",
        "unknown field",
    ),
    ({"optim.no_such_knob": {"type": "choice", "values": [1]}}, "optim.no_such_knob", "unknown field"),
    ({"nosection.lr": {"type": "choice", "values": [1]}}, "nosection.lr", "unknown section"),
    # reg must be > 0: an endpoint at 0 is refused by the field's own opt(gt=0) range
    ({"method.reg": {"type": "uniform", "low": 0.0, "high": 0.3}}, "method.reg", "> 0.0"),
    (
        {"method.reg": {"type": "loguniform", "low": 0.0, "high": 0.3}},
        "method.reg",
        "loguniform needs low > 0",
    ),
    (
        {"method.reg": {"type": "uniform", "low": -0.1, "high": 0.3}},
        "method.reg",
        "allowed: > 0.0 and <= 10.0",
    ),
    ({"method.reg": {"type": "uniform", "low": 0.1, "high": 11.0}}, "method.reg", "<= 10.0"),
    ({"method.momentum": {"type": "uniform", "low": 0.9, "high": 1.5}}, "method.momentum", "<= 1.0"),
    (
        {"optim.optimizer": {"type": "choice", "values": ["adamw", "adam"]}},
        "optim.optimizer",
        "one of ['adamw', 'lars', 'sgd']",
    ),
    # top-k beyond the targets (2 target crops x 32 x 1 worker = 64) without a clip rule: the cross-field
    # rule of BAM.check decides
    ({"method.top_k_sink": {"type": "choice", "values": [0, 128]}}, "method.top_k_sink", "[0, 64]"),
    # an integer field cannot take a continuous distribution (trials would sample 2.7 iterations)
    (
        {"method.num_sink_iter": {"type": "uniform", "low": 1, "high": 10}},
        "method.num_sink_iter",
        "randint or choice",
    ),
    ({"method.reg": {"type": "normal", "low": 0.1, "high": 0.2}}, "method.reg", "type 'normal'"),
    ({"method.reg": {"type": "choice", "low": 0.1, "high": 0.2}}, "method.reg", "non-empty 'values'"),
    ({"method.reg": {"type": "uniform", "values": [0.1]}}, "method.reg", "not 'values'"),
    (
        {"method.reg": {"type": "uniform", "low": 0.1, "high": 0.2, "clip": "nope"}},
        "method.reg",
        "unknown clip rule",
    ),
    ({"method.name": {"type": "choice", "values": ["bam", "dino"]}}, "method.name", "cannot be searched"),
]


@pytest.mark.parametrize("params, field, text", BAD_SPACES)
def test_bad_space_is_refused_naming_the_param_and_range(params, field, text):
    cfg = bam_cfg("optim.batch_size=32", "train.workers=1")
    with pytest.raises(ConfigError) as err:
        load_space({"name": "bad", "params": params}, cfg)
    assert err.value.field == field, str(err.value)
    assert text in str(err.value), str(err.value)
    assert "'bad'" in str(err.value) or "search space" in str(err.value) or err.value.field in str(err.value)


def test_message_names_the_space_the_param_and_the_offending_endpoint():
    with pytest.raises(ConfigError) as err:
        load_space(
            {"name": "mine", "params": {"method.temperature": {"type": "uniform", "low": 0.0, "high": 0.5}}},
            bam_cfg(),
        )
    text = str(err.value)
    assert text.startswith("method.temperature:")
    assert "search space 'mine'" in text and "low=0.0" in text and "> 0.0" in text


def test_space_for_another_method_is_refused():
    with pytest.raises(ConfigError, match="tunes method 'dino' but the base config uses 'bam'"):
        load_space("dino", bam_cfg())


def test_unknown_space_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as err:
        load_space("no_such_space", bam_cfg())
    assert err.value.field == "--space" and "bam_sinkhorn" in str(err.value)


def test_user_yaml_space_round_trips(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "lr_sweep",
                "description": "learning rate and Sinkhorn iterations",
                "params": {
                    "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                    "method.num_sink_iter": {"type": "randint", "low": 1, "high": 5},
                    "seed": {"type": "grid", "values": [0, 1, 2]},
                },
            }
        )
    )
    space = load_space(str(path), bam_cfg())
    assert space.name == "lr_sweep" and space.source == str(path)
    assert space.grid_size("random") == 3
    assert space.grid_size("grid") == 3 * 5  # randint 1..5 INCLUSIVE becomes a grid axis of 5 values
    again = space_from_dict(space.to_dict())
    assert again.params == space.params
    # randint's high is inclusive: Tune's upper bound is exclusive, so the domain is [1, 6)
    dom = space.to_tune()["method.num_sink_iter"]
    assert (dom.lower, dom.upper) == (1, 6)
    assert {dom.sample() for _ in range(300)} == {1, 2, 3, 4, 5}


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_space(str(tmp_path / "nope.yaml"), bam_cfg())


def test_grid_search_turns_discrete_params_into_grid_axes():
    space = load_space("bam_sinkhorn", bam_cfg("optim.batch_size=32", "train.workers=1"))
    tune_space = space.to_tune("grid")
    assert tune_space["method.num_sink_iter"] == {"grid_search": [1, 2, 3, 5, 10]}
    assert tune_space["method.top_k_sink"] == {"grid_search": [0, 32, 64]}  # clipped to 64 targets
    assert space.grid_size("grid") == 15
    # optuna cannot take grid_search: grid-type params become categorical for it
    grid_space = load_space({"name": "g", "params": {"seed": {"type": "grid", "values": [0, 1]}}}, bam_cfg())
    from ray.tune.search.sample import Categorical

    assert grid_space.to_tune("random") == {"seed": {"grid_search": [0, 1]}}
    assert isinstance(grid_space.to_tune("optuna")["seed"], Categorical)


def test_the_handed_in_check_decides_and_search_spaces_imports_no_upper_layer():
    """search_spaces sits below the orchestrator: it imports neither orchestrator nor data, and what is a
    valid value is decided by the check it is handed (here one that refuses reg > 0.2)."""
    import subprocess
    import sys

    code = """
import sys
from search_spaces import load_space
from trainers.options import ConfigError

def check(overrides):
    if overrides.get("method.reg", 0) > 0.2:
        raise ConfigError("method.reg", "must be <= 0.2 here")

base = {"method": {"name": "bam", "reg": 0.05}, "optim": {"batch_size": 8}, "train": {"workers": 1}}
space = load_space({"name": "s", "params": {"method.reg": {"type": "uniform", "low": 0.01, "high": 0.1}}}, base, check)
assert space.params["method.reg"].high == 0.1
try:
    load_space({"name": "s", "params": {"method.reg": {"type": "uniform", "low": 0.01, "high": 0.3}}}, base, check)
except ConfigError as err:
    assert err.field == "method.reg" and "high=0.3 is invalid: must be <= 0.2 here" in str(err), err
else:
    raise AssertionError("the check was not used")
upper = sorted(m for m in sys.modules if m.split(".")[0] in ("orchestrator", "data"))
assert not upper, upper
"""
    subprocess.run([sys.executable, "-c", code], check=True)
