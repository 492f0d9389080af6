"""Section 6 -- embed: ``bamray embed``'s Ray Data job, images/s with 1 and 2 actors, and each actor's peak
resident memory at two data-set sizes.

The network is ``bam_fmnist``'s (the ``make run`` ResNet, small stem, 28 px) at its random init, exported
as a run exports it; the rows are Fashion-MNIST's train split repeated (the shards are written once:
``TRAIN_IMAGES`` x ``REPEAT``). Each actor count runs on a fresh local Ray with the machine's CPUs: one
actor gets all but the reading / writing share, two actors half of it each (one torch thread per whole
CPU, at least one). Wall time includes starting the actors (a model load each) and writing Parquet: what a
user waits for.

Streaming: if the job held the data set anywhere, an actor's peak RSS would grow with the rows. It is
measured on the small and the large set; the decoded size of the large set is recorded beside it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench.common import BenchContext, Figure, SectionResult
from bench.fixtures import FMNIST_SRC, init_ray

#: Fashion-MNIST train images per copy, and how many copies the large set holds (quick, full)
TRAIN_IMAGES = {False: 10000, True: 2000}
REPEAT = {False: 3, True: 3}


def _shards(ctx: BenchContext, copies: int) -> Path:
    """Fashion-MNIST train images written ``copies`` times into one prepared set (test split: 1 image)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.sources import prepare_fashion_mnist, read_meta

    n = TRAIN_IMAGES[ctx.quick]
    base = ctx.workdir / "embed-base"
    if not (base / "meta.json").exists():
        prepare_fashion_mnist(base, src_dir=FMNIST_SRC, limit=n, test_limit=1)
    out = ctx.workdir / f"embed-x{copies}"
    if (out / "meta.json").exists():
        return out
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    table = pq.read_table(base / "train")
    for k in range(copies):
        index = table.column("index").to_numpy() + k * n
        part = table.set_column(table.schema.get_field_index("index"), "index", pa.array(index))
        pq.write_table(part, out / "train" / f"part-{k:05d}.parquet", compression="none")
    for f in (base / "test").glob("*.parquet"):
        (out / "test" / f.name).write_bytes(f.read_bytes())
    meta = read_meta(str(base))
    meta["counts"] = {"train": n * copies, "test": 1}
    (out / "meta.json").write_text(json.dumps(meta))
    assert np.all(np.diff(pq.read_table(out / "train", columns=["index"]).column("index").to_numpy()) != 0)
    return out


def _backbone(ctx: BenchContext, data: Path) -> Any:
    """``bam_fmnist``'s backbone at its random init, exported as a run exports it."""
    from orchestrator import checkpointing as ckpt
    from orchestrator.config import load_config
    from orchestrator.downstream.source import resolve_backbone
    from orchestrator.training.data_prep import prepare_data
    from trainers.build import build_method

    cfg, _ = prepare_data(load_config("bam_fmnist", [f"data.path={data}"]))
    method = build_method(cfg, device="cpu", steps_per_epoch=1, batch_size=cfg.optim.batch_size)
    out = ckpt.export_backbone(method, cfg, ctx.workdir / "embed-export")
    return resolve_backbone(str(out), ctx.workdir)


def _embed(ctx: BenchContext, backbone: Any, data: Path, actors: int) -> dict[str, Any]:
    from orchestrator.downstream.commands import network, view_for
    from orchestrator.downstream.embed import IO_CPUS, Rows, run_embed

    init_ray(ctx, ctx.cpus)
    cpus = (ctx.cpus - 2 * IO_CPUS) / actors
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        return run_embed(
            network(backbone, "backbone"),
            view_for(backbone, str(data)),
            [Rows("train", path=str(data))],
            str(Path(tmp) / "out"),
            labelled=True,
            actors=actors,
            batch_size=256,
            cpus_per_actor=cpus,
        )


def run(ctx: BenchContext) -> SectionResult:
    res = SectionResult("embed")
    small, large = _shards(ctx, 1), _shards(ctx, REPEAT[ctx.quick])
    backbone = _backbone(ctx, small)
    n_small, n_large = TRAIN_IMAGES[ctx.quick], TRAIN_IMAGES[ctx.quick] * REPEAT[ctx.quick]
    for actors in (1, 2):
        ctx.log(f"embed: {n_small} images, {actors} actor(s)")
        s = _embed(ctx, backbone, small, actors)
        assert s["rows"] == n_small, s
        res.add(
            Figure(
                "embed",
                f"images_per_s_{actors}_actor{'s' if actors > 1 else ''}",
                "images/s",
                [s["images_per_s"]],
                higher_is_better=True,
                params={"images": n_small, "actors": actors},
            )
        )
        res.derived[f"peak_rss_mb_per_actor_{actors}_actors_{n_small}_images"] = sorted(
            round(a["peak_rss_mb"]) for a in s["actors"].values()
        )
    res.compare("images_per_s_2_actors", "images_per_s_1_actor")
    ctx.log(f"embed: {n_large} images, 2 actors (memory)")
    s = _embed(ctx, backbone, large, 2)
    assert s["rows"] == n_large, s
    res.derived[f"peak_rss_mb_per_actor_2_actors_{n_large}_images"] = sorted(
        round(a["peak_rss_mb"]) for a in s["actors"].values()
    )
    res.derived["images_per_s_2_actors_large"] = s["images_per_s"]
    res.derived[f"decoded_mb_{n_large}_images"] = round(n_large * 28 * 28 / 2**20, 1)
    res.derived[f"embeddings_mb_{n_large}_images"] = round(n_large * 256 * 4 / 2**20, 1)
    res.notes.append(
        "peak RSS per actor is the whole process (Python, torch, Ray worker, the model); compare it across "
        "the two data-set sizes: flat = streaming"
    )
    return res
