"""Bad input ends as one line on stderr and a FAILED run, never as a run stuck in RUNNING.

Imports MLflow but no TensorFlow, so a rejected configuration fails in about a second.
"""

from __future__ import annotations

import os
import sys

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient


def fail_run(message: str) -> None:
    """Mark the run of this process FAILED with an ``error`` tag.

    Covers both the active run and a run that ``mlflow run`` created but the script never
    entered (``MLFLOW_RUN_ID``), as happens when the configuration is rejected.
    """
    active = mlflow.active_run()
    run_id = active.info.run_id if active else os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        client = MlflowClient()
        client.set_tag(run_id, "error", message[:5000])
        if active:
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        elif not RunStatus.is_terminated(RunStatus.from_string(client.get_run(run_id).info.status)):
            client.set_terminated(run_id, "FAILED")
    except Exception as error:  # the store itself may be the problem: say so, and go on failing
        print(f"warning: could not mark run {run_id} FAILED: {error}", file=sys.stderr)


def exit_with_error(message: str, exit_code: int = 2, mark_run: bool = True) -> int:
    """Print ``error: <message>`` as one line, fail the run (unless ``mark_run`` is false: a run
    that must be left as it was), and return the exit code."""
    line = " ".join(message.split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    if mark_run:
        fail_run(line)
    return exit_code
