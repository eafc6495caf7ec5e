"""A remote tracking server: `mlflow server` on loopback with a sqlite database backend."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from growing_batch import checkpoint

from processes import environment, histories, train_command, wait_for_checkpoint

pytestmark = pytest.mark.e2e


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder, port):
    """`mlflow server` with a database backend and its own artifact store, answering on loopback."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{folder}/server.db",
               "--artifacts-destination", str(folder / "server-artifacts"), "--workers", "1"]
    log = open(folder / f"server-{port}.log", "a")
    server = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
        assert server.poll() is None, open(folder / f"server-{port}.log").read()[-3000:]
    server.kill()
    raise AssertionError("mlflow server did not answer within 120 s")


def stop_server(server):
    import psutil

    for process in [*psutil.Process(server.pid).children(recursive=True), psutil.Process(server.pid)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    server.wait(timeout=60)


@pytest.fixture
def server(tmp_path):
    port = free_port()
    process = start_server(tmp_path, port)
    yield f"http://127.0.0.1:{port}", port, process
    if process.poll() is None:
        stop_server(process)


# Fail fast in these tests instead of MLflow's default minutes of retries.
QUICK_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def test_a_run_logs_everything_to_a_tracking_server(tmp_path, fashion_dir, server):
    uri, _, _ = server
    process = subprocess.run(train_command({"epochs": 3, "data_dir": fashion_dir, "validation_size": 40,
                                            "batch_size": 20, "learning_rate": 0.05}),
                             cwd=tmp_path, env=environment(uri), capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs(["0"])
    assert run.info.status == "FINISHED"
    for key, points in histories(uri, run.info.run_id).items():
        assert [step for step, _ in points] == [1, 2, 3], key
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "history.csv", "training_curves.png"} <= artifacts
    assert os.listdir(tmp_path / "server-artifacts")  # uploaded through the server


def test_an_unreachable_server_fails_before_training(tmp_path, fashion_dir):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.time()
    process = subprocess.run(train_command({"epochs": 3, "data_dir": fashion_dir, "validation_size": 40}),
                             cwd=tmp_path, env=environment(uri), capture_output=True, text=True, timeout=600)
    assert process.returncode == 2
    errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"MLFLOW_TRACKING_URI='{uri}' is not allowed" in errors[0], process.stderr[-2000:]
    assert "does not" in errors[0] and "Epoch 1/" not in process.stdout
    assert time.time() - started < 60


def test_a_server_that_goes_away_mid_run_leaves_a_checkpoint_to_resume_from(tmp_path, fashion_dir_1400, server):
    uri, port, server_process = server
    parameters = {"epochs": 10, "data_dir": fashion_dir_1400, "validation_size": 40, "batch_size": 32,
                  "learning_rate": 0.05}
    process = subprocess.Popen(train_command(parameters), cwd=tmp_path, env=environment(uri, **QUICK_FAILURE),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, run_id = wait_for_checkpoint(process, str(tmp_path / "checkpoints"), 2)
    stop_server(server_process)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tracking store" in errors[0] and f"--run_id {run_id}" in errors[0], stderr[-3000:]
    state = checkpoint.load_state(str(tmp_path / "checkpoints"), run_id)
    assert state.epoch == 10  # training went on without the server; every epoch is in the checkpoint

    restarted = start_server(tmp_path, port)
    try:
        resumed = subprocess.run(train_command({"run_id": run_id}), cwd=tmp_path, env=environment(uri),
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        run = MlflowClient(uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        for key, points in histories(uri, run_id).items():
            assert [step for step, _ in points] == list(range(1, 11)), key
    finally:
        stop_server(restarted)
