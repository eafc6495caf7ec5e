"""Run statuses under `mlflow run` (MLflow 3.17.2 marks its run FAILED after any non-zero exit, even a run
the script ended itself; growing_batch.tracking.keep_status_after_mlflow_run writes back what the script left).

A FINISHED run refused a resume stays FINISHED; bad values give one line; a run stopped by SIGTERM is KILLED
with the tag `interrupted`; a refused concurrent resume and a resume with other parameters leave it so."""

import concurrent.futures
import signal
import subprocess
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from growing_batch import checkpoint
from processes import environment, mlflow_run_command, wait_for_checkpoint

TINY = {"epochs": 1, "validation_size": 40, "batch_size": 20, "learning_rate": 0.05}


def mlflow_run(tmp_path, uri, parameters, run_id=None):
    parameters = {"checkpoint_dir": str(tmp_path / "checkpoints"), **parameters}
    return subprocess.run(mlflow_run_command(parameters, run_id=run_id), cwd=tmp_path, env=environment(uri),
                          capture_output=True, text=True, timeout=600)


def error_lines(process):
    return [line for line in process.stderr.splitlines() if line.startswith("error: ")]


def settles(uri, run_id, status, end_time=None, seconds=60):
    """Poll until the run shows ``status`` (and ``end_time``, if given): the write-back follows `mlflow run`."""
    client = MlflowClient(uri)
    deadline = time.time() + seconds
    while True:
        info = client.get_run(run_id).info
        if info.status == status and (end_time is None or info.end_time == end_time):
            return info
        if time.time() > deadline:
            raise AssertionError(f"run {run_id} is {info.status} (end {info.end_time}), not {status} ({end_time})")
        time.sleep(0.5)


def no_run_is_running(uri):
    client = MlflowClient(uri)
    return [run.info.run_id for run in client.search_runs(["0"]) if run.info.status == "RUNNING"] == []


@pytest.mark.e2e
def test_finished_run_refused_resume_and_bad_values_through_mlflow_run(tmp_path, fashion_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parameters = {**TINY, "data_dir": fashion_dir}
    first = mlflow_run(tmp_path, uri, parameters)
    assert first.returncode == 0, first.stderr[-3000:]
    (finished,) = MlflowClient(uri).search_runs(["0"])
    run_id, end_time = finished.info.run_id, finished.info.end_time

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        refused, seed, folder = pool.map(lambda item: mlflow_run(tmp_path, uri, *item), [
            (parameters, run_id),
            ({**parameters, "seed": 4294967296}, None),
            ({**parameters, "checkpoint_dir": "/proc/nope/ck"}, None),
        ])
    assert refused.returncode == 1  # what `mlflow run` exits with for any failure
    (line,) = error_lines(refused)
    assert f"run_id='{run_id}' is not allowed: that run is FINISHED" in line
    info = settles(uri, run_id, "FINISHED", end_time)
    assert "error" not in MlflowClient(uri).get_run(run_id).data.tags and info.end_time == end_time
    for process, message in ((seed, "error: seed='4294967296' is not allowed"),
                             (folder, "error: checkpoint_dir='/proc/nope/ck' is not allowed")):
        assert process.returncode == 1
        (line,) = error_lines(process)
        assert line.startswith(message), line
        assert "Traceback" not in process.stderr
        assert "Epoch 1/" not in process.stdout
    others = [run for run in MlflowClient(uri).search_runs(["0"]) if run.info.run_id != run_id]
    assert sorted(run.info.status for run in others) == ["FAILED", "FAILED"]
    assert all("is not allowed" in run.data.tags["error"] for run in others)
    assert no_run_is_running(uri)


def training_process(process):
    for child in psutil.Process(process.pid).children(recursive=True):
        if "growing_batch.train" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no training process under mlflow run")


@pytest.mark.e2e
def test_sigterm_under_mlflow_run_ends_killed_and_refused_resumes_leave_it_so(tmp_path, fashion_dir_1400):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folder = str(tmp_path / "checkpoints")
    parameters = {"epochs": 30, "validation_size": 40, "batch_size": 16, "learning_rate": 0.05,
                  "data_dir": fashion_dir_1400, "checkpoint_dir": folder}
    process = subprocess.Popen(mlflow_run_command(parameters), cwd=tmp_path, env=environment(uri),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, run_id = wait_for_checkpoint(process, folder, 1)
    training_process(process).send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output[-3000:]
    assert f"run {run_id} interrupted by SIGTERM" in output
    killed = settles(uri, run_id, "KILLED")
    assert MlflowClient(uri).get_run(run_id).data.tags["interrupted"].startswith("SIGTERM during epoch")

    with checkpoint.RunLock(folder, run_id):  # another process trains it: refused
        concurrent = mlflow_run(tmp_path, uri, parameters, run_id=run_id)
    assert "is being trained by another process" in error_lines(concurrent)[0]
    settles(uri, run_id, "KILLED", killed.end_time)
    other = mlflow_run(tmp_path, uri, {**parameters, "learning_rate": 0.2}, run_id=run_id)
    assert "learning_rate='0.2' is not allowed: run" in error_lines(other)[0]
    settles(uri, run_id, "KILLED", killed.end_time)
    run = MlflowClient(uri).get_run(run_id)
    assert "error" not in run.data.tags and "interrupted" in run.data.tags
    assert checkpoint.exists(folder, run_id)  # still resumable
