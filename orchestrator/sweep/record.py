"""Where a sweep lives in storage and the record that lets ``--resume`` rebuild it.

Storage may be a local path or an ``s3://`` / ``gs://`` URI (a cluster's shared storage), so every path
here goes through :func:`join` and every file through pyarrow's filesystem when it is a URI."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from data.sources import is_uri
from orchestrator.config import ExperimentConfig, config_from_dict
from orchestrator.sweep.settings import SweepSettings
from search_spaces import SearchSpace, space_from_dict
from trainers.fileio import atomic_write
from trainers.options import ConfigError

META_FILE = "bamray_sweep.json"
RECORD_FORMAT = 1


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else os.path.join(base, *parts)


def write_text(path: str, text: str) -> None:
    """Atomic for local paths; URIs go through pyarrow's filesystem (object stores write whole objects)."""
    if is_uri(path):
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
        with fs.open_output_stream(fs_path) as f:
            f.write(text.encode())
        return
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_text(path: str) -> str | None:
    """The file's text, or None when there is no such file."""
    if is_uri(path):
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
        if fs.get_file_info(fs_path).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(fs_path) as f:
            return f.readall().decode()
    return Path(path).read_text() if os.path.exists(path) else None


@dataclasses.dataclass(frozen=True)
class SweepRecord:
    """Everything needed to rebuild a sweep's trainable on resume (``<storage>/<name>/bamray_sweep.json``)."""

    settings: SweepSettings
    base: ExperimentConfig
    space: SearchSpace
    parent_run_id: str
    experiment_id: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": RECORD_FORMAT,
                "settings": dataclasses.asdict(self.settings),
                "base": self.base.to_dict(),
                "space": self.space.to_dict(),
                "parent_run_id": self.parent_run_id,
                "experiment_id": self.experiment_id,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> SweepRecord:
        doc: dict[str, Any] = json.loads(text)
        return cls(
            settings=SweepSettings(**{"collapse_threshold": 0.0, **doc["settings"]}),  # older: no stop
            base=config_from_dict(doc["base"]),
            space=space_from_dict(doc["space"]),
            parent_run_id=doc["parent_run_id"],
            experiment_id=doc["experiment_id"],
        )


def sweep_exists(exp_path: str) -> bool:
    from ray.tune import Tuner

    return Tuner.can_restore(exp_path) or read_text(join(exp_path, META_FILE)) is not None


def save_record(exp_path: str, record: SweepRecord) -> None:
    write_text(join(exp_path, META_FILE), record.to_json())


def load_record(storage: str, name: str) -> SweepRecord:
    """The stored record of sweep ``name``, or a ``ConfigError`` listing the sweeps that exist."""
    text = read_text(join(storage, name, META_FILE))
    if text is None:
        known = (
            sorted(p.parent.name for p in Path(storage).glob(f"*/{META_FILE}")) if not is_uri(storage) else []
        )
        raise ConfigError("--resume", f"no sweep named {name!r} in {storage}; known sweeps: {known}")
    return SweepRecord.from_json(text)
