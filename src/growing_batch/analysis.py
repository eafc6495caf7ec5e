"""Reading runs back from a tracking store: tidy tables and summaries. No TensorFlow.

    python -m growing_batch.analysis --experiment_name quick-fashion-mnist
    python -m growing_batch.analysis --parent_run_id <a sweep's parent run>

prints one line per run (final and best test accuracy, updates, wall-clock seconds), the summary per
schedule over seeds, and the command that opens the MLflow UI on the same store.

Two tables describe a set of runs:

* ``runs``: one row per run — ``run_id``, ``run_name``, ``status`` (see ``run_status``), ``member`` (the sweep member: a
  preset or schedule name; outside a sweep the run's preset, else its schedule), ``schedule``, ``seed``,
  ``start_time`` and every ``resolved.*`` param (without the prefix, e.g. ``batch_size``) under
  ``param_<name>``;
* ``history``: one row per run and epoch — ``run_id``, ``member``, ``seed``, ``epoch`` and every
  per-epoch metric, plus ``wall_seconds`` (from the run's start to the metric's timestamp).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from growing_batch.metrics import EPOCH_METRICS, NOISE_METRICS

# Schedules that decay the learning rate at a fixed batch: the baseline of the summary's ratios.
BASELINE_SCHEDULES = ("lr-decay", "step-lr")

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the notebook reads when neither its parameters nor MLflow's environment variables say.
DEFAULT_EXPERIMENT_NAME = "quick-fashion-mnist"  # the main job's (make main)


def run_status(status: str, tags: dict) -> str:
    """The status the tables show: KILLED for a FAILED run tagged ``interrupted`` — a run stopped by a
    signal under ``mlflow run``, whose KILLED status could not be written back after ``mlflow run``
    marked it FAILED — else the store's status."""
    return "KILLED" if status == "FAILED" and "interrupted" in tags else status


def absolute_tracking_uri(uri: str, base: str | None = None) -> str:
    """A relative sqlite path or store folder made absolute from ``base`` (default: the working
    directory): ``sqlite:///mlflow.db`` -> ``sqlite:////abs/path/mlflow.db``. Other URIs as they are."""
    base = base or os.getcwd()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + os.path.normpath(os.path.join(base, uri[len(prefix):]))
    if "://" not in uri and not uri.startswith("file:"):  # a plain folder of a file store
        return os.path.normpath(os.path.join(base, uri))
    return uri


@dataclass(frozen=True)
class Source:
    """Which runs to read: a tracking store and an experiment, or a sweep's parent run in it."""

    tracking_uri: str
    experiment_name: str
    parent_run_id: str

    def describe(self, runs: pd.DataFrame | None = None, history: pd.DataFrame | None = None) -> str:
        """E.g. ``Read experiment 'quick' from sqlite:////x/mlflow.db: 4 runs, 40 run-epochs.``"""
        if self.parent_run_id:
            what = f"the children of sweep run {self.parent_run_id} in experiment {self.experiment_name!r}"
        else:
            what = f"experiment {self.experiment_name!r}"
        counts = "" if runs is None else f": {len(runs)} runs, {0 if history is None else len(history)} run-epochs"
        return f"Read {what} from {self.tracking_uri}{counts}."


def notebook_source(tracking_uri: str = "", experiment_name: str = "", parent_run_id: str = "",
                    environ=None, project_dir: str = PROJECT_DIR) -> Source:
    """What the analysis notebook reads. Its parameters, when set (injected as papermill does, or
    edited), win; else MLflow's own ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME``; else the
    project's ``mlflow.db`` and the main job's experiment. A relative store path is taken from the
    project folder (the notebook's kernel runs in ``notebooks/``). A parent run wins over an
    experiment, and the experiment named is then the parent's."""
    environ = os.environ if environ is None else environ
    uri = tracking_uri or environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    uri = absolute_tracking_uri(uri, project_dir)
    if parent_run_id:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment(client.get_run(parent_run_id).info.experiment_id)
        return Source(uri, experiment.name, parent_run_id)
    return Source(uri, experiment_name or environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT_NAME, "")


def _runs_of(client: MlflowClient, experiment_name: str | None, parent_run_id: str | None):
    if parent_run_id:
        parent = client.get_run(parent_run_id)
        return client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
        )
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"experiment_name={experiment_name!r}: no such experiment in {client.tracking_uri}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [run for run in runs if run.data.tags.get("sweep_role") != "parent"]


def load_runs(
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    latest_only: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``runs`` and ``history`` tables of an experiment, or of a sweep's children.

    With ``latest_only``, a sweep child that a rerun superseded (tag ``sweep_superseded``) is left out.
    """
    if not experiment_name and not parent_run_id:
        raise ValueError("give experiment_name or parent_run_id")
    client = MlflowClient(tracking_uri=tracking_uri)
    run_rows, history_rows = [], []
    for run in _runs_of(client, experiment_name, parent_run_id):
        tags, params = run.data.tags, run.data.params
        if latest_only and tags.get("sweep_superseded") == "true":
            continue
        member = tags.get("sweep_member") or params.get("resolved.preset") or tags.get("schedule", "")
        seed = int(params.get("resolved.seed", tags.get("sweep_seed", 0)) or 0)
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run_status(run.info.status, tags),
            "member": member,
            "schedule": tags.get("schedule", ""),
            "seed": seed,
            "start_time": run.info.start_time,
            "diverged_epoch": int(tags["diverged_epoch"]) if tags.get("diverged") == "true" else None,
        }
        row.update({f"param_{key[len('resolved.'):]}": value for key, value in params.items() if key.startswith("resolved.")})
        run_rows.append(row)
        by_epoch: dict[int, dict] = {}
        for name in (*EPOCH_METRICS, *NOISE_METRICS):
            for metric in client.get_metric_history(run.info.run_id, name):
                entry = by_epoch.setdefault(metric.step, {"wall_seconds": 0.0})
                entry[name] = metric.value
                entry["wall_seconds"] = max(entry["wall_seconds"], (metric.timestamp - run.info.start_time) / 1000)
        for epoch in sorted(by_epoch):
            history_rows.append({"run_id": run.info.run_id, "member": member, "seed": seed, "epoch": epoch, **by_epoch[epoch]})
    runs = pd.DataFrame(run_rows, columns=None if run_rows else ["run_id", "run_name", "status", "member", "schedule", "seed",
                                                                  "start_time", "diverged_epoch"])
    history = pd.DataFrame(history_rows, columns=None if history_rows else ["run_id", "member", "seed", "epoch", "wall_seconds"])
    return runs, history


def test_accuracy_at_best_val(own: pd.DataFrame) -> float:
    """The test accuracy at the epoch of the best validation accuracy (the first such epoch): model
    selection on the validation split. NaN without a validation split."""
    if "val_accuracy" not in own or "test_accuracy" not in own:
        return math.nan
    scored = own.dropna(subset=["val_accuracy", "test_accuracy"])
    if scored.empty:
        return math.nan
    return float(scored.loc[scored["val_accuracy"].idxmax(), "test_accuracy"])


def run_summary(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per run: final test accuracy, test accuracy at the best validation epoch, best test
    accuracy (optimistic: the epoch is picked on the test set), updates and wall-clock seconds."""
    rows = []
    for run in runs.itertuples():
        own = history[history["run_id"] == run.run_id].sort_values("epoch").reset_index(drop=True)
        accuracy = own["test_accuracy"].dropna() if "test_accuracy" in own else pd.Series(dtype=float)
        rows.append(
            {
                "run_id": run.run_id,
                "run_name": run.run_name,
                "status": run.status,
                "diverged_epoch": getattr(run, "diverged_epoch", None),
                "member": run.member,
                "seed": run.seed,
                "epochs": int(own["epoch"].max()) if len(own) else 0,
                "final_test_accuracy": float(accuracy.iloc[-1]) if len(accuracy) else math.nan,
                "test_accuracy_at_best_val": test_accuracy_at_best_val(own),
                "best_test_accuracy": float(accuracy.max()) if len(accuracy) else math.nan,
                "updates": int(own["updates"].iloc[-1]) if "updates" in own and len(own) else 0,
                "wall_seconds": float(own["wall_seconds"].iloc[-1]) if len(own) else math.nan,
                "train_seconds": float(own["epoch_seconds"].sum()) if "epoch_seconds" in own else math.nan,
            }
        )
    return pd.DataFrame(rows)


def schedule_summary(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per member (schedule or preset), over its FINISHED runs (seeds).

    Columns: ``seeds`` (finished runs), ``diverged`` (runs that diverged), the final test accuracy,
    the test accuracy at the best validation epoch and the best test accuracy (optimistic: picked on
    the test set) as ``*_mean`` and ``*_std`` (sample standard deviation; 0 for one seed), mean
    ``updates`` and ``wall_seconds``, and their ratios to the
    LR-decay baseline (the first member whose schedule is lr-decay or step-lr), ``updates_ratio`` and
    ``time_ratio``; NaN where there is no baseline.
    """
    per_run = run_summary(runs[runs["status"] == "FINISHED"], history) if len(runs) else run_summary(runs, history)
    accuracies = ("final_test_accuracy", "test_accuracy_at_best_val", "best_test_accuracy")
    columns = ["member", "schedule", "seeds", "diverged",
               *[f"{name}_{statistic}" for name in accuracies for statistic in ("mean", "std")],
               "updates", "wall_seconds", "updates_ratio", "time_ratio"]
    if per_run.empty:
        return pd.DataFrame(columns=columns)
    schedules = dict(zip(runs["member"], runs["schedule"]))
    diverged = (runs[runs["diverged_epoch"].notna()]["member"].value_counts().to_dict()
                if "diverged_epoch" in runs else {})
    rows = []
    for member, group in per_run.groupby("member", sort=False):
        row = {"member": member, "schedule": schedules.get(member, ""), "seeds": len(group),
               "diverged": int(diverged.get(member, 0))}
        for name in accuracies:
            row[f"{name}_mean"] = group[name].mean()
            row[f"{name}_std"] = group[name].std(ddof=1) if len(group) > 1 else 0.0
        row.update(updates=group["updates"].mean(), wall_seconds=group["wall_seconds"].mean())
        rows.append(row)
    table = pd.DataFrame(rows)
    baseline = table[table["schedule"].isin(BASELINE_SCHEDULES)]
    if len(baseline):
        table["updates_ratio"] = table["updates"] / baseline["updates"].iloc[0]
        table["time_ratio"] = table["wall_seconds"] / baseline["wall_seconds"].iloc[0]
    else:
        table["updates_ratio"] = np.nan
        table["time_ratio"] = np.nan
    return table[columns]


def format_run_table(per_run: pd.DataFrame) -> str:
    header = (f"{'run':<46} {'status':<9} {'epochs':>6} {'final acc':>9} {'@best val':>9} {'best acc*':>9} "
              f"{'updates':>8} {'train s':>8} {'wall s':>8}  run id")
    lines = [header, "-" * len(header)]
    for row in per_run.itertuples():
        lines.append(
            f"{str(row.run_name)[:46]:<46} {row.status:<9} {row.epochs:>6} {row.final_test_accuracy:>9.4f} "
            f"{row.test_accuracy_at_best_val:>9.4f} {row.best_test_accuracy:>9.4f} {row.updates:>8,} "
            f"{row.train_seconds:>8.1f} {row.wall_seconds:>8.1f}  {row.run_id}"
        )
    lines.append(OPTIMISTIC_NOTE)
    return "\n".join(lines)


OPTIMISTIC_NOTE = ("@best val: test accuracy at the epoch of the best validation accuracy; "
                   "* best test accuracy is optimistic (its epoch is picked on the test set)")


def format_schedule_table(summary: pd.DataFrame) -> str:
    header = (f"{'schedule / preset':<24} {'seeds':>5} {'diverged':>8} {'final test acc':>16} "
              f"{'test acc @best val':>18} {'best test acc*':>16} {'updates':>9} {'wall s':>8} {'updates/base':>12} "
              f"{'time/base':>9}")
    lines = [header, "-" * len(header)]
    for row in summary.itertuples():
        lines.append(
            f"{row.member[:24]:<24} {row.seeds:>5} {row.diverged:>8} "
            f"{row.final_test_accuracy_mean:>8.4f} ± {row.final_test_accuracy_std:<5.4f} "
            f"{row.test_accuracy_at_best_val_mean:>10.4f} ± {row.test_accuracy_at_best_val_std:<5.4f} "
            f"{row.best_test_accuracy_mean:>8.4f} ± {row.best_test_accuracy_std:<5.4f} "
            f"{row.updates:>9,.0f} {row.wall_seconds:>8.1f} {row.updates_ratio:>12.3f} {row.time_ratio:>9.3f}"
        )
    lines.append(OPTIMISTIC_NOTE)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m growing_batch.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment_name", default=None)
    parser.add_argument("--parent_run_id", default=None)
    parser.add_argument("--tracking_uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    arguments = parser.parse_args(argv)
    try:
        runs, history = load_runs(arguments.experiment_name, arguments.parent_run_id, arguments.tracking_uri)
    except (ValueError, mlflow.exceptions.MlflowException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    uri = arguments.tracking_uri or mlflow.get_tracking_uri()
    print(f"{arguments.experiment_name or 'sweep ' + arguments.parent_run_id} in {uri}:")
    print(format_run_table(run_summary(runs, history)))
    print()
    print(format_schedule_table(schedule_summary(runs, history)))
    print(f"\nOpen the MLflow UI on these runs:  mlflow ui --backend-store-uri {uri}")
    print("then http://127.0.0.1:5000: the experiment, its 'Model training' (Training runs) view; Chart view with "
          "x-axis 'updates'; or select runs, Compare, 'Show diff only'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
