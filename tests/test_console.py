"""The console of a bamray command (orchestrator/console.py), rank 0's progress updates and the end-of-run
summary: what reaches the user, what only the log file gets. Fast: no Ray (the Ray path is checked by
``test_resume_after_killed_driver_continues_the_same_run`` in test_train_ray.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from orchestrator import console
from orchestrator.console import LINE_MARK, PROGRESS_MARK, Console, progress_line, progress_text
from orchestrator.training import console as worker_console
from orchestrator.training.summary import summary_lines, wall_split, what_line

#: a batch of forwarded lines as Ray's log thread hands it over (one process), from a real `make run`
RAY_BATCH = {
    "pid": 2375,
    "actor_name": "TrainController",
    "is_err": False,
    "lines": [
        "Requesting resources: {'CPU': 1.0} * 2",
        "Started training worker group of size 2: ",
        "- (ip=127.0.0.1, pid=2485) world_rank=0, local_rank=0, node_rank=0",
        "[2026-12-01 17:00:46,829 E 2375 2409] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: 'a58a' has constructor arguments in the object store and max_restarts > 0. If the arguments",
        "TrainingReport(checkpoint=None, metrics={'epoch': 1, 'loss': 4.2}, validation_spec=None)",
    ],
}


def _console(**kw) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(out, **kw), out


def test_ray_chatter_goes_to_the_log_file_only(tmp_path):
    c, out = _console(tty=False)
    log = c.open_log(tmp_path / "logs" / "train.log")
    c.ray_lines(RAY_BATCH)
    c.ray_lines(
        {"pid": "raylet", "lines": ["WARNING: 8 PYTHON worker processes have been started on node: x"]}
    )
    c.ray_lines(
        {
            "pid": 2586,
            "actor_name": "DatasetManager",
            "lines": [
                "/x/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is "
                "deprecated",
                "  self.exclude_resources = exclude_resources",
            ],
        }
    )
    assert out.getvalue() == ""
    c.close_log()
    text = log.read_text()
    assert "(TrainController pid=2375) TrainingReport(" in text and "PYTHON worker processes" in text
    assert c.hidden == 8


def test_our_lines_show_once_without_rays_prefix_and_problems_always_show():
    c, out = _console(tty=False)
    c.ray_lines(
        {
            "pid": 2485,
            "actor_name": "RayTrainWorker",
            "lines": [
                "\x1b[36mMoving model to device: cpu\x1b[0m",
                LINE_MARK + "epoch 1/2: 468 steps in 190.0 s, loss 4.1",
                "WARNING: the disk is 95 % full",
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "ValueError: boom",
            ],
        }
    )
    lines = out.getvalue().splitlines()
    assert lines[0] == "epoch 1/2: 468 steps in 190.0 s, loss 4.1"
    assert lines[1:] == [
        "(RayTrainWorker pid=2485) WARNING: the disk is 95 % full",
        "(RayTrainWorker pid=2485) Traceback (most recent call last):",
        '(RayTrainWorker pid=2485)   File "x.py", line 1, in <module>',
        "(RayTrainWorker pid=2485) ValueError: boom",
    ]


def test_verbose_shows_everything():
    c, out = _console(tty=False, verbose=True)
    c.ray_lines(RAY_BATCH)
    assert out.getvalue().count("\n") == len(RAY_BATCH["lines"])
    assert "TrainingReport(" in out.getvalue()


PAYLOAD = {"epoch": 1, "epochs": 2, "step": 120, "steps": 468, "images_per_sec": 310.4, "loss": 4.12345,
           "eta_s": 65.0, "run_eta_s": 280.0}  # fmt: skip


def test_progress_text_and_bar():
    assert progress_text(PAYLOAD) == "epoch 1/2 120/468 steps, 310 img/s, loss 4.1235, ETA 1:05 (run 4:40)"
    barred = progress_text(PAYLOAD, bar_width=10)
    assert "[###-------] 120/468" in barred  # 120/468 of 10 = 2.6 -> 3
    last = dict(PAYLOAD, epoch=2, eta_s=3725.0, run_eta_s=3725.0)
    assert progress_text(last).endswith("ETA 1:02:05")  # no run ETA on the last epoch


def test_plain_progress_lines_at_most_once_per_interval(monkeypatch):
    clock = iter([100.0, 101.0, 131.0, 132.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    c, out = _console(tty=False, plain_interval=30.0)
    for step in (10, 20, 30):
        c.forwarded(progress_line(dict(PAYLOAD, step=step)))
    assert out.getvalue().splitlines() == [
        "  " + progress_text(dict(PAYLOAD, step=10)),
        "  " + progress_text(dict(PAYLOAD, step=30)),
    ]
    c.forwarded(LINE_MARK + "epoch 1/2: done")  # the epoch's end: the next update shows at once
    c.forwarded(progress_line(dict(PAYLOAD, epoch=2, step=5)))
    assert out.getvalue().splitlines()[-2:] == [
        "epoch 1/2: done",
        "  " + progress_text(dict(PAYLOAD, epoch=2, step=5)),
    ]


def test_terminal_bar_is_redrawn_under_other_lines():
    c, out = _console(tty=True)
    c.forwarded(progress_line(PAYLOAD))
    bar = progress_text(PAYLOAD, bar_width=24)
    assert out.getvalue() == "\r\x1b[K" + bar
    c.say("a line")
    assert out.getvalue().endswith("\r\x1b[Ka line\n" + bar)  # the bar stays the last line
    c.forwarded(LINE_MARK + "epoch 1/2: done")
    assert out.getvalue().endswith("\r\x1b[Kepoch 1/2: done\n")  # the epoch's end removes it


def test_malformed_progress_is_ignored():
    c, out = _console(tty=False, plain_interval=0.001)
    c.forwarded(PROGRESS_MARK + "{not json")
    c.forwarded(PROGRESS_MARK + json.dumps({"epoch": 1}))
    assert out.getvalue() == ""


def test_worker_progress_emitter_skips_the_first_step_and_respects_the_interval(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(worker_console.time, "monotonic", lambda: now[0])
    lines = []
    monkeypatch.setattr(worker_console, "to_driver", lines.append)
    emitter = worker_console.ProgressEmitter(10.0, epochs=2, steps=100, global_batch=128)
    for step in range(1, 101):
        now[0] = 5.0 + step * 0.5  # step 1 ends at 5.5 s (the first batch's wait); 0.5 s a step after it
        emitter.step(0, step, {"loss": 3.0})
    payloads = [json.loads(line[len(PROGRESS_MARK) :]) for line in lines]
    # the first update once 10 s have passed since the emitter started: step 10 ends at 10.0 s
    assert [p["step"] for p in payloads] == [10, 30, 50, 70, 90]
    first = payloads[0]
    assert first["images_per_sec"] == pytest.approx(256.0)  # 128 images per 0.5 s
    assert first["eta_s"] == pytest.approx(45.0) and first["run_eta_s"] == pytest.approx(95.0)
    silent = worker_console.ProgressEmitter(0.0, epochs=1, steps=10, global_batch=1)
    assert not any(silent.step(0, s, {"loss": 1.0}) for s in range(1, 11))


def test_wall_split_adds_up_and_counts_the_first_step_once():
    worker = {"first_step_unix": 1030.0, "first_step_s": 5.0, "train_time_s": 405.0, "eval_time_s": 20.0}
    split = wall_split(500.0, worker, launched_unix=1000.0, linear_s=10.0)
    assert split == {"start-up": 30.0, "training": 400.0, "evaluation": 30.0, "other": 40.0, "total": 500.0}
    assert sum(split[k] for k in ("start-up", "training", "evaluation", "other")) == split["total"]


def test_summary_table():
    lines = summary_lines(
        run_id="abc",
        status="FINISHED",
        reason=None,
        what="bam on fashion-mnist, resnet18, 2 epochs, 2 workers x batch 64",
        history={"epoch_loss": {1: 4.5, 2: 4.25}, "knn_top1": {1: 80.23, 2: 80.76}},
        pixels_top1=79.76,
        linear_top1=84.5,
        split={"start-up": 30.0, "training": 384.0, "evaluation": 40.0, "other": 6.0, "total": 460.0},
        ui="bamray ui",
        run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc",
        checkpoints="/c",
        log_path="/l.log",
    )
    assert lines[0] == "Run abc: FINISHED"
    assert lines[3].split() == ["1", "4.5000", "80.23", "%", "79.76", "%", "+0.47"]
    assert lines[4].split()[-1] == "+1.00"
    assert "  linear probe top-1 84.50 %" in lines
    assert "  wall time 7.7 min: 30 s start-up, 6.4 min training, 40 s evaluation, 6 s other" in lines
    assert not any("--resume" in line for line in lines)
    failed = summary_lines(
        run_id="abc", status="FAILED", reason="boom", what="", history={}, pixels_top1=None, linear_top1=None,
        split=None, ui="bamray ui", run_url="u", checkpoints=None, log_path=None,
    )  # fmt: skip
    assert failed[0] == "Run abc: FAILED (boom)" and failed[-1].endswith("bamray train --resume abc`")


def test_what_line_counts_in_words():
    from orchestrator.config import load_config

    cfg = load_config("bam_fmnist", ["data.dataset=fashion-mnist", "train.workers=1", "optim.batch_size=32"])
    assert what_line(cfg, epochs=1).endswith(", 1 epoch, 1 worker x batch 32")
    assert what_line(cfg, epochs=3).endswith(", 3 epochs, 1 worker x batch 32")
    two = load_config("bam_fmnist", ["train.workers=2", "optim.epochs=2"])
    assert what_line(two).endswith(", 2 epochs, 2 workers x batch 64"), what_line(two)


def test_log_path_sits_beside_the_sqlite_store(tmp_path):
    path = console.default_log_path("train", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    assert path.parent == tmp_path / "store" / "logs" and path.name.startswith("train-")


def test_a_fresh_mlflow_store_keeps_its_set_up_lines_off_the_console(tmp_path):
    """A first run on a fresh SQLite store: MLflow's "Creating initial MLflow database tables..." INFO lines
    are not the user's business (a warning still would be)."""
    code = (
        "from orchestrator import tracking; "
        f"tracking.ensure_experiment('sqlite:///{tmp_path}/mlflow.db', 'fresh'); print('made')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "made" in proc.stdout and (tmp_path / "mlflow.db").exists()
    assert "database tables" not in proc.stdout + proc.stderr, proc.stderr


def test_prints_to_log_keeps_other_prints_off_the_console_and_ours_on_it(tmp_path, capsys):
    """Ray Tune prints its configuration box at every sweep's start whatever its verbosity: inside
    ``prints_to_log`` such prints reach the log file only, the console's own lines still reach the user,
    and ``--verbose`` changes nothing."""
    c = Console(verbose=False, tty=False)
    c.open_log(tmp_path / "run.log")
    with c.prints_to_log():
        print("+----------------------------------+\n| Configuration for experiment ... |")
        print("To visualize your results with TensorBoard, run: ...", end="")
        c.say("trial 00000: started")
    c.say("after")
    c.close_log()
    out = capsys.readouterr().out
    assert out == "trial 00000: started\nafter\n"
    log = (tmp_path / "run.log").read_text()
    assert "Configuration for experiment" in log and "TensorBoard" in log and "trial 00000: started" in log
    loud = Console(verbose=True, tty=False)
    with loud.prints_to_log():
        print("Configuration for experiment")
    assert "Configuration for experiment" in capsys.readouterr().out
