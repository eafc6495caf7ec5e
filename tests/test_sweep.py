"""Sweeps: parent and children, resuming, the summary, the notebook and the report."""

import math
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from growing_batch import analysis, plots, report, sweep
from growing_batch.config import ConfigError

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_crosses_members_and_seeds_with_the_overrides():
    children = sweep.plan("repro", 2, {"epochs": "3", "dataset": "fashion_mnist", "data_dir": ""})
    assert [child.key for child in children] == [
        f"{name}/seed={seed}" for seed in (0, 1) for name in ("repro-lrd", "repro-ibs", "repro-matched", "repro-hybrid")
    ]
    assert children[4].values == {"preset": "repro-lrd", "epochs": "3", "dataset": "fashion_mnist", "seed": "1",
                                  "verbose": "2"}  # one line per epoch in the child's log
    assert children[4].argv()[:2] == ["--preset", "repro-lrd"]


@pytest.mark.parametrize(
    "experiment, seeds, overrides, message",
    [
        ("imagenet", 1, {}, "experiment='imagenet' is not allowed: expected one of quick, repro, paper"),
        ("quick", 0, {}, "seeds='0' is not allowed"),
        ("quick", 1, {"epochs": "-1"}, "epochs='-1' is not allowed"),
        ("quick", 1, {"dataset": "svhn"}, "dataset='svhn' is not allowed"),
    ],
)
def test_bad_sweeps_fail_before_anything_runs(experiment, seeds, overrides, message):
    with pytest.raises(ConfigError, match=message):
        sweep.plan(experiment, seeds, overrides)


def test_sweep_key_ignores_empty_overrides():
    assert sweep.sweep_key("quick", 2, {"epochs": "2", "data_dir": ""}) == sweep.sweep_key("quick", 2, {"epochs": "2"})
    assert sweep.sweep_key("quick", 2, {"epochs": "2"}) != sweep.sweep_key("quick", 3, {"epochs": "2"})


def test_every_member_of_every_experiment_resolves():
    for name in sweep.EXPERIMENTS:
        assert sweep.plan(name, 1, {})


def mlflow_sweep(tmp_path, uri, fashion_dir, **extra):
    command = [sys.executable, "-m", "mlflow", "run", PROJECT_DIR, "--env-manager", "local", "--experiment-name", "sweeps",
               "-e", "sweep", "-P", "experiment=quick", "-P", "epochs=2", "-P", "seeds=2", "-P", "workers=2",
               "-P", f"data_dir={fashion_dir}", "-P", "validation_size=40",
               "-P", f"checkpoint_dir={tmp_path / 'checkpoints'}"]
    for name, value in extra.items():
        command += ["-P", f"{name}={value}"]
    environment = dict(os.environ, MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="2",
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    environment.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, fashion_dir_1400):
    tmp_path = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("sweeps", artifact_location=str(tmp_path / "artifacts"))
    first = mlflow_sweep(tmp_path, uri, fashion_dir_1400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp_path, uri, first, fashion_dir_1400


def sweep_runs(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep_role") == "child"]
    return parents, children, runs


@pytest.mark.e2e
def test_a_sweep_makes_one_parent_with_its_children_and_a_rerun_makes_none(swept):
    tmp_path, uri, first, fashion_dir = swept
    (parent,), children, _ = sweep_runs(uri)
    assert sorted(c.data.tags["sweep_child"] for c in children) == [
        "lr-decay/seed=0", "lr-decay/seed=1", "noise-matched/seed=0", "noise-matched/seed=1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {c.data.params["resolved.seed"] for c in children} == {"0", "1"}
    assert {c.data.params["resolved.epochs"] for c in children} == {"2"}
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"summary.csv", "runs.csv", "figures/test_accuracy.png", "figures/schedules.png"} <= artifacts
    assert "noise-matched" in first.stdout

    again = mlflow_sweep(tmp_path, uri, fashion_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skip ") == 4
    parents, children_after, runs = sweep_runs(uri)
    assert len(parents) == 1 and len(children_after) == 4
    (resume_run,) = [r for r in runs if "sweep_resumed" in r.data.tags]
    assert resume_run.data.tags["sweep_resumed"] == parent.info.run_id


@pytest.mark.e2e
def test_a_rerun_replaces_a_failed_child_and_keeps_the_old_one(swept):
    tmp_path, uri, _, fashion_dir = swept
    client = MlflowClient(uri)
    _, children, _ = sweep_runs(uri)
    failed = next(c for c in children if c.data.tags["sweep_child"] == "noise-matched/seed=1")
    client.set_terminated(failed.info.run_id, "FAILED")
    process = mlflow_sweep(tmp_path, uri, fashion_dir)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("skip ") == 3
    _, children, _ = sweep_runs(uri)
    replaced = [c for c in children if c.data.tags["sweep_child"] == "noise-matched/seed=1"]
    assert len(replaced) == 2
    old = next(c for c in replaced if c.info.run_id == failed.info.run_id)
    new = next(c for c in replaced if c.info.run_id != failed.info.run_id)
    assert old.data.tags["sweep_superseded"] == "true" and new.info.status == "FINISHED"
    assert client.get_metric_history(old.info.run_id, "test_accuracy")  # what it logged is kept


@pytest.mark.e2e
def test_summary_numbers_equal_the_metric_histories(swept):
    _, uri, _, _ = swept
    (parent,), _, _ = sweep_runs(uri)
    client = MlflowClient(uri)
    runs, history = analysis.load_runs(parent_run_id=parent.info.run_id, tracking_uri=uri)
    assert len(runs) == 4  # superseded children are left out
    summary = analysis.schedule_summary(runs, history).set_index("member")
    direct = {}
    for run in runs.itertuples():
        accuracy = [m.value for m in sorted(client.get_metric_history(run.run_id, "test_accuracy"), key=lambda m: m.step)]
        validation = [m.value for m in sorted(client.get_metric_history(run.run_id, "val_accuracy"), key=lambda m: m.step)]
        updates = max(m.value for m in client.get_metric_history(run.run_id, "updates"))
        at_best_val = accuracy[validation.index(max(validation))]
        direct.setdefault(run.member, []).append((accuracy[-1], max(accuracy), updates, at_best_val))
    for member, values in direct.items():
        finals = [v[0] for v in values]
        mean = sum(finals) / len(finals)
        std = math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1))
        assert summary.loc[member, "final_test_accuracy_mean"] == pytest.approx(mean, abs=1e-12)
        assert summary.loc[member, "final_test_accuracy_std"] == pytest.approx(std, abs=1e-12)
        assert summary.loc[member, "best_test_accuracy_mean"] == pytest.approx(sum(v[1] for v in values) / 2, abs=1e-12)
        assert summary.loc[member, "test_accuracy_at_best_val_mean"] == pytest.approx(
            sum(v[3] for v in values) / 2, abs=1e-12)
        assert summary.loc[member, "diverged"] == 0
        assert summary.loc[member, "updates"] == pytest.approx(sum(v[2] for v in values) / 2)
    assert summary.loc["lr-decay", "updates_ratio"] == 1.0
    assert summary.loc["noise-matched", "updates_ratio"] == pytest.approx(
        summary.loc["noise-matched", "updates"] / summary.loc["lr-decay", "updates"])
    for name, figure in plots.comparison_figures(history).items():
        assert figure.run_ids == set(runs["run_id"]), name


@pytest.mark.e2e
def test_the_notebook_and_the_report_run_headless_on_the_sweep(swept, monkeypatch):
    tmp_path, uri, _, _ = swept
    monkeypatch.chdir(tmp_path)  # nothing lands in the working directory
    (parent,), _, _ = sweep_runs(uri)
    notebook = report.execute_notebook({"TRACKING_URI": uri, "EXPERIMENT_NAME": "", "PARENT_RUN_ID": parent.info.run_id})
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # the noise-scale one is left out, saying why
    assert "No run measured the gradient noise scale" in text
    assert f"Read the children of sweep run {parent.info.run_id} in experiment 'sweeps' from {uri}: 4 runs" in text
    assert "all 4 figures draw all 4 runs" in text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    assert report.main(["--run_id", parent.info.run_id]) == 0
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "report")}
    assert {"report/analysis.html", "report/analysis.ipynb", "report/test_accuracy_wall_clock.png"} <= logged
    assert report.main(["--run_id", "0" * 32]) == 2  # no such run: one line, not a traceback


def test_absolute_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report.absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert report.absolute_tracking_uri("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"
    assert report.absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_sweep_without_mlflow_run_creates_and_then_continues_its_parent(tracking_uri, monkeypatch):
    """In process, with training replaced by a stub child that finishes at once."""
    launched = []

    def finish_at_once(client, experiment_id, parent_id, key, child, log_dir, resume_run_id=None):
        run = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_id, "sweep_key": key,
                                                     "sweep_child": child.key, "sweep_member": child.member,
                                                     "sweep_role": "child"})
        client.set_terminated(run.info.run_id, "FINISHED")
        launched.append(child.key)
        return "FINISHED"

    monkeypatch.setattr(sweep, "run_child", finish_at_once)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "direct")
    assert sweep.main(["--experiment", "repro", "--seeds", "2", "--epochs", "1"]) == 0
    assert len(launched) == 8
    assert sweep.main(["--experiment", "repro", "--seeds", "2", "--epochs", "1"]) == 0
    assert len(launched) == 8  # all FINISHED: nothing runs again
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("direct").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["seeds"] == "2"


def test_shards_on_several_machines_share_one_parent_and_split_the_children(tracking_uri, monkeypatch, capsys):
    """Two machines (shards 0/2 and 1/2) run one sweep: each child once, one parent, FINISHED at the end."""
    launched = {}

    def finish_at_once(client, experiment_id, parent_id, key, child, log_dir, resume_run_id=None):
        run = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent_id, "sweep_key": key,
                                                     "sweep_child": child.key, "sweep_member": child.member,
                                                     "sweep_role": "child"})
        client.set_terminated(run.info.run_id, "FINISHED")
        launched.setdefault(child.key, []).append(parent_id)
        return "FINISHED"

    monkeypatch.setattr(sweep, "run_child", finish_at_once)
    assert sweep.main(["--experiment", "quick", "--seeds", "3", "--shard", "0/2"]) == 0
    assert "the parent stays RUNNING" in capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    (parent,) = client.search_runs(["0"], filter_string="tags.sweep_role = 'parent'")
    assert parent.info.status == "RUNNING" and len(launched) == 3
    assert sweep.main(["--experiment", "quick", "--seeds", "3", "--shard", "1/2"]) == 0
    assert sorted(launched) == sorted(child.key for child in sweep.plan("quick", 3, {}))
    assert all(parents == [parent.info.run_id] for parents in launched.values())  # each child once, one parent
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    for bad in ("2/2", "1", "a/b", "-1/2"):
        assert sweep.main(["--experiment", "quick", f"--shard={bad}"]) == 2
        assert f"shard='{bad}' is not allowed: expected i/n with 0 <= i < n" in capsys.readouterr().err


def test_sweep_bad_arguments_are_one_line(tracking_uri, capsys):
    assert sweep.main(["--experiment", "quick", "--seeds", "two"]) == 2
    assert capsys.readouterr().err.strip() == "error: seeds='two' is not allowed: expected a whole number."
    assert sweep.main(["--experiment", "nope"]) == 2
    assert "experiment='nope' is not allowed" in capsys.readouterr().err
