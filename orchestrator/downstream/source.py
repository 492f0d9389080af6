"""Which backbone a downstream command uses: an MLflow run's exported checkpoint, or a directory.

A run logs its evaluated backbone twice (:func:`orchestrator.checkpointing.export_backbone`): ``final``
and, when it ran the k-NN, ``best_knn``. Each is ``backbone.safetensors`` + ``config.yaml``; the config
rebuilds the network (:func:`orchestrator.checkpointing.load_backbone`). Every failure is a
:class:`~trainers.options.ConfigError` naming the flag, raised before any Ray or data work.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from orchestrator import checkpointing as ckpt
from orchestrator import tracking
from orchestrator.downstream import CHECKPOINTS
from trainers.options import ConfigError


@dataclasses.dataclass
class Backbone:
    """A resolved backbone: its local export directory, its run's config, and where it came from."""

    directory: Path
    cfg: Any
    #: the MLflow run it belongs to (None for a plain directory) and the store that holds it
    run_id: str | None
    tracking_uri: str
    checkpoint: str

    @property
    def label(self) -> str:
        return f"run {self.run_id} ({self.checkpoint})" if self.run_id else str(self.directory)

    def load(self, device: Any = "cpu") -> Any:
        """The network in eval mode on ``device``."""
        module, _ = ckpt.load_backbone(self.directory, device=device)
        return module


def is_export_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / ckpt.BACKBONE_FILE).is_file() and (p / ckpt.CONFIG_FILE).is_file()


def resolve_backbone(
    run: str,
    dst: str | os.PathLike,
    *,
    checkpoint: str = "final",
    tracking_uri: str | None = None,
    flag: str = "--run",
) -> Backbone:
    """``run``: an MLflow run id, or a directory holding ``backbone.safetensors`` + ``config.yaml`` (an
    export, or a downloaded artifact). A run's artifact ``checkpoint`` is downloaded into ``dst``.

    Refused, naming ``flag``: an unknown run id, a run that logged no such checkpoint (still running,
    failed before its first epoch, or ``best_knn`` without a k-NN), a directory that is not an export.
    """
    import mlflow.artifacts

    from orchestrator import preflight
    from orchestrator.config import config_from_dict, upgrade_saved_config

    uri = tracking.resolve_tracking_uri(tracking_uri)
    if checkpoint not in CHECKPOINTS:
        raise ConfigError("--checkpoint", f"got {checkpoint!r}; one of {', '.join(CHECKPOINTS)}")
    if os.path.sep in run or run.startswith(".") or os.path.isdir(run):
        if not is_export_dir(run):
            raise ConfigError(
                flag, f"{run} is not an exported backbone (needs {ckpt.BACKBONE_FILE} and {ckpt.CONFIG_FILE})"
            )
        directory, run_id = Path(run).resolve(), None
    else:
        preflight.check_tracking_uri(uri)
        try:
            info = tracking.with_retry(tracking.client(uri).get_run, run)
        except Exception as err:  # noqa: BLE001 - MlflowException: no such run in this store
            raise ConfigError(flag, f"no MLflow run {run!r} in {uri} ({type(err).__name__})") from err
        try:
            local = tracking.with_retry(
                mlflow.artifacts.download_artifacts,
                run_id=run,
                artifact_path=checkpoint,
                dst_path=str(dst),
                tracking_uri=uri,
            )
        except Exception as err:  # noqa: BLE001 - MlflowException / OSError: the artifact is not there
            raise ConfigError(
                "--checkpoint",
                f"MLflow run {run} ({info.info.status}) has no {checkpoint!r} checkpoint: it logs one when "
                f"its first epoch ends{' and it ran the k-NN' if checkpoint == 'best_knn' else ''}",
            ) from err
        if not is_export_dir(local):
            raise ConfigError("--checkpoint", f"the {checkpoint!r} artifact of run {run} holds no backbone")
        directory, run_id = Path(local), run
    import yaml

    with open(directory / ckpt.CONFIG_FILE) as f:
        cfg = config_from_dict(upgrade_saved_config(yaml.safe_load(f)))
    return Backbone(directory, cfg, run_id, uri, checkpoint)
