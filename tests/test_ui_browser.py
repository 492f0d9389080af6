"""The MLflow UI as a user sees it: ``bamray ui`` on a free 127.0.0.1 port over a store holding a real sweep
(its parent run and two finished trial runs: real Ray Tune, Ray Train, MLflow), opened in a real headless
Chromium (Debian's ``chromium``, which ``make test`` installs). Each check waits for what it asserts: the
run's metric charts drawn, its description, its pictures served and decoded by the browser, the sweep's
parallel-coordinates picture. Screenshots go to ``$BAMRAY_SCREENSHOTS`` (the README's come from there) or
the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from browser import CHROMIUM, chromium
from conftest import free_port
from test_sweep_ray import tiny_cfg

from orchestrator import tracking
from orchestrator.mlflow_ui import ui_url
from orchestrator.sweep import run_sweep

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test installs Debian's package)"),
]

#: a drawn plotly chart (the MLflow UI renders metric charts with plotly)
CHARTS = "document.querySelectorAll('.js-plotly-plot .main-svg').length"
#: an <img> the browser has fetched and decoded, at least this wide
IMG = "Array.from(document.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth >= {w}).length"
TEXT = "document.body.innerText"
#: a run's chart sections, in the order a researcher reads them (``orchestrator.metric_names``)
SECTIONS = ("eval", "train", "train_signals", "Model metrics")


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """A 2-trial, 1-epoch sweep over lr on 200 Fashion-MNIST images: its store, parent and a finished trial."""
    from data.sources import prepare_fashion_mnist

    root = tmp_path_factory.mktemp("ui")
    prepare_fashion_mnist(root / "shards", limit=200)
    space = root / "lr.yaml"
    space.write_text(
        yaml.safe_dump({"name": "lr_pair", "params": {"optim.lr": {"type": "grid", "values": [2e-3, 1e-3]}}})
    )
    uri = f"sqlite:///{root / 'mlflow.db'}"
    printed = io.StringIO()  # what the user would see of the sweep on the console
    with contextlib.redirect_stdout(printed):
        out = run_sweep(
            tiny_cfg(str(root / "shards"), 1),
            str(space),
            trials=2,
            scheduler="fifo",
            max_concurrent=1,
            storage_path=str(root / "ray"),
            name="ui-test",
            tracking_uri=uri,
            seed=0,
        )
    c = tracking.client(uri)
    parent = c.get_run(out["parent_run_id"])
    child = next(r for r in out["trials"] if r["status"] == "completed")["mlflow_run_id"]
    return uri, parent, c.get_run(child), printed.getvalue()


def _serve(uri: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ui", "--tracking-uri", uri, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"bamray ui did not serve: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(1)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def test_the_mlflow_ui_shows_runs_charts_pictures_and_the_sweep_in_a_real_browser(swept, tmp_path):
    uri, parent, child, printed = swept
    # Ray Tune's start-of-sweep box and TensorBoard hint went to the sweep's log, not to the console
    log = Path(tracking.client(uri).download_artifacts(parent.info.run_id, "logs/console.log", str(tmp_path)))
    assert "Configuration for experiment" in log.read_text()
    assert "Configuration for experiment" not in printed and "tensorboard" not in printed.lower(), printed
    shots = Path(os.environ.get("BAMRAY_SCREENSHOTS") or tmp_path / "shots")
    images = [a.path for a in tracking.client(uri).list_artifacts(child.info.run_id, "images")]
    embedding = next(p for p in images if "/embedding_map+step+" in p and p.endswith(".png"))
    attention = next(p for p in images if "/attention+step+" in p and p.endswith(".png"))
    port = free_port()
    server = _serve(uri, port)
    try:
        # 127.0.0.1 only (0100007F in /proc's little-endian hex), never all interfaces
        assert _listening_addresses(port) == {"0100007F"}
        exp, run = child.info.experiment_id, child.info.run_id

        async def browse() -> dict[str, object]:
            seen: dict[str, object] = {}
            async with chromium() as page:
                await page.goto(ui_url(port, exp, run))
                await page.wait_for(f"{TEXT}.includes('k-NN top-1')")  # the run's one-line description
                text = await page.evaluate(TEXT)
                seen["model-training view"] = "Model training" in text and "Evaluation runs" not in text
                await page.evaluate("document.querySelector('button[aria-label=\"Close\"]')?.click()")
                await page.screenshot(shots / "run_overview.png")

                await page.goto(ui_url(port, exp, run, "model-metrics"))
                seen["charts"] = await page.wait_for(f"{CHARTS} >= 4 && {CHARTS}")
                seen["knn chart"] = await page.wait_for(f"{TEXT}.includes('knn_top1')")
                text = await page.evaluate(TEXT)
                # the sections as the page lists them (each heading is followed by its chart count)
                seen["sections"] = [s for s in SECTIONS if f"\n{s}\n(" in text]
                seen["section order"] = sorted(seen["sections"], key=lambda s: text.index(f"\n{s}\n("))
                await page.screenshot(shots / "run_charts.png")

                for name, path in (("embedding map", embedding), ("attention", attention)):
                    await page.goto(ui_url(port, exp, run, f"artifacts/{path}"))
                    seen[name] = await page.wait_for(IMG.format(w=200))
                    await page.screenshot(shots / f"run_{name.replace(' ', '_')}.png")

                await page.goto(
                    ui_url(
                        port,
                        parent.info.experiment_id,
                        parent.info.run_id,
                        "artifacts/parallel_coordinates.png",
                    )
                )
                seen["parallel coordinates"] = await page.wait_for(IMG.format(w=300))
                await page.screenshot(shots / "sweep_parallel_coordinates.png")
            return seen

        seen = asyncio.run(asyncio.wait_for(browse(), timeout=300))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert seen["model-training view"], "the UI opened in its GenAI view"
    assert seen["charts"] >= 4 and seen["knn chart"]
    assert seen["section order"] == list(SECTIONS), seen  # k-NN first, then loss / lr, the rest last
    assert seen["embedding map"] and seen["attention"] and seen["parallel coordinates"]
    for name in (
        "run_overview",
        "run_charts",
        "run_embedding_map",
        "run_attention",
        "sweep_parallel_coordinates",
    ):
        assert (shots / f"{name}.png").stat().st_size > 20_000, name  # a rendered page, not a blank one
