"""orchestrator.preflight: impossible or unreachable requests refused in seconds, naming the field.
Network probes use closed ports on 127.0.0.1 only."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from orchestrator import preflight
from orchestrator.config import CONFIG_DIR, load_config
from trainers.options import ConfigError


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once to pick it, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_mlflow_server_is_refused_in_seconds():
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        preflight.check_tracking_uri(f"http://127.0.0.1:{_closed_port()}")
    assert err.value.field == "tracking.tracking_uri" and "cannot reach" in err.value.message
    assert time.monotonic() - t0 < preflight.CONNECT_TIMEOUT_S + 1


def test_live_server_and_writable_sqlite_store_pass(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        preflight.check_tracking_uri(f"http://127.0.0.1:{s.getsockname()[1]}")
    preflight.check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_dead_ray_address_is_refused(address):
    with pytest.raises(ConfigError) as err:
        preflight.check_ray_address(address.format(port=_closed_port()), "train.address")
    assert err.value.field == "train.address"


def test_unwritable_paths_are_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory below a file cannot exist, whoever we run as
    with pytest.raises(ConfigError) as err:
        preflight.check_storage_path(str(blocker / "ray_results"))
    assert err.value.field == "train.storage_path"
    with pytest.raises(ConfigError) as err:
        preflight.check_tracking_uri(f"sqlite:///{blocker / 'mlflow.db'}")
    assert err.value.field == "tracking.tracking_uri"
    preflight.check_storage_path("s3://bucket/prefix")  # remote storage is pyarrow's to check


@pytest.mark.parametrize(
    "overrides, have, field, amount",
    [
        (["train.workers=100"], {"CPU": 2}, "train.workers", "has 2"),
        (["train.workers=2", "train.cpus_per_worker=1.5"], {"CPU": 2}, "train.workers", "need 3 CPUs"),
        (["train.gpus_per_worker=1"], {"CPU": 8, "GPU": 0}, "train.gpus_per_worker", "has 0"),
        (
            ["train.workers=4", "train.gpus_per_worker=0.5"],
            {"CPU": 8, "GPU": 1},
            "train.gpus_per_worker",
            "need 2",
        ),
        (  # 2 workers x 1 CPU + each worker's stream of 2 actors x 1 CPU = 6 > 4
            ["train.workers=2", "data.stream=run", "data.map_workers=2"],
            {"CPU": 4},
            "data.map_workers",
            "4 CPUs beside the workers' 2",
        ),
    ],
)
def test_impossible_resources_name_the_field_and_what_there_is(overrides, have, field, amount):
    cfg = load_config("bam_fmnist", overrides)
    with pytest.raises(ConfigError) as err:
        preflight.check_resources(cfg, have, "this machine")
    assert err.value.field == field and amount in err.value.message


def test_requests_that_fit_pass():
    preflight.check_resources(load_config("bam_fmnist", ["train.workers=2"]), {"CPU": 2}, "x")
    preflight.check_resources(load_config("bam_fmnist", ["train.workers=0"]), {"CPU": 1}, "x")
    cfg = load_config("bam_fmnist", ["train.workers=2", "train.gpus_per_worker=0.5"])
    preflight.check_resources(cfg, {"CPU": 4, "GPU": 1}, "x")
    run_stream = load_config("bam_fmnist", ["train.workers=2", "data.stream=run", "data.map_cpus=0.5"])
    preflight.check_resources(run_stream, {"CPU": 3}, "x")  # 2 + 2 x 0.5
    preflight.check_resources(run_stream, {"CPU": 2}, "this machine", streams=False)  # cores: oversubscribed


def test_autoscaler_capacity_of_the_shipped_aws_cluster():
    """Head (8 CPUs) plus 8 GPU workers of 8 CPUs: what a job may ask of an autoscaling cluster whose
    worker nodes start at zero."""
    assert preflight.autoscaler_capacity(CONFIG_DIR.parent / "cluster" / "aws.yaml") == {
        "CPU": 72.0,
        "GPU": 8.0,
    }
    assert preflight.autoscaler_capacity(Path("/nonexistent/ray_bootstrap_config.yaml")) is None


def test_check_job_on_a_local_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(preflight.os, "cpu_count", lambda: 2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    preflight.check_job(load_config("bam_fmnist"), uri, str(tmp_path / "ray_results"))
    with pytest.raises(ConfigError, match="train.workers"):
        preflight.check_job(load_config("bam_fmnist", ["train.workers=100"]), uri, str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    with pytest.raises(ConfigError) as err:
        preflight.check_job(load_config("bam_fmnist"), uri, str(tmp_path))
    assert err.value.field == "RAY_ADDRESS"
