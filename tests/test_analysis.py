"""Analysis tables and figures read back from a tiny store of fake runs; what the notebook reads."""

import matplotlib.colors
import pytest
from mlflow.tracking import MlflowClient

import fake_runs
from growing_batch import analysis, plots


def test_a_failed_run_tagged_interrupted_shows_killed():
    assert analysis.run_status("FAILED", {"interrupted": "SIGTERM during epoch 4"}) == "KILLED"
    assert analysis.run_status("FAILED", {"error": "bad input"}) == "FAILED"
    assert analysis.run_status("KILLED", {"interrupted": "SIGINT"}) == "KILLED"
    assert analysis.run_status("FINISHED", {}) == "FINISHED"
    assert analysis.run_status("RUNNING", {"interrupted": "x"}) == "RUNNING"  # resumed, training again


@pytest.fixture
def fake_store(tracking_uri, tmp_path):
    return tracking_uri, fake_runs.fake_experiment(tracking_uri, "fake", str(tmp_path / "artifacts"))


def test_the_runs_table_shows_an_interrupted_run_left_failed_as_killed(fake_store):
    uri, ids = fake_store
    assert MlflowClient(uri).get_run(ids["interrupted"]).info.status == "FAILED"  # as `mlflow run` left it
    runs, history = analysis.load_runs(experiment_name="fake", tracking_uri=uri)
    status = dict(zip(runs["run_id"], runs["status"]))
    assert status[ids["interrupted"]] == "KILLED"
    assert {status[ids[key]] for key in ids if key != "interrupted"} == {"FINISHED"}
    table = analysis.format_run_table(analysis.run_summary(runs, history))
    (line,) = [line for line in table.splitlines() if line.endswith(ids["interrupted"])]
    assert " KILLED " in line
    summary = analysis.schedule_summary(runs, history).set_index("member")
    assert summary.loc["noise-matched", "seeds"] == 2  # the interrupted run is not a finished seed


def test_the_notebook_reads_its_parameters_then_mlflows_variables_then_the_defaults(tmp_path):
    environment = {"MLFLOW_TRACKING_URI": "sqlite:////data/mlflow.db", "MLFLOW_EXPERIMENT_NAME": "from-env"}
    assert analysis.notebook_source(environ=environment) == analysis.Source("sqlite:////data/mlflow.db", "from-env", "")
    given = analysis.notebook_source("sqlite:////given.db", "given", environ=environment)
    assert given == analysis.Source("sqlite:////given.db", "given", "")
    default = analysis.notebook_source(environ={}, project_dir=str(tmp_path))
    assert default == analysis.Source(f"sqlite:///{tmp_path}/mlflow.db", "quick-fashion-mnist", "")
    relative = analysis.notebook_source(environ={"MLFLOW_TRACKING_URI": "sqlite:///runs/mlflow.db"},
                                        project_dir=str(tmp_path))
    assert relative.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db"  # from the project folder
    assert analysis.notebook_source(environ={"MLFLOW_TRACKING_URI": "http://10.0.0.1:5000"}).tracking_uri == (
        "http://10.0.0.1:5000")


def test_a_parent_run_wins_and_names_its_experiment(fake_store):
    uri, _ = fake_store
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("fake").experiment_id
    parent = client.create_run(experiment_id, tags={"sweep_role": "parent"}).info.run_id
    child = fake_runs.log_fake_run(client, experiment_id, "lr-decay", 0, parent_run_id=parent)
    source = analysis.notebook_source(uri, "ignored", parent, environ={"MLFLOW_EXPERIMENT_NAME": "other"})
    assert source == analysis.Source(uri, "fake", parent)
    runs, history = analysis.load_runs(parent_run_id=parent, tracking_uri=uri)
    assert list(runs["run_id"]) == [child]
    assert source.describe(runs, history) == (
        f"Read the children of sweep run {parent} in experiment 'fake' from {uri}: 1 runs, 3 run-epochs.")


def test_figures_are_means_over_seeds_with_a_band_and_empty_ones_say_why(fake_store):
    uri, ids = fake_store
    runs, history = analysis.load_runs(experiment_name="fake", tracking_uri=uri)
    figure = plots.figure_or_reason(history, "test_accuracy")
    axis = figure.axes[0]
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) == {"lr-decay (2 seeds)", "noise-matched (3 seeds)"}
    # seeds 0 and 1 of lr-decay differ by 0.01: the mean is the middle, the band ±1 sample std around it
    assert list(lines["lr-decay (2 seeds)"].get_ydata()) == pytest.approx([0.605, 0.705, 0.805])
    line_colour = matplotlib.colors.to_rgb(lines["lr-decay (2 seeds)"].get_color())
    (band,) = [band for band in axis.collections if tuple(band.get_facecolor()[0][:3]) == pytest.approx(line_colour)]
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    std = 0.01 / 2 ** 0.5
    assert (low, high) == pytest.approx((0.605 - std, 0.805 + std))
    schedules = plots.figure_or_reason(history, "schedules")
    assert len(schedules.axes[1].collections) == 2  # a band per schedule, zero wide here
    assert plots.figure_or_reason(history, "gradient_noise_scale") == plots.NO_NOISE_SCALE
    assert plots.figure_or_reason(history.iloc[0:0], "train_loss") == (
        "No run here logged an epoch, so this figure is left out.")
    assert plots.figure_or_reason(history.drop(columns="train_loss"), "train_loss") == (
        "No run here logged train_loss, so this figure is left out.")
    client = MlflowClient(uri)
    measured = fake_runs.log_fake_run(client, client.get_experiment_by_name("fake").experiment_id, "lr-decay", 5,
                                      noise=True)
    _, history = analysis.load_runs(experiment_name="fake", tracking_uri=uri)
    assert plots.figure_or_reason(history, "gradient_noise_scale").run_ids == {measured}
    with pytest.raises(ValueError, match="name='loss'"):
        plots.figure_or_reason(history, "loss")

