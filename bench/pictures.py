"""Section 9 -- pictures: the first UMAP embedding map of a new process, umap's numba code compiled there
against loaded from numba's on-disk cache.

Every evaluation epoch logs an embedding map (``eval.embedding_map: umap``, 1000 validation images by
default), drawn in the rank-0 training worker. umap-learn does not cache its numba functions, so a new
process compiled them at its first fit; :func:`orchestrator.pictures.cache_numba_functions` turns numba's
cache on for them. Each figure is one new Python process: import + the fit on ``MAP_SAMPLES`` x
``DIM`` random features (ResNet-18's width), timed inside the process (the interpreter's own start is the
same for both). All processes share one numba cache directory (``NUMBA_CACHE_DIR`` under the bench's
scratch dir), so the machine's own caches neither help nor change:

- *empty cache*, once: what the first run on a fresh install pays (umap's functions and pynndescent's,
  which pynndescent itself caches, compile);
- *umap uncached*: ``umap.UMAP(...).fit_transform`` as before the change (pynndescent's cache is filled by
  then, as on any machine after the first run);
- *umap cached*: ``orchestrator.pictures.project_2d(features, "umap")``, as the worker draws it now.
The two last ones alternate, so that a slow spell of the machine does not land on one of them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from bench.common import BenchContext, Figure, SectionResult, launch, output_tail

REPO = Path(__file__).resolve().parent.parent
MAP_SAMPLES, DIM = 1000, 512
TIMEOUT_S = 300

SCRIPT = """
import sys, time
t0 = time.perf_counter()
import numpy as np
mode, n, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
if mode == "uncached":
    import umap
    points = umap.UMAP(n_neighbors=15, metric="cosine", random_state=0, n_jobs=1).fit_transform(x)
else:
    from orchestrator import pictures
    points, how = pictures.project_2d(x, "umap")
    assert how == "UMAP", how
assert points.shape == (n, 2)
print("BENCH_MAP_S", time.perf_counter() - t0)
"""


def _map_seconds(mode: str, n: int, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-c", SCRIPT, mode, str(n), str(DIM)]
    _, lines, rc = launch(cmd, REPO, env, TIMEOUT_S)
    stamps = [float(line.split()[1]) for _, line in lines if line.startswith("BENCH_MAP_S ")]
    if rc != 0 or not stamps:
        raise RuntimeError(f"the {mode} UMAP process exited {rc}:\n{output_tail(lines)}")
    return stamps[0]


def run(ctx: BenchContext) -> SectionResult:
    res = SectionResult("pictures")
    try:
        import umap  # noqa: F401
    except ImportError as err:
        res.skipped = f"umap-learn is not installed ({err})"
        return res
    n = 200 if ctx.quick else MAP_SAMPLES
    repeats = 1 if ctx.quick else 3
    cache = ctx.workdir / "numba-cache"
    shutil.rmtree(cache, ignore_errors=True)  # a reused --workdir: the first figure needs it empty
    cache.mkdir(parents=True)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    params = {"points": n, "dim": DIM, "n_neighbors": 15, "metric": "cosine"}

    empty = [_map_seconds("cached", n, env)]
    ctx.log(f"  pictures: first UMAP map, empty numba cache: {empty[0]:.1f}s")
    uncached, cached = [], []
    for _ in range(repeats):
        uncached.append(_map_seconds("uncached", n, env))
        cached.append(_map_seconds("cached", n, env))
        ctx.log(f"  pictures: umap uncached {uncached[-1]:.1f}s, cached {cached[-1]:.1f}s")

    base = "first UMAP map of a new process, umap's functions compiled (before)"
    res.add(Figure("pictures", base, "s", uncached, False, params))
    now = "first UMAP map of a new process, from numba's cache (bamray now)"
    res.add(Figure("pictures", now, "s", cached, False, params))
    res.compare(now, base)
    res.add(
        Figure(
            "pictures",
            "first UMAP map on a fresh install (numba cache empty), once",
            "s",
            empty,
            False,
            params,
        )
    )
    res.notes.append(
        "Seconds inside a new Python process: import + UMAP fit (cosine, 15 neighbours) on random features; "
        "all processes share one NUMBA_CACHE_DIR in the bench's scratch dir."
    )
    return res
