"""After training: what people do with a pretrained backbone.

``bamray export`` (safetensors / TorchScript / ONNX), ``bamray embed`` (a Ray Data job writing Parquet
embeddings), ``bamray eval retrieval`` and ``bamray eval copydetect`` (built on ``embed``), and
``bamray train --init-from`` (a new run from exported weights). Every command names its backbone the
same way (:mod:`orchestrator.downstream.source`): an MLflow run id and ``--checkpoint final|best_knn``,
or an exported directory.
"""

# The choices the command line offers, here so that building the parser imports no torch.
#: ``bamray export --format``
EXPORT_FORMATS = ("safetensors", "torchscript", "onnx")
#: what ``bamray embed --network`` embeds with: the run's backbone, its random init, raw pixels
NETWORKS = ("backbone", "random", "pixels")
#: ``bamray eval finetune --mode`` (the same as ``trainers.evaluation.finetune.MODES``, which imports torch)
FINETUNE_MODES = ("finetune", "probe", "scratch")
#: the exports a run logs (``--checkpoint``)
CHECKPOINTS = ("final", "best_knn")
