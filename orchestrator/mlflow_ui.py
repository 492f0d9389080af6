"""``bamray ui``: the MLflow UI on the run store, bound to localhost.

The store is files on this machine (an SQLite database and an artifact folder), not a service for the
network, so the UI never listens on 0.0.0.0; ``--default-artifact-root`` points it at the artifact folder
next to the database so images and backbones open in the browser.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from orchestrator.tracking import artifact_root, sqlite_path

#: The MLflow UI opens in its GenAI view unless told otherwise (a query parameter, or its own toggle that the
#: browser remembers); bamray's links ask for the model-training view.
VIEW = "workflowType=machine_learning"


def ui_url(
    port: int = 5000, experiment_id: str | None = None, run_id: str | None = None, tab: str = ""
) -> str:
    """A link into ``bamray ui``: the experiments, an experiment's runs, or a run (``tab``: ``model-metrics``,
    ``artifacts/<path>``, ...), in the model-training view."""
    page = "experiments"
    if experiment_id is not None:
        page += f"/{experiment_id}"
        if run_id is not None:
            page += f"/runs/{run_id}" + (f"/{tab}" if tab else "")
    return f"http://127.0.0.1:{port}/#/{page}?{VIEW}"


def ui_command(uri: str, port: int = 5000, host: str = "127.0.0.1") -> list[str]:
    """``mlflow ui`` on ``uri``, bound to localhost (never 0.0.0.0: the store is not for the network)."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    root = artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


def serve_ui(uri: str, port: int = 5000) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C; returns its exit code."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ui_command(uri, port)
    print(f"MLflow UI for {uri}\n  open {ui_url(port)}  (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(cmd)

    def stop(signum: int, frame: object) -> None:
        # A SIGTERM to `bamray ui` must not orphan the server (it would keep the port and the store open).
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return 0
    finally:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        signal.signal(signal.SIGTERM, previous)
