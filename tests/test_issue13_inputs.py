"""Every error one line, before the work: untrusted CIFAR pickles, checkpoint_dir, seed, devices, milestones,
an exploded loss, bad store URIs, the sweep's store check, bench's output, a full disk while saving."""

import errno
import os
import pickle

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import fake_data
from growing_batch import bench, checkpoint, config, data, loop, sweep, train


def error_lines(captured):
    return [line for line in captured.err.splitlines() if line.startswith("error: ")]


class _RunsCode:
    """Unpickling this calls os.system: what a crafted data_batch_1 did."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_is_refused_and_its_code_does_not_run(tracking_uri, tmp_path, capsys, monkeypatch):
    folder = fake_data.write_cifar10(str(tmp_path / "data"), per_batch=4, test=4)
    marker = tmp_path / "the-crafted-code-ran"
    with open(os.path.join(folder, "cifar-10-batches-py", "data_batch_1"), "wb") as handle:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, handle)
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("crafted"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert train.main(["--dataset", "cifar10", "--data_dir", folder, "--validation_size", "0"]) == 2
    (line,) = error_lines(capsys.readouterr())
    assert line.startswith(f"error: data_dir='{folder}' is not allowed: expected CIFAR batches that hold only")
    assert "posix.system" in line or "os.system" in line
    assert not marker.exists()
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_real_cifar_pickles_still_load_in_every_protocol(tmp_path):
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"batch{protocol}"
        with open(path, "wb") as handle:
            pickle.dump({b"data": images, b"labels": [1, 2], b"batch_label": b"x", b"filenames": [b"a", b"b"],
                         b"scalar": np.float32(1.5)}, handle, protocol=protocol)
        loaded, labels = data._cifar_batch(str(path), b"labels")
        assert loaded.shape == (2, 32, 32, 3) and list(labels) == [1, 2]


def test_cifar100_with_a_missing_file_names_its_folder(tmp_path):
    with pytest.raises(data.DataError, match="cifar-100-python"):
        data.read_local("cifar100", str(tmp_path))


@pytest.mark.parametrize("argv, message", [
    (["--seed", "4294967296"], "seed='4294967296' is not allowed: expected a whole number from 0 to 4294967295"),
    (["--checkpoint_dir", "/proc/nope/ck"], "checkpoint_dir='/proc/nope/ck' is not allowed: expected a folder that "
                                             "can be created and written"),
    (["--checkpoint_dir", "{file}/ck"], "checkpoint_dir='{file}/ck' is not allowed: expected a folder that can be"),
    (["--devices", "1000"], "devices='1000' is not allowed: expected auto or a whole number from 1 to this machine's"),
    (["--schedule", "step-lr", "--milestones", "60,,120"], "milestones='60,,120' is not allowed: expected "
                                                            "comma-separated whole numbers with none empty"),
])
def test_bad_values_give_one_line_before_any_data(tracking_uri, tmp_path, capsys, monkeypatch, argv, message):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    argv = [part.format(file=a_file) for part in argv]
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("bad"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert train.main(["--data_dir", str(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    (line,) = error_lines(captured)
    assert message.format(file=a_file) in line, line
    assert "Traceback" not in captured.err
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FAILED" and finished.data.tags["error"] == line[len("error: "):]
    assert not os.path.exists(tmp_path / "checkpoints")  # the check leaves nothing behind


def test_milestones_after_the_last_epoch_are_warned_about(fashion_dir, tracking_uri, capsys):
    assert train.main(["--schedule", "step-lr", "--milestones", "1,5", "--epochs", "2", "--data_dir", fashion_dir,
                       "--validation_size", "40", "--batch_size", "20"]) == 0
    assert "warning: milestones='1,5': 5 at or after the last epoch (epochs=2) never take effect" in capsys.readouterr().err
    assert config.warnings_for(config.from_strings({"schedule": "step-lr", "milestones": "1", "epochs": "2"})) == []


def test_an_exploded_finite_loss_counts_as_diverged(fashion_dir, tracking_uri, capsys):
    assert loop.loss_diverged(float("nan"), None) and loop.loss_diverged(4.6e29, None)
    assert loop.loss_diverged(500.0, 2.3) and not loop.loss_diverged(400.0, 2.3) and not loop.loss_diverged(2.3, None)
    assert loop.loss_diverged(1001.0, 10.0) and not loop.loss_diverged(999.0, 10.0)
    assert train.main(["--learning_rate", "1e30", "--epochs", "3", "--data_dir", fashion_dir, "--validation_size", "40",
                       "--batch_size", "20"]) == train.EXIT_DIVERGED
    (line,) = error_lines(capsys.readouterr())
    assert "diverged: train_loss is" in line
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"


@pytest.mark.parametrize("uri, message", [
    ("foo://bar", "expected a tracking store MLflow can open"),
    ("sqlite:///{file}/folder/mlflow.db", "expected a tracking store MLflow can open"),
    ("http://127.0.0.1:9", "expected a tracking server that answers"),
])
def test_bad_store_uris_give_one_line_before_the_data_for_main_and_sweep(tmp_path, capsys, monkeypatch, uri,
                                                                         message):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    uri = uri.format(file=a_file)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        for entry_point in (lambda: train.main(["--epochs", "1"]), lambda: sweep.main(["--experiment", "quick"])):
            assert entry_point() == 2
            captured = capsys.readouterr()
            (line,) = error_lines(captured)
            assert line.startswith(f"error: MLFLOW_TRACKING_URI='{uri}' is not allowed: {message}"), line
            assert "Traceback" not in captured.err
    finally:
        mlflow.set_tracking_uri(None)


def test_bench_checks_its_output_before_benchmarking(tracking_uri, tmp_path, capsys):
    for output in ("/proc/nope/bench.json", str(tmp_path)):
        assert bench.main(["--quick", "true", "--output", output]) == 2
        (line,) = error_lines(capsys.readouterr())
        assert line.startswith(f"error: output='{output}' is not allowed: expected a file path that can be written")


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_removes_the_partial_file(tmp_path, monkeypatch):
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    folder = str(tmp_path / "ck")
    checkpoint.save(folder, "run", model, checkpoint.State(config={}, epoch=1))

    def full_disk(file, **options):
        with open(file, "wb") as handle:
            handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_weights", full_disk)
    with pytest.raises(checkpoint.CheckpointSaveError, match="No space left on device.*the checkpoint of epoch 1 is kept"):
        checkpoint.save(folder, "run", model, checkpoint.State(config={}, epoch=2))
    assert sorted(os.listdir(os.path.join(folder, "run"))) == ["epoch-0001.weights.h5", "state.json"]
    assert checkpoint.load_state(folder, "run").epoch == 1
