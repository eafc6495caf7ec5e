"""The ``report`` entry point: the analysis notebook, executed headless for one sweep.

    mlflow run . --env-manager local -e report -P run_id=<the sweep's parent run>
    python -m growing_batch.report --run_id <the sweep's parent run>

Runs ``notebooks/analysis.ipynb`` with its parameters set to this tracking store (as an absolute
URI) and the sweep's parent run — a cell inserted after the one tagged ``parameters``, as
papermill does — and logs to the parent run ``report/analysis.html`` (the rendered notebook),
``report/analysis.ipynb`` (with outputs) and the figures under ``report/``.

Under ``mlflow run``, MLflow makes a run of its own for the entry point before the script starts (in
the Default experiment unless ``--experiment-name`` says otherwise), and would leave it empty. After a
report succeeds, that run is deleted once ``mlflow run`` has exited and marked it FINISHED (a small
detached process waits for it, as MLflow cannot delete a run it is still to terminate): deleted as
the UI's *Delete* does, so ``mlflow gc`` can purge it. A report that fails keeps that run, FAILED with
its ``error`` tag.
"""

from __future__ import annotations

import os
import sys

import mlflow
from mlflow.tracking import MlflowClient

from growing_batch.config import OneLineParser
from growing_batch.errors import exit_with_error

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(PROJECT_DIR, "notebooks", "analysis.ipynb")
EXECUTION_TIMEOUT_SECONDS = 600


def delete_after_mlflow_run(run_id: str) -> bool:
    """Under ``mlflow run`` for ``run_id``: delete that run once ``mlflow run`` has exited
    (growing_batch.tracking). Returns whether it will; elsewhere does nothing."""
    from growing_batch import tracking

    return tracking.delete_after_mlflow_run(run_id)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/path/mlflow.db`` (the notebook runs elsewhere)."""
    from growing_batch.analysis import absolute_tracking_uri as absolute

    return absolute(uri)


def execute_notebook(parameters: dict | None, notebook_path: str = NOTEBOOK):
    """The notebook executed with ``parameters`` injected after its ``parameters`` cell (``None``:
    none injected; the notebook then reads MLflow's environment variables)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(notebook_path, as_version=4)
    index = next(
        (i for i, cell in enumerate(notebook.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])),
        None,
    )
    if index is None:
        raise ValueError(f"{notebook_path} has no cell tagged 'parameters'")
    if parameters is not None:
        _inject(notebook, index, parameters)
    client = NotebookClient(
        notebook, timeout=EXECUTION_TIMEOUT_SECONDS, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(notebook_path)}},
    )
    client.execute()
    return notebook


def _inject(notebook, index: int, parameters: dict) -> None:
    import nbformat

    source = "# Injected by growing_batch.report\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, injected)


def report(run_id: str) -> int:
    import nbformat
    from nbconvert import HTMLExporter

    from growing_batch import analysis, plots

    client = MlflowClient()
    parent = client.get_run(run_id)  # raises if there is no such run
    if parent.data.tags.get("sweep_role") != "parent":
        raise ValueError(f"run_id={run_id!r} is not a sweep's parent run (tag sweep_role=parent)")
    uri = absolute_tracking_uri(mlflow.get_tracking_uri())
    notebook = execute_notebook({"TRACKING_URI": uri, "EXPERIMENT_NAME": "", "PARENT_RUN_ID": run_id})
    html, _ = HTMLExporter().from_notebook_node(notebook)
    client.log_text(run_id, html, "report/analysis.html")
    client.log_text(run_id, nbformat.writes(notebook), "report/analysis.ipynb")
    _, history = analysis.load_runs(parent_run_id=run_id)
    figures = plots.comparison_figures(history)
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"report/{name}")
    experiment = client.get_experiment(parent.info.experiment_id).name
    print(f"logged to run {run_id} (experiment {experiment!r}): report/analysis.html, report/analysis.ipynb "
          f"and {len(figures)} figures")
    current = os.environ.get("MLFLOW_RUN_ID")
    if current and current != run_id:
        client.set_tag(current, "report_for", run_id)
        if delete_after_mlflow_run(current):
            print(f"the run {current} that `mlflow run` made for this entry point is deleted once it exits")
    return 0


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m growing_batch.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_id", required=True, help="the sweep's parent run")
    try:
        arguments = parser.parse_args(argv)
        return report(arguments.run_id)
    except (ValueError, mlflow.exceptions.MlflowException) as error:  # ConfigError is a ValueError
        return exit_with_error(f"report: {error}", run_id=os.environ.get("MLFLOW_RUN_ID"))


if __name__ == "__main__":
    sys.exit(main())
