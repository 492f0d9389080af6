"""The sweep's results: one row per trial, the best trial, the tables and the plot on the parent run, and
the children's statuses reconciled with what Tune recorded (a killed trial could not write its own)."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.config import ExperimentConfig
from orchestrator.sweep.lineage import OUTCOMES, TAG_SWEEP_STATUS, mark_child, mark_interrupted, trial_outcome
from orchestrator.sweep.plan import trial_epochs, trial_params
from orchestrator.sweep.settings import METRIC, MODE, TIME_ATTR
from search_spaces import SearchSpace


def results(
    exp_path: str, base: ExperimentConfig, space: SearchSpace, children: dict[str, Any]
) -> list[dict]:
    """One row per Tune trial (sorted by id): outcome, epochs, last ``knn_top1``, params, child run."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(exp_path, default_metric=METRIC, default_mode=MODE)
    base_dict, rows = base.to_dict(), []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params, _ = trial_params(
            {k: trial.config[k] for k in space.params if k in trial.config}, base_dict, space
        )
        last = trial.last_result or {}
        outcome = trial_outcome(trial.status, last, trial_epochs(trial.config, base.optim.epochs))
        run = children.get(trial.trial_id)
        knn = last.get(METRIC)
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": outcome,
                "epochs": int(last.get(TIME_ATTR) or 0),
                "knn_top1": float(knn) if knn is not None else None,
                "params": params,
                "mlflow_run_id": run.info.run_id if run is not None else None,
                "checkpoint_path": last.get("checkpoint_path"),
            }
        )
    return rows


def reconcile_children(uri: str, rows: list[dict], children: dict[str, Any]) -> None:
    """Statuses the lineage callback could not write (actor killed, store busy, restored trials)."""
    for r in rows:
        run = children.get(r["trial_id"])
        if run is None:
            continue
        if (
            r["status"] == "completed"
            and r["checkpoint_path"]
            and not _has_artifact(uri, run.info.run_id, "final")
        ):
            # ASHA may stop a trial on its LAST report when a rung falls on the final epoch: it trained its
            # whole budget but its driver was torn down before logging the exported backbone.
            _log_final_artifacts(uri, run.info.run_id, r["checkpoint_path"])
        if r["status"] != "unfinished":
            mark_child(uri, tracking.client(uri).get_run(run.info.run_id), r["status"])
        else:
            mark_interrupted(uri, run)


def _has_artifact(uri: str, run_id: str, path: str) -> bool:
    listed = tracking.with_retry(tracking.client(uri).list_artifacts, run_id)
    return any(a.path == path for a in listed)


def _log_final_artifacts(uri: str, run_id: str, checkpoint_path: str) -> None:
    from ray.train import Checkpoint

    try:
        tracking.log_checkpoint_artifacts(uri, run_id, Checkpoint(checkpoint_path), "final")
    except Exception as err:  # noqa: BLE001 - a missing export must not fail the sweep's summary
        print(f"bamray sweep: could not log the final backbone of run {run_id}: {err}", flush=True)


def best_row(rows: list[dict]) -> dict | None:
    """Best final k-NN among trials that ran their whole budget (a stopped trial's early score is not
    comparable), else among all trials with a score."""
    scored = [r for r in rows if r["knn_top1"] is not None]
    full = [r for r in scored if r["status"] == "completed"]
    pool = full or scored
    return max(pool, key=lambda r: r["knn_top1"]) if pool else None


def results_csv(rows: list[dict], keys: list[str]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["trial_id", "status", "epochs", "knn_top1", *keys, "mlflow_run_id"])
    for r in rows:
        w.writerow(
            [
                r["trial_id"],
                r["status"],
                r["epochs"],
                "" if r["knn_top1"] is None else f"{r['knn_top1']:.4f}",
                *[r["params"].get(k, "") for k in keys],
                r["mlflow_run_id"] or "",
            ]
        )
    return out.getvalue()


def results_markdown(rows: list[dict], keys: list[str]) -> str:
    head = ["trial", "status", "epochs", "knn_top1 (%)", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -(r["knn_top1"] if r["knn_top1"] is not None else -1)):
        knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.2f}"
        vals = [_fmt(r["params"].get(k)) for k in keys]
        lines.append("| " + " | ".join([r["trial_id"], r["status"], str(r["epochs"]), knn, *vals]) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_STYLES = {
    "completed": ("o", "tab:blue"),
    "stopped_early": ("x", "tab:orange"),
    "failed": ("v", "tab:red"),
    "unfinished": (".", "tab:gray"),
}


def plot_knn_vs_params(rows: list[dict], space: SearchSpace, path: str) -> None:
    """One panel per searched parameter: final k-NN top-1 of each trial (marker = outcome). matplotlib
    comes with MLflow, a declared dependency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space.params)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _plot_param(ax, rows, key, space.params[key])
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sweep over {space.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_param(ax: Any, rows: list[dict], key: str, p: Any) -> None:
    categorical = p.type in ("choice", "grid") and not all(isinstance(v, (int, float)) for v in p.values)
    labels = [str(v) for v in p.values] if categorical else []
    for outcome, (marker, color) in _STYLES.items():
        pts = [
            (r["params"].get(key), r["knn_top1"])
            for r in rows
            if r["status"] == outcome and r["knn_top1"] is not None and key in r["params"]
        ]
        if not pts:
            continue
        xs = [labels.index(str(x)) if categorical else x for x, _ in pts]
        ax.scatter(xs, [y for _, y in pts], marker=marker, color=color, label=outcome)
    if categorical:
        ax.set_xticks(range(len(labels)), labels)
    elif p.type in ("choice", "grid"):
        ax.set_xticks(sorted(p.values))
    elif p.type == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("k-NN top-1 (%)")
    ax.grid(alpha=0.3)


def finish_parent(
    uri: str, parent: str, rows: list[dict], space: SearchSpace, interrupted: bool
) -> dict | None:
    """Tables, plot, summary metrics and final status of the sweep's parent run; returns the best row."""
    keys = list(space.params)
    best = best_row(rows)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "results.csv").write_text(results_csv(rows, keys))
        Path(tmp, "results.md").write_text(results_markdown(rows, keys))
        if any(r["knn_top1"] is not None for r in rows):
            plot_knn_vs_params(rows, space, os.path.join(tmp, "knn_vs_params.png"))
        tracking.log_artifacts(uri, parent, tmp)
    summary: dict[str, float] = {f"trials_{o}": sum(r["status"] == o for r in rows) for o in OUTCOMES}
    summary["total_trial_epochs"] = sum(r["epochs"] for r in rows)
    if best is not None:
        summary["best_knn_top1"] = best["knn_top1"]
    tracking.log_metrics(uri, parent, summary, step=0)
    if interrupted:
        tracking.log_tags(uri, parent, {TAG_SWEEP_STATUS: "interrupted"})
        tracking.finish_run(uri, parent, "KILLED")
        return best
    if best is not None:
        tracking.log_params(uri, parent, {f"best.{k}": v for k, v in best["params"].items()})
        tracking.log_tags(
            uri,
            parent,
            {
                "best_trial_id": best["trial_id"],
                "best_run_id": best["mlflow_run_id"] or "",
                TAG_SWEEP_STATUS: "finished",
            },
        )
        tracking.finish_run(uri, parent, "FINISHED")
    else:
        tracking.finish_run(uri, parent, "FAILED", "no trial reported knn_top1")
    return best


def print_summary(out: dict[str, Any], space: SearchSpace) -> None:
    print("\n" + results_markdown(out["trials"], list(space.params)))
    if out["interrupted"]:
        print(f"sweep {out['name']} interrupted; continue it with `bamray sweep --resume {out['name']}`")
    elif out["best_config"] is not None:
        print(
            f"best knn_top1 {out['best_metric']:.2f} % with {out['best_config']} (trial {out['best_trial_id']})"
        )
    print(
        f"MLflow parent run {out['parent_run_id']} ({out['tracking_uri']}); Tune results in {out['experiment_path']}"
    )
