"""The analysis notebook executed headless with only MLflow's own environment variables set."""

import os

import fake_runs
from growing_batch import report


def outputs_of(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def text_of(outputs):
    return "".join(output.get("text", "") for output in outputs)


def test_the_notebook_reads_mlflows_environment_variables(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = fake_runs.fake_experiment(uri, "from-the-environment", str(tmp_path / "artifacts"))
    for name in list(os.environ):
        if name.startswith("MLFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-environment")
    monkeypatch.chdir(tmp_path)

    notebook = report.execute_notebook(None)  # no parameters injected

    outputs = outputs_of(notebook)
    assert not [output for output in outputs if output.get("output_type") == "error"]
    text = text_of(outputs)
    assert f"Read experiment 'from-the-environment' from {uri}: 5 runs, 15 run-epochs." in text
    # the CLI's tables: thousands separators, four decimals, an interrupted run left FAILED shows KILLED
    updates = 3 * (fake_runs.TRAIN_EXAMPLES // 128)
    assert f"{updates:,}" in text and f"{updates}.0" not in text
    (killed,) = [line for line in text.splitlines() if line.endswith(ids["interrupted"])]
    assert " KILLED " in killed
    assert "0.8050 ± 0.0071" in text  # lr-decay's final test accuracy over its two seeds
    # four figures; the noise-scale one is left out with a sentence, no run having measured it
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 4
    assert "No run measured the gradient noise scale" in text
    assert "all 4 figures draw all 5 runs" in text
    assert os.listdir(tmp_path) == ["mlflow.db"]  # nothing else written
