"""`mlflow run -e bench -P quick=true`: it writes its JSON, meets its own targets and logs the JSON to its run."""

import json
import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from processes import PROJECT_DIR, environment


@pytest.mark.e2e
def test_mlflow_run_bench_quick_writes_its_json_and_meets_its_targets(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    output = tmp_path / "bench.json"
    command = ["mlflow", "run", PROJECT_DIR, "--env-manager", "local", "-e", "bench",
               "-P", "quick=true", "-P", f"output={output}"]
    process = subprocess.run(command, cwd=tmp_path, env=environment(uri), capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "warning" not in process.stderr, process.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["quick"] is True
    judged = {name: target for name, target in results["targets"].items() if target["met"] is not None}
    assert set(judged) == {"train_step_traces", "logging_fraction"}
    assert all(target["met"] for target in judged.values()), results["targets"]
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert [artifact.path for artifact in MlflowClient(uri).list_artifacts(run.info.run_id)] == ["bench.json"]
    assert not os.path.exists(os.path.join(PROJECT_DIR, "mlflow.db"))  # the bench's own store was temporary
