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
from orchestrator.sweep.collapse import TAG_STOPPED
from orchestrator.sweep.lineage import OUTCOMES, TAG_SWEEP_STATUS, mark_child, mark_interrupted, trial_outcome
from orchestrator.sweep.plan import trial_epochs, trial_params
from orchestrator.sweep.settings import METRIC, MODE, TIME_ATTR
from search_spaces import SearchSpace


def results(
    exp_path: str,
    base: ExperimentConfig,
    space: SearchSpace,
    children: dict[str, Any],
    metric: str = METRIC,
    mode: str = MODE,
) -> list[dict]:
    """One row per Tune trial (sorted by id): outcome, epochs, the last ``metric`` (and the last
    ``knn_top1`` / ``rankme`` beside it), params, child run, and why it was stopped when it was."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(exp_path, default_metric=metric, default_mode=mode)
    base_dict, rows = base.to_dict(), []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params, _ = trial_params(
            {k: trial.config[k] for k in space.params if k in trial.config}, base_dict, space
        )
        last = trial.last_result or {}
        outcome = trial_outcome(trial.status, last, trial_epochs(trial.config, base.optim.epochs))
        run = children.get(trial.trial_id)
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": outcome,
                "epochs": int(last.get(TIME_ATTR) or 0),
                "metric": _float(last.get(metric)),
                "knn_top1": _float(last.get("knn_top1")),
                "rankme": _float(last.get("rankme")),
                "stop_reason": run.data.tags.get(TAG_STOPPED) if run is not None else None,
                "params": params,
                "mlflow_run_id": run.info.run_id if run is not None else None,
                "checkpoint_path": last.get("checkpoint_path"),
            }
        )
    return rows


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None


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


def best_row(rows: list[dict], mode: str = MODE, key: str = "metric") -> dict | None:
    """Best final ``key`` among trials that ran their whole budget (a stopped trial's early score is not
    comparable), else among all trials with a score."""
    scored = [r for r in rows if r[key] is not None]
    full = [r for r in scored if r["status"] == "completed"]
    pool = full or scored
    if not pool:
        return None
    return (max if mode == "max" else min)(pool, key=lambda r: r[key])


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    if len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else None


def label_free_summary(rows: list[dict]) -> dict[str, float]:
    """How far the label-free RankMe agrees with the k-NN across the completed trials: Spearman's rho of
    their final values, and whether the best trial by RankMe is the best by k-NN (1 / 0)."""
    done = [
        r
        for r in rows
        if r["status"] == "completed" and r["knn_top1"] is not None and r["rankme"] is not None
    ]
    out: dict[str, float] = {}
    rho = spearman([r["rankme"] for r in done], [r["knn_top1"] for r in done])
    if rho is not None:
        out["spearman_rankme_knn"] = rho
    if done:
        by_knn, by_rankme = best_row(done, "max", "knn_top1"), best_row(done, "max", "rankme")
        out["rankme_picks_best_knn"] = float(by_knn is by_rankme)
        out["knn_top1_of_rankme_pick"] = by_rankme["knn_top1"]
        out["knn_top1_of_knn_pick"] = by_knn["knn_top1"]
    return out


def results_csv(rows: list[dict], keys: list[str], metric: str = METRIC) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    extra = [c for c in ("knn_top1", "rankme") if c != metric]
    w.writerow(["trial_id", "status", "epochs", metric, *extra, *keys, "stop_reason", "mlflow_run_id"])
    for r in rows:
        w.writerow(
            [
                r["trial_id"],
                r["status"],
                r["epochs"],
                _cell(r["metric"]),
                *[_cell(r[c]) for c in extra],
                *[r["params"].get(k, "") for k in keys],
                r["stop_reason"] or "",
                r["mlflow_run_id"] or "",
            ]
        )
    return out.getvalue()


def _cell(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _md(v: float | None) -> str:
    """A score for people: 2 decimals (k-NN %, RankMe), 4 below 1 (std_norm, uniformity)."""
    return "-" if v is None else f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"


def results_markdown(rows: list[dict], keys: list[str], metric: str = METRIC, mode: str = MODE) -> str:
    extra = [c for c in ("knn_top1", "rankme") if c != metric and any(r[c] is not None for r in rows)]
    head = ["trial", "status", "epochs", metric, *extra, *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sign = -1 if mode == "max" else 1
    unscored = float("inf")
    for r in sorted(rows, key=lambda r: sign * r["metric"] if r["metric"] is not None else unscored):
        status = r["status"] + (f" ({r['stop_reason']})" if r["stop_reason"] else "")
        scores = [_md(r[c]) for c in ("metric", *extra)]
        vals = [_fmt(r["params"].get(k)) for k in keys]
        lines.append("| " + " | ".join([r["trial_id"], status, str(r["epochs"]), *scores, *vals]) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_STYLES = {
    "completed": ("o", "tab:blue"),
    "stopped_early": ("x", "tab:orange"),
    "failed": ("v", "tab:red"),
    "unfinished": (".", "tab:gray"),
}


def plot_metric_vs_params(rows: list[dict], space: SearchSpace, path: str, metric: str = METRIC) -> None:
    """One panel per searched parameter: the final ``metric`` of each trial (marker = outcome). matplotlib
    comes with MLflow, a declared dependency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space.params)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        _plot_param(ax, rows, key, space.params[key])
        ax.set_ylabel("k-NN top-1 (%)" if metric == "knn_top1" else metric)
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
            (r["params"].get(key), r["metric"])
            for r in rows
            if r["status"] == outcome and r["metric"] is not None and key in r["params"]
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
    ax.grid(alpha=0.3)


def parallel_coordinates_image(rows: list[dict], space: SearchSpace, metric: str = METRIC) -> Any:
    """Every trial that reported ``metric`` as one line across the numeric searched parameters and the
    metric (:func:`orchestrator.pictures.parallel_coordinates`); None when no parameter is numeric or no
    trial reported."""
    from orchestrator.pictures import parallel_coordinates

    keys = [
        k
        for k in space.params
        if all(isinstance(r["params"].get(k), (int, float)) for r in rows if r["metric"] is not None)
    ]
    done = [
        {**{k: r["params"][k] for k in keys}, metric: r["metric"]} for r in rows if r["metric"] is not None
    ]
    if not keys or not done:
        return None
    return parallel_coordinates(
        done, keys, metric, f"sweep over {space.name}: {len(done)} trials, colour = {metric}"
    )


def finish_parent(
    uri: str,
    parent: str,
    rows: list[dict],
    space: SearchSpace,
    interrupted: bool,
    metric: str = METRIC,
    mode: str = MODE,
) -> dict | None:
    """Tables, plot, summary metrics and final status of the sweep's parent run; returns the best row.

    Summary: trials per outcome (``trials_stopped_collapse`` of them stopped as collapsed), ``best_<metric>``,
    and, when the trials logged both, how far RankMe agrees with the k-NN (:func:`label_free_summary`)."""
    keys = list(space.params)
    best = best_row(rows, mode)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "results.csv").write_text(results_csv(rows, keys, metric))
        Path(tmp, "results.md").write_text(results_markdown(rows, keys, metric, mode))
        if any(r["metric"] is not None for r in rows):
            name = "knn_vs_params.png" if metric == "knn_top1" else f"{metric}_vs_params.png"
            plot_metric_vs_params(rows, space, os.path.join(tmp, name), metric)
            coords = parallel_coordinates_image(rows, space, metric)
            if coords is not None:
                coords.save(os.path.join(tmp, "parallel_coordinates.png"))
        tracking.log_artifacts(uri, parent, tmp)
    summary: dict[str, float] = {f"trials_{o}": sum(r["status"] == o for r in rows) for o in OUTCOMES}
    summary["trials_stopped_collapse"] = sum(r["stop_reason"] == "collapse" for r in rows)
    summary["total_trial_epochs"] = sum(r["epochs"] for r in rows)
    summary.update(label_free_summary(rows))
    if best is not None:
        summary[f"best_{metric}"] = best["metric"]
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
        tracking.finish_run(uri, parent, "FAILED", f"no trial reported {metric}")
    return best


def print_summary(out: dict[str, Any], space: SearchSpace) -> None:
    metric = out.get("metric", METRIC)
    print("\n" + results_markdown(out["trials"], list(space.params), metric, out.get("mode", MODE)))
    if out["interrupted"]:
        print(f"sweep {out['name']} interrupted; continue it with `bamray sweep --resume {out['name']}`")
    elif out["best_config"] is not None:
        print(
            f"best {metric} {out['best_metric']:.4g} with {out['best_config']} (trial {out['best_trial_id']})"
        )
    stopped = sum(r.get("stop_reason") == "collapse" for r in out["trials"])
    if stopped:
        print(f"{stopped} trial(s) stopped as collapsed (MLflow tag stopped=collapse)")
    print(
        f"MLflow parent run {out['parent_run_id']} ({out['tracking_uri']}); Tune results in {out['experiment_path']}"
    )
