"""Quality benchmark: what each method's features are worth after the same wall-clock budget.

``python -m bench.quality [--methods bam,byol,dino,simclr,mae] [--budget-min 30] [--workers 2] [--quick]``

For every method it runs ``bamray train --config <method>_fmnist`` as a user does (a child process: Ray
Train with ``--workers`` DDP workers, Ray Data multi-crop streaming, MLflow) on the whole training split
with ``train.time_budget_min = --budget-min``: the run times its first epoch, keeps the whole number of
epochs nearest the budget and fits every schedule to them, so every method gets the same training time
within half an epoch (evaluations are not counted). The online k-NN (DINO protocol: weighted, k=20, T=0.07, cosine) runs after every epoch
with the whole training split as the bank and the test split as the queries, which gives the curve
k-NN against training minutes. Afterwards the linear probe (``bamray eval linear``) runs on the final
backbone.

Beside every method, through the very same k-NN and linear-probe code on the same bank and queries:
the same network at random initialisation (same seed), and raw pixels (the floor a learned feature must
beat to mean anything: 84.6 % k-NN on Fashion-MNIST's 60k bank).

Writes ``bench/results/<date>-<machine>-quality.json`` and ``...-quality.png`` (k-NN against minutes),
logs the PNG to every method's MLflow run and prints a markdown table. ``--quick`` is the CI smoke mode:
one method, 2k images, a few seconds of budget. Not a test: 30 minutes a method on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, machine_name
from orchestrator.metric_names import mlflow_key

REPO = Path(__file__).resolve().parent.parent
METHOD_ORDER = ["bam", "byol", "dino", "simclr", "mae"]
QUICK = {"methods": ["bam"], "budget_min": 0.1, "train_limit": 2000, "val_limit": 500, "max_epochs": 3}


def run_overrides(args: argparse.Namespace, data_path: str, storage: str, uri: str, method: str) -> list[str]:
    """``--set`` values of one method's run: the shipped recipe, the whole split, the budget, k-NN every
    epoch on the whole bank, and this benchmark's own MLflow store and Ray storage."""
    sets = [
        f"data.path={data_path}",
        f"data.train_limit={args.train_limit}",
        f"data.val_limit={args.val_limit}",
        f"train.time_budget_min={args.budget_min}",
        f"optim.epochs={args.max_epochs}",
        f"train.workers={args.workers}",
        "eval.knn_freq=1",
        "eval.knn_train_fraction=1.0",
        "eval.knn_eval_fraction=1.0",
        f"train.storage_path={storage}",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=bamray-quality",
        f"tracking.run_name=quality-{method}",
        "train.max_failures=0",
    ]
    return sets + list(args.set)


def train(method: str, sets: list[str], log_path: Path) -> str:
    """``python -m orchestrator train`` in a child process; returns its MLflow run id."""
    cmd = [sys.executable, "-m", "orchestrator", "train", "--config", f"{method}_fmnist"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    text = log_path.read_text()
    found = re.search(r"MLflow run ([0-9a-f]{32})", text)
    if rc != 0 or not found:
        raise RuntimeError(f"bamray train {method} exited {rc}; log {log_path}:\n{text[-3000:]}")
    return found.group(1)


def knn_curve(uri: str, run_id: str) -> list[dict[str, float]]:
    """``[{"epoch", "minutes", "knn_top1"}]`` from the run's MLflow history (k-NN and the training clock
    are logged at the same step)."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    clock = {m.step: m.value for m in c.get_metric_history(run_id, "train_time_s")}
    # one per epoch (knn_freq=1)
    knn = sorted(c.get_metric_history(run_id, mlflow_key("knn_top1")), key=lambda m: m.step)
    return [{"epoch": i + 1, "minutes": clock[m.step] / 60, "knn_top1": m.value} for i, m in enumerate(knn)]


_PIXELS: dict[tuple, dict[str, float]] = {}  # raw pixels do not depend on the method: measured once per bank


def baselines(cfg, device: torch.device) -> dict[str, Any]:
    """Raw pixels and the random-init network, through the same k-NN and linear probe, on the same bank."""
    from orchestrator.training.data_prep import resolved_data
    from orchestrator.training.evaluate import clean_features, raw_pixel_features
    from trainers.build import build_method

    cfg, _ = resolved_data(cfg)  # the data set's channels / mean / std, as the trained run used them
    out = {}
    key = (cfg.data.path, cfg.data.train_limit, cfg.data.val_limit, cfg.seed)
    if key not in _PIXELS:
        pixels = {split: raw_pixel_features(cfg.data, split, seed=cfg.seed) for split in ("train", "test")}
        _PIXELS[key] = evaluate_features(cfg, pixels)
    out["raw_pixels"] = _PIXELS[key]
    method = build_method(cfg, device=device, steps_per_epoch=1, batch_size=cfg.optim.batch_size)
    model = method.eval_backbone()
    init = {
        split: clean_features(model, cfg.data, split, device, seed=cfg.seed) for split in ("train", "test")
    }
    out["random_init"] = evaluate_features(cfg, init)
    return out


def evaluate_features(cfg, feats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """k-NN and linear-probe top-1 (%) of ``{"train": bank, "test": queries}`` features."""
    from trainers.evaluation.knn import knn_classify
    from trainers.evaluation.linear import linear_probe

    (xb, yb), (xq, yq) = feats["train"], feats["test"]
    classes = int(max(int(yb.max()), int(yq.max()))) + 1
    knn = knn_classify(xb, yb, xq, yq, classes, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)[
        "top1"
    ]
    linear = linear_probe(
        xb,
        yb,
        xq,
        yq,
        classes,
        epochs=cfg.eval.linear_epochs,
        lr=cfg.eval.linear_lr,
        batch_size=cfg.eval.linear_batch_size,
        seed=cfg.seed,
    )["top1"]
    return {"knn_top1": knn, "linear_top1": linear}


def measure(method: str, args: argparse.Namespace, work: Path, data_path: str, uri: str) -> dict[str, Any]:
    """One method: train under the budget, read the curve, run the linear probe, add its baselines."""
    from orchestrator.config import load_config
    from orchestrator.training.evaluate import run_linear_eval

    sets = run_overrides(args, data_path, str(work / "ray_results"), uri, method)
    t0 = time.perf_counter()
    run_id = train(method, sets, work / f"train-{method}.log")
    wall = time.perf_counter() - t0
    curve = knn_curve(uri, run_id)
    linear = run_linear_eval(run_id, uri)
    cfg = load_config(f"{method}_fmnist", sets)
    base = baselines(cfg, torch.device("cpu"))
    return {
        "method": method,
        "run_id": run_id,
        "backbone": cfg.model.backbone,
        "backbone_kwargs": dict(cfg.model.backbone_kwargs),
        "stem": cfg.model.stem,
        "budget_min": args.budget_min,
        "train_minutes": curve[-1]["minutes"] if curve else 0.0,
        "epochs": curve[-1]["epoch"] if curve else 0,
        "global_batch": cfg.optim.batch_size * cfg.world_size,
        "wall_minutes": wall / 60,
        "curve": curve,
        "knn_top1": curve[-1]["knn_top1"] if curve else None,
        "linear_top1": linear,
        **{f"{k}_{m}": v for k, d in base.items() for m, v in d.items()},
        "bank": "train split" + (f" (first {args.train_limit})" if args.train_limit else ""),
        "queries": "test split" + (f" (first {args.val_limit})" if args.val_limit else ""),
        "overrides": sets,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | backbone | epochs in budget | train min | k-NN | k-NN random init | k-NN raw pixels | "
        "linear | linear random init | linear raw pixels |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        kw = ", ".join(f"{k}={v}" for k, v in r["backbone_kwargs"].items())
        lines.append(
            f"| {r['method']} | {r['backbone']} ({r['stem']} stem{', ' + kw if kw else ''}) | {r['epochs']} | "
            f"{r['train_minutes']:.1f} | **{r['knn_top1']:.1f} %** | {r['random_init_knn_top1']:.1f} % | "
            f"{r['raw_pixels_knn_top1']:.1f} % | **{r['linear_top1']:.1f} %** | "
            f"{r['random_init_linear_top1']:.1f} % | {r['raw_pixels_linear_top1']:.1f} % |"
        )
    return head + "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """k-NN against training minutes, one line per method, raw pixels as a dashed floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in rows:
        xs = [0.0] + [p["minutes"] for p in r["curve"]]
        ys = [r["random_init_knn_top1"]] + [p["knn_top1"] for p in r["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=r["method"])
    if rows:
        ax.axhline(
            rows[0]["raw_pixels_knn_top1"],
            color="k",
            ls="--",
            lw=1,
            label=f"raw pixels {rows[0]['raw_pixels_knn_top1']:.1f} %",
        )
    ax.set_xlabel("training minutes (evaluations not counted)")
    ax.set_ylabel("k-NN top-1 % (k=20, T=0.07)")
    ax.set_title(
        f"Fashion-MNIST, bank: {rows[0]['bank'] if rows else ''}, queries: {rows[0]['queries'] if rows else ''}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def quick_shards(work: Path, args: argparse.Namespace) -> str:
    """Shards of only the first train / test images (quick mode: no need to prepare all 70k)."""
    from bench.fixtures import FMNIST_SRC
    from data.sources import prepare_fashion_mnist

    out = work / "fashion-mnist"
    prepare_fashion_mnist(out, src_dir=FMNIST_SRC, limit=args.train_limit, test_limit=args.val_limit)
    return str(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHOD_ORDER))
    p.add_argument("--budget-min", type=float, default=30.0, help="training minutes per method")
    p.add_argument("--max-epochs", type=int, default=200, help="optim.epochs: the most a budget may plan")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per run")
    p.add_argument("--train-limit", type=int, default=0, help="first N train images (0 = the whole split)")
    p.add_argument("--val-limit", type=int, default=0, help="first N test images (0 = the whole split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--quick", action="store_true", help="CI smoke mode: " + json.dumps(QUICK))
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store of the runs (default: the project's own, "
        "experiment bamray-quality, browsable with `bamray ui`)",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quick:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])}
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from orchestrator import tracking
    from orchestrator.config import load_config
    from orchestrator.training.data_prep import prepare_data

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-{machine_name('cpu')}-quality" + ("-quick" if args.quick else "")
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bamray-quality-") as tmp:
        work = Path(tmp)
        data_path = (
            quick_shards(work, args) if args.quick else prepare_data(load_config("bam_fmnist"))[0].data.path
        )
        for method in args.methods:
            print(f"== {method}: {args.budget_min} min of training", flush=True)
            rows.append(measure(method, args, work, data_path, uri))
            print(table(rows[-1:]), flush=True)
            json_path.write_text(
                json.dumps(
                    {
                        "args": {k: v for k, v in vars(args).items()},
                        "rows": rows,
                        "load_average": os.getloadavg(),
                        "torch": torch.__version__,
                    },
                    indent=1,
                )
            )
        plot(rows, png_path)
        pics = work / "pics"
        pics.mkdir()
        (pics / "knn_vs_minutes.png").write_bytes(png_path.read_bytes())
        for r in rows:
            tracking.log_artifacts(uri, r["run_id"], str(pics), "quality")
    print(table(rows))
    print(f"written: {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
