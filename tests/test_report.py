"""The report entry point under `mlflow run`: it logs to the sweep's parent run and leaves no stray run."""

import os
import subprocess
import sys
import time

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

import fake_runs

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_sweep(uri, artifact_location):
    """A sweep's parent run with two finished children (fake histories, no training)."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("fake-sweep", artifact_location=artifact_location)
    parent = client.create_run(experiment_id, tags={"sweep_role": "parent", "mlflow.runName": "sweep"}).info.run_id
    children = [fake_runs.log_fake_run(client, experiment_id, schedule, 0, parent_run_id=parent)
                for schedule in ("lr-decay", "noise-matched")]
    client.set_terminated(parent, "FINISHED")
    return parent, children


def test_report_under_mlflow_run_logs_to_the_parent_and_deletes_its_own_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the Default experiment's artifact root, ./mlruns, lands here
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent, children = fake_sweep(uri, str(tmp_path / "artifacts"))
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_")}
    environment.update(MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="2",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    process = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", PROJECT_DIR, "--env-manager", "local", "-e", "report",
         "-P", f"run_id={parent}"],  # no --experiment-name: MLflow makes its run in the Default experiment
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert f"logged to run {parent} (experiment 'fake-sweep')" in process.stdout

    client = MlflowClient(uri)
    logged = {artifact.path for artifact in client.list_artifacts(parent, "report")}
    assert {"report/analysis.html", "report/analysis.ipynb", "report/test_accuracy.png"} <= logged
    experiments = [experiment.experiment_id for experiment in client.search_experiments(view_type=ViewType.ALL)]
    (entry_point_run,) = [run for run in client.search_runs(experiments, run_view_type=ViewType.ALL)
                          if run.info.run_id not in {parent, *children}]
    assert entry_point_run.data.tags["report_for"] == parent
    deadline = time.monotonic() + 60
    while client.get_run(entry_point_run.info.run_id).info.lifecycle_stage != "deleted":
        assert time.monotonic() < deadline, "the entry point's run was not deleted after mlflow run exited"
        time.sleep(0.5)
    assert client.get_run(entry_point_run.info.run_id).info.status == "FINISHED"  # mlflow run ended it first
    active = {run.info.run_id for run in client.search_runs(experiments, run_view_type=ViewType.ACTIVE_ONLY)}
    assert active == {parent, *children}  # nothing stray, nothing of the sweep lost


def test_report_outside_mlflow_run_deletes_nothing(tmp_path, monkeypatch):
    from growing_batch import report, tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent, _ = fake_sweep(uri, str(tmp_path / "artifacts"))
    own = MlflowClient(uri).create_run("0").info.run_id  # MLFLOW_RUN_ID set by hand, not by `mlflow run`
    assert report.delete_after_mlflow_run(own) is False
    assert tracking.mlflow_run_process(own) is None
    assert MlflowClient(uri).get_run(parent).info.lifecycle_stage == "active"
