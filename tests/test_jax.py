"""The JAX engine (backend=jax) end to end: a batch-growth run logs what the TensorFlow run logs, with few
XLA compilations and a like accuracy; it is reproducible; killed and resumed, it matches an uninterrupted run."""

import math
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from growing_batch.metrics import EPOCH_METRICS, NOISE_METRICS
from processes import environment, histories, kill_tree, train_command, wait_for_checkpoint
from test_reliability import assert_same_run

pytestmark = pytest.mark.e2e

EPOCHS = 3


def parameters(fashion_dir, backend, **extra):
    """Batch growth from 64 by 2 per epoch (the issue's check): B = 64, 128, 256."""
    return {"backend": backend, "schedule": "batch-growth", "batch_size": 64, "batch_growth": 2, "max_batch_size": 256,
            "learning_rate": 0.3, "epochs": EPOCHS, "data_dir": fashion_dir,
            "validation_size": 40, **extra}


def jax_environment(uri):
    env = environment(uri)
    env.pop("KERAS_BACKEND", None)  # the parameter alone chooses JAX
    return env


def train(folder, uri, values):
    result = subprocess.run(train_command(values), cwd=folder, env=jax_environment(uri), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return MlflowClient(uri).search_runs(["0"], order_by=["attributes.start_time DESC"], max_results=1)[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, fashion_dir_1400):
    """One JAX run, the same JAX run again and the same TensorFlow run, in one store."""
    folder = tmp_path_factory.mktemp("jax")
    uri = f"sqlite:///{folder}/mlflow.db"
    runs = {name: train(folder, uri, parameters(fashion_dir_1400, backend))
            for name, backend in (("jax", "jax"), ("jax_again", "jax"), ("tensorflow", "tensorflow"))}
    return folder, uri, runs


def test_a_jax_batch_growth_run_logs_every_metric_the_tensorflow_run_logs(store):
    _, uri, runs = store
    jax_run, tensorflow_run = runs["jax"], runs["tensorflow"]
    assert jax_run.info.status == "FINISHED"
    assert jax_run.data.tags["backend"] == "jax" and tensorflow_run.data.tags["backend"] == "tensorflow"
    assert jax_run.data.params["resolved.backend"] == "jax"
    def trained(run):  # the run's own metrics; MLflow's system/ metrics are sampled by the clock
        return {key for key in run.data.metrics if not key.startswith("system/")}

    assert trained(jax_run) == trained(tensorflow_run) and set(EPOCH_METRICS) <= trained(jax_run)
    jax_history = histories(uri, jax_run.info.run_id)
    for key in EPOCH_METRICS:
        assert [step for step, _ in jax_history[key]] == [1, 2, 3], key
    assert [value for _, value in jax_history["batch_size"]] == [64, 128, 256]
    # On a CPU every batch of 64 or more runs as micro-batches of 64 (jax_engine.CPU_MICRO_BATCH_SIZE): one shape
    assert jax_run.data.metrics["xla_compilations"] == 1
    assert jax_run.data.metrics["train_step_traces"] <= 8  # one trace per compiled shape
    accuracy = {name: run.data.metrics["test_accuracy"] for name, run in runs.items()}
    assert accuracy["jax"] > 0.5, accuracy  # chance is 0.1
    assert abs(accuracy["jax"] - accuracy["tensorflow"]) <= 0.05, accuracy


def test_the_same_seed_on_jax_gives_the_same_metrics(store):
    _, uri, runs = store
    first, second = histories(uri, runs["jax"].info.run_id), histories(uri, runs["jax_again"].info.run_id)
    for key in EPOCH_METRICS:
        if key not in ("epoch_seconds", "examples_per_second"):
            assert first[key] == second[key], key


def test_a_killed_jax_run_resumed_matches_the_uninterrupted_one(store, fashion_dir_1400):
    folder, uri, runs = store
    checkpoints = str(folder / "killed-checkpoints")
    process = subprocess.Popen(train_command(parameters(fashion_dir_1400, "jax", checkpoint_dir=checkpoints)), cwd=folder,
                               env=jax_environment(uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    epoch, run_id = wait_for_checkpoint(process, checkpoints, 2)
    kill_tree(process)  # SIGKILL during epoch 3: the run stays RUNNING with its epoch-2 checkpoint
    assert epoch == 2 and MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
    resumed = subprocess.run(train_command({"run_id": run_id}), cwd=folder, env=jax_environment(uri),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 2" in resumed.stdout
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    assert not os.path.exists(os.path.join(checkpoints, run_id, "state.json"))
    assert_same_run(uri, runs["jax"].info.run_id, run_id, EPOCHS)


# --- the engine's parts, in a process whose Keras runs on JAX ---------------------------------------

ENGINE_CHECKS = r"""
import jax, jax.numpy as jnp, keras, numpy as np
from growing_batch import data, jax_engine, models

assert keras.backend.backend() == "jax"
rng = np.random.default_rng(0)
split = data.Split(rng.integers(0, 256, (40, 16, 16, 1)).astype(np.uint8), rng.integers(0, 4, 40).astype(np.int32))
keras.utils.set_random_seed(0)
model = models.compile_for_training(models.build("small-cnn", (16, 16, 1), 4, seed=0, weight_decay=1e-2),
                                    models.build_optimizer("sgd", 0.0, 0.0))
batches = data.EpochBatches(split, seed=0)
assert isinstance(batches.images, jax.Array) and isinstance(batches.labels, jax.Array)
step = jax_engine.TrainStep(model)
before = [np.array(v.value) for v in model.trainable_variables]
indices = np.arange(10, dtype=np.int32)
step.reset()
step(batches.images, batches.labels, indices)  # learning rate 0: nothing moves
step.write_back()
for a, v in zip(before, model.trainable_variables):
    np.testing.assert_array_equal(a, np.array(v.value))
assert int(np.array(model.optimizer.iterations.value)) == 1  # the optimizer's state came back too

# The schedule sets the learning rate between epochs: the next epoch's state takes it.
model.optimizer.learning_rate = 0.1
step.reset()
step(batches.images, batches.labels, indices)  # 10 examples, padded to 16 with zero weights
step.write_back()
loss_sum, correct, count = step.totals_read()
assert count == 10 and step.compiled_shapes == {16}

def mean_loss(trainable):  # over exactly those 10 examples
    nontrainable = [v.value for v in model.non_trainable_variables]
    logits, _ = model.stateless_call(trainable, nontrainable, data.scale(split.images[:10]), training=True)
    return jnp.mean(model.loss.call(jnp.asarray(split.labels[:10]), logits))

def objective(trainable):  # plus the weight penalty
    with keras.StatelessScope(state_mapping=list(zip(model.trainable_variables, trainable))):
        penalty = sum(model.losses)
    return mean_loss(trainable) + penalty

start = [jnp.asarray(a) for a in before]
gradients = jax.grad(objective)(start)
for a, g, v in zip(before, gradients, model.trainable_variables):
    np.testing.assert_allclose(np.array(v.value), a - 0.1 * np.array(g), rtol=1e-4, atol=1e-6)
np.testing.assert_allclose(loss_sum / 10, float(mean_loss(start)), rtol=1e-5)
assert float(objective(start)) > float(mean_loss(start))  # the penalty is there

# On a CPU, 100 examples run as micro-batches of 64 (64, then 36 and 28 of padding), their gradients
# summed, one update applied: the update of the whole batch.
assert jax_engine.CPU_MICRO_BATCH_SIZE == 64 and jax_engine.on_cpu()
large = data.Split(rng.integers(0, 256, (100, 16, 16, 1)).astype(np.uint8), rng.integers(0, 4, 100).astype(np.int32))
large_batches = data.EpochBatches(large, seed=0)
keras.utils.set_random_seed(0)
cnn = models.compile_for_training(models.build("small-cnn", (16, 16, 1), 4, seed=0, weight_decay=1e-2),
                                  models.build_optimizer("sgd", 0.1, 0.0))
cnn_start = [jnp.asarray(np.array(v.value)) for v in cnn.trainable_variables]
cnn_step = jax_engine.TrainStep(cnn)
assert cnn_step.micro_batch_size == 64
cnn_step.reset()
cnn_step(large_batches.images, large_batches.labels, np.arange(100, dtype=np.int32))
cnn_step.write_back()
assert cnn_step.compiled_shapes == {64} and int(np.array(cnn.optimizer.iterations.value)) == 1

def cnn_objective(trainable):
    logits, _ = cnn.stateless_call(trainable, [], data.scale(large.images), training=True)
    with keras.StatelessScope(state_mapping=list(zip(cnn.trainable_variables, trainable))):
        penalty = sum(cnn.losses)
    return jnp.mean(cnn.loss.call(jnp.asarray(large.labels), logits)) + penalty

for a, g, v in zip(cnn_start, jax.grad(cnn_objective)(cnn_start), cnn.trainable_variables):
    np.testing.assert_allclose(np.array(v.value), np.array(a) - 0.1 * np.array(g), rtol=1e-4, atol=1e-6)
assert cnn_step.totals_read()[2] == 100

# Ghost batch norm (the paper's WRN) on JAX: 10 examples padded to 16 train exactly as the 10 alone do
# (ghost batches of 8: the second holds 2 real examples and 6 of padding, left out of its statistics).
keras.utils.set_random_seed(0)
wrn = models.compile_for_training(models.wide_resnet((16, 16, 1), 4, depth=10, width=1, ghost_batch_size=8,
                                                     weight_decay=5e-4, seed=0),
                                  models.build_optimizer("sgd", 0.1, 0.0))
wrn_start = [jnp.asarray(np.array(v.value)) for v in wrn.trainable_variables]
wrn_statistics = [v.value for v in wrn.non_trainable_variables]
wrn_step = jax_engine.TrainStep(wrn)
assert wrn_step.micro_batch_size == 0  # micro-batches would change the batch statistics
wrn_step.reset()
wrn_step(batches.images, batches.labels, indices)
wrn_step.write_back()
assert wrn_step.compiled_shapes == {16}

def wrn_objective(trainable):
    logits, statistics, _ = wrn.stateless_call(trainable, wrn_statistics, data.scale(split.images[:10]),
                                                training=True, return_losses=True)
    with keras.StatelessScope(state_mapping=list(zip(wrn.trainable_variables, trainable))):
        penalty = sum(wrn.losses)
    return jnp.mean(wrn.loss.call(jnp.asarray(split.labels[:10]), logits)) + penalty, statistics

(_, unpadded_statistics), wrn_gradients = jax.value_and_grad(wrn_objective, has_aux=True)(wrn_start)
for a, g, v in zip(wrn_start, wrn_gradients, wrn.trainable_variables):
    np.testing.assert_allclose(np.array(v.value), np.array(a) - 0.1 * np.array(g), rtol=1e-4, atol=1e-6)
for expected, v in zip(unpadded_statistics, wrn.non_trainable_variables):
    np.testing.assert_allclose(np.array(v.value), np.array(expected), rtol=1e-5, atol=1e-6)

# Augmentation: a reflect-padded crop and maybe a flip, the same for the same key.
images = jnp.asarray(data.scale(split.images[:8]))
key = jax.random.key(3)
first, again = jax_engine.augment(images, key), jax_engine.augment(images, key)
np.testing.assert_array_equal(np.array(first), np.array(again))
padded = np.pad(np.array(images), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
for image, out in zip(padded, np.array(first)):
    windows = [image[r:r + 16, c:c + 16] for r in range(9) for c in range(9)]
    assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)
# The noise probe recovers linear regression's noise scale in closed form (as tests/test_noise.py on TensorFlow).
d, sigma = 10, 1.0
rng = np.random.default_rng(0)
true_weights = rng.normal(size=d)
r = rng.normal(size=d)
r /= np.linalg.norm(r)
regression = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=False)])
regression.layers[0].kernel.assign((true_weights + r)[:, None].astype(np.float32))
from growing_batch import noise
probe = jax_engine.GradientNoiseProbe(regression, lambda y, out: 0.5 * jnp.square(out[:, 0] - y), small_batch_size=16)
estimator = noise.NoiseScaleEstimator(decay=0.98)
for _ in range(300):
    x = rng.normal(size=(512, d)).astype(np.float32)
    y = (x @ true_weights + sigma * rng.normal(size=512)).astype(np.float32)
    estimate = estimator.update(*probe(jnp.asarray(x), jnp.asarray(y)))["gradient_noise_scale"]
assert abs(estimate / (d * (1 + sigma**2) + 1) - 1) < 0.10, estimate
np.testing.assert_allclose(np.array(regression.layers[0].kernel.value)[:, 0], true_weights + r, rtol=1e-6)
print("engine checks passed")
"""


def test_the_jax_step_pads_with_zero_weights_takes_the_learning_rate_and_augments_and_the_probe_measures(tmp_path):
    result = subprocess.run([sys.executable, "-c", ENGINE_CHECKS], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=environment("sqlite://", KERAS_BACKEND="jax"))
    assert result.returncode == 0 and "engine checks passed" in result.stdout, result.stderr[-3000:]


DATA_PARALLEL_CHECKS = r"""
import jax, keras, numpy as np
from growing_batch import data, distribute, jax_engine, models
from growing_batch.config import ConfigError

assert len(jax.devices()) == 2  # XLA_FLAGS=--xla_force_host_platform_device_count=2
rng = np.random.default_rng(0)
split = data.Split(rng.integers(0, 256, (60, 16, 16, 1)).astype(np.uint8), rng.integers(0, 4, 60).astype(np.int32))

def two_updates(devices):
    distribution = distribute.jax_distribution(devices)
    keras.utils.set_random_seed(0)
    model = models.compile_for_training(models.wide_resnet((16, 16, 1), 4, depth=10, width=1, ghost_batch_size=8,
                                                           weight_decay=5e-4, seed=0),
                                        models.build_optimizer("sgd", 0.1, 0.9))
    batches = data.EpochBatches(split, seed=0, augment=True)  # made under the distribution: replicated
    step = jax_engine.TrainStep(model, augment=True)
    step.reset()
    for _ in range(2):  # 37 examples: padded to 40, 20 per device; ghost batches of 8 across both
        step(batches.images, batches.labels, np.arange(37, dtype=np.int32), seed=(0, 5))
    step.write_back()
    evaluation = jax_engine.Evaluator(model)(data.evaluation_batches(split))
    keras.distribution.set_distribution(None)
    return model, step, evaluation, distribution

one, one_step, one_evaluation, none = two_updates("1")
two, two_step, two_evaluation, distribution = two_updates("2")
assert none is None and distribute.describe(distribution) == "DataParallel" and distribute.replica_count(distribution) == 2
assert len(two.trainable_variables[0].value.sharding.device_set) == 2
assert one_step.compiled_shapes == two_step.compiled_shapes == {40}
loss_one, hits_one, count_one = one_step.totals_read()
loss_two, hits_two, count_two = two_step.totals_read()
assert count_one == count_two == 74 and hits_one == hits_two and abs(loss_one - loss_two) < 1e-4 * loss_one
np.testing.assert_allclose(two_evaluation, one_evaluation, rtol=1e-5)
for a, b in zip(one.variables, two.variables):  # weights, batch-norm statistics, momentum, iterations
    np.testing.assert_allclose(np.array(b.value), np.array(a.value), rtol=1e-4, atol=1e-6, err_msg=a.path)
try:
    distribute.jax_distribution("3")
except ConfigError as error:
    assert str(error).startswith("devices='3' is not allowed with backend jax: expected at most the 2 local JAX "
                                 "device(s) (cpu); on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=3"), error
else:
    raise AssertionError("devices=3 of 2 was accepted")
print("data-parallel checks passed")
"""


def test_two_jax_devices_make_the_same_updates_as_one(tmp_path):
    """devices=2 on two CPU devices (XLA_FLAGS): Keras' DataParallel shards the padded batch; the updates,
    batch-norm statistics and evaluation equal one device's up to float rounding."""
    result = subprocess.run([sys.executable, "-c", DATA_PARALLEL_CHECKS], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=environment("sqlite://", KERAS_BACKEND="jax",
                                                         XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert result.returncode == 0 and "data-parallel checks passed" in result.stdout, result.stderr[-3000:]


def test_a_jax_run_on_two_devices_finishes_and_says_so(tmp_path, fashion_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = jax_environment(uri)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    values = {"backend": "jax", "devices": 2, "batch_size": 30, "epochs": 2, "data_dir": fashion_dir,
              "validation_size": 40}
    result = subprocess.run(train_command(values), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = MlflowClient(uri).search_runs(["0"])[0]
    assert run.info.status == "FINISHED" and run.data.tags["distribution"] == "DataParallel"
    assert run.data.metrics["xla_compilations"] == 1  # 30 -> the bucket 32, 16 per device
    assert run.data.params["replicas"] == "2" and run.data.params["resolved.devices"] == "2"
    assert [step for step, _ in histories(uri, run.info.run_id)["test_accuracy"]] == [1, 2]


TENSORFLOW_RUN_WITHOUT_JAX = r"""
import sys
from growing_batch import config, train
code = train.main(sys.argv[1:])
assert code == 0, code
# (TensorFlow itself imports jax when it is installed, in tensorflow.lite: not this project's doing.)
assert "growing_batch.jax_engine" not in sys.modules, "the TensorFlow path imported the JAX engine"
print("no jax engine")
"""


def test_the_tensorflow_path_never_imports_the_jax_engine(tmp_path, fashion_dir):
    arguments = ["--epochs", "1", "--batch_size", "40", "--data_dir", fashion_dir, "--validation_size", "40"]
    env = environment(f"sqlite:///{tmp_path}/mlflow.db")
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", TENSORFLOW_RUN_WITHOUT_JAX, *arguments], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and "no jax engine" in result.stdout, result.stderr[-3000:]


JAX_RUN_WITHOUT_TENSORFLOW = r"""
import sys

class NoTensorFlow:  # as on a GPU image without TensorFlow: `import tensorflow` finds no module
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
from growing_batch import train
code = train.main(sys.argv[1:])
assert code == 0, code
assert "tensorflow" not in sys.modules
print("trained without tensorflow")
"""


def train_without_tensorflow(folder, arguments):
    """A JAX run through growing_batch.train.main in a process that cannot import TensorFlow."""
    uri = f"sqlite:///{folder}/mlflow.db"
    env = environment(uri)
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", JAX_RUN_WITHOUT_TENSORFLOW, "--backend", "jax", *arguments],
                            cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "trained without tensorflow" in result.stdout, result.stderr[-3000:]
    run = MlflowClient(uri).search_runs(["0"])[0]
    assert run.info.status == "FINISHED" and run.data.tags["backend"] == "jax"
    return uri, run


def test_the_papers_model_trains_on_jax_without_tensorflow(tmp_path, fashion_dir):
    """WRN-16-4 with ghost batch norm, augmentation and weight decay; TensorFlow unimportable."""
    _, run = train_without_tensorflow(tmp_path, [
        "--model", "wrn-16-4", "--ghost_batch_size", "16", "--weight_decay", "5e-4", "--augment", "true",
        "--epochs", "1", "--batch_size", "40", "--max_examples", "200", "--data_dir", fashion_dir,
        "--validation_size", "40"])
    assert run.data.params["resolved.model"] == "wrn-16-4" and math.isfinite(run.data.metrics["test_loss"])


def test_an_adaptive_jax_run_logs_the_noise_scale_every_epoch(tmp_path, fashion_dir):
    """The noise probe on JAX, in a process that cannot import TensorFlow."""
    uri, run = train_without_tensorflow(tmp_path, ["--schedule", "adaptive", "--batch_size", "20",
                                                   "--max_batch_size", "40", "--epochs", "2", "--data_dir", fashion_dir,
                                                   "--validation_size", "40"])
    assert run.data.params["resolved.measure_noise_scale"] == "true"
    history = histories(uri, run.info.run_id)
    client = MlflowClient(uri)
    for key in NOISE_METRICS:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [step for step, _ in points] == [1, 2], key
        assert all(math.isfinite(value) for _, value in points), (key, points)
    traces = [m.value for m in client.get_metric_history(run.info.run_id, "gradient_variance_trace")]
    assert all(value > 0 for value in traces), traces  # the micro-batches' gradients differ
    assert [step for step, _ in history["batch_size"]] == [1, 2]
