"""The gradient noise scale: the estimator, the probe against a closed form, the adaptive schedule."""

import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from growing_batch import noise, schedules, train
from growing_batch.config import ConfigError, from_args
from growing_batch.metrics import NOISE_METRICS


def test_the_two_batch_estimates_are_exact_on_expected_norms():
    gradient_squared, trace = 2.0, 300.0
    expected = lambda batch: gradient_squared + trace / batch  # noqa: E731  E|G_B|² = |G|² + tr Σ / B
    assert noise.two_batch_estimates(expected(32), expected(1024), 32, 1024) == pytest.approx((2.0, 300.0))
    with pytest.raises(ValueError, match="0 < small < big; received small=64, big=64"):
        noise.two_batch_estimates(1.0, 1.0, 64, 64)


def test_the_moving_averages_are_bias_corrected_and_the_ratio_waits_for_a_positive_gradient():
    average = noise.MovingAverage(0.5)
    assert math.isnan(average.value)
    assert average.update(4.0) == 4.0  # not pulled towards 0
    assert average.update(2.0) == pytest.approx((0.5 * 0.5 * 4 + 0.5 * 2) / 0.75)
    estimator = noise.NoiseScaleEstimator(0.5)
    assert math.isnan(estimator.add(-1.0, 10.0)["gradient_noise_scale"])  # |G|² lost in the noise
    assert estimator.add(3.0, 10.0)["gradient_noise_scale"] == pytest.approx(10.0 / ((-0.25 + 1.5) / 0.75))


def test_the_probe_recovers_the_noise_scale_of_linear_regression_in_closed_form():
    """y = w*·x + σε with x ~ N(0, I_d). At weights w, with r = w − w*, the per-example gradient of
    ½(w·x − y)² is g = (x·r − σε) x, so G = E g = r and (Isserlis) Σ = (|r|² + σ²) I + r rᵀ:
    B_simple = tr Σ / |G|² = (d (|r|² + σ²) + |r|²) / |r|²."""
    d, sigma = 10, 1.0
    rng = np.random.default_rng(0)
    true_weights = rng.normal(size=d)
    r = rng.normal(size=d)
    r /= np.linalg.norm(r)  # |r|² = 1
    expected = (d * (1 + sigma**2) + 1) / 1  # 21
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign((true_weights + r)[:, None].astype(np.float32))
    probe = noise.GradientNoiseProbe(model, lambda y, out: 0.5 * tf.square(out[:, 0] - y), small_batch_size=16)
    estimator = noise.NoiseScaleEstimator(decay=0.98)
    for _ in range(300):
        x = rng.normal(size=(512, d)).astype(np.float32)
        y = (x @ true_weights + sigma * rng.normal(size=512)).astype(np.float32)
        estimate = estimator.update(*probe(tf.constant(x), tf.constant(y)))["gradient_noise_scale"]
    assert estimate == pytest.approx(expected, rel=0.10)
    np.testing.assert_allclose(model.layers[0].kernel.numpy()[:, 0], true_weights + r, rtol=1e-6)  # untouched


def test_the_adaptive_schedule_follows_the_measurement_within_its_limits():
    step = functools.partial(schedules.adaptive, learning_rate=0.1, batch_size=100, min_batch_size=50,
                             max_batch_size=400, max_batch_growth=2.0)
    assert step(1) == (0.1, 100, 0.0)
    assert step(2, measured=[150.0]) == (0.1, 150, 0.0)  # follows it
    assert step(2, measured=[1000.0]) == (0.1, 200, 0.0)  # at most x2 per epoch
    assert step(2, measured=[10.0]) == (0.1, 50, 0.0)  # down by at most /2, and not below min_batch_size
    assert step(2, measured=[math.nan]) == (0.1, 100, 0.0)  # no measurement: no change
    # past the cap the batch stays at 400 and ε takes the rest: ε/B is that of the effective batch
    capped = step(5, measured=[1000.0, 1000.0, 1000.0, 1000.0])  # effective 200, 400, 800, 1000
    assert capped.batch_size == 400 and capped.learning_rate == pytest.approx(0.1 * 400 / 1000)
    assert capped.noise_scale(50_000) == pytest.approx(0.1 * 50_000 / 1000)
    with pytest.raises(ValueError, match="epoch 3 needs the measurements of epochs 1..2; received 1"):
        step(3, measured=[1.0])


def test_the_adaptive_schedule_object_records_what_each_epoch_measured():
    schedule = schedules.AdaptiveSchedule(learning_rate=0.1, batch_size=16, min_batch_size=16, max_batch_size=100,
                                          max_batch_growth=1.5)
    schedule.observe(1, {"gradient_noise_scale": 40.0})
    assert schedule(2).batch_size == 24
    schedule.observe(2, {})  # nothing measured (diverged): the batch holds
    assert schedule(3).batch_size == 24
    schedule.observe(2, {"gradient_noise_scale": 30.0})  # epoch 2 retrained after a resume: replaced
    assert schedule.measured == [40.0, 30.0] and schedule(3).batch_size == 30


def test_adaptive_turns_the_measurement_on_and_checks_its_limits():
    assert from_args(["--schedule", "adaptive"]).measure_noise_scale is True
    assert from_args(["--schedule", "lr-decay"]).measure_noise_scale is False
    with pytest.raises(ConfigError, match="measure_noise_scale='false' is not allowed: expected true for schedule adaptive"):
        from_args(["--schedule", "adaptive", "--measure_noise_scale", "false"])
    with pytest.raises(ConfigError, match="min_batch_size='200' is not allowed: expected 0 .batch_size. or a whole"):
        from_args(["--schedule", "adaptive", "--min_batch_size", "200"])
    with pytest.raises(ConfigError, match="max_batch_growth='0.5' is not allowed: expected a number >= 1"):
        from_args(["--max_batch_growth", "0.5"])


def histories(uri, run_id):
    client = MlflowClient(uri)
    return {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in ("batch_size", "learning_rate", *NOISE_METRICS)}


def test_an_adaptive_run_logs_the_noise_scale_every_epoch_and_follows_it(tracking_uri, fashion_dir):
    argv = ["--schedule", "adaptive", "--batch_size", "16", "--max_batch_size", "60", "--max_batch_growth", "1.5",
            "--epochs", "4", "--data_dir", fashion_dir, "--validation_size", "40", "--learning_rate", "0.05"]
    assert train.main(argv) == 0
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    logged = histories(tracking_uri, run.info.run_id)
    for key in NOISE_METRICS:
        assert len(logged[key]) == 4, key  # every epoch
    assert all(value > 0 for value in logged["gradient_noise_scale"])
    expected = [schedules.adaptive(epoch, learning_rate=0.05, batch_size=16, min_batch_size=16, max_batch_size=60,
                                   max_batch_growth=1.5, measured=logged["gradient_noise_scale"][: epoch - 1])
                for epoch in range(1, 5)]
    assert logged["batch_size"] == [step.batch_size for step in expected]
    assert logged["learning_rate"] == pytest.approx([step.learning_rate for step in expected])
    assert len(set(logged["batch_size"])) > 1  # it did move


def test_runs_without_the_measurement_log_none_of_it(tracking_uri, fashion_dir):
    assert train.main(["--epochs", "1", "--data_dir", fashion_dir, "--validation_size", "40",
                       "--batch_size", "20"]) == 0
    (run,) = MlflowClient(tracking_uri).search_runs(["0"])
    assert not set(NOISE_METRICS) & set(run.data.metrics)


def test_the_noise_scale_figure_draws_the_runs_that_measured_it(tracking_uri, fashion_dir):
    from growing_batch import analysis, plots

    common = ["--epochs", "2", "--data_dir", fashion_dir, "--validation_size", "40", "--batch_size", "16",
              "--max_batch_size", "60"]
    assert train.main([*common, "--schedule", "adaptive"]) == 0
    assert train.main([*common, "--schedule", "lr-decay"]) == 0
    runs, history = analysis.load_runs(experiment_name="Default", tracking_uri=tracking_uri)
    adaptive_id = runs[runs["schedule"] == "adaptive"]["run_id"].iloc[0]
    figure = plots.noise_scale_figure(history)
    assert figure.run_ids == {adaptive_id}
    assert "gradient_noise_scale.png" not in plots.comparison_figures(history)  # not every run measured it
    assert "gradient_noise_scale.png" in plots.comparison_figures(history[history["run_id"] == adaptive_id])
    assert plots.noise_scale_figure(history[history["run_id"] != adaptive_id]).run_ids == set()
