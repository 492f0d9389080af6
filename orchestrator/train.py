"""temporary: removed once orchestrator.sweep imports orchestrator.training (the training code lives there)."""

from orchestrator.tracking import best_checkpoint as _best_checkpoint  # noqa: F401
from orchestrator.tracking import log_checkpoint_artifacts as _log_checkpoint_artifacts  # noqa: F401
from orchestrator.tracking import log_config_artifact as _log_config_artifact  # noqa: F401
from orchestrator.training.data_prep import prepare_data, steps_per_epoch  # noqa: F401
from orchestrator.training.driver import build_trainer, run_training  # noqa: F401
