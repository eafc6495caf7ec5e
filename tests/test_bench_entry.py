"""`mlflow run -e bench -P quick=true`: it writes its JSON, meets its own targets and logs the JSON to its run;
`-P backend=jax`: the same parts and JSON keys on JAX, with bounded XLA compilations; bad input: one line."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from growing_batch import bench
from processes import PROJECT_DIR, environment


@pytest.mark.e2e
def test_mlflow_run_bench_quick_writes_its_json_and_meets_its_targets(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    output = tmp_path / "bench.json"
    command = ["mlflow", "run", PROJECT_DIR, "--env-manager", "local", "-e", "bench",
               "-P", "quick=true", "-P", f"output={output}"]
    env = environment(uri)
    env.pop("KERAS_BACKEND", None)  # not given: tensorflow
    project_store = os.path.join(PROJECT_DIR, "mlflow.db")  # may hold the user's runs (make main)

    def stamp():
        return os.stat(project_store).st_mtime_ns if os.path.exists(project_store) else None

    before = stamp()
    process = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "warning" not in process.stderr, process.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["quick"] is True and results["backend"] == "tensorflow"
    judged = {name: target for name, target in results["targets"].items() if target["met"] is not None}
    assert set(judged) == {"train_step_traces", "logging_fraction"}
    assert all(target["met"] for target in judged.values()), results["targets"]
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backend"] == "''"  # not given: MLflow logs the empty default as ''
    assert [artifact.path for artifact in MlflowClient(uri).list_artifacts(run.info.run_id)] == ["bench.json"]
    assert stamp() == before  # the bench's own store was temporary: the project's store is untouched


# Every part of the bench at toy sizes (about 40 s on JAX on a 2-core CPU, most of it XLA compiling):
# two batch sizes, a batch-growth run over B = 16..32 (six sizes, three buckets), synthetic data.
TINY = {"train": 256, "test": 64, "repetitions": 2, "batch_sizes": [32, 64], "growth_epochs": 6, "growth_train": 512,
        "logging_epochs": 2, "comparison_epochs": 2, "comparison_train": 1280, "matmul": 256,
        "variant_batch_size": 64, "comparison_data": "synthetic"}


# The bench's command line in a process that cannot import TensorFlow (as on a GPU image with JAX alone).
BENCH_WITHOUT_TENSORFLOW = r"""
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
from growing_batch import bench
code = bench.main(sys.argv[1:])
assert "tensorflow" not in sys.modules, "the JAX bench imported TensorFlow"
sys.exit(code)
"""


def tiny_bench(folder, backend):
    """The toy bench on ``backend``; on JAX, without TensorFlow importable."""
    output = folder / f"bench-{backend}.json"
    env = environment(f"sqlite:///{folder}/mlflow.db", GROWING_BATCH_BENCH_SETTINGS=json.dumps(TINY))
    env.pop("KERAS_BACKEND", None)  # the flag alone chooses the backend
    program = ["-c", BENCH_WITHOUT_TENSORFLOW] if backend == "jax" else ["-m", "growing_batch.bench"]
    process = subprocess.run([sys.executable, *program, "--backend", backend, "--quick", "true",
                              "--output", str(output)], cwd=folder, env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(output.read_text()), process.stdout


@pytest.fixture(scope="module")
def tiny_benches(tmp_path_factory):
    """The toy bench on each backend, each in its own process (the backend is fixed when Keras is imported)."""
    folder = tmp_path_factory.mktemp("bench")
    return {backend: tiny_bench(folder, backend) for backend in ("jax", "tensorflow")}


def key_tree(value):
    """The keys of every nested object, without the values."""
    if isinstance(value, dict):
        return {key: key_tree(item) for key, item in value.items()}
    return None


def test_the_jax_bench_writes_the_tensorflow_bench_keys(tiny_benches):
    (jax_results, jax_output), (tensorflow_results, _) = tiny_benches["jax"], tiny_benches["tensorflow"]
    assert jax_results["backend"] == "jax" and tensorflow_results["backend"] == "tensorflow"
    assert key_tree(jax_results) == key_tree(tensorflow_results)
    assert list(jax_results["fit_ratio"]) == ["32", "64"]
    assert all(ratio > 0 for ratio in jax_results["fit_ratio"].values())
    assert jax_results["devices"] == ["CPU"] and jax_results["jax"]
    assert all(rate > 0 for rate in jax_results["peak_flops"].values())
    assert jax_output.startswith("B=    32: loop") and "\nbackend jax (Keras " in jax_output
    # On JAX the loop is always XLA-compiled: no XLA speed-up is made up, the loop's own epoch is given.
    xla = jax_results["loop_variants"]["xla"]
    assert xla["speedup"] is None and xla["float32_seconds"] is None and "implied" in xla["note"]
    assert xla["seconds"] == jax_results["epoch_seconds"]["64"]
    assert jax_results["loop_variants"]["mixed_bfloat16"]["speedup"] > 0
    assert tensorflow_results["loop_variants"]["xla"]["speedup"] > 0


def test_the_jax_bench_compiles_a_bounded_number_of_shapes(tiny_benches):
    results, _ = tiny_benches["jax"]
    assert results["loop_xla_compilations"] == {"32": 1, "64": 1}  # one padded shape per fixed batch size
    assert results["batch_size_range"] == [16, 32] and results["distinct_batch_sizes"] == 6
    assert results["xla_compilations"] == 3  # the buckets 16, 24 and 32: not one per epoch
    assert results["xla_compilation_bound"] == 3 and results["train_step_traces"] == 3
    judged = {name: target for name, target in results["targets"].items() if target["met"] is not None}
    assert set(judged) == {"train_step_traces", "xla_compilations", "logging_fraction"}
    assert all(target["met"] for target in judged.values()), results["targets"]
    tensorflow, _ = tiny_benches["tensorflow"]
    assert tensorflow["train_step_traces"] == 1 and tensorflow["xla_compilations"] == 0
    assert tensorflow["loop_xla_compilations"] == {"32": 0, "64": 0}


def test_the_compilation_bound_counts_the_bucket_sizes():
    assert bench.compilation_bound(16, 32) == 3  # 16, 24, 32
    assert bench.compilation_bound(128, 128) == 1
    # 8 · 2^(k/4) rounded up to a multiple of 8, k = 4..28: 24 and 32 each stand for two k
    assert bench.compilation_bound(16, 1024) == 1 + 4 * 6 - 2


def test_the_bench_entry_point_has_one_flag_per_parameter():
    with open(os.path.join(PROJECT_DIR, "MLproject"), encoding="utf-8") as handle:
        entry = yaml.safe_load(handle)["entry_points"]["bench"]
    flags = {action.dest for action in bench.make_parser()._actions if action.dest != "help"}
    assert set(entry["parameters"]) == flags == {"output", "quick", "backend"}
    assert entry["parameters"]["backend"] == {"type": "string", "default": ""}
    for name in flags:
        assert f"--{name} {{{name}}}" in entry["command"], name


def error_lines(captured):
    return [line for line in captured.err.splitlines() if line.startswith("error: ")]


BAD_BENCH_INPUT = [
    ({"argv": ["--backend", "pytorch"]}, "backend='pytorch' is not allowed: expected one of tensorflow, jax"),
    ({"argv": [], "KERAS_BACKEND": "torch"},
     "KERAS_BACKEND='torch' is not allowed: expected one of tensorflow, jax, or the parameter backend given"),
    ({"argv": ["--backend", "jax"], "no_jax": True},
     "backend='jax' is not allowed: expected JAX installed; install it with: pip install jax==0.10.2 jaxlib==0.10.2"),
    ({"argv": ["--quick", "true"], "GROWING_BATCH_BENCH_SETTINGS": '{"train": "many"}'},
     "GROWING_BATCH_BENCH_SETTINGS='{\"train\": \"many\"}' is not allowed: expected a JSON object"),
]


@pytest.mark.parametrize("case, message", BAD_BENCH_INPUT, ids=["backend", "KERAS_BACKEND", "no-jax", "settings"])
def test_bad_bench_input_is_one_line_and_a_failed_run(tracking_uri, capsys, monkeypatch, case, message):
    from growing_batch import config

    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("bad-bench"))  # as `mlflow run` creates it
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    for name in ("KERAS_BACKEND", "GROWING_BATCH_BENCH_SETTINGS"):
        if name in case:
            monkeypatch.setenv(name, case[name])
    if case.get("no_jax"):
        monkeypatch.setattr(config, "jax_installed", lambda: False)
    assert bench.main(case["argv"]) == 2
    (line,) = error_lines(capsys.readouterr())
    assert message in line
    assert client.get_run(run.info.run_id).info.status == "FAILED"
