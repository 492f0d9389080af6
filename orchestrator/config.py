"""Typed, validated experiment config: YAML file + ``--set key=value`` overrides.

Every field declares its range (``trainers.options.opt``); ``load_config`` checks all of them plus the
cross-field rules (crops fit the image and the patch grid, top-k within the targets, known timm model,
known method) and raises ``ConfigError`` naming the field, before any Ray job starts. The CLI turns
that into exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from data.config import DataConfig
from orchestrator.fault_injection import DebugConfig
from trainers.backbones import ModelConfig, check_backbone_name, crop_sizes, patch_size_for
from trainers.evaluation import EvalConfig
from trainers.methods import get_options
from trainers.optim_config import OptimConfig
from trainers.options import ConfigError, flatten, from_dict, opt, to_dict

CONFIG_DIR = Path(__file__).parent / "configs"
#: the config section of test-only fault injection (orchestrator/fault_injection.py)
DEBUG_SECTION = "debug"
#: ``train.preemption_notice`` presets: the cloud metadata endpoints that announce a node's termination
NOTICE_URLS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
}


def check_notice_source(source: str) -> str | None:
    """Why ``source`` is not a valid ``train.preemption_notice`` (None when it is)."""
    if not source or source in NOTICE_URLS or source.startswith(("http://", "https://", "/")):
        return None
    return f"got {source!r}; allowed: '' (off), aws, gcp, an http(s):// URL or an absolute file path"


@dataclasses.dataclass
class TrainConfig:
    """How the run is distributed and made fault tolerant (Ray Train)."""

    workers: int = opt(2, ge=0, le=1024, help="Ray Train workers (0 = run the loop in-process, no Ray)")
    gpus_per_worker: float = opt(0.0, ge=0.0, le=8.0)
    cpus_per_worker: float = opt(1.0, gt=0.0, le=256.0)
    precision: str = opt(
        "auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="auto = bf16 on GPU and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32",
    )
    channels_last: bool = opt(True, help="NHWC memory layout for convolutions (faster on CPU and GPU)")
    time_budget_min: float = opt(
        0.0,
        ge=0.0,
        le=100000.0,
        help="train about this many minutes (evaluations not counted): after epoch 1 the "
        "run keeps the whole number of epochs nearest the budget (at most optim.epochs) "
        "and fits every schedule to them; "
        "0 = off",
    )
    checkpoint_freq: int = opt(1, ge=1, help="report a checkpoint every N epochs")
    checkpoint_every_steps: int = opt(
        0,
        ge=0,
        help="also checkpoint inside an epoch every N global steps; a resume continues there (0 = off)",
    )
    checkpoint_every_minutes: float = opt(
        0.0, ge=0.0, le=100000.0, help="also checkpoint inside an epoch every N minutes (0 = off)"
    )
    preemption_notice: str = opt(
        "",
        help="checkpoint after the current step when a termination notice appears: aws, gcp, an "
        "http(s):// URL (200 and not FALSE = notice) or an absolute file path (exists = notice); '' = off",
    )
    keep_checkpoints: int = opt(2, ge=1)
    max_failures: int = opt(3, ge=0, help="worker failures Ray Train recovers from (restart from checkpoint)")
    storage_path: str = opt(".bamray/ray_results", help="Ray Train storage (local path or s3:// / gs:// URI)")
    address: str = opt("", help="Ray cluster address (empty: RAY_ADDRESS or a local Ray)")


@dataclasses.dataclass
class TrackingConfig:
    """MLflow."""

    tracking_uri: str = opt("", help="MLflow tracking URI (empty: MLFLOW_TRACKING_URI or the local store)")
    experiment: str = opt("bamray", help="MLflow experiment name")
    run_name: str = opt("", help="MLflow run name (default: the config name)")
    system_metrics_s: float = opt(
        10.0,
        ge=0,
        le=3600,
        help="seconds between MLflow system-metric samples (system/...: CPU, memory, disk, network, GPU) "
        "of each node; 0 = off",
    )


@dataclasses.dataclass
class ExperimentConfig:
    name: str = opt("bam-fmnist", help="experiment / run name")
    seed: int = opt(0, ge=0)
    method_name: str = "bam"
    method: Any = None  # the method's own Options dataclass instance
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict; round-trips through ``config_from_dict``."""
        d = {
            f.name: to_dict(getattr(self, f.name))
            if dataclasses.is_dataclass(getattr(self, f.name))
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        d["method"] = {"name": d.pop("method_name"), **(d["method"] or {})}
        return d

    def run_params(self) -> dict[str, Any]:
        """The flat ``section.field`` values logged as MLflow run params: every section but
        :data:`DEBUG_SECTION`, whose fault injection is no setting of the experiment."""
        return flatten({k: v for k, v in self.to_dict().items() if k != DEBUG_SECTION})

    @property
    def world_size(self) -> int:
        return max(self.train.workers, 1)


def _parse_scalar(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: ``0.1``, ``true``, ``[0.2, 1.0]``, ``resnet18``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("--set", f"cannot parse value {text!r}: {err}") from err


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (a copy)."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(key, f"{p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError("--set", f"expected key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), _parse_scalar(value)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and fully validate an ExperimentConfig from a nested dict."""
    raw = copy.deepcopy(raw or {})
    method_raw = raw.pop("method", {}) or {}
    if not isinstance(method_raw, dict):
        raise ConfigError("method", f"is a section of fields; expected a mapping, got {method_raw!r}")
    method_raw = dict(method_raw)
    method_name = method_raw.pop("name", "bam")
    if not isinstance(method_name, str):
        raise ConfigError("method.name", f"expected a method name, got {method_name!r}")
    options_cls = get_options(method_name)
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"method_name", "method"}
    unknown = set(raw) - fields
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown section; known: {sorted(fields | {'method'})}")
    top = {k: v for k, v in raw.items() if k in ("name", "seed")}
    sections = {k: v for k, v in raw.items() if k not in ("name", "seed")}
    cfg = from_dict(ExperimentConfig, {**top, **sections})
    cfg.method_name = method_name
    cfg.method = from_dict(options_cls, method_raw, prefix="method.")
    validate_cross_fields(cfg)
    return cfg


def upgrade_saved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A config a run saved (``config.yaml`` of an MLflow run or an exported backbone) as the code that
    wrote it meant it: runs from before ``model.stem`` existed were built with timm's ImageNet stem,
    and their weights only fit that network again; the fault-injection fields of older runs' ``train:``
    section now live in ``debug:``."""
    model = raw.get("model")
    if isinstance(model, dict) and "stem" not in model:
        raw = {**raw, "model": {**model, "stem": "imagenet"}}
    train = raw.get("train")
    moved = ("fail_at_step", "nan_at_step")
    if isinstance(train, dict) and any(k in train for k in moved):
        debug = {**{k: train[k] for k in moved if k in train}, **(raw.get(DEBUG_SECTION) or {})}
        raw = {**raw, "train": {k: v for k, v in train.items() if k not in moved}, DEBUG_SECTION: debug}
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    saved: bool = False,
) -> ExperimentConfig:
    """Load a YAML config (a path, or the name of a shipped config such as ``bam_fmnist``).
    ``saved``: the file is a config a run wrote (see :func:`upgrade_saved_config`)."""
    raw: dict[str, Any] = {}
    if path:
        p = resolve_config_path(path)
        raw = _read_yaml(p)
        if not isinstance(raw, dict):
            raise ConfigError(str(path), "the config file must be a YAML mapping")
        if saved:
            raw = upgrade_saved_config(raw)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error becomes a ConfigError pointing at the line, since a
    typo in a config is the user's to fix, not a crash to debug."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(str(path), f"not valid YAML{where}: {problem}") from err
    except OSError as err:
        raise ConfigError(str(path), f"cannot read the config file: {err.strerror or err}") from err


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    shipped = CONFIG_DIR / f"{p.stem if p.suffix else p.name}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError("--config", f"no such file {str(path)!r}; shipped configs: {names}")


def check_normalisation(d: DataConfig) -> None:
    """``data.mean`` / ``data.std`` against ``data.channels`` where both are known (an empty value or
    channels 0 means "the data set's own", resolved from its meta once the data is found)."""
    for name in ("mean", "std"):
        values = getattr(d, name)
        if values and d.channels and len(values) != d.channels:
            raise ConfigError(
                f"data.{name}",
                f"got {len(values)} value(s); need {d.channels} for data.channels={d.channels} "
                f"(or leave it empty for the data set's own)",
            )
    if d.mean and d.std and len(d.mean) != len(d.std):
        raise ConfigError(
            "data.std", f"got {len(d.std)} value(s); need one per data.mean value ({len(d.mean)})"
        )
    if any(s <= 0 for s in d.std):
        raise ConfigError("data.std", "all values must be > 0")


def validate_cross_fields(cfg: ExperimentConfig) -> None:
    """Rules that involve several fields."""
    d, m = cfg.data, cfg.model
    check_backbone_name(m.backbone)
    if cfg.eval.signal_samples == 1:
        raise ConfigError(
            "eval.signal_samples", "got 1; must be 0 (off) or >= 2 (RankMe and std need 2 images)"
        )
    notice_problem = check_notice_source(cfg.train.preemption_notice)
    if notice_problem:
        raise ConfigError("train.preemption_notice", notice_problem)
    for name in ("global_crop_scale", "local_crop_scale"):
        lo, hi = getattr(d, name)
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"data.{name}", f"got ({lo}, {hi}); need 0 < min <= max <= 1")
    if d.local_crops and d.local_crop_size > d.global_crop_size:
        raise ConfigError(
            "data.local_crop_size",
            f"got {d.local_crop_size}; must be <= data.global_crop_size ({d.global_crop_size})",
        )
    check_normalisation(d)
    if m.img_size is not None and m.img_size != d.global_crop_size:
        raise ConfigError(
            "model.img_size", f"got {m.img_size}; must equal data.global_crop_size ({d.global_crop_size})"
        )
    if m.patch_size is not None:
        sizes = [("data.global_crop_size", d.global_crop_size)]
        if d.local_crops:
            sizes.append(("data.local_crop_size", d.local_crop_size))
        for field, size in sizes:
            if size % m.patch_size:
                raise ConfigError(
                    field, f"got {size}; must be a multiple of model.patch_size ({m.patch_size})"
                )
    ctx = {
        "batch_size": cfg.optim.batch_size,
        "world_size": cfg.world_size,
        "num_global_crops": d.global_crops,
        "num_local_crops": d.local_crops,
        "image_size": d.global_crop_size,
        "patch_size": patch_size_for(m, crop_sizes(d)) or 0,  # the chosen one when model.stem picks it
        "backbone_kwargs": dict(m.backbone_kwargs),
    }
    check = getattr(cfg.method, "check", None)  # a method's own section may have no cross-field rule
    if check is not None:
        check(ctx)
