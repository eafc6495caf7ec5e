"""A tiny tracking store of fake finished runs, logged with MLflow's client: no training."""

from mlflow.tracking import MlflowClient

EPOCHS = 3
TRAIN_EXAMPLES = 12_800


def log_fake_run(client: MlflowClient, experiment_id: str, schedule: str, seed: int, status: str = "FINISHED",
                 tags: dict | None = None, parent_run_id: str | None = None, noise: bool = False) -> str:
    """A run of ``schedule`` with per-epoch metrics at steps 1..EPOCHS, as a training run logs them.
    lr-decay: ε × 0.9 per epoch at B = 128; noise-matched: B ÷ 0.9 per epoch at ε = 0.1."""
    all_tags = {"schedule": schedule, "mlflow.runName": f"{schedule} s{seed}", **(tags or {})}
    if parent_run_id:
        all_tags.update({"mlflow.parentRunId": parent_run_id, "sweep_role": "child", "sweep_member": schedule,
                         "sweep_seed": str(seed)})
    run = client.create_run(experiment_id, tags=all_tags, start_time=1_000_000)
    run_id = run.info.run_id
    client.log_param(run_id, "resolved.seed", seed)
    client.log_param(run_id, "resolved.schedule", schedule)
    updates = 0
    for epoch in range(1, EPOCHS + 1):
        rate = 0.1 * 0.9 ** (epoch - 1) if schedule == "lr-decay" else 0.1
        batch = 128 if schedule == "lr-decay" else int(128 / 0.9 ** (epoch - 1))
        updates += TRAIN_EXAMPLES // batch
        values = {"train_loss": 1.0 / epoch + 0.01 * seed, "test_accuracy": 0.5 + 0.1 * epoch + 0.01 * seed,
                  "val_accuracy": 0.5 + 0.1 * epoch, "learning_rate": rate, "batch_size": batch,
                  "noise_scale": rate * TRAIN_EXAMPLES / batch, "updates": updates, "epoch_seconds": 2.0}
        if noise:
            values["gradient_noise_scale"] = 100.0 * epoch
        for name, value in values.items():
            client.log_metric(run_id, name, value, timestamp=1_000_000 + 1000 * epoch, step=epoch)
    client.set_terminated(run_id, status, end_time=1_000_000 + 1000 * EPOCHS + 1)
    return run_id


def fake_experiment(uri: str, name: str, artifact_location: str, seeds: int = 2) -> dict:
    """lr-decay and noise-matched × ``seeds`` FINISHED runs, and one run that `mlflow run` left FAILED
    after it was interrupted (tag ``interrupted``). Returns the run ids by ``schedule/seed``."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name, artifact_location=artifact_location)
    ids = {f"{schedule}/{seed}": log_fake_run(client, experiment_id, schedule, seed)
           for seed in range(seeds) for schedule in ("lr-decay", "noise-matched")}
    ids["interrupted"] = log_fake_run(client, experiment_id, "noise-matched", 9, status="FAILED",
                                      tags={"interrupted": "SIGTERM during epoch 3"})
    return ids
