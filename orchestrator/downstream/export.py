"""``bamray export``: the backbone alone, as safetensors (+ what ``timm.create_model`` needs), TorchScript
or ONNX, each reloaded and checked against the original network before the command succeeds.

The safetensors file is the run's own export, keyed as timm keys its model; ``timm.json`` holds the
``timm.create_model`` arguments that rebuild the network (the README shows the few lines, no bamray
needed). The small-image ResNet stem (:func:`trainers.backbones.small_resnet_stem`) is not a timm
option: ``timm.json`` says so and gives its width, and the loader replaces two modules.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator import checkpointing as ckpt
from orchestrator.downstream import EXPORT_FORMATS
from orchestrator.downstream.source import Backbone
from trainers.fileio import atomic_write
from trainers.options import ConfigError

FORMATS = EXPORT_FORMATS
FILES = {"safetensors": ckpt.BACKBONE_FILE, "torchscript": "backbone.torchscript.pt", "onnx": "backbone.onnx"}
TIMM_SPEC = "timm.json"
#: the reloaded export must reproduce the network's features to this (float32, same CPU)
TOLERANCE = 1e-4


def timm_spec(cfg: Any, module: nn.Module) -> dict[str, Any]:
    """``{"name", "kwargs", "small_resnet_stem"}``: ``timm.create_model(name, **kwargs)`` builds the
    exported network, except that a small ResNet stem (``small_resnet_stem: {"in_chans", "width"}``)
    replaces ``conv1`` by a 3x3 stride-1 conv and ``maxpool`` by an identity."""
    from timm.models.resnet import ResNet

    from trainers.backbones import resolve_stem

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": int(cfg.data.channels)}
    kwargs.update(cfg.model.backbone_kwargs)
    if cfg.model.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    patch_embed = getattr(module, "patch_embed", None)
    if patch_embed is not None:  # a ViT-like model: the size and patch it was built with
        kwargs["img_size"] = int(cfg.model.img_size or cfg.data.global_crop_size)
        kwargs["patch_size"] = int(patch_embed.patch_size[0])
        kwargs["dynamic_img_size"] = True
    small = None
    if isinstance(module, ResNet) and resolve_stem(cfg.model.stem, cfg.data.global_crop_size) == "small":
        small = {"in_chans": int(cfg.data.channels), "width": int(module.conv1.out_channels)}
    return {"name": str(cfg.model.backbone), "kwargs": kwargs, "small_resnet_stem": small}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """What the README's loader does, with timm alone: the reference the export test compares against."""
    import timm

    model = timm.create_model(spec["name"], **spec["kwargs"])
    if spec.get("small_resnet_stem"):
        s = spec["small_resnet_stem"]
        model.conv1 = nn.Conv2d(s["in_chans"], s["width"], kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def example_batch(cfg: Any, n: int = 4, seed: int = 0) -> torch.Tensor:
    """A normalised-looking float batch of the size the network was trained on."""
    g = torch.Generator().manual_seed(seed)
    size = int(cfg.model.img_size or cfg.data.global_crop_size)
    return torch.randn(n, int(cfg.data.channels), size, size, generator=g)


def export(backbone: Backbone, fmt: str, out: str | Path) -> dict[str, Any]:
    """Write ``fmt`` into ``out`` and check it: returns ``{"format", "path", "max_abs_diff"}`` (the
    largest feature difference between the reloaded export and the network, on a batch other than the
    one the export was traced with)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"got {fmt!r}; one of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    module = backbone.load("cpu")
    cfg = backbone.cfg
    check = example_batch(cfg, n=3, seed=1)
    with torch.no_grad():
        expected = module(check)
    path = out / FILES[fmt]
    if fmt == "safetensors":
        shutil.copyfile(backbone.directory / ckpt.BACKBONE_FILE, path)
        shutil.copyfile(backbone.directory / ckpt.CONFIG_FILE, out / ckpt.CONFIG_FILE)
        spec = timm_spec(cfg, module)
        atomic_write(out / TIMM_SPEC, lambda tmp: Path(tmp).write_text(json.dumps(spec, indent=2) + "\n"))
        got = _reload_safetensors(spec, path)(check)
    elif fmt == "torchscript":
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(module, example_batch(cfg, n=2))
            atomic_write(path, lambda tmp: traced.save(tmp))
            got = torch.jit.load(str(path), map_location="cpu")(check)
    else:
        _export_onnx(module, cfg, path)
        got = torch.from_numpy(run_onnx(path, check.numpy()))
    diff = float((got - expected).abs().max())
    if not diff <= TOLERANCE:
        raise RuntimeError(f"the {fmt} export differs from the network by {diff:.3g} (> {TOLERANCE})")
    return {"format": fmt, "path": str(path), "max_abs_diff": diff}


def _reload_safetensors(spec: dict[str, Any], path: Path) -> nn.Module:
    from safetensors.torch import load_model

    model = build_from_spec(spec)
    load_model(model, str(path), strict=True)
    model.eval()
    return lambda x: model(x).detach()  # type: ignore[return-value]


def _export_onnx(module: nn.Module, cfg: Any, path: Path) -> None:
    """torch.export-based ONNX (opset 18), input ``image`` with a dynamic batch axis, output ``features``."""
    try:
        import onnx  # noqa: F401 - the exporter needs it; say so before tracing
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            "--format", "onnx needs the packages onnx and onnxscript: pip install 'bamray[export]'"
        ) from err
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        program = torch.onnx.export(
            module,
            (example_batch(cfg, n=2),),
            input_names=["image"],
            output_names=["features"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
        program.save(str(Path(tmp) / "model.onnx"))
        atomic_write(path, lambda t: shutil.copyfile(Path(tmp) / "model.onnx", t))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Tracing warnings (TorchScript's "might not generalise", its deprecation) and the ONNX exporter's
    progress lines: the export is checked against the network right after, which is what they warn about."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def run_onnx(path: str | Path, images: Any) -> Any:
    """Features of ``images`` (float32 numpy) from the ONNX file, with onnxruntime on CPU."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(
            "--format", "checking an onnx export needs onnxruntime: pip install 'bamray[export]'"
        ) from err
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def log_export(backbone: Backbone, results: list[dict[str, Any]], out: Path) -> None:
    """Files under ``export/`` of the run, and per format a tag and its reload difference."""
    if backbone.run_id is None:
        return
    from orchestrator import tracking

    uri, run = backbone.tracking_uri, backbone.run_id
    files = {Path(r["path"]) for r in results}
    if any(r["format"] == "safetensors" for r in results):
        files |= {out / ckpt.CONFIG_FILE, out / TIMM_SPEC}
    for path in sorted(files):  # only what this command wrote, not whatever else is in --out
        tracking.with_retry(tracking.client(uri).log_artifact, run, str(path), "export")
    tags = {
        f"bamray.export.{r['format']}": f"{Path(r['path']).name} from {backbone.checkpoint}" for r in results
    }
    tracking.log_tags(uri, run, tags)
    tracking.log_metrics(
        uri, run, {f"export_{r['format']}_max_abs_diff": r["max_abs_diff"] for r in results}, 0
    )
