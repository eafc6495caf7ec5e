"""Tracking: run names, the history file and the callback against a temporary store."""

import mlflow
from mlflow.tracking import MlflowClient

from growing_batch import tracking
from growing_batch.config import Config


def test_run_names_are_readable():
    assert tracking.run_name(Config(schedule="batch-growth")) == "batch-growth b128x1.037 lr0.1 s0"
    assert tracking.run_name(Config(schedule="lr-decay", seed=3)) == "lr-decay b128 lr0.1x0.9 s3"
    assert tracking.run_name(Config(schedule="noise-matched")) == "noise-matched b128x1.1111 lr0.1 s0"
    assert tracking.run_name(Config(preset="repro-hybrid", schedule="noise-matched", max_batch_size=1024)) == (
        "repro-hybrid: noise-matched b128x1.1111 lr0.1 s0"
    )
    assert tracking.run_name(Config(schedule="step-batch", momentum=0.9, nesterov=True)) == (
        "step-batch b128 lr0.1 /5@60,120,160 sgd-nesterov m0.9 s0"
    )


def test_history_csv_has_epoch_then_the_metrics_in_order():
    rows = [{"epoch": 1, "test_accuracy": 0.5, "train_loss": 2.0, "custom": 1.0},
            {"epoch": 2, "test_accuracy": 0.6, "train_loss": 1.0, "custom": 2.0}]
    assert tracking.history_csv(rows).splitlines() == [
        "epoch,train_loss,test_accuracy,custom", "1,2.0,0.5,1.0", "2,1.0,0.6,2.0"
    ]


def test_callback_logs_every_number_at_step_epoch_and_the_history_files(tracking_uri):
    with mlflow.start_run() as run:
        callback = tracking.TrackingCallback(run.info.run_id, "a title")
        for epoch in range(3):
            callback.on_epoch_end(epoch, {"train_loss": 1.0 / (epoch + 1), "batch_size": 2**epoch,
                                          "learning_rate": 0.1, "noise_scale": 5.0, "updates": 10 * (epoch + 1),
                                          "note": "text is not a metric"})
        callback.on_train_end()
    client = MlflowClient(tracking_uri)
    points = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "batch_size")]
    assert sorted(points) == [(1, 1.0), (2, 2.0), (3, 4.0)]
    assert "note" not in client.get_run(run.info.run_id).data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.csv", "schedule.png", "training_curves.png"} <= artifacts


def test_the_logged_model_has_an_example_documented_logits_and_can_be_registered(tracking_uri):
    import keras
    import mlflow
    import numpy as np

    from growing_batch import models, tracking

    keras.utils.set_random_seed(0)
    model = models.compile_for_training(models.build("small-cnn", (28, 28, 1), 10), models.build_optimizer("sgd", 0.1))
    images = np.random.default_rng(0).random((4, 28, 28, 1)).astype(np.float32)
    with mlflow.start_run() as run:
        mlflow.log_metric("test_accuracy", 0.5, step=3)
        model_id = tracking.log_model(model, images, epoch=3, registered_model_name="tiny-cnn")
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.saved_input_example_info is not None and info.run_id == run.info.run_id
    assert info.metadata == {"input": tracking.MODEL_INPUT, "output": tracking.MODEL_OUTPUT}
    assert [(metric.key, metric.value, metric.step) for metric in mlflow.get_logged_model(model_id).metrics] == [
        ("test_accuracy", 0.5, 3)]
    (version,) = MlflowClient(tracking_uri).search_model_versions("name='tiny-cnn'")
    assert int(version.version) == 1
    loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    np.testing.assert_allclose(loaded.predict(images), model(images).numpy(), rtol=1e-5, atol=1e-6)  # logits


def test_new_experiments_keep_their_artifacts_beside_their_sqlite_store(tmp_path, monkeypatch):
    import mlflow

    for database in ("first.db", "second.db"):
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/stores/{database}")
        try:
            experiment_id = tracking.experiment_id_for("my sweep")
            assert tracking.experiment_id_for("my sweep") == experiment_id  # created once
            location = MlflowClient().get_experiment(experiment_id).artifact_location
        finally:
            mlflow.set_tracking_uri(None)
        stem = database[:-3]
        assert location.endswith(f"stores/mlartifacts/{stem}/my_sweep")  # two stores in a folder do not mix
