"""The JAX engine (backend=jax) end to end: a batch-growth run logs what the TensorFlow run logs, with few
XLA compilations and a like accuracy; it is reproducible; killed and resumed, it matches an uninterrupted run."""

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from growing_batch.metrics import EPOCH_METRICS
from processes import environment, histories, kill_tree, train_command, wait_for_checkpoint
from test_reliability import assert_same_run

pytestmark = pytest.mark.e2e

EPOCHS = 3


def parameters(fashion_dir, backend, **extra):
    """Batch growth from 16 by 2 per epoch: B = 16, 32, 64; padded to the buckets 16, 32 and 64 on JAX."""
    return {"backend": backend, "schedule": "batch-growth", "batch_size": 16, "batch_growth": 2, "max_batch_size": 64,
            "learning_rate": 0.3, "epochs": EPOCHS, "data_dir": fashion_dir,
            "validation_size": 40, **extra}


def jax_environment(uri):
    env = environment(uri)
    env.pop("KERAS_BACKEND", None)  # the parameter alone chooses JAX
    return env


def train(folder, uri, values):
    result = subprocess.run(train_command(values), cwd=folder, env=jax_environment(uri), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return MlflowClient(uri).search_runs(["0"], order_by=["attributes.start_time DESC"], max_results=1)[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, fashion_dir_1400):
    """One JAX run, the same JAX run again and the same TensorFlow run, in one store."""
    folder = tmp_path_factory.mktemp("jax")
    uri = f"sqlite:///{folder}/mlflow.db"
    runs = {name: train(folder, uri, parameters(fashion_dir_1400, backend))
            for name, backend in (("jax", "jax"), ("jax_again", "jax"), ("tensorflow", "tensorflow"))}
    return folder, uri, runs


def test_a_jax_batch_growth_run_logs_every_metric_the_tensorflow_run_logs(store):
    _, uri, runs = store
    jax_run, tensorflow_run = runs["jax"], runs["tensorflow"]
    assert jax_run.info.status == "FINISHED"
    assert jax_run.data.tags["backend"] == "jax" and tensorflow_run.data.tags["backend"] == "tensorflow"
    assert jax_run.data.params["resolved.backend"] == "jax"
    def trained(run):  # the run's own metrics; MLflow's system/ metrics are sampled by the clock
        return {key for key in run.data.metrics if not key.startswith("system/")}

    assert trained(jax_run) == trained(tensorflow_run) and set(EPOCH_METRICS) <= trained(jax_run)
    jax_history = histories(uri, jax_run.info.run_id)
    for key in EPOCH_METRICS:
        assert [step for step, _ in jax_history[key]] == [1, 2, 3], key
    assert [value for _, value in jax_history["batch_size"]] == [16, 32, 64]
    assert jax_run.data.metrics["xla_compilations"] == 3  # the buckets 16, 32 and 64
    assert jax_run.data.metrics["train_step_traces"] <= 8  # one trace per compiled shape
    accuracy = {name: run.data.metrics["test_accuracy"] for name, run in runs.items()}
    assert accuracy["jax"] > 0.5, accuracy  # chance is 0.1
    assert abs(accuracy["jax"] - accuracy["tensorflow"]) <= 0.05, accuracy


def test_the_same_seed_on_jax_gives_the_same_metrics(store):
    _, uri, runs = store
    first, second = histories(uri, runs["jax"].info.run_id), histories(uri, runs["jax_again"].info.run_id)
    for key in EPOCH_METRICS:
        if key not in ("epoch_seconds", "examples_per_second"):
            assert first[key] == second[key], key


def test_a_killed_jax_run_resumed_matches_the_uninterrupted_one(store, fashion_dir_1400):
    folder, uri, runs = store
    checkpoints = str(folder / "killed-checkpoints")
    process = subprocess.Popen(train_command(parameters(fashion_dir_1400, "jax", checkpoint_dir=checkpoints)), cwd=folder,
                               env=jax_environment(uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    epoch, run_id = wait_for_checkpoint(process, checkpoints, 2)
    kill_tree(process)  # SIGKILL during epoch 3: the run stays RUNNING with its epoch-2 checkpoint
    assert epoch == 2 and MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    resumed = subprocess.run(train_command({"run_id": run_id}), cwd=folder, env=jax_environment(uri),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 2" in resumed.stdout
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert not os.path.exists(os.path.join(checkpoints, run_id, "state.json"))
    assert_same_run(uri, runs["jax"].info.run_id, run_id, EPOCHS)
