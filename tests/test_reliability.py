"""Divergence, checkpoints, interruption (SIGTERM, SIGKILL) and resuming: nothing logged is lost."""

import functools
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from growing_batch import checkpoint, config as config_module, data, models, schedules, tf_engine, tracking, train
from growing_batch.metrics import EPOCH_METRICS
from processes import (checkpointed_epoch, environment, histories, kill_tree, mlflow_run_command, train_command,
                       wait_for_checkpoint)

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Metrics that do not depend on the machine's speed: an interrupted and resumed run must match.
DETERMINISTIC = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
                 "learning_rate", "batch_size", "momentum", "noise_scale", "updates", "examples_seen")


def final_weights(uri, run_id):
    import mlflow

    mlflow.set_tracking_uri(uri)
    run = MlflowClient(uri).get_run(run_id)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id='{run_id}'", output_format="list")
    return mlflow.keras.load_model(model.model_uri).get_weights()


def assert_same_run(uri, reference_id, resumed_id, epochs):
    """Every metric at steps 1..epochs exactly once, equal to the uninterrupted run; equal final weights."""
    reference, resumed = histories(uri, reference_id), histories(uri, resumed_id)
    for key in EPOCH_METRICS:
        assert [step for step, _ in resumed[key]] == list(range(1, epochs + 1)), (key, resumed[key])
    for key in DETERMINISTIC:
        np.testing.assert_allclose([v for _, v in resumed[key]], [v for _, v in reference[key]], rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    for a, b in zip(final_weights(uri, reference_id), final_weights(uri, resumed_id)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# --- checkpoints ---------------------------------------------------------------------------------


def small_model(momentum=0.9):
    keras.utils.set_random_seed(0)
    model = models.build("small-cnn", (16, 16, 1), 4, seed=0)
    return models.compile_for_training(model, models.build_optimizer("sgd", 0.1, momentum))


def test_a_checkpoint_restores_weights_and_optimizer_state(tmp_path):
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (64, 16, 16, 1)).astype(np.uint8), rng.integers(0, 4, 64).astype(np.int32))
    trained = small_model()
    step = tf_engine.TrainStep(trained)
    batches = data.EpochBatches(split, seed=0)
    for _ in range(3):
        step(batches.images, batches.labels)
    state = checkpoint.State(config={"seed": 0}, epoch=3, updates=3, examples_seen=192, rows=[{"epoch": 3, "a": 1.5}])
    saved = checkpoint.save(str(tmp_path), "run1", trained, state)
    assert saved == os.path.join(str(tmp_path), "run1", "state.json")
    assert sorted(os.listdir(os.path.join(str(tmp_path), "run1"))) == ["epoch-0003.weights.h5", "state.json"]
    import h5py  # Keras' own weights format: variables stored under their layers' paths

    with h5py.File(os.path.join(str(tmp_path), "run1", "epoch-0003.weights.h5")) as weights:
        assert {"conv2d", "conv2d_1", "dense", "dense_1"} <= set(weights["layers"]) and "optimizer" in weights
    fresh = small_model()
    assert checkpoint.restore(str(tmp_path), "run1", fresh) == state
    for a, b in zip(trained.variables + trained.optimizer.variables, fresh.variables + fresh.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(fresh.optimizer.iterations.numpy()) == 3
    # one more identical step on both gives identical weights: the momentum buffers came back too
    tf_engine.TrainStep(fresh)(batches.images, batches.labels)
    step(batches.images, batches.labels)
    for a, b in zip(trained.trainable_variables, fresh.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def test_a_damaged_or_foreign_checkpoint_is_refused_with_one_line(tmp_path):
    folder = tmp_path / "run1"
    folder.mkdir()
    (folder / "state.json").write_text('{"version": 2, "weights": "epoch-0001.weig')
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read .* delete it to start the run afresh"):
        checkpoint.restore(str(tmp_path), "run1", small_model())
    checkpoint.save(str(tmp_path), "run2", small_model(momentum=0.0), checkpoint.State(config={}))
    with pytest.raises(checkpoint.CheckpointError, match="do not fit this model"):  # no momentum buffers saved
        checkpoint.restore(str(tmp_path), "run2", small_model(momentum=0.9))
    checkpoint.save(str(tmp_path), "run3", small_model(), checkpoint.State(config={}))
    keras.utils.set_random_seed(0)
    other = models.compile_for_training(models.build("small-cnn", (16, 16, 1), 3, seed=0),
                                        models.build_optimizer("sgd", 0.1, 0.9))
    with pytest.raises(checkpoint.CheckpointError, match="do not fit this model"):  # 3 classes, not 4
        checkpoint.restore(str(tmp_path), "run3", other)


def test_only_one_process_at_a_time_holds_a_run(tmp_path):
    with checkpoint.RunLock(str(tmp_path), "run1"):
        holder = subprocess.run(
            [sys.executable, "-c", "import sys; from growing_batch import checkpoint\n"
             "try:\n    checkpoint.RunLock(sys.argv[1], 'run1').__enter__()\n"
             "except checkpoint.CheckpointError as error:\n    print(error); sys.exit(3)", str(tmp_path)],
            env=environment("sqlite://"), capture_output=True, text=True, timeout=60)
        assert holder.returncode == 3 and "is being trained by another process" in holder.stdout
    with checkpoint.RunLock(str(tmp_path), "run1"):
        pass  # released: free again


def test_resume_logs_only_the_points_the_store_lacks(tracking_uri):
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    rows = [{"epoch": 1, "train_loss": 2.0, "updates": 10.0}, {"epoch": 2, "train_loss": 1.5, "updates": 20.0}]
    tracking.backfill(run_id, rows[:1], {})  # epoch 1 reached the store, epoch 2 was lost
    logged = tracking.logged_steps(run_id)
    assert logged == {"train_loss": {1}, "updates": {1}}
    assert tracking.backfill(run_id, rows, logged) == 2
    callback = tracking.TrackingCallback(run_id, rows=rows, logged=logged)
    callback.on_epoch_end(1, {"train_loss": 9.0, "updates": 20.0})  # epoch 2 retrained: already there, not again
    callback.on_epoch_end(2, {"train_loss": 1.2, "updates": 30.0})
    callback.wait()
    history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
               for key in ("train_loss", "updates")}
    assert history == {"train_loss": [(1, 2.0), (2, 1.5), (3, 1.2)], "updates": [(1, 10.0), (2, 20.0), (3, 30.0)]}


# --- divergence ------------------------------------------------------------------------------------


class BlowUpAt(keras.callbacks.Callback):
    """Sets an absurd learning rate from ``epoch`` on (after the schedule set its own)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 >= self.epoch:
            self.model.optimizer.learning_rate = 1e10


def test_a_diverging_run_stops_at_that_epoch_and_keeps_what_it_logged(tracking_uri, fashion_dir, capsys):
    config = config_module.from_args(["--epochs", "6", "--data_dir", fashion_dir, "--validation_size", "40",
                                      "--batch_size", "20", "--learning_rate", "0.05"])
    assert train.train(config, extra_callbacks=[BlowUpAt(3)], verbose=0) == train.EXIT_DIVERGED
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "FAILED"
    assert run.data.tags["diverged"] == "true" and run.data.tags["diverged_epoch"] == "3"
    assert "diverged: train_loss is nan at epoch 3" in run.data.tags["error"]
    history = histories(tracking_uri, run.info.run_id)
    assert [step for step, _ in history["train_loss"]] == [1, 2, 3]  # stopped at 3: no epoch 4
    assert all(np.isfinite(value) for _, value in history["train_loss"][:2])
    assert np.isnan(history["train_loss"][2][1])
    assert [step for step, _ in history["test_accuracy"]] == [1, 2]  # the broken weights are not evaluated
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"run {run.info.run_id} diverged" in errors[0]
    # the run is not resumable (it would diverge again), so its checkpoint is not kept
    assert not checkpoint.exists("checkpoints", run.info.run_id)
    with pytest.raises(train.Refused, match="diverged at epoch 3"):
        train.plan_resume(config, run.info.run_id)


def test_an_absurd_learning_rate_fails_the_run_from_the_command_line(tmp_path, fashion_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = subprocess.run(train_command({"learning_rate": 100, "epochs": 3, "data_dir": fashion_dir,
                                            "validation_size": 40, "batch_size": 16}),
                             cwd=tmp_path, env=environment(uri), capture_output=True, text=True, timeout=300)
    assert process.returncode == train.EXIT_DIVERGED, process.stderr[-2000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "diverged: train_loss is nan at epoch 1" in errors[0]
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert (run.info.status, run.data.tags["diverged"], run.data.tags["diverged_epoch"]) == ("FAILED", "true", "1")
    assert [step for step, _ in histories(uri, run.info.run_id)["train_loss"]] == [1]


# --- interruption and resuming -----------------------------------------------------------------------

RESUME_PARAMETERS = {"epochs": 5, "validation_size": 40, "batch_size": 16, "learning_rate": 0.05,
                     "schedule": "noise-matched", "lr_decay": 0.7, "max_batch_size": 64}


@pytest.mark.e2e
def test_sigkill_mid_run_then_mlflow_run_resume_matches_an_uninterrupted_run(tmp_path, fashion_dir_1400):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # `mlflow run` runs the entry point in the project's folder: keep the checkpoints in tmp_path
    parameters = {**RESUME_PARAMETERS, "data_dir": fashion_dir_1400, "checkpoint_dir": str(tmp_path / "checkpoints")}
    reference = subprocess.run(mlflow_run_command(parameters), cwd=tmp_path, env=environment(uri),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (reference_run,) = MlflowClient(uri).search_runs(["0"])

    interrupted = subprocess.Popen(mlflow_run_command(parameters), cwd=tmp_path, env=environment(uri),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    epoch, run_id = wait_for_checkpoint(interrupted, str(tmp_path / "checkpoints"), 2)
    kill_tree(interrupted)  # SIGKILL: no handler runs, no status is set
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    assert checkpointed_epoch(str(tmp_path / "checkpoints"))[0] < RESUME_PARAMETERS["epochs"]

    resumed = subprocess.run(mlflow_run_command(parameters, run_id=run_id), cwd=tmp_path, env=environment(uri),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run {run_id} (" in resumed.stdout and "resuming after epoch" in resumed.stdout
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["resumed_from_epoch"]) >= 2
    assert_same_run(uri, reference_run.info.run_id, run_id, RESUME_PARAMETERS["epochs"])
    assert not os.path.exists(tmp_path / "checkpoints" / run_id)  # a finished run's checkpoint is removed


@pytest.mark.e2e
def test_sigterm_ends_the_run_killed_and_the_package_command_line_resumes_it(tmp_path, fashion_dir_1400):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parameters = {**RESUME_PARAMETERS, "epochs": 20, "data_dir": fashion_dir_1400}
    process = subprocess.Popen(train_command(parameters), cwd=tmp_path, env=environment(uri),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    epoch, run_id = wait_for_checkpoint(process, str(tmp_path / "checkpoints"), 1)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert f"run {run_id} interrupted by SIGTERM during epoch" in stderr
    assert f"python -m growing_batch.train --run_id {run_id}" in stderr
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["interrupted"].startswith("SIGTERM during epoch")
    done = checkpoint.load_state(str(tmp_path / "checkpoints"), run_id).epoch
    assert [step for step, _ in histories(uri, run_id)["train_loss"]] == list(range(1, done + 1))

    # while a process holds the run (here: this test), no other may resume it
    with checkpoint.RunLock(str(tmp_path / "checkpoints"), run_id):
        second = subprocess.run(train_command({"run_id": run_id}), cwd=tmp_path, env=environment(uri),
                                capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "is being trained by another process" in second.stderr
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"  # left as it was

    resumed = subprocess.run(train_command({"run_id": run_id}), cwd=tmp_path, env=environment(uri),
                             capture_output=True, text=True, timeout=600)  # the run's own parameters
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after epoch {done} of 20" in resumed.stdout
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    history = histories(uri, run_id)
    for key in EPOCH_METRICS:
        assert [step for step, _ in history[key]] == list(range(1, 21)), key
    schedule = functools.partial(schedules.noise_matched, learning_rate=0.05, batch_size=16, lr_decay=0.7,
                                 max_batch_size=64)
    expected = schedules.table(schedule, 20, 1360)  # every batch full, the carry continued across the resume
    assert [value for _, value in history["updates"]] == [row["updates"] for row in expected]
    assert [value for _, value in history["examples_seen"]] == [row["examples_seen"] for row in expected]


@pytest.mark.e2e
def test_a_killed_sweep_rerun_resumes_its_children_in_their_own_runs(tmp_path, fashion_dir_1400):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "-m", "growing_batch.sweep", "--experiment", "quick", "--epochs", "30",
               "--data_dir", fashion_dir_1400, "--validation_size", "40", "--workers", "2"]
    first = subprocess.Popen(command, cwd=tmp_path, env=environment(uri), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    epoch, killed_id = wait_for_checkpoint(first, str(tmp_path / "checkpoints"), 2)
    kill_tree(first)
    rerun = subprocess.run(command, cwd=tmp_path, env=environment(uri), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"run {killed_id}" in rerun.stdout and "resume " in rerun.stdout
    client = MlflowClient(uri)
    killed = client.get_run(killed_id)
    assert killed.info.status == "FINISHED" and "sweep_superseded" not in killed.data.tags
    children = [run for run in client.search_runs(["0"], filter_string="tags.sweep_role = 'child'")
                if run.data.tags.get("sweep_superseded") != "true"]
    assert sorted(run.data.tags["sweep_child"] for run in children) == ["lr-decay/seed=0", "noise-matched/seed=0"]
    for run in children:
        assert run.info.status == "FINISHED"
        for key, points in histories(uri, run.info.run_id).items():
            assert [step for step, _ in points] == list(range(1, 31)), (run.data.tags["sweep_child"], key)


def test_a_sweep_goes_on_past_a_diverged_child_and_lists_it(tracking_uri, fashion_dir, monkeypatch, capsys):
    from growing_batch import sweep

    monkeypatch.setitem(sweep.EXPERIMENTS, "quick", [
        sweep.Member("calm", {"schedule": "lr-decay", "learning_rate": "0.05", "batch_size": "20"}),
        sweep.Member("wild", {"schedule": "lr-decay", "learning_rate": "100", "batch_size": "16"}),
    ])
    overrides = {"epochs": "2", "data_dir": fashion_dir, "validation_size": "40"}
    assert sweep.sweep("quick", seeds=1, workers=2, overrides=overrides) == 0
    output = capsys.readouterr().out
    assert "not finished: wild/seed=0 (diverged at epoch 1)" in output
    client = MlflowClient(tracking_uri)
    (parent,) = client.search_runs(["0"], filter_string="tags.sweep_role = 'parent'")
    assert parent.info.status == "FINISHED"
    by_member = {run.data.tags["sweep_member"]: run for run in
                 client.search_runs(["0"], filter_string="tags.sweep_role = 'child'")}
    assert by_member["calm"].info.status == "FINISHED"
    assert by_member["wild"].info.status == "FAILED" and by_member["wild"].data.tags["diverged_epoch"] == "1"
    local = client.download_artifacts(parent.info.run_id, "runs.csv", str(os.path.dirname(tracking_uri[10:])))
    assert "diverged_epoch" in open(local).readline()
    # rerun: the diverged child is kept as the result, not trained again
    assert sweep.sweep("quick", seeds=1, workers=2, overrides=overrides) == 0
    assert "skip   wild/seed=0" in capsys.readouterr().out
    assert len(client.search_runs(["0"], filter_string="tags.sweep_role = 'child'")) == 2
