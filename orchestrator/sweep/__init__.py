"""`bamray sweep`: Ray Tune over a trial DRIVER function that fits one Ray Train run per trial.

How a sweep trial becomes a Ray Train run, one module per step:

- :mod:`~orchestrator.sweep.settings`: the sweep's settings and every check that must fail before Ray starts
  (the search space is validated here, with a validator handed to :mod:`search_spaces`).
- :mod:`~orchestrator.sweep.run`: :func:`run_sweep` prepares the data once, opens the PARENT MLflow run,
  stores the sweep's record (:mod:`~orchestrator.sweep.record`, for ``--resume``) and fits the Tuner.
- :mod:`~orchestrator.sweep.tune_setup`: scheduler (ASHA / PBT / FIFO), searcher, and the trainable bound
  to a :class:`~orchestrator.sweep.plan.TrialPlan`, the typed contract every trial receives.
- :mod:`~orchestrator.sweep.trial`: the driver of one trial: a CHILD MLflow run and a Ray Train run
  (``build_trainer``) fitted through :mod:`~orchestrator.sweep.relay`, which reports each epoch to Tune
  and holds the workers at ASHA's rungs until Tune has decided (:mod:`orchestrator.epoch_gate`).
- :mod:`~orchestrator.sweep.lineage`: child-run statuses, written by the sweep's own process for trials
  Tune stopped; :mod:`~orchestrator.sweep.report`: result tables, plot and best params on the parent run.
- :mod:`~orchestrator.sweep.cli`: the ``bamray sweep`` sub-command.

MLflow lineage: the PARENT run holds the space, scheduler, search and trial count, and at the end the best
params (``best.<key>``), ``best_knn_top1``, a results table (CSV + markdown) and a PNG of k-NN against each
searched parameter. Each trial's CHILD run holds its params and tags (written by its driver), its curves
(written by the rank-0 Train worker) and its exported backbones.
"""

from typing import Any

from orchestrator.sweep.cli import add_sweep_parser, cmd_sweep


def __getattr__(name: str) -> Any:
    """``run_sweep`` on first use: it pulls in the config, torch and Ray Tune, which the CLI's parser (built
    for every command, ``--help`` included) must not pay for."""
    if name == "run_sweep":
        from orchestrator.sweep.run import run_sweep

        return run_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["add_sweep_parser", "cmd_sweep", "run_sweep"]
