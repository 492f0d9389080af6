"""Does a short CPU training help? k-NN top-1 of each method's backbone at random init and after training.

``python -m bench.knn_gain [--methods bam,byol,dino,simclr,mae] [--epochs N] [--set key=value ...]``
(without ``--epochs`` each config trains for its own ``optim.epochs``)

For every method it loads the shipped ``<method>_fmnist`` config with the given overrides, builds the
model, ``Engine`` and ``DataLoader`` in this process (``bench.train_step.build_bare``: the trainers'
own code, no Ray, no MLflow), then measures the weighted k-NN (DINO protocol, ``eval.knn_k`` /
``eval.knn_temperature``) of ``method.eval_backbone()`` on clean 28 px views: the bank is the
config's k-NN fraction of the first ``data.train_limit`` train images, the queries the first
``data.val_limit`` test images (the whole test set by default). It does so once at random init (same
seed, same network) and once after ``optim.epochs`` epochs, and reports the raw-pixel k-NN on the very
same bank and queries: the floor a learned feature must beat to mean anything.

Prints a markdown table and writes the JSON next to the other bench results. Not a test: a few
minutes per method on 2 CPUs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

METHOD_ORDER = ["bam", "byol", "dino", "simclr", "mae"]
DEFAULT_SET: list[str] = []  # the shipped configs as they are (global batch = batch_size x workers)


def clean_images(cfg, split: str, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, C, S, S)`` clean views and labels of the config's k-NN selection of ``split``."""
    from data.pipeline import CleanTorchDataset

    ds = CleanTorchDataset(cfg.data, split, fraction=fraction, seed=cfg.seed)
    items = [ds[i] for i in range(len(ds))]
    items = [it for it in items if it is not None]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def knn_top1(model: torch.nn.Module, cfg, bank: tuple, queries: tuple, device: torch.device) -> float:
    from trainers.engine import normalise_uint8
    from trainers.evaluation.knn import extract_features, knn_classify

    def batches(images: torch.Tensor, labels: torch.Tensor):
        for i in range(0, len(images), 512):
            yield normalise_uint8(images[i:i + 512], cfg.data.mean, cfg.data.std, device), labels[i:i + 512]

    with torch.no_grad():
        bank_f, bank_y = extract_features(model, batches(*bank), device)
        query_f, query_y = extract_features(model, batches(*queries), device)
    num_classes = int(max(int(bank_y.max()), int(query_y.max()))) + 1
    return knn_classify(bank_f, bank_y, query_f, query_y, num_classes, k=cfg.eval.knn_k,
                        temperature=cfg.eval.knn_temperature)["top1"]


def measure(method_name: str, overrides: list[str], device: str = "cpu") -> dict[str, Any]:
    """k-NN before/after one short training of ``<method_name>_fmnist`` with ``overrides``."""
    from bench.train_step import build_bare
    from orchestrator.config import load_config
    from trainers.engine import crops_from_batch
    from trainers.evaluation.knn import raw_pixel_baseline

    cfg = load_config(f"{method_name}_fmnist", overrides)
    bare = build_bare(cfg, device)
    method, engine, dev, dataset = bare["method"], bare["engine"], bare["device"], bare["dataset"]
    bank = clean_images(cfg, "train", cfg.eval.knn_train_fraction)
    queries = clean_images(cfg, "test", cfg.eval.knn_eval_fraction)
    floor = raw_pixel_baseline(bank[0], bank[1], queries[0], queries[1], k=cfg.eval.knn_k,
                               temperature=cfg.eval.knn_temperature)
    before = knn_top1(method.eval_backbone(), cfg, bank, queries, dev)
    t0 = time.perf_counter()
    losses = []
    for epoch in range(cfg.optim.epochs):
        dataset.set_epoch(epoch)
        epoch_loss = []
        for b in bare["loader"]:
            crops = crops_from_batch(b, cfg.data.mean, cfg.data.std, dev, crop_usage=method.crop_usage)
            epoch_loss.append(engine.train_step(crops)["loss"])
        losses.append(sum(epoch_loss) / max(len(epoch_loss), 1))
        print(f"  {method_name} epoch {epoch + 1}/{cfg.optim.epochs} loss {losses[-1]:.4f} "
              f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    train_min = (time.perf_counter() - t0) / 60
    after = knn_top1(method.eval_backbone(), cfg, bank, queries, dev)
    return {
        "method": method_name, "backbone": cfg.model.backbone, "backbone_kwargs": dict(cfg.model.backbone_kwargs),
        "patch_size": cfg.model.patch_size, "epochs": cfg.optim.epochs, "train_images": len(dataset),
        "batch": bare["batch"], "steps": bare["steps_per_epoch"] * cfg.optim.epochs,
        "crops": f"{cfg.data.global_crops}x{cfg.data.global_crop_size}+{cfg.data.local_crops}x{cfg.data.local_crop_size}",
        "train_minutes": round(train_min, 2), "knn_before": before, "knn_after": after,
        "raw_pixel_floor": floor, "bank": len(bank[1]), "queries": len(queries[1]),
        "loss_per_epoch": losses, "overrides": overrides, "threads": torch.get_num_threads(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | backbone | epochs (steps x batch) | train min | k-NN init | k-NN trained | gain | "
            "raw pixels (same bank) |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        kw = ",".join(f"{k}={v}" for k, v in r["backbone_kwargs"].items())
        bb = f"{r['backbone']}" + (f"/{r['patch_size']}" if r["patch_size"] else "") + (f" ({kw})" if kw else "")
        lines.append(f"| {r['method']} | {bb} | {r['epochs']} ({r['steps']} x {r['batch']}) | {r['train_minutes']:.1f} | "
                     f"{r['knn_before']:.1f} % | {r['knn_after']:.1f} % | {r['knn_after'] - r['knn_before']:+.1f} | "
                     f"{r['raw_pixel_floor']:.1f} % |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.knn_gain", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHOD_ORDER))
    p.add_argument("--epochs", type=int, default=None,
                   help="optim.epochs for every method (default: each shipped config's own)")
    p.add_argument("--train-limit", type=int, default=10000, help="train images (the k-NN bank is these too)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"extra config overrides, after the defaults {DEFAULT_SET}")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = [f"optim.epochs={args.epochs}"] if args.epochs is not None else []
    overrides = [*DEFAULT_SET, *epochs, f"data.train_limit={args.train_limit}", *args.set]
    rows = []
    out = Path(args.out) / f"{time.strftime('%Y-%m-%d')}-{platform.node()}-knn-gain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows of methods not measured now stay (a rerun of one method updates its row only).
    kept = json.loads(out.read_text())["rows"] if out.exists() else []
    names = [n.strip() for n in args.methods.split(",")]
    kept = [r for r in kept if r["method"] not in names]
    for name in names:
        print(f"== {name}", flush=True)
        rows.append(measure(name, overrides))
        merged = sorted(kept + rows, key=lambda r: METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99)
        out.write_text(json.dumps({"rows": merged, "torch": torch.__version__, "cpus": torch.get_num_threads()}, indent=1))
        print(table(rows[-1:]), flush=True)
    print(table(merged))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
