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
    print(f"MLflow UI for {uri}\n  open http://127.0.0.1:{port}  (Ctrl-C to stop)", flush=True)
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
