"""Bad input ends as one line on stderr and, where a run was already created for it, a FAILED run —
never a run stuck in RUNNING.

Imports no TensorFlow (and MLflow only to mark a run), so a rejected configuration fails in seconds.
"""

from __future__ import annotations

import sys


def exit_with_error(message: str, exit_code: int = 2, run_id: str | None = None) -> int:
    """Print ``error: <message>`` as one line; with ``run_id`` (a run ``mlflow run`` created that this
    process never trained), mark that run FAILED with the line as its ``error`` tag
    (:func:`growing_batch.tracking.fail_run`); return the exit code."""
    line = " ".join(message.split())
    print(f"error: {line}", file=sys.stderr, flush=True)
    if run_id:
        from growing_batch import tracking

        tracking.fail_run(run_id, line)
    return exit_code
