"""Where a result came from: the code's commit and the package versions, as the tags every run starts with."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def git_commit(path: str | os.PathLike | None = None) -> str:
    """``HEAD`` of the repository holding this package (``+dirty`` when modified), or ``unknown``."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on, and Python's."""
    out = {}
    for pkg in ("torch", "ray", "timm", "mlflow", "torchvision", "numpy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    out["python"] = sys.version.split()[0]
    return out


def run_tags(method: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags every bamray MLflow run starts with: commit, method, package versions, plus ``extra``."""
    tags = {"git_commit": git_commit(), "method": method}
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    tags.update(extra or {})
    return tags
