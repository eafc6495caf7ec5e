#!/usr/bin/env bash
# The GPU check on a GPU machine with Python 3.12 and JAX but no network (docs/jax.md, "The GPU check"):
# installs the wheels in .whl/ (made by `make gpu-wheels` on a machine with the package index) into
# /tmp/site, then runs `python -m growing_batch.gpu_check` with any arguments given here, writing its JSON
# lines to $OUT/gpu-check.jsonl (OUT defaults to the current folder) and its output to $OUT/gpu-check.log.
set -euo pipefail
OUT=${OUT:-.}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu-check.log" || true
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" 2>&1 | tee -a "$OUT/gpu-check.log"
python3 -m growing_batch.gpu_check --output "$OUT/gpu-check.jsonl" "$@" 2>&1 | tee -a "$OUT/gpu-check.log"
