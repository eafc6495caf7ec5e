"""End to end: `mlflow run . --env-manager local` on tiny data against a temporary store."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from growing_batch import schedules, train
from growing_batch import config as config_module
from growing_batch.config import Config, ConfigError
from growing_batch.metrics import EPOCH_METRICS

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2
# Small enough to be quick, with a schedule change visible at epoch 2 for every schedule.
COMMON = {"epochs": EPOCHS, "validation_size": 40, "batch_size": 16, "lr_decay": 0.5, "batch_growth": 2,
          "milestones": "1", "step_factor": 2, "learning_rate": 0.05}


def mlflow_run(tmp_path, uri, parameters, experiment="e2e"):
    """`python -m mlflow run PROJECT --env-manager local -P ...`; returns the finished process."""
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=str(tmp_path / "artifacts"))
    command = [sys.executable, "-m", "mlflow", "run", PROJECT_DIR, "--env-manager", "local",
               "--experiment-name", experiment]
    # `mlflow run` runs the entry point in the project's folder: keep checkpoints in tmp_path
    parameters = {"checkpoint_dir": str(tmp_path / "checkpoints"), **parameters}
    for name, value in parameters.items():
        command += ["-P", f"{name}={value}"]
    environment = dict(
        os.environ,
        MLFLOW_TRACKING_URI=uri,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    environment.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)


def runs(uri, experiment="e2e"):
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.fixture(scope="module")
def schedule_runs(tmp_path_factory, fashion_dir):
    """One 2-epoch `mlflow run` per schedule, all in one store, four at a time."""
    import concurrent.futures

    tmp_path = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("e2e", artifact_location=str(tmp_path / "artifacts"))  # before fan-out
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        processes = dict(zip(schedules.SCHEDULES, pool.map(
            lambda name: mlflow_run(tmp_path, uri, {"schedule": name, "data_dir": fashion_dir, **COMMON}),
            schedules.SCHEDULES)))
    outputs = {}
    for name, process in processes.items():
        assert process.returncode == 0, process.stderr[-3000:]
        outputs[name] = process.stdout + process.stderr
    by_schedule = {run.data.tags["schedule"]: run for run in runs(uri)}
    return uri, by_schedule, outputs


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
def test_each_schedule_logs_one_point_per_epoch_matching_the_schedule(schedule_runs, name):
    uri, by_schedule, _ = schedule_runs
    client = MlflowClient(uri)
    run = by_schedule[name]
    assert run.info.status == "FINISHED"
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
               for key in EPOCH_METRICS}
    for key, points in history.items():
        assert [step for step, _ in points] == list(range(1, EPOCHS + 1)), key
    train_size = int(run.data.params["train_examples"])
    assert train_size == 200
    config = Config(schedule=name, epochs=EPOCHS, validation_size=40, batch_size=16, lr_decay=0.5,
                    batch_growth=2.0, milestones=(1,), step_factor=2.0, learning_rate=0.05)
    schedule = schedules.build_schedule(config, train_size)
    if name == "adaptive":  # it follows the gradient noise scale the run measured
        measured = client.get_metric_history(run.info.run_id, "gradient_noise_scale")
        assert sorted(m.step for m in measured) == list(range(1, EPOCHS + 1))
        for metric in measured:
            schedule.observe(metric.step, {"gradient_noise_scale": metric.value})
    for epoch in range(1, EPOCHS + 1):
        step = schedule(epoch)
        assert history["batch_size"][epoch - 1][1] == step.batch_size
        assert history["learning_rate"][epoch - 1][1] == pytest.approx(step.learning_rate, rel=1e-12)
        assert history["noise_scale"][epoch - 1][1] == pytest.approx(step.noise_scale(train_size), rel=1e-12)
    table = schedules.table(schedule, EPOCHS, train_size)
    assert [value for _, value in history["updates"]] == [row["updates"] for row in table]
    assert [value for _, value in history["examples_seen"]] == [row["examples_seen"] for row in table]
    # every update sees exactly batch_size examples
    previous_updates = previous_examples = 0
    for (_, updates), (_, examples), (_, batch_size) in zip(history["updates"], history["examples_seen"],
                                                             history["batch_size"]):
        assert examples - previous_examples == batch_size * (updates - previous_updates)
        previous_updates, previous_examples = updates, examples


@pytest.mark.e2e
def test_runs_hold_params_tags_inputs_artifacts_and_model(schedule_runs):
    uri, by_schedule, outputs = schedule_runs
    client = MlflowClient(uri)
    run = by_schedule["noise-matched"]
    run_id = run.info.run_id
    params = run.data.params
    for field in Config.__dataclass_fields__:
        assert field in params, field  # as given (mlflow run logged them)
        assert f"resolved.{field}" in params, field  # as used
    assert params["schedule"] == "noise-matched" and params["resolved.schedule"] == "noise-matched"
    assert params["preset"] == "''" and params["resolved.preset"] == ""  # MLflow logs an empty value quoted
    assert params["resolved.momentum"] == "0.0" and params["resolved.epochs"] == "2"
    assert (params["train_examples"], params["validation_examples"], params["test_examples"]) == ("200", "40", "80")
    assert "resolved_max_batch_size" not in params  # one name per concept: the cap is in the description
    tags = run.data.tags
    assert (tags["schedule"], tags["dataset"], tags["model"], tags["preset"]) == (
        "noise-matched", "fashion_mnist", "small-cnn", "none")
    description = tags["mlflow.note.content"]  # the run explains itself in the UI
    assert "| `learning_rate` | 0.05 |" in description and "| `batch_size` | 16 |" in description
    assert "B × 1/0.5 per epoch from 16 to 20, then ε × 0.5 per epoch" in description
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(tags["git_commit"]) == 40
    assert run.info.run_name == "noise-matched b16x2 lr0.05 s0"
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    contexts = {tag.value for dataset_input in run.inputs.dataset_inputs for tag in dataset_input.tags}
    assert contexts == {"train", "validation", "test"}
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {"config.json", "history.csv", "schedule.png", "training_curves.png"} <= artifacts
    local = client.download_artifacts(run_id, "config.json", str(os.path.dirname(uri[len("sqlite:///"):])))
    with open(local) as handle:
        resolved = json.load(handle)
    assert resolved["schedule"] == "noise-matched" and resolved["train_examples"] == 200
    history_csv = open(client.download_artifacts(run_id, "history.csv", os.path.dirname(local))).read().splitlines()
    assert history_csv[0].startswith("epoch,train_loss,train_accuracy,val_loss")
    assert len(history_csv) == 1 + EPOCHS
    mlflow.set_tracking_uri(uri)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id='{run_id}'", output_format="list"
    )
    assert len(models) == 1
    info = mlflow.models.get_model_info(models[0].model_uri)
    assert "keras" in info.flavors
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 28, 28, 1]
    assert info.saved_input_example_info is not None and "logits" in info.metadata["output"]
    linked = {metric.key: metric.value for metric in models[0].metrics}  # the Models view can rank by them
    assert linked["test_accuracy"] == client.get_metric_history(run_id, "test_accuracy")[-1].value
    assert f"run {run_id} done: test_accuracy" in outputs["noise-matched"]
    # piped output: one line per epoch (verbose=auto), no progress bar of carriage returns
    for name, output in outputs.items():
        assert output.count("\r") < 20, name
        assert "epoch 2/2" in output, name


@pytest.mark.e2e
@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"learning_rate": -1}, "error: learning_rate='-1.0' is not allowed: expected a number > 0"),
        ({"schedule": "cosine"}, "error: schedule='cosine' is not allowed"),
        ({"batch_size": 500}, "error: batch_size='500' is not allowed: expected at most the 200 training examples"),
        ({"data_dir": "/no/such/folder"}, "error: data_dir='/no/such/folder' is not allowed"),
        ({"epochs": 2, "unknown_parameter": 3}, "error: unrecognized arguments: --unknown_parameter 3"),
    ],
)
def test_bad_input_through_mlflow_run_fails_with_one_line_and_no_running_run(tmp_path, fashion_dir, parameters, message):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = mlflow_run(tmp_path, uri, {"data_dir": fashion_dir, "validation_size": 40, **parameters})
    assert process.returncode != 0
    error_lines = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], process.stderr[-2000:]
    (run,) = runs(uri)
    assert run.info.status == "FAILED"
    assert message[len("error: "):] in run.data.tags["error"]
    assert "Epoch 1/" not in process.stdout  # nothing trained


@pytest.mark.e2e
def test_corrupt_data_file_through_mlflow_run(tmp_path, fashion_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(fashion_dir, broken)
    with open(broken / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"\x1f\x8b truncated")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = mlflow_run(tmp_path, uri, {"data_dir": str(broken), "validation_size": 40})
    assert process.returncode != 0
    assert "error: corrupt or truncated IDX file" in process.stderr
    assert "Traceback" not in process.stderr.split("=== Running command")[-1].split("mlflow.cli")[0]
    assert [run.info.status for run in runs(uri)] == ["FAILED"]


@pytest.mark.e2e
def test_a_preset_with_overrides_through_mlflow_run_logs_what_it_resolved_to(tmp_path, fashion_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    process = mlflow_run(tmp_path, uri, {"preset": "repro-ibs", "dataset": "fashion_mnist", "epochs": 2,
                                         "data_dir": fashion_dir, "validation_size": 40, "max_batch_size": 200})
    assert process.returncode == 0, process.stderr[-3000:]
    (run,) = runs(uri)
    params = run.data.params
    assert (params["preset"], params["epochs"], params["batch_growth"]) == ("repro-ibs", "2", "''")
    resolved = {key[len("resolved."):]: value for key, value in params.items() if key.startswith("resolved.")}
    assert resolved == Config(preset="repro-ibs", schedule="batch-growth", dataset="fashion_mnist", epochs=2,
                              validation_size=40, data_dir=fashion_dir, max_batch_size=200,
                              checkpoint_dir=str(tmp_path / "checkpoints")).to_params()
    client = MlflowClient(uri)
    sizes = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "batch_size"), key=lambda m: m.step)]
    assert sizes == [128, 132]


def test_a_cap_below_the_initial_batch_is_rejected(tracking_uri, fashion_dir):
    # N = 200, so the default cap N/10 = 20 is below the preset's B0 = 128
    with pytest.raises(ConfigError, match="max_batch_size='0' is not allowed: it resolves to N/10 = 20, below batch_size"):
        train.train(config_module.from_args(["--preset", "repro-ibs", "--dataset", "fashion_mnist", "--data_dir",
                                             fashion_dir, "--validation_size", "40"]))


def test_main_marks_the_run_mlflow_run_created_failed(tracking_uri, monkeypatch):
    """In process: the run exists before the script starts, as under `mlflow run`."""
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("pre-created"))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert train.main(["--momentum", "1.5"]) == 2
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.tags["error"].startswith("momentum='1.5' is not allowed")


def test_main_without_mlflow_run_creates_no_run_on_bad_input(tracking_uri, capsys):
    assert train.main(["--epochs", "-3"]) == 2
    assert capsys.readouterr().err.strip() == "error: epochs='-3' is not allowed: expected a whole number >= 1."
    assert MlflowClient(tracking_uri).search_runs(["0"]) == []


def test_main_trains_in_process_and_finishes_the_run(tracking_uri, fashion_dir):
    assert train.main(["--schedule", "step-hybrid", "--milestones", "1", "--step_factor", "2", "--epochs", "2",
                       "--data_dir", fashion_dir, "--validation_size", "40", "--batch_size", "20"]) == 0
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["batch_size"] == 20  # max_batch_size N/10 = 20: B x 2 capped, ε takes the rest
    assert run.data.metrics["learning_rate"] == pytest.approx(0.05)
