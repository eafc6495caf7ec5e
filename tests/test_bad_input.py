"""Bad input across the entry points: a non-zero exit, one line naming the problem, no run left RUNNING.

Each case runs the entry point's ``main`` in process, inside a run created beforehand as ``mlflow
run`` creates one (``MLFLOW_RUN_ID``); `tests/test_entry_point.py` runs some through `mlflow run`.
"""

import gzip
import os
import shutil

import pytest
from mlflow.tracking import MlflowClient

from growing_batch import bench, report, sweep, train


def error_lines(captured):
    return [line for line in captured.err.splitlines() if line.startswith("error: ")]


def no_run_is_running(uri):
    client = MlflowClient(uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    return [run.info.run_id for run in client.search_runs(experiments) if run.info.status == "RUNNING"] == []


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory, fashion_dir):
    """Two copies of the tiny Fashion-MNIST files: one with a corrupt gzip, one with a truncated payload."""
    root = tmp_path_factory.mktemp("broken")
    corrupt, truncated = root / "corrupt", root / "truncated"
    shutil.copytree(fashion_dir, corrupt)
    shutil.copytree(fashion_dir, truncated)
    with open(corrupt / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\x1f\x8b not really gzip")
    with gzip.open(os.path.join(fashion_dir, "train-images-idx3-ubyte.gz"), "rb") as handle:
        whole = handle.read()
    with gzip.open(truncated / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(whole[: len(whole) // 2])  # a valid gzip whose images stop half way
    return {"corrupt": str(corrupt), "truncated": str(truncated)}


TRAIN_CASES = [
    (["--learning_rate", "-1"], "learning_rate='-1.0' is not allowed: expected a number > 0"),
    (["--batch_size", "2.5"], "batch_size='2.5' is not allowed: expected a whole number"),
    (["--epochs", "ten"], "epochs='ten' is not allowed: expected a whole number"),
    (["--nesterov", "maybe"], "nesterov='maybe' is not allowed: expected true or false"),
    (["--schedule", "cosine"], "schedule='cosine' is not allowed: expected one of constant, lr-decay"),
    (["--preset", "paper-nonesuch"], "preset='paper-nonesuch' is not allowed: expected empty or one of"),
    (["--no_such_parameter", "3"], "unrecognized arguments: --no_such_parameter 3"),
    (["--momentum", "1.5"], "momentum='1.5' is not allowed: expected a number in [0, 1)"),
    (["--schedule", "step-lr", "--milestones", "60,30"], "milestones='60,30' is not allowed: expected"),
    (["--precision", "float16"], "precision='float16' is not allowed: expected one of float32, mixed_bfloat16"),
    (["--data_dir", "/no/such/folder"], "data_dir='/no/such/folder' is not allowed: expected an existing folder"),
    (["--checkpoint_dir", "{file}"], "checkpoint_dir='{file}' is not allowed: expected a folder path"),
    (["--data_dir", "{corrupt}"], "corrupt or truncated IDX file"),
    (["--data_dir", "{truncated}"], "corrupt or truncated IDX file"),
    (["--data_dir", "{data}", "--batch_size", "500"], "batch_size='500' is not allowed: expected at most the 200"),
    (["--data_dir", "{data}", "--model", "wrn-16-4", "--ghost_batch_size", "16", "--max_device_batch_size", "24"],
     "max_device_batch_size='24' is not allowed: expected a multiple of ghost_batch_size (16)"),
    (["--run_id", "0123456789abcdef"], "run_id='0123456789abcdef' is not allowed: expected a run in the tracking store"),
]


@pytest.mark.parametrize("argv, message", TRAIN_CASES, ids=[" ".join(argv)[:40] for argv, _ in TRAIN_CASES])
def test_bad_training_input(tracking_uri, tmp_path, fashion_dir, broken_data, capsys, monkeypatch, argv, message):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    names = {"file": str(a_file), "data": fashion_dir, **broken_data}
    argv = [part.format(**names) for part in argv]
    client = MlflowClient(tracking_uri)
    resuming = "--run_id" in argv
    if not resuming:
        run = client.create_run(client.create_experiment("bad-input"))  # as `mlflow run` creates it
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    status = train.main(["--validation_size", "40", *argv])
    assert status == 2
    (line,) = error_lines(capsys.readouterr())
    assert message.format(**names) in line
    assert no_run_is_running(tracking_uri)
    if not resuming:
        assert client.get_run(run.info.run_id).info.status == "FAILED"
        assert client.get_run(run.info.run_id).data.tags["error"] == line[len("error: "):]


def test_refused_resumes_leave_the_run_as_it_was(tracking_uri, fashion_dir, capsys):
    common = ["--epochs", "1", "--data_dir", fashion_dir, "--validation_size", "40", "--batch_size", "20"]
    assert train.main([*common, "--learning_rate", "0.05"]) == 0
    client = MlflowClient(tracking_uri)
    (finished,) = client.search_runs(["0"])
    run_id = finished.info.run_id
    capsys.readouterr()

    cases = [
        ([*common, "--learning_rate", "0.2", "--run_id", run_id],
         f"learning_rate='0.2' is not allowed: run {run_id} was trained with learning_rate='0.05'"),
        (["--run_id", run_id], f"run_id='{run_id}' is not allowed: that run is FINISHED; there is nothing to resume"),
    ]
    fresh = client.create_run("0").info.run_id  # created, never trained
    cases.append((["--run_id", fresh], f"run_id='{fresh}' is not allowed: that run has not started training"))
    for argv, message in cases:
        assert train.main(argv) == 2, argv
        (line,) = error_lines(capsys.readouterr())
        assert message in line
        os.environ.pop("MLFLOW_RUN_ID", None)  # --run_id sets it, as `mlflow run --run-id` would
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "error" not in client.get_run(run_id).data.tags
    assert client.get_run(fresh).info.status == "RUNNING"  # not ours to end: it was left as it was
    client.set_terminated(fresh)


SWEEP_CASES = [
    (["--experiment", "nonesuch"], "experiment='nonesuch' is not allowed: expected one of quick, repro"),
    (["--experiment", "quick", "--seeds", "0"], "seeds='0' is not allowed: expected a whole number >= 1"),
    (["--experiment", "quick", "--workers", "two"], "workers='two' is not allowed: expected a whole number"),
    (["--experiment", "quick", "--epochs", "-1"], "epochs='-1' is not allowed: expected a whole number >= 1"),
    (["--experiment", "quick", "--precision", "half"], "precision='half' is not allowed"),
]


@pytest.mark.parametrize("argv, message", SWEEP_CASES, ids=[" ".join(argv)[-30:] for argv, _ in SWEEP_CASES])
def test_bad_sweep_input(tracking_uri, capsys, monkeypatch, argv, message):
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("bad-sweep"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert sweep.main(argv) == 2
    (line,) = error_lines(capsys.readouterr())
    assert message in line
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert no_run_is_running(tracking_uri)


def test_bad_report_and_bench_input(tracking_uri, capsys, monkeypatch):
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("bad-report"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert report.main(["--run_id", "0123456789abcdef"]) == 2
    (line,) = error_lines(capsys.readouterr())
    assert line.startswith("error: report:") and "0123456789abcdef" in line
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    run = client.create_run(client.create_experiment("bad-bench"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert bench.main(["--quick", "maybe"]) == 2
    (line,) = error_lines(capsys.readouterr())
    assert "quick='maybe' is not allowed: expected true or false" in line
    assert no_run_is_running(tracking_uri)
