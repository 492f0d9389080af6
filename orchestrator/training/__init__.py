"""``bamray train``: one Ray Train run of one method, tracked in one MLflow run.

One job per module: :mod:`.data_prep` (the shards, their meta and the steps of an epoch),
:mod:`.plan` (:class:`~.plan.WorkerPlan`, what the driver hands every worker, and the time budget),
:mod:`.driver` (Ray, ``TorchTrainer``, artifacts), :mod:`.mlflow_run` (creating, re-opening or
extending the MLflow run), :mod:`.worker` (the per-worker loop around
``trainers.loop.train_one_epoch``: resume, reports, checkpoints), :mod:`.midepoch` (checkpoints inside
an epoch, termination notices), :mod:`.ranks` (what the workers agree on through the process group),
:mod:`.console` (the workers' console lines), :mod:`.loopback_ddp` (the process group on one node) and
:mod:`.online_eval` (the k-NN figure at the end of an epoch); :mod:`.interrupt` turns Ctrl-C / SIGTERM
into a clean stop; :mod:`.evaluate` evaluates a finished run offline (``bamray eval linear``,
the linear probe at the end of a run, the quality benchmark's baselines).
"""
