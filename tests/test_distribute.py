"""Data-parallel training: logical CPU devices under MirroredStrategy, two workers on loopback."""

import json
import socket
import subprocess

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from growing_batch import distribute
from growing_batch.config import ConfigError, from_args
from growing_batch.metrics import EPOCH_METRICS

from processes import environment, histories, train_command

GROWING = {"schedule": "batch-growth", "batch_size": 16, "batch_growth": 1.5, "max_batch_size": 100, "epochs": 3,
           "weight_decay": 5e-3,  # its penalty enters once per update, however the batch is split
           "validation_size": 40, "learning_rate": 0.05, "momentum": 0.9}
# Metrics that do not depend on the machine's speed.
DETERMINISTIC = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
                 "learning_rate", "batch_size", "momentum", "noise_scale", "updates", "examples_seen")


def test_devices_are_auto_or_a_whole_number():
    assert distribute.parse_devices("auto") is None and distribute.parse_devices("2") == 2
    for bad in ("0", "-1", "two", "1.5", "1000"):
        with pytest.raises(ConfigError, match=f"devices='{bad}' is not allowed: expected auto or a whole number from 1"):
            from_args(["--devices", bad])


@pytest.mark.e2e
def test_xla_with_several_replicas_is_refused_before_the_data_is_loaded(tmp_path):
    """Checked once, where the number of replicas is known (``auto`` may mean several GPUs)."""
    process = subprocess.run(train_command({"devices": 2, "jit_compile": "true", "data_dir": str(tmp_path)}),
                             cwd=tmp_path, env=environment(f"sqlite:///{tmp_path}/mlflow.db"), capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 2, process.stderr[-2000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: jit_compile='true' is not allowed: expected false with 2 replicas (devices)."]


def test_the_chief_of_a_cluster_is_the_one_that_logs(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.cluster() is None and distribute.is_chief()
    workers = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for task, chief in (({"type": "worker", "index": 0}, True), ({"type": "worker", "index": 1}, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": workers, "task": task}))
        assert distribute.is_chief() is chief
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["127.0.0.1:3"], **workers},
                                                "task": {"type": "worker", "index": 0}}))
    assert not distribute.is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker",
                                                                                                  "index": 0}}))
    assert distribute.cluster() is None  # one task: no cluster
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG='{not json' is not allowed: expected JSON"):
        distribute.is_chief()


def finished_run(uri):
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    return run


@pytest.mark.e2e
def test_two_logical_cpu_devices_give_one_devices_metrics(tmp_path, fashion_dir):
    """One device, then two logical devices with whole batches and with gradient accumulation over
    micro-batches of 8 per device: the same metrics, names, steps and values."""
    results = {}
    for name, devices, extra in (("one", 1, {}), ("two", 2, {}), ("two accumulated", 2, {"max_device_batch_size": 8})):
        uri = f"sqlite:///{tmp_path}/{name.replace(' ', '-')}.db"
        process = subprocess.run(train_command({**GROWING, **extra, "data_dir": fashion_dir, "devices": devices}),
                                 cwd=tmp_path, env=environment(uri), capture_output=True, text=True, timeout=600)
        assert process.returncode == 0, process.stderr[-3000:]
        run = finished_run(uri)
        assert run.data.params["replicas"] == str(devices)
        assert run.data.tags["distribution"] == ("MirroredStrategy" if devices == 2 else "one-device")
        results[name] = histories(uri, run.info.run_id)
    one = results["one"]
    for name in ("two", "two accumulated"):
        two = results[name]
        for key in EPOCH_METRICS:  # the same names and steps
            assert [step for step, _ in two[key]] == [step for step, _ in one[key]] == [1, 2, 3], (name, key)
        assert [value for _, value in two["batch_size"]] == [16, 24, 36]  # the global batch
        for key in DETERMINISTIC:  # and the same values: every update is the whole batch's mean gradient
            np.testing.assert_allclose([v for _, v in two[key]], [v for _, v in one[key]], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name}: {key}")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


@pytest.mark.e2e
def test_two_workers_on_loopback_train_one_run_logged_by_the_chief(tmp_path, fashion_dir, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # the store made here puts its default artifact root (./mlruns) here
    MlflowClient(uri).search_experiments()  # the store exists before the workers start
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(train_command({**GROWING, "data_dir": fashion_dir}), cwd=tmp_path,
                                          env=environment(uri, TF_CONFIG=tf_config), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert "done: test_accuracy" in outputs[0][0] and "done" not in outputs[1][0]  # only the chief reports
    run = finished_run(uri)  # exactly one run
    assert run.data.params["replicas"] == "2"
    assert run.data.tags["distribution"] == "MultiWorkerMirroredStrategy"
    for key, points in histories(uri, run.info.run_id).items():
        assert [step for step, _ in points] == [1, 2, 3], key
