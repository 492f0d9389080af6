"""``bamray embed`` on a data set several times larger than the memory the whole job may use.

The images are Fashion-MNIST's, upscaled to ``--size`` px (grayscale PNG, zlib level 1), so the set
decodes to ``images x size^2`` bytes: 24 000 images at 1024 px are 25 GB decoded. ``bamray embed`` and the
local Ray it starts (its object store included) run inside one memory cgroup capped at ``--limit-gib``;
the kernel kills the job if it ever holds more. The script reports the job's peak resident memory (every
process of the job together: anonymous plus shared memory, sampled from the cgroup every 0.2 s; the
kernel's own peak also counts the page cache of the shards read, which it drops under pressure), each
embedding actor's peak RSS as the job measures it, and the rows written.

Needs root for the cgroup (v1 ``memory`` or v2 ``memory.max``); without one it says so and stops. The
same limit with public tools: ``systemd-run --scope -p MemoryMax=5G bamray embed ...``.

    python -m bench.embed_memory --run <run id | exported dir> --images 24000 --size 1024 --limit-gib 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from bench.common import RESULTS_DIR, machine_name
from bench.fixtures import FMNIST_SRC

#: rows per shard file: a read task holds one file's PNG bytes, so large images need small files
SHARD_ROWS = 250


def _encode(args: tuple[bytes, int]) -> bytes:
    import numpy as np
    from PIL import Image

    raw, size = args
    image = Image.fromarray(np.frombuffer(raw, np.uint8).reshape(28, 28)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_shards(out: Path, images: int, size: int) -> Path:
    """Fashion-MNIST's train images (repeated past 60k) upscaled to ``size`` px, as prepared shards."""
    from data.shards import ShardWriter, begin_shards, finish_shards
    from data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, read_idx

    if (out / "meta.json").exists():
        return out
    begin_shards(out)
    src = Path(FMNIST_SRC)
    writers = {}
    for split, n in (("train", images), ("test", 1)):
        pixels = read_idx(src / FASHION_MNIST_FILES[split][0])
        labels = read_idx(src / FASHION_MNIST_FILES[split][1])
        writer = ShardWriter(out, split, SHARD_ROWS)
        rows = ((pixels[i % len(pixels)].tobytes(), size) for i in range(n))
        with Pool(os.cpu_count() or 1) as pool:
            for i, png in enumerate(pool.imap(_encode, rows, chunksize=32)):
                writer.add(png, int(labels[i % len(labels)]), (size, size), "L")
        writers[split] = writer
    finish_shards(out, "fashion-mnist-upscaled", list(FASHION_MNIST_CLASSES), writers, {}, channels=1)
    return out


class MemoryCgroup:
    """A memory cgroup (v1 or v2) with a hard limit; processes join it with :meth:`prefix`."""

    def __init__(self, name: str, limit: int):
        v2 = Path("/sys/fs/cgroup") / name
        v1 = Path("/sys/fs/cgroup/memory") / name
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            self.dir, self.limit_file, self.peak_file = v2, "memory.max", "memory.peak"
        elif Path("/sys/fs/cgroup/memory").is_dir():
            self.dir, self.limit_file, self.peak_file = (
                v1,
                "memory.limit_in_bytes",
                "memory.max_usage_in_bytes",
            )
        else:
            raise SystemExit("no memory cgroup controller here: cannot cap the job's memory")
        self.dir.mkdir(exist_ok=True)
        (self.dir / self.limit_file).write_text(str(limit))
        if (self.dir / "memory.memsw.limit_in_bytes").exists():  # v1: no escaping into swap
            (self.dir / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def prefix(self) -> list[str]:
        """A command prefix that moves the shell into the cgroup before it execs the command."""
        procs = self.dir / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]

    def peak(self) -> int:
        """The kernel's peak for the group: page cache (the shards read) included, so it reaches the limit
        whenever the reads fill it; the pressure that counts is :meth:`resident`."""
        return int((self.dir / self.peak_file).read_text())

    def resident(self) -> int:
        """Bytes the group holds that the kernel cannot drop: anonymous memory (every process's heap) plus
        shared memory (Ray's object store lives in /dev/shm)."""
        stat = dict(line.split() for line in (self.dir / "memory.stat").read_text().splitlines())
        keys = ("anon", "shmem") if "anon" in stat else ("total_rss", "total_shmem")
        return sum(int(stat.get(k, 0)) for k in keys)

    def oom_kills(self) -> int:
        for name in ("memory.events", "memory.oom_control"):
            f = self.dir / name
            if f.exists():
                m = re.search(r"oom_kill (\d+)", f.read_text())
                if m:
                    return int(m.group(1))
        return -1

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # still holding a process: left for the next run to reuse
            self.dir.rmdir()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="MLflow run id or exported directory (the network)")
    p.add_argument("--images", type=int, default=24000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--limit-gib", type=float, default=5.0)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus-per-actor", type=float, default=0.75)
    p.add_argument("--object-store-mb", type=int, default=1024, help="Ray's object store (inside the limit)")
    p.add_argument("--workdir", default="/tmp/bamray-embed-memory")
    args = p.parse_args(argv)

    work = Path(args.workdir)
    data = work / f"fmnist-{args.images}x{args.size}px"
    t0 = time.perf_counter()
    write_shards(data, args.images, args.size)
    on_disk = sum(f.stat().st_size for f in data.rglob("*.parquet"))
    print(
        f"data: {data} ({args.images} images, {on_disk / 1e9:.2f} GB on disk) in {time.perf_counter() - t0:.0f} s"
    )

    limit = int(args.limit_gib * 2**30)
    group = MemoryCgroup("bamray-embed-memory", limit)
    bin_dir = Path(sys.executable).parent
    out = work / "embeddings"
    shutil.rmtree(out, ignore_errors=True)
    embed = [str(bin_dir / "bamray"), "embed", "--run", args.run, "--data", str(data), "--out", str(out)]
    embed += ["--split", "train", "--actors", str(args.actors), "--cpus-per-actor", str(args.cpus_per_actor)]
    # The job starts its own local Ray, inside the group: every Ray process counts against the limit.
    # Ray sizes its object store from the machine's memory, not the group's, so it is capped to fit.
    env = dict(os.environ, RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES=str(args.object_store_mb * 2**20))
    t1 = time.perf_counter()
    job = subprocess.Popen(
        group.prefix() + embed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak_resident = 0
    while job.poll() is None:  # sampled every 0.2 s
        peak_resident = max(peak_resident, group.resident())
        time.sleep(0.2)
    stdout, stderr = job.communicate()
    seconds = time.perf_counter() - t1
    print(stdout[-2000:], stderr[-3000:] if job.returncode else "")
    decoded = args.images * args.size * args.size
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name("cpu"),
        "images": args.images,
        "size_px": args.size,
        "decoded_gb": round(decoded / 1e9, 2),
        "on_disk_gb": round(on_disk / 1e9, 2),
        "limit_gib": args.limit_gib,
        "decoded_over_limit": round(decoded / limit, 1),
        "object_store_mib": args.object_store_mb,
        "job_peak_resident_gib": round(peak_resident / 2**30, 2),
        "job_peak_with_page_cache_gib": round(group.peak() / 2**30, 2),
        "oom_kills": group.oom_kills(),
        "returncode": job.returncode,
        "seconds": round(seconds, 1),
        "embed_line": next((ln for ln in stdout.splitlines() if ln.startswith("embedded")), ""),
        "command": " ".join(embed),
    }
    group.remove()
    print(json.dumps(result, indent=1))
    name = f"{result['date'][:10]}-{result['machine']}-embed-memory-{args.images}x{args.size}px.json"
    path = RESULTS_DIR / name
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if job.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
