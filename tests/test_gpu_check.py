"""The GPU check's script on the CPU, tiny: one JSON line per batch size of the preset and a projection;
bad input in one line. (Its figures are the GPU machine's: docs/jax.md.)"""

import json
import subprocess
import sys

import pytest

from growing_batch import gpu_check
from growing_batch.config import ConfigError
from processes import environment

pytestmark = pytest.mark.e2e


def test_the_gpu_check_times_every_batch_size_of_the_preset_and_projects_its_200_epochs(tmp_path):
    output = tmp_path / "gpu-check.jsonl"
    env = environment(f"sqlite:///{tmp_path}/mlflow.db")
    env.pop("KERAS_BACKEND", None)  # the check chooses JAX itself
    result = subprocess.run([sys.executable, "-m", "growing_batch.gpu_check", "--bench", "false", "--train_size", "128",
                             "--test_size", "32", "--image_size", "8", "--presets", "paper-increase",
                             "--precisions", "float32", "--output", str(output)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert printed == lines
    train, projection = lines[:-1], lines[-1]
    # paper-increase: B = 128, 640, 3,200, 16,000 for 60, 60, 40 and 40 epochs (measured at the 128 images here)
    assert [(line["batch_size"], line["epochs_at_batch_size"]) for line in train] == [
        (128, 60), (640, 60), (3200, 40), (16000, 40)]
    assert all(line["measured_batch_size"] == 128 and line["device"] == "cpu" and line["model"] == "wrn-16-4"
               and line["ghost_batch_size"] == 128 and not line["diverged"] for line in train)
    # one train step for every batch size: the padded shape 128 is compiled once
    assert [line["new_padded_shapes"] for line in train] == [[128], [], [], []]
    assert train[0]["compilations"] >= 1 and train[0]["compile_seconds"] > 0
    for line in train:
        assert line["loop_examples_per_second"] > 0 and line["fit_examples_per_second"] > 0
        assert line["fit_ratio"] == pytest.approx(line["loop_examples_per_second"] / line["fit_examples_per_second"],
                                                  rel=0.01)
        assert line["epoch_seconds"] > 0 and line["peak_memory_bytes"] is None  # a CPU reports none
    assert projection["check"] == "projection" and projection["epochs"] == 200
    assert projection["projected_seconds"] > projection["compile_seconds"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--presets", "repro-lrd"], "presets='repro-lrd' is not allowed: expected paper presets"),
    (["--precisions", "float16"], "precisions='float16' is not allowed: expected float32, mixed_bfloat16"),
    (["--epochs_per_batch_size", "1"], "epochs_per_batch_size=1 is not allowed: expected 2 or more"),
    (["--train_size", "-5"], "train_size=-5 is not allowed"),
    (["--bench", "maybe"], "bench='maybe' is not allowed: expected true or false"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        gpu_check.parse(argv)


def test_the_batch_sizes_of_a_schedule_in_order_with_their_epochs():
    from growing_batch import config, schedules

    decay = schedules.build_schedule(config.from_args(["--preset", "paper-decay"]), 50_000)
    assert [(size, epochs) for size, epochs, _ in gpu_check.batch_sizes_of(decay, 200)] == [(128, 200)]
    hybrid = schedules.build_schedule(config.from_args(["--preset", "paper-hybrid"]), 50_000)
    assert [(size, epochs) for size, epochs, _ in gpu_check.batch_sizes_of(hybrid, 200)] == [(128, 60), (640, 140)]


def test_the_gpu_check_reports_the_jax_bench(tmp_path, monkeypatch):
    """The bench part: a tiny JAX bench in a process of its own, its ratios and compilations as one line."""
    from test_bench_entry import TINY

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GROWING_BATCH_BENCH_SETTINGS", json.dumps(TINY))
    lines = []
    gpu_check.bench_lines(quick=True, emit=lines.append)
    assert len(lines) == 1 and lines[0]["check"] == "bench" and "error" not in lines[0], lines
    line = lines[0]
    assert line["backend"] == "jax" and set(line["fit_ratio"]) == {str(size) for size in TINY["batch_sizes"]}
    assert all(ratio > 0 for ratio in line["fit_ratio"].values())
    assert line["train_step_traces"] == line["xla_compilations"] <= line["xla_compilation_bound"]
