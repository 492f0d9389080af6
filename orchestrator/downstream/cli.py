"""``bamray export``, ``bamray embed``, ``bamray eval retrieval`` and ``bamray eval copydetect``.

Every command takes ``--run <MLflow run id | exported directory>`` and ``--checkpoint final|best_knn``,
and logs what it measured to that run. Ray, MLflow and torch are imported inside the commands, so a bad
argument is refused in a second.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.downstream import CHECKPOINTS, FINETUNE_MODES

CHECKPOINT_HELP = "which export of the run: final (default) or best_knn (the best k-NN epoch)"


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, metavar="RUN_ID|DIR", help="MLflow run id, or an exported directory"
    )
    p.add_argument("--checkpoint", default="final", choices=CHECKPOINTS, help=CHECKPOINT_HELP)
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else .bamray/mlflow.db)"
    )


def _add_job(p: argparse.ArgumentParser, work_dir: bool = True) -> None:
    p.add_argument("--actors", type=int, default=1, help="embedding actors (one model load each; default 1)")
    p.add_argument("--batch-size", type=int, default=256, help="images per actor call (default 256)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="> 0: each actor embeds on a GPU")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    if work_dir:
        p.add_argument(
            "--work-dir",
            help="where the embeddings are written (default: a temporary directory; on a multi-node "
            "cluster give shared storage, e.g. s3://bucket/tmp)",
        )


def _options(args: argparse.Namespace) -> Any:
    from orchestrator.downstream.commands import JobOptions

    return JobOptions(
        actors=args.actors,
        batch_size=args.batch_size,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        address=args.address,
    )


def _resolve(args: argparse.Namespace, tmp: str) -> Any:
    from orchestrator.downstream.source import resolve_backbone

    return resolve_backbone(args.run, tmp, checkpoint=args.checkpoint, tracking_uri=args.tracking_uri)


# ------------------------------------------------------------------------------------------------ commands
def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.downstream.export import FORMATS, export, log_export

    formats = FORMATS if args.format == "all" else (args.format,)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = _resolve(args, tmp)
        results = [export(backbone, fmt, args.out) for fmt in formats]
        log_export(backbone, results, Path(args.out))
    for r in results:
        print(f"{r['format']:12s} {r['path']}  (reloaded: max |difference| {r['max_abs_diff']:.2e})")
    if backbone.run_id:
        print(f"logged under export/ of MLflow run {backbone.run_id}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from orchestrator.downstream.commands import embed_command

    with tempfile.TemporaryDirectory() as tmp:
        backbone = _resolve(args, tmp)
        s = embed_command(
            backbone, args.data, args.out, split=args.split, kind=args.network, options=_options(args)
        )
    peaks = ", ".join(f"{a['peak_rss_mb']:.0f} MB ({int(a['rows'])} rows)" for a in s["actors"].values())
    print(
        f"embedded {s['rows']} images in {s['seconds']:.1f} s ({s['images_per_s']:.0f} images/s) into {s['out']}; "
        f"corrupt skipped: {s['corrupt']}; peak RSS per actor: {peaks or 'n/a'}"
    )
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from orchestrator.downstream.commands import figures_table, retrieval_command

    with tempfile.TemporaryDirectory() as tmp:
        backbone = _resolve(args, tmp)
        res = retrieval_command(
            backbone, queries=args.queries, options=_options(args), work_dir=args.work_dir
        )
    first = res["backbone"]
    print(
        f"retrieval ({backbone.label}): {int(first['queries'])} test queries against a bank of "
        f"{int(first['bank'])} train images, cosine"
    )
    print(figures_table(res, ("map", "recall@1", "recall@5", "recall@10")))
    return 0


def cmd_copydetect(args: argparse.Namespace) -> int:
    from orchestrator.downstream.commands import figures_table
    from orchestrator.downstream.copydetect import copydetect_command

    with tempfile.TemporaryDirectory() as tmp:
        backbone = _resolve(args, tmp)
        res = copydetect_command(
            backbone,
            data=args.data,
            queries=args.queries,
            distractors=args.distractors,
            seed=args.seed,
            options=_options(args),
            work_dir=args.work_dir,
        )
    first = res["backbone"]
    print(
        f"copy detection ({backbone.label}): {int(first['queries'])} strong copies against "
        f"{int(first['database'])} images ({int(first['distractors'])} distractors), cosine"
    )
    print(figures_table(res, ("map", "recall@1", "recall@10")))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from orchestrator.downstream.finetune import finetune_command

    modes = FINETUNE_MODES if args.mode == "all" else (args.mode,)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = _resolve(args, tmp)
        res = finetune_command(
            backbone,
            labels=args.labels,
            modes=modes,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            address=args.address,
        )
    first = next(iter(res.values()))
    print(
        f"fine-tuning ({backbone.label}) with {args.labels} of the labels ({int(first['labelled_images'])} "
        f"images), {args.epochs} epochs; {int(first['test_images'])} test images"
    )
    names = {"finetune": "fine-tuned", "probe": "frozen probe", "scratch": "from scratch"}
    print(f"{'':14s}{'top-1':>10s}{'top-5':>10s}")
    for mode, r in res.items():
        print(f"{names[mode]:14s}{r['top1']:9.2f}%{r['top5']:9.2f}%")
    return 0


# ------------------------------------------------------------------------------------------------ parsers
def add_export_parser(sub: Any) -> None:
    from orchestrator.downstream import EXPORT_FORMATS as FORMATS

    p = sub.add_parser("export", help="the backbone alone: safetensors (timm-loadable), TorchScript or ONNX")
    _add_source(p)
    p.add_argument("--format", default="safetensors", choices=(*FORMATS, "all"))
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export)


def add_viz_parser(sub: Any) -> None:
    v = sub.add_parser("viz", help="pictures of a trained backbone")
    vsub = v.add_subparsers(dest="what", required=True, metavar="WHAT")
    a = vsub.add_parser(
        "attention",
        help="per-head [CLS] attention of a ViT (the feature-map norm of a CNN) on your images",
    )
    _add_source(a)
    a.add_argument(
        "--images", nargs="+", metavar="FILE", help="image files (default: the run's first test images)"
    )
    a.add_argument("--out", default="attention.png", help="PNG to write (default: attention.png)")
    a.set_defaults(func=cmd_viz_attention)


def cmd_viz_attention(args: argparse.Namespace) -> int:
    from orchestrator.downstream.viz import attention_command

    with tempfile.TemporaryDirectory() as tmp:
        backbone = _resolve(args, tmp)
        out = attention_command(backbone, args.images, args.out)
    what = "attention maps" if out["kind"] == "attention" else "feature-norm maps (a CNN has no attention)"
    print(f"{what} of {out['images']} image(s): {out['path']}")
    if backbone.run_id:
        print(f"logged under viz/ of MLflow run {backbone.run_id}")
    return 0


def add_embed_parser(sub: Any) -> None:
    from orchestrator.downstream import NETWORKS

    p = sub.add_parser("embed", help="embeddings of a data set as Parquet (a streaming Ray Data job)")
    _add_source(p)
    p.add_argument(
        "--data",
        help="a prepared data set's name or directory/URI, a folder of images, or Parquet files "
        "(default: the run's training set)",
    )
    p.add_argument("--out", required=True, help="output directory or URI (new or empty)")
    p.add_argument("--split", default="all", choices=("all", "train", "test"))
    p.add_argument(
        "--network",
        default="backbone",
        choices=NETWORKS,
        help="backbone (default), random (its init), pixels",
    )
    _add_job(p, work_dir=False)
    p.set_defaults(func=cmd_embed)


def add_eval_protocols(esub: Any) -> None:
    r = esub.add_parser("retrieval", help="image retrieval (mAP, recall@1/5/10) on the labelled set")
    _add_source(r)
    r.add_argument(
        "--queries", type=int, default=0, help="at most this many test queries, evenly spaced (default: all)"
    )
    _add_job(r)
    r.set_defaults(func=cmd_retrieval)
    c = esub.add_parser("copydetect", help="copy detection: strong copies against originals + distractors")
    _add_source(c)
    c.add_argument("--data", help="data set to build the benchmark from (default: the run's training set)")
    c.add_argument("--queries", type=int, default=500, help="originals copied as queries (default 500)")
    c.add_argument("--distractors", type=int, default=10000, help="train images added to the database")
    c.add_argument("--seed", type=int, default=0, help="the benchmark's seed (originals, distortions)")
    _add_job(c)
    c.set_defaults(func=cmd_copydetect)
    f = esub.add_parser(
        "finetune",
        help="semi-supervised: fine-tune / probe / from scratch on 1 %%, 10 %% or N labels (Ray Train)",
    )
    _add_source(f)
    f.add_argument("--labels", required=True, help="1%%, 10%% (of each class) or a count N (class-balanced)")
    f.add_argument("--mode", default="all", choices=("all", *FINETUNE_MODES))
    f.add_argument("--epochs", type=int, default=30)
    f.add_argument("--batch-size", type=int, default=64, help="per worker")
    f.add_argument("--lr", type=float, default=1e-2, help="head lr (a trained backbone gets a tenth)")
    f.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    f.add_argument("--cpus-per-worker", type=float, default=1.0)
    f.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    f.set_defaults(func=cmd_finetune)
