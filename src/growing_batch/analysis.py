"""Reading runs back from a tracking store. No TensorFlow.

    python -m growing_batch.analysis --experiment_name quick-fashion-mnist

prints one line per run of the experiment (final and best test accuracy, parameter updates,
training seconds) and the command that opens the MLflow UI on the same store.
"""

from __future__ import annotations

import argparse
import math
import sys

import mlflow
from mlflow.tracking import MlflowClient


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of one metric, ordered by step."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def summarize_run(client: MlflowClient, run) -> dict:
    run_id = run.info.run_id
    accuracy = metric_history(client, run_id, "test_accuracy")
    seconds = metric_history(client, run_id, "epoch_seconds")
    updates = metric_history(client, run_id, "updates")
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "schedule": run.data.tags.get("schedule", ""),
        "epochs": len(accuracy),
        "final_test_accuracy": accuracy[-1][1] if accuracy else math.nan,
        "best_test_accuracy": max(value for _, value in accuracy) if accuracy else math.nan,
        "updates": int(updates[-1][1]) if updates else 0,
        "train_seconds": sum(value for _, value in seconds),
    }


def summarize_experiment(experiment_name: str, tracking_uri: str | None = None) -> list[dict]:
    """One summary per run of the experiment, oldest first."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"experiment_name={experiment_name!r}: no such experiment in {client.tracking_uri}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [summarize_run(client, run) for run in runs]


def format_table(rows: list[dict]) -> str:
    header = f"{'run':<34} {'status':<9} {'epochs':>6} {'final acc':>9} {'best acc':>9} {'updates':>8} {'train s':>8}  run id"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['run_name'][:34]:<34} {row['status']:<9} {row['epochs']:>6} "
            f"{row['final_test_accuracy']:>9.4f} {row['best_test_accuracy']:>9.4f} "
            f"{row['updates']:>8,} {row['train_seconds']:>8.1f}  {row['run_id']}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m growing_batch.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment_name", required=True)
    parser.add_argument("--tracking_uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    arguments = parser.parse_args(argv)
    try:
        rows = summarize_experiment(arguments.experiment_name, arguments.tracking_uri)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    uri = arguments.tracking_uri or mlflow.get_tracking_uri()
    print(f"Experiment {arguments.experiment_name!r} in {uri}:")
    print(format_table(rows))
    print(f"\nOpen the MLflow UI on these runs:  mlflow ui --backend-store-uri {uri}")
    print("then http://127.0.0.1:5000 -> the experiment -> select runs -> Compare, or a chart with x-axis 'updates'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
