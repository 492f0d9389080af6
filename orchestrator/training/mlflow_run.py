"""The MLflow side of starting a training run: the run ``--resume`` names (refused if unknown), whether a
FINISHED run is being extended, creating or re-opening the run with its params, tags and config, and the
Ray Train storage a resumed run keeps."""

from __future__ import annotations

from typing import Any

from orchestrator import provenance, tracking
from orchestrator.config import ExperimentConfig
from trainers.options import ConfigError


def previous_run(uri: str, run_id: str) -> Any:
    """The MLflow run ``--resume`` names, read (not yet re-opened) so a wrong id is refused first."""
    try:
        return tracking.with_retry(tracking.client(uri).get_run, run_id)
    except Exception as err:  # noqa: BLE001 - MlflowException: no such run in this store
        raise ConfigError("--resume", f"no MLflow run {run_id!r} in {uri} ({type(err).__name__})") from err


def extends(cfg: ExperimentConfig, run: Any) -> bool:
    """Whether resuming the FINISHED ``run`` with ``cfg`` asks for more epochs than it trained; a
    time-budgeted run is refused, since its checkpoint pins the length it planned."""
    logged = run.data.params.get("optim.epochs")
    if logged is None or cfg.optim.epochs <= int(logged):
        return False
    if float(run.data.params.get("train.time_budget_min", 0) or 0) > 0:
        raise ConfigError(
            "optim.epochs",
            f"run {run.info.run_id} was time-budgeted; its checkpoint keeps the epochs it planned, so it "
            "cannot be extended: start a new run",
        )
    return True


def open_run(cfg: ExperimentConfig, uri: str, previous: Any) -> tuple[str, str]:
    """Create the MLflow run (or re-open ``previous``, the run ``--resume`` names) and log its params,
    tags and config; returns ``(run id, Ray run name)``."""
    storage_path = storage(cfg, previous)
    if previous is not None:
        run_id = previous.info.run_id
        tracking.reopen_run(uri, run_id)
        ray_run_name = previous.data.tags.get(tracking.TAG_RAY_RUN) or f"{cfg.name}-{run_id[:8]}"
    else:
        run_id = tracking.create_run(
            uri,
            cfg.tracking.experiment,
            cfg.tracking.run_name or cfg.name,
            provenance.run_tags(cfg.method_name),
        )
        ray_run_name = f"{cfg.name}-{run_id[:8]}"
    tracking.log_tags(uri, run_id, {tracking.TAG_RAY_RUN: ray_run_name, tracking.TAG_STORAGE: storage_path})
    changed = tracking.log_params(uri, run_id, cfg.run_params())
    if changed:
        tracking.log_tags(uri, run_id, {"resume_changed_params": ",".join(sorted(changed))})
    if previous is None:
        tracking.log_config_artifact(uri, run_id, cfg)
    return run_id, ray_run_name


def storage(cfg: ExperimentConfig, previous: Any) -> str:
    """Ray Train storage: a resumed run's own (its tag), else ``train.storage_path`` made absolute."""
    tagged = previous.data.tags.get(tracking.TAG_STORAGE) if previous is not None else None
    return tagged or tracking.absolute_path(cfg.train.storage_path)
