"""The ``bamray`` command line (also ``python -m orchestrator``).

Heavy modules (Ray, MLflow, the data pipeline) are imported inside the commands, so a bad config is
refused in a couple of seconds with exit code 2, naming the field, before anything starts.

Exit codes: 0 success, 1 the run failed (MLflow run marked FAILED), 2 anything the user can fix: a bad
config (values, YAML syntax), missing data, bad arguments, an unreachable Ray address or MLflow server, an
unwritable path, more workers/GPUs than there are (:mod:`orchestrator.preflight`), an unknown run id. Those
print one line naming what to fix; ``--verbose`` adds the traceback. 130 / 143: stopped by Ctrl-C / SIGTERM
(a training run is marked KILLED and its Ray shut down first; ``--resume`` continues it). Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trainers.options import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ================================================================================================ helpers
def _config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the dedicated flags, which win (applied last)."""
    overrides = list(args.set or [])
    if getattr(args, "workers", None) is not None:
        overrides.append(f"train.workers={args.workers}")
    if getattr(args, "gpus_per_worker", None) is not None:
        overrides.append(f"train.gpus_per_worker={args.gpus_per_worker}")
    if getattr(args, "cpus_per_worker", None) is not None:
        overrides.append(f"train.cpus_per_worker={args.cpus_per_worker}")
    if getattr(args, "address", None):
        overrides.append(f"train.address={args.address}")
    if getattr(args, "tracking_uri", None):
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    if getattr(args, "init_from", None):
        # a directory made absolute here (a sweep trial runs in its own directory); quoted, so a run id
        # such as 1234e5... stays a string when the value is read as YAML
        src = os.path.abspath(args.init_from) if os.path.isdir(args.init_from) else args.init_from
        overrides.append(f"model.init_from={json.dumps(src)}")
    return overrides


def _data_root() -> Path:
    from orchestrator import tracking

    return tracking.project_root() / ".bamray" / "data"


def _resume_config_path(run_id: str, tracking_uri: str | None, dst: str) -> str:
    """The ``config.yaml`` the original run logged (``--resume`` without ``--config``)."""
    import mlflow.artifacts

    from orchestrator import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    try:
        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.yaml", dst_path=dst, tracking_uri=uri
        )
    except Exception as err:  # noqa: BLE001 - any MLflow error means the same thing to the user
        raise ConfigError(
            "--resume",
            f"cannot read config.yaml of MLflow run {run_id!r} in {uri}: {err}; pass --config as well",
        ) from err


# ================================================================================================ commands
#: the config of a new `bamray train` without --config: BAM, sized for small images
DEFAULT_CONFIG = "bam_fmnist"


def cmd_train(args: argparse.Namespace) -> int:
    """SIGINT and SIGTERM stop it from the first line on (:mod:`orchestrator.training.interrupt`):
    :func:`main` turns the :class:`~orchestrator.training.interrupt.Interrupted` into exit 130 / 143."""
    import tempfile

    from orchestrator.training.interrupt import stop_on_signals

    with stop_on_signals():
        from orchestrator.config import load_config
        from orchestrator.training.driver import run_training

        if not args.config and not args.resume:
            args.config = DEFAULT_CONFIG  # the headline recipe; `--set data.dataset=<name>` adapts it
        if args.resume and not args.config:  # the run's config comes from the store: it must answer first
            from orchestrator import preflight, tracking

            preflight.check_tracking_uri(tracking.resolve_tracking_uri(args.tracking_uri))
        with tempfile.TemporaryDirectory() as tmp:
            path = args.config or _resume_config_path(args.resume, args.tracking_uri, tmp)
            cfg = load_config(path, _config_overrides(args), saved=not args.config)
        out = run_training(cfg, resume=args.resume)
    return EXIT_OK if out.get("status") == "FINISHED" else EXIT_FAILED


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Write the shards, then say what training will read from meta.json (labels, channels, mean, std),
    so the user sees before training what ``--set data.dataset=<name>`` will normalise with."""
    from data import sources

    if args.source == "fashion-mnist":
        out = args.out or str(_data_root() / "fashion-mnist")
        kwargs = {"limit": args.limit} if args.limit else {}
        if args.src:
            kwargs["src_dir"] = args.src
        meta = sources.prepare_fashion_mnist(out, **kwargs)
        name = "fashion-mnist"
    elif args.source == "folder":
        out = args.out or str(_data_root() / args.name)
        meta = sources.prepare_image_folder(args.root, out, name=args.name, labelled=not args.unlabelled)
        name = args.name
    else:
        out = args.out or str(_data_root() / args.name)
        label_column = args.label_column  # None with --unlabelled (argparse keeps the two apart)
        if label_column is None and not args.unlabelled:  # a column "label" if the files have one
            label_column = "label" if "label" in sources.parquet_columns(args.src) else None
        meta = sources.prepare_parquet(
            args.src, out, image_column=args.image_column, label_column=label_column, name=args.name
        )
        name = args.name
    print(_prepared_summary(name, out, meta))
    print(sources.skipped_summary(meta, out))
    if name != "fashion-mnist":
        where = f"data.path={os.path.abspath(out)}" if args.out else f"data.dataset={name}"
        hint = f"train on it with: bamray train --set {where}"
        if not meta.get("labelled", True):
            hint += " (the k-NN evaluation needs a labelled set: add --set eval.dataset=<labelled set>)"
        print(hint)
    return EXIT_OK


def _prepared_summary(name: str, out: str, meta: dict[str, Any]) -> str:
    """e.g. ``prepared pets in /d/pets: 900 train / 100 test images, labelled (2 class(es)), 3 channel(s),
    mean (0.4810, 0.4500, 0.3960), std (0.2500, 0.2400, 0.2500) from 900 images``."""
    counts = meta.get("counts", {})
    labels = f"labelled ({meta['num_classes']} class(es))" if meta.get("labelled", True) else "unlabelled"
    stats = "mean/std not measured (empty train split)"
    if meta.get("mean") is not None:
        mean, std = (", ".join(f"{v:.4f}" for v in meta[k]) for k in ("mean", "std"))
        stats = f"mean ({mean}), std ({std}) from {meta['stats_images']} images"
    return (
        f"prepared {name} in {out}: {counts.get('train', 0)} train / {counts.get('test', 0)} test images, "
        f"{labels}, {meta['channels']} channel(s), {stats}"
    )


def cmd_eval_linear(args: argparse.Namespace) -> int:
    from orchestrator.training.evaluate import run_linear_eval

    top1 = run_linear_eval(args.run, args.tracking_uri, checkpoint=args.checkpoint, epochs=args.epochs)
    where = "" if os.path.isdir(args.run) else f" (logged to MLflow run {args.run})"
    print(f"linear_top1 = {top1:.2f} %{where}")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    from orchestrator import tracking
    from orchestrator.mlflow_ui import serve_ui

    return serve_ui(tracking.resolve_tracking_uri(args.tracking_uri), args.port)


def cmd_ray(args: argparse.Namespace) -> int:
    from orchestrator import kept_ray

    if args.action == "up":
        ray = kept_ray.up(args.cpus)
        print(
            f"local Ray kept at {ray.address} ({ray.cpus:g} logical CPUs, 127.0.0.1 only; process {ray.pid}): "
            "`bamray train` joins it when given no address; `bamray ray down` stops it"
        )
    elif args.action == "down":
        ray = kept_ray.down()
        print(f"stopped the local Ray at {ray.address}" if ray else "no local Ray is kept")
    else:
        ray = kept_ray.kept()
        print(
            f"local Ray kept at {ray.address} ({ray.cpus:g} logical CPUs; process {ray.pid})"
            if ray
            else "no local Ray is kept"
        )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from orchestrator.config import DEBUG_SECTION, load_config

    cfg = load_config(args.config, list(args.set or []))
    settings = cfg.to_dict()
    debug = settings.pop(DEBUG_SECTION)
    sys.stdout.write(yaml.safe_dump(settings, sort_keys=False))
    sys.stdout.write(
        f"# {DEBUG_SECTION}: fault injection for tests, not a training setting (never logged as an "
        "MLflow param)\n"
    )
    sys.stdout.write(yaml.safe_dump({DEBUG_SECTION: debug}, sort_keys=False))
    return EXIT_OK


def cmd_config_list(args: argparse.Namespace) -> int:
    from orchestrator.config import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        desc = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{path.stem:20s} {desc}")
    return EXIT_OK


# ================================================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    """Every sub-command, registered explicitly: an import error in a command's module is an error here,
    never a silently missing command."""
    from orchestrator.downstream.cli import add_embed_parser, add_export_parser, add_viz_parser
    from orchestrator.submit import add_submit_parser
    from orchestrator.sweep import add_sweep_parser

    p = argparse.ArgumentParser(
        prog="bamray",
        description="Distributed self-supervised learning on Ray "
        "(BAM, BYOL, DINO, SimCLR, MAE) tracked in MLflow.",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's whole output (by default it goes to .bamray/logs/ and the run's logs/console.log) "
        "and the traceback of a refused command (exit 2)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_train_parser,
        _add_data_parser,
        _add_eval_parser,
        _add_ui_parser,
        _add_config_parser,
        _add_ray_parser,
        add_sweep_parser,
        add_submit_parser,
        add_export_parser,
        add_embed_parser,
        add_viz_parser,
    ):
        add(sub)
    for (
        command
    ) in sub.choices.values():  # `bamray train --verbose ...` as well as `bamray --verbose train ...`
        command.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return p


def _add_train_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="train a method with Ray Train, tracked in MLflow")
    t.add_argument(
        "--config",
        help=f"shipped config name (bamray config list) or YAML path (default for a new run: {DEFAULT_CONFIG})",
    )
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. optim.lr=1e-3")
    t.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    t.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (train.gpus_per_worker)")
    t.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (train.cpus_per_worker)")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    t.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else .bamray/mlflow.db)"
    )
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    start.add_argument(
        "--init-from",
        metavar="RUN_ID|DIR",
        help="a new run whose backbone starts from these weights (a run's 'final' export or an exported "
        "directory): weights only, a new schedule and optimiser (model.init_from)",
    )
    t.set_defaults(func=cmd_train)


def _add_data_parser(sub: Any) -> None:
    d = sub.add_parser("data", help="prepare data sets as Parquet shards")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = dsub.add_parser("prepare", help="write shards + meta.json")
    psub = prep.add_subparsers(dest="source", required=True, metavar="SOURCE")
    f = psub.add_parser(
        "fashion-mnist", help="from the IDX files of the Debian package dataset-fashion-mnist"
    )
    f.add_argument("--out", help="default: .bamray/data/fashion-mnist")
    f.add_argument("--src", help="IDX folder (default: /usr/share/datasets/fashion-mnist)")
    f.add_argument("--limit", type=int, help="first N images per split (quick experiments)")
    f.set_defaults(func=cmd_data_prepare)
    fo = psub.add_parser(
        "folder",
        help="an ImageFolder tree ROOT/<split>/<class>/*.png|jpg or ROOT/<class>/..., "
        "or with --unlabelled any folder tree of images",
    )
    fo.add_argument("root")
    fo.add_argument("--name", required=True, help="data set name (data.dataset)")
    fo.add_argument("--out", help="default: .bamray/data/<name>")
    fo.add_argument(
        "--unlabelled",
        action="store_true",
        help="no classes: every image file at any depth under ROOT, label -1 (self-supervised only)",
    )
    fo.set_defaults(func=cmd_data_prepare)
    pq = psub.add_parser("parquet", help="a Parquet file/folder with encoded images (and labels)")
    pq.add_argument("src")
    pq.add_argument("--name", required=True, help="data set name (data.dataset)")
    pq.add_argument("--image-column", default="image")
    labels = pq.add_mutually_exclusive_group()
    labels.add_argument(
        "--label-column", help="default: the column 'label' if the files have one, else unlabelled"
    )
    labels.add_argument("--unlabelled", action="store_true", help="ignore any label column: every label -1")
    pq.add_argument("--out", help="default: .bamray/data/<name>")
    pq.set_defaults(func=cmd_data_prepare)


def _add_eval_parser(sub: Any) -> None:
    from orchestrator.downstream.cli import add_eval_protocols

    e = sub.add_parser("eval", help="evaluate a trained backbone")
    esub = e.add_subparsers(dest="eval_command", required=True, metavar="PROTOCOL")
    lin = esub.add_parser(
        "linear", help="linear probe on the frozen backbone of an MLflow run (or an export)"
    )
    lin.add_argument("--run", required=True, help="MLflow run id, or a directory `bamray export` wrote")
    lin.add_argument(
        "--checkpoint", "--artifact", dest="checkpoint", default="final", choices=("final", "best_knn")
    )
    lin.add_argument("--epochs", type=int, help="default: eval.linear_epochs of the run's config")
    lin.add_argument("--tracking-uri")
    lin.set_defaults(func=cmd_eval_linear)
    add_eval_protocols(esub)


def _add_ui_parser(sub: Any) -> None:
    u = sub.add_parser("ui", help="MLflow UI on 127.0.0.1 for the tracking store")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--tracking-uri")
    u.set_defaults(func=cmd_ui)


def _add_config_parser(sub: Any) -> None:
    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved, validated config as YAML")
    show.add_argument("--config", required=True)
    show.add_argument("--set", action="append", metavar="KEY=VALUE")
    show.set_defaults(func=cmd_config_show)
    lst = csub.add_parser("list", help="shipped configs")
    lst.set_defaults(func=cmd_config_list)


def _add_ray_parser(sub: Any) -> None:
    from orchestrator.kept_ray import DEFAULT_CPUS

    r = sub.add_parser(
        "ray",
        help="keep a local Ray up between runs (loopback only): `bamray train` joins it and starts faster",
    )
    r.add_argument("action", choices=("up", "down", "status"))
    r.add_argument(
        "--cpus", type=int, default=DEFAULT_CPUS, help=f"its logical CPUs (up; default {DEFAULT_CPUS})"
    )
    r.set_defaults(func=cmd_ray)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    from orchestrator import console

    console.configure(verbose=args.verbose)
    if not args.verbose:  # MLflow's per-download progress bars: noise in a command's output
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        return _refused(args, f"config error: {err}")
    except FileNotFoundError as err:  # data.sources.DataMissingError is a FileNotFoundError
        return _refused(args, str(err))
    except KeyboardInterrupt as err:
        return _interrupted(err)


def _interrupted(err: KeyboardInterrupt) -> int:
    """Ctrl-C or (in ``train``) SIGTERM: one line, no traceback, the shell's code for that signal (128 +
    signal number); for a stopped training run, the command that continues it."""
    import signal

    signum = getattr(err, "signum", signal.SIGINT)
    run_id = getattr(err, "run_id", None)
    where = (
        f": MLflow run {run_id} marked KILLED; continue it with `bamray train --resume {run_id}`"
        if run_id
        else ""
    )
    print(f"bamray: stopped by {signal.Signals(signum).name}{where}", file=sys.stderr, flush=True)
    return 128 + signum


def _refused(args: argparse.Namespace, message: str) -> int:
    """A user error: one line (and, with ``--verbose``, the traceback of the exception being handled)."""
    if args.verbose:
        import traceback

        traceback.print_exc()
    print(f"bamray: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
