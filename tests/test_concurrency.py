"""Concurrent runs against one sqlite store: every run finishes and every metric point is stored.

Four short training processes at once, two of them `python -m growing_batch.train` and two
`mlflow run . --env-manager local`, log to one sqlite store (system metrics every 0.5 s); and four
started at once against a store that does not exist yet build it once between them.
"""

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

import processes
from growing_batch.metrics import EPOCH_METRICS
from processes import mlflow_run_command, train_command

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a failed write to the store looks like: the lock, MLflow's async-queue failure, sqlite's error.
STORE_FAILURES = ("database is locked", "Failed to log run data", "OperationalError")


def environment(uri: str) -> dict:
    return processes.environment(uri, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5")


def run_all_at_once(commands: list[list[str]], tmp_path, env: dict) -> list[tuple[int, str]]:
    """Start every command before waiting for any; (return code, stdout + stderr) of each."""
    processes = []
    for index, command in enumerate(commands):
        log = open(tmp_path / f"process{index}.log", "w+")  # a file, not a pipe: no process blocks on output
        processes.append((subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for process, log in processes:
        try:
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
        log.seek(0)
        results.append((process.returncode, log.read()))
        log.close()
    return results


def assert_every_point_stored(uri: str, experiment_ids: list[str], expected_runs: int, epochs: int) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs(experiment_ids)
    assert len(runs) == expected_runs, [run.info.run_id for run in runs]
    assert [run.info.status for run in runs] == ["FINISHED"] * expected_runs
    wrong = {}
    for run in runs:
        for name in EPOCH_METRICS:
            steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, name))
            if steps != list(range(1, epochs + 1)):
                wrong[(run.info.run_id, name)] = steps
    assert wrong == {}, f"metric points missing or repeated (run, metric): steps: {wrong}"


def assert_no_store_failure(results: list[tuple[int, str]]) -> None:
    for index, (returncode, output) in enumerate(results):
        assert returncode == 0, f"process {index} exited {returncode}:\n{output[-3000:]}"
        failures = [line for line in output.splitlines() if any(text in line for text in STORE_FAILURES)]
        assert failures == [], f"process {index}: {failures[:5]}"


@pytest.mark.e2e
def test_four_runs_at_once_in_one_store_finish_with_every_point(tmp_path, fashion_dir):
    epochs = 2
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = "concurrent"
    # As the sweep does before its fan-out (and `mlflow run` needs the experiment): the store exists.
    experiment_id = MlflowClient(uri).create_experiment(experiment, artifact_location=str(tmp_path / "artifacts"))
    # `mlflow run` runs in the project's folder: the checkpoints go to tmp_path
    values = {"data_dir": fashion_dir, "validation_size": 40, "epochs": epochs, "batch_size": 16,
              "checkpoint_dir": str(tmp_path / "checkpoints")}
    env = dict(environment(uri), MLFLOW_EXPERIMENT_NAME=experiment)
    commands = [train_command({**values, "seed": seed}) for seed in (0, 1)]
    commands += [mlflow_run_command({**values, "seed": seed}, experiment=experiment) for seed in (2, 3)]

    results = run_all_at_once(commands, tmp_path, env)

    assert_no_store_failure(results)
    assert_every_point_stored(uri, [experiment_id], expected_runs=4, epochs=epochs)
    runs = MlflowClient(uri).search_runs([experiment_id])
    assert sorted(run.data.params["resolved.seed"] for run in runs) == ["0", "1", "2", "3"]
    assert all(any(key.startswith("system/") for key in run.data.metrics) for run in runs)


@pytest.mark.e2e
def test_four_runs_started_at_once_against_a_new_store_build_it_once(tmp_path, fashion_dir):
    """No store yet: one process creates and migrates it, the others wait and use it."""
    epochs = 1
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert not (tmp_path / "mlflow.db").exists()
    values = {"data_dir": fashion_dir, "validation_size": 40, "epochs": epochs, "batch_size": 16}
    commands = [train_command({**values, "seed": seed}) for seed in range(4)]

    results = run_all_at_once(commands, tmp_path, environment(uri))

    assert_no_store_failure(results)
    assert_every_point_stored(uri, ["0"], expected_runs=4, epochs=epochs)
