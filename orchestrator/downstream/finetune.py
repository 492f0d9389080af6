"""``bamray eval finetune --run ID --labels 1%|10%|N``: semi-supervised evaluation on Ray Train workers.

Each mode (``finetune``: backbone + linear head end to end; ``probe``: the head on the frozen backbone;
``scratch``: the same network from its random init, same recipe, same labels -- the "supervised" row)
is one ``TorchTrainer`` run: every worker reads its share of the labelled subset and of the test split,
the model is wrapped by DDP (``ray.train.torch.prepare_model``), and the top-1 / top-5 correct counts are
summed over the workers. The figures go to the run as ``finetune_<labels>_<mode>_top1`` / ``_top5``.

The recipe (AdamW, cosine with a 10 % warm-up, random resized crop + flip, ``--epochs``) is the same for
every mode: the head (the linear probe's parameter-free BatchNorm + Linear) at ``--lr`` (1e-2), the
backbone, when trained, at a tenth of it (1e-3), from the pretrained weights or from the random init.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from typing import Any

import numpy as np

from orchestrator import tracking
from orchestrator.downstream.embed import Network
from orchestrator.downstream.source import Backbone
from trainers.evaluation.finetune import MODES
from trainers.options import ConfigError

#: the backbone's lr relative to the head's (``--lr``), fine-tuned or trained from scratch alike
BACKBONE_LR_SCALE = 0.1


@dataclasses.dataclass
class FinetunePlan:
    """What every worker of one mode's run needs."""

    mode: str
    net: Network
    view: Any
    train_indices: np.ndarray
    test_indices: np.ndarray | None
    num_classes: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    threads: int = 1
    #: the driver's :class:`_Results` actor, which rank 0 hands the figures to
    results: Any = None


class _Results:
    """Holds rank 0's figures for the driver: Ray Train V2 keeps only the metrics reported with a
    checkpoint, and a checkpoint would need storage every node can reach."""

    def __init__(self) -> None:
        self.value: dict[str, float] | None = None

    def put(self, value: dict[str, float]) -> None:
        self.value = value

    def get(self) -> dict[str, float] | None:
        return self.value


def _rows(view: Any, split: str, indices: np.ndarray | None) -> tuple[Any, Any]:
    """Clean uint8 views and labels of ``indices`` of ``split`` (corrupt rows skipped)."""
    import torch

    from data.batch_maps import decode_rows
    from data.images import clean_transform
    from data.torch_dataset import _ShardRows

    rows = _ShardRows(view, split, indices=indices)
    decoded, keep = decode_rows(rows.images.to_numpy(zero_copy_only=False), view.channels)
    size = view.global_crop_size
    images = [clean_transform(image, size) for image in decoded]
    x = torch.stack(images) if images else torch.zeros((0, view.channels, size, size), dtype=torch.uint8)
    return x, torch.as_tensor(np.asarray(rows.labels)[keep], dtype=torch.long)


def _test_counts(model: Any, plan: FinetunePlan, rank: int, world: int, device: Any) -> Any:
    """``(top-1 correct, top-5 correct, images)`` of the test split, summed over every worker's share."""
    import torch

    from trainers.distributed import all_reduce_sum
    from trainers.engine import normalise_uint8
    from trainers.evaluation.finetune import topk_correct

    mean, std = plan.view.mean, plan.view.std
    model.eval()
    tx, ty = _rows(plan.view, "test", None if plan.test_indices is None else plan.test_indices[rank::world])
    if plan.test_indices is None:  # every rank reads the split; each scores its share
        tx, ty = tx[rank::world], ty[rank::world]
    counts = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(tx), 256):
            logits = model(normalise_uint8(tx[start : start + 256], mean, std, device)).cpu()
            top1, top5 = topk_correct(logits, ty[start : start + 256])
            counts += torch.tensor([top1, top5, len(logits)], dtype=torch.float64)
    return all_reduce_sum(counts.to(device)).cpu()


def finetune_worker(config: dict[str, Any]) -> None:
    """One worker: train on its share for ``epochs``, then report the summed test top-1 / top-5 counts."""
    import ray.train
    import ray.train.torch
    import torch

    from orchestrator.downstream.embed import build_network
    from trainers.engine import normalise_uint8
    from trainers.evaluation.finetune import Classifier, augment, cosine_lr

    plan: FinetunePlan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, plan.threads))
    backbone = build_network(plan.net)
    torch.manual_seed(plan.seed)  # the head: the same on every rank and in every mode
    model = Classifier(backbone, int(backbone.num_features), plan.num_classes, frozen=plan.mode == "probe")
    head_params = list(model.head.parameters())
    groups = [{"params": head_params, "lr_scale": 1.0}]
    if plan.mode != "probe":  # fine-tuned and from scratch: the same recipe, the backbone at a tenth
        groups.append({"params": list(model.backbone.parameters()), "lr_scale": BACKBONE_LR_SCALE})
    opt = torch.optim.AdamW(groups, lr=plan.lr, weight_decay=plan.weight_decay)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    mean, std = plan.view.mean, plan.view.std
    x, y = _rows(plan.view, "train", plan.train_indices[rank::world])
    steps_per_epoch = max(1, math.ceil(len(plan.train_indices) / world / plan.batch_size))
    total = steps_per_epoch * plan.epochs
    gen = torch.Generator().manual_seed(plan.seed * 1000 + rank)
    step, loss_sum = 0, 0.0
    for _epoch in range(plan.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):  # the same number of steps on every rank (DDP)
            idx = order[torch.arange(s * plan.batch_size, (s + 1) * plan.batch_size) % max(len(x), 1)]
            images = normalise_uint8(augment(x[idx], gen), mean, std, device)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(plan.lr, step, total, warmup=max(1, total // 10)) * g["lr_scale"]
            loss = torch.nn.functional.cross_entropy(model(images), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            step += 1
    counts = _test_counts(model, plan, rank, world, device)
    n = max(float(counts[2]), 1.0)
    figures = {
        "top1": 100.0 * float(counts[0]) / n,
        "top5": 100.0 * float(counts[1]) / n,
        "test_images": float(counts[2]),
        "train_loss": loss_sum / max(step, 1),
        "steps": float(step),
    }
    if rank == 0:
        ray.get(plan.results.put.remote(figures))
    ray.train.report(figures)


def run_mode(plan: FinetunePlan, workers: int, cpus_per_worker: float) -> dict[str, float]:
    """One mode as a ``TorchTrainer`` run (Ray must be initialised); its last report."""
    import ray
    import ray.train

    from data.run_actors import on_this_node
    from orchestrator.training.trainer import torch_trainer

    box = ray.remote(num_cpus=0)(_Results).options(scheduling_strategy=on_this_node()).remote()
    plan = dataclasses.replace(plan, threads=max(1, int(cpus_per_worker)), results=box)
    with tempfile.TemporaryDirectory(prefix="bamray-ft-") as storage:
        trainer = torch_trainer(
            finetune_worker,
            datasets_callback=False,  # its workers read no Ray Data
            train_loop_config={"plan": plan},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(name=f"finetune-{plan.mode}", storage_path=storage),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    figures = ray.get(box.get.remote())
    ray.kill(box)
    if figures is None:
        raise RuntimeError(f"the {plan.mode} run finished without reporting its figures")
    return dict(figures)


def finetune_command(
    backbone: Backbone,
    *,
    labels: str,
    modes: tuple[str, ...] = MODES,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 0.05,
    workers: int = 1,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
) -> dict[str, dict[str, float]]:
    """Train and score every mode of ``modes`` on the same class-balanced ``labels`` subset."""
    from data.shards import read_split_table
    from data.torch_dataset import select_eval_indices
    from orchestrator.downstream.commands import JobOptions, labelled_view, network, ray_for
    from trainers.evaluation.finetune import label_subset

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError("--mode", f"got {', '.join(bad) or 'none'}; of {', '.join(MODES)}")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--workers", workers)):
        if value < 1:
            raise ConfigError(name, f"got {value}; must be >= 1")
    if not lr > 0:
        raise ConfigError("--lr", f"got {lr}; must be > 0")
    view = labelled_view(backbone, "fine-tuning")
    table = read_split_table(view.path, "train", columns=["label", "index"])
    positions = label_subset(table.column("label").to_numpy(), labels, seed=backbone.cfg.seed)
    train_indices = table.column("index").to_numpy()[positions]
    from data.sources import read_meta

    num_classes = int(read_meta(view.path)["num_classes"])
    test = select_eval_indices(view.path, "test", backbone.cfg.eval.knn_eval_fraction, backbone.cfg.seed)
    results: dict[str, dict[str, float]] = {}
    with ray_for(JobOptions(address=address)):
        import ray

        have = float(ray.cluster_resources().get("CPU", 0))
        if workers * cpus_per_worker > have:
            raise ConfigError("--workers", f"{workers} x {cpus_per_worker:g} CPUs; the cluster has {have:g}")
        for mode in modes:
            kind = "random" if mode == "scratch" else "backbone"
            plan = FinetunePlan(
                mode=mode,
                net=network(backbone, kind),
                view=view,
                train_indices=train_indices,
                test_indices=test,
                num_classes=num_classes,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                seed=backbone.cfg.seed,
            )
            results[mode] = run_mode(plan, workers, cpus_per_worker)
            results[mode]["labelled_images"] = float(len(train_indices))
    _log(backbone, labels, results)
    return results


def metric_tag(labels: str) -> str:
    """``1%`` -> ``1pct``, ``0.5%`` -> ``0p5pct``, ``500`` -> ``500``: MLflow metric names take no ``%``."""
    return labels.strip().replace("%", "pct").replace(".", "p")


def _log(backbone: Backbone, labels: str, results: dict[str, dict[str, float]]) -> None:
    if not backbone.run_id:
        return
    tag = metric_tag(labels)
    metrics = {}
    for mode, r in results.items():
        metrics[f"finetune_{tag}_{mode}_top1"] = r["top1"]
        metrics[f"finetune_{tag}_{mode}_top5"] = r["top5"]
    tracking.log_metrics(backbone.tracking_uri, backbone.run_id, metrics, 0)
