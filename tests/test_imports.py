"""Modules that other processes import only to unpickle something must stay light.

Ray ships the dataset plan's map callables and the run's helper actors by reference, so Ray Train's
controller, its dataset manager, every split coordinator and every helper actor import their modules;
the CLI builds its whole parser for every command. Each torch import there costs seconds of CPU per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fresh_python

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "statement",
    [
        "import data.batch_maps",
        "import data.run_actors",
        "import data.run_stream",  # its map actor class ships by reference in the plan
        "import data.pipeline",  # the driver builds the run's datasets with it
        "import orchestrator.training.plan",  # Ray Train's controller unpickles the workers' plan
        "from orchestrator.cli import build_parser; build_parser()",
        "import orchestrator.training.driver",  # only the workers import torch (the last test here)
    ],
)
def test_light_modules_do_not_import_torch(statement):
    code = f"import sys; {statement}; print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    assert fresh_python(code, timeout=60) == ["[]"]


def test_the_sweep_package_still_exposes_run_sweep():
    from orchestrator import sweep
    from orchestrator.sweep.run import run_sweep

    assert sweep.run_sweep is run_sweep
    with pytest.raises(AttributeError):
        _ = sweep.no_such_name


@pytest.mark.parametrize(
    "statement",
    [
        "import orchestrator.config",
        "import orchestrator.training.plan",
        # what the driver imports before it hands the run to Ray Train
        "import orchestrator.training.driver, data.pipeline, data.run_actors",
    ],
)
def test_the_run_config_does_not_import_timm(statement):
    """Ray Train's controller unpickles the run's ``WorkerPlan`` (its config inside) before it starts the
    workers: importing timm and torchvision there cost about 1.2 s of CPU on the start-up's critical path
    (torch itself: see the test below)."""
    code = f"import sys; {statement}; print(sorted(m for m in ('torchvision', 'timm', 'mlflow') if m in sys.modules))"
    assert fresh_python(code, timeout=60) == ["[]"]


@pytest.mark.parametrize("method", ["bam", "byol", "dino", "mae", "simclr"])
def test_a_pickled_plan_unpickles_without_torch(method):
    """What Ray Train's controller does with the workers' plan: unpickle it, config and the method's options
    inside. It used to import torch for the options' classes (defined beside the ``nn.Module`` methods)
    and for ``OptimConfig`` (beside the optimisers): about 2 s of CPU before the workers start."""
    dump = (
        "import pickle, sys; from orchestrator.config import load_config; "
        "from orchestrator.training.plan import WorkerPlan; "
        f"cfg = load_config(None, ['method.name={method}']); "
        "plan = WorkerPlan(cfg=cfg, steps_per_epoch=2, num_classes=10, mlflow_run_id=None, tracking_uri='', "
        "epoch_clock='c', corrupt_counter='k', run_dir=None, knn=True, knn_prefetch=True); "
        "sys.stdout.buffer.write(pickle.dumps(plan))"
    )
    pickled = subprocess.run([sys.executable, "-c", dump], cwd=ROOT, capture_output=True, timeout=120)
    assert pickled.returncode == 0, pickled.stderr.decode()[-2000:]
    load = (
        "import pickle, sys; plan = pickle.loads(sys.stdin.buffer.read()); "
        "print(plan.cfg.method_name, type(plan.cfg.method).__name__, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", load], cwd=ROOT, input=pickled.stdout, capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    name, options, torch_imported = out.stdout.decode().split()
    assert name == method and options.lower() == f"{method}options" and torch_imported == "False"


def test_a_method_lookup_imports_its_own_module_only():
    """MAE's module imports timm (and torchvision, ``torch._dynamo``): about 4 s of a BAM driver's start-up."""
    code = (
        "import sys; from trainers.methods import get_method, available_methods; get_method('bam'); "
        "print('trainers.methods.mae' in sys.modules, 'timm' in sys.modules); print(available_methods())"
    )
    assert fresh_python(code, timeout=60)[:2] == ["False False", "['bam', 'byol', 'dino', 'mae', 'simclr']"]


def test_a_config_with_a_known_backbone_name_loads_without_timm(tmp_path):
    """The first load asks timm and keeps its model names for that timm version; the next ones do not
    import timm, torchvision or torch._dynamo (about 4 s of the driver's start-up), nor torch: the driver
    validates the config before it starts Ray and hands the run to Ray Train without torch. Every
    shipped recipe, so every method's option checks (``trainers.methods.options``)."""
    configs = ["bam_fmnist", "byol_fmnist", "dino_fmnist", "mae_fmnist", "simclr_fmnist"]
    code = (
        f"import sys; from orchestrator.config import load_config; [load_config(c) for c in {configs!r}]; "
        "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo', 'torch') if m in sys.modules))"
    )
    env = dict(os.environ, BAMRAY_CACHE_DIR=str(tmp_path))
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert runs[0].stdout.strip() != "[]"  # the first one asked timm
    assert runs[1].stdout.strip() == "[]", runs[1].stdout
    (cache,) = tmp_path.glob("timm-*-models.json")
    assert "resnet18" in cache.read_text()


def test_the_driver_hands_ray_train_the_run_without_torch(tmp_path):
    """The trainer class (Ray Train 2.60's ``TorchTrainer`` built torch-free) and the workers' function (by
    reference, from the torch-free plan module): building the trainer and pickling what Ray ships to the
    controller imports no torch in the driver. Its backend is the one ``TorchTrainer`` would pick (gloo,
    nccl for GPU workers), and its local mode (0 workers) gets Ray's torch controller."""
    code = (
        "import sys; import ray.cloudpickle as cp; from ray.train import RunConfig, ScalingConfig; "
        "from orchestrator.training.plan import train_loop_per_worker; "
        "from orchestrator.training.trainer import trainer_class; "
        "make = lambda **s: trainer_class()(train_loop_per_worker, train_loop_config={}, "
        f"scaling_config=ScalingConfig(**s), run_config=RunConfig(name='t', storage_path={str(tmp_path)!r})); "
        "cpu, gpu = make(num_workers=2), make(num_workers=2, use_gpu=True); "
        "fn = cp.loads(cp.dumps(cpu.train_loop_per_worker)); "
        "print(cpu.backend_config.backend, gpu.backend_config.backend, type(cpu.backend_config).__name__, "
        "fn is train_loop_per_worker, 'torch' in sys.modules); "
        "print(type(make(num_workers=0)._get_local_controller()).__name__)"
    )
    assert fresh_python(code)[-2:] == ["gloo nccl LoopbackTorchConfig True False", "LocalTorchController"]
