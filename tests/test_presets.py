"""Presets resolve to the paper's and the reproduction's setups, epoch by epoch."""

import pytest

from growing_batch import presets, schedules
from growing_batch.config import Config, ConfigError, from_args

REPRODUCTION = dict(dataset="cifar10", model="small-cnn", optimizer="sgd", momentum=0.0, nesterov=False,
                    learning_rate=0.1, batch_size=128, epochs=150, validation_size=5000, augment=False,
                    weight_decay=0.0, ghost_batch_size=0)
PAPER = dict(dataset="cifar10", model="wrn-16-4", ghost_batch_size=128, weight_decay=5e-4, augment=True,
             optimizer="sgd", momentum=0.9, nesterov=False, learning_rate=0.1, batch_size=128, epochs=200,
             milestones=(60, 120, 160), step_factor=5.0, validation_size=0)

# preset -> (fields that differ from the defaults, [(epoch, ε, B, m), ...] on N)
EXPECTED = {
    "repro-lrd": (dict(REPRODUCTION, schedule="lr-decay", lr_decay=0.9),
                  [(1, 0.1, 128, 0.0), (2, 0.09, 128, 0.0), (3, 0.081, 128, 0.0), (5, 0.06561, 128, 0.0)]),
    "repro-ibs": (dict(REPRODUCTION, schedule="batch-growth", batch_growth=1.037),
                  [(1, 0.1, 128, 0.0), (2, 0.1, 132, 0.0), (5, 0.1, 148, 0.0), (100, 0.1, 4500, 0.0)]),
    "repro-matched": (dict(REPRODUCTION, schedule="noise-matched", lr_decay=0.9),
                      [(1, 0.1, 128, 0.0), (2, 0.09984375, 142, 0.0), (3, 0.099984375, 158, 0.0),
                       (35, 0.1 * 0.9**34 * 4500 / 128, 4500, 0.0)]),
    "repro-hybrid": (dict(REPRODUCTION, schedule="noise-matched", lr_decay=0.9, max_batch_size=1024),
                     [(1, 0.1, 128, 0.0), (20, 0.1 * 0.9**19 * 947 / 128, 947, 0.0),
                      (21, 0.1 * 0.9**20 * 1024 / 128, 1024, 0.0), (22, 0.1 * 0.9**21 * 1024 / 128, 1024, 0.0)]),
    "paper-decay": (dict(PAPER, schedule="step-lr"),
                    [(1, 0.1, 128, 0.9), (61, 0.02, 128, 0.9), (121, 0.004, 128, 0.9), (161, 0.0008, 128, 0.9)]),
    "paper-hybrid": (dict(PAPER, schedule="step-hybrid", max_batch_size=16000),
                     [(1, 0.1, 128, 0.9), (61, 0.1, 640, 0.9), (121, 0.02, 640, 0.9), (161, 0.004, 640, 0.9)]),
    "paper-increase": (dict(PAPER, schedule="step-batch", max_batch_size=16000),
                       [(1, 0.1, 128, 0.9), (61, 0.1, 640, 0.9), (121, 0.1, 3200, 0.9), (161, 0.1, 16000, 0.9)]),
    "paper-decay-nesterov": (dict(PAPER, schedule="step-lr", nesterov=True), [(61, 0.02, 128, 0.9)]),
    "paper-increase-sgd": (dict(PAPER, schedule="step-batch", max_batch_size=16000, momentum=0.0),
                           [(1, 0.1, 128, 0.0), (161, 0.1, 16000, 0.0)]),
    "paper-hybrid-adam": (dict(PAPER, schedule="step-hybrid", max_batch_size=16000, optimizer="adam",
                               learning_rate=1e-3),
                          [(1, 1e-3, 128, 0.9), (61, 1e-3, 640, 0.9), (121, 2e-4, 640, 0.9)]),
    "paper-lr0.5": (dict(PAPER, schedule="step-batch", learning_rate=0.5, batch_size=640, max_batch_size=5120),
                    [(1, 0.5, 640, 0.9), (61, 0.5, 3200, 0.9), (121, 0.5 * 5120 / 16000, 5120, 0.9),
                     (161, 0.5 * 5120 / 80000, 5120, 0.9)]),
    "paper-momentum0.98": (dict(PAPER, schedule="step-batch", learning_rate=0.5, momentum=0.98, batch_size=3200,
                                max_batch_size=5120),
                           [(1, 0.5, 3200, 0.98), (61, 0.5 * 5120 / 16000, 5120, 0.98)]),
}
TRAIN_SIZE = {"repro": 45_000, "paper": 50_000}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_resolves_to_the_setup_and_its_first_epochs(name):
    fields, epochs = EXPECTED[name]
    config = from_args(["--preset", name])
    assert config == Config(preset=name, **fields)
    schedule = schedules.build_schedule(config, TRAIN_SIZE[name.split("-")[0]])
    for epoch, rate, batch, momentum in epochs:
        step = schedule(epoch)
        assert (step.learning_rate, step.batch_size, step.momentum) == (pytest.approx(rate, rel=1e-9), batch, momentum)


def test_every_preset_resolves_and_has_a_docstring_with_its_command():
    assert len(presets.PRESETS) == 19  # 4 reproduction + 3 schedules x 4 optimizers + 3 of the paper's table
    for name in presets.PRESETS:
        config = from_args(["--preset", name])
        assert config.preset == name
        assert f"-P preset={name}" in presets.describe(name)


@pytest.mark.parametrize(
    "name, updates",
    [("paper-decay", 78_125), ("paper-increase", 28_876), ("paper-increase-5120", 29_142), ("paper-lr0.5", 6_407),
     ("paper-momentum0.98", 2_305), ("repro-lrd", 52_735)],
)
def test_update_counts_match_the_paper(name, updates):
    """The paper's ≈80,000, ≈29,000, < 6,500 and < 2,500 (every batch full); the reproduction's ≈53,000."""
    config = from_args(["--preset", name])
    train_size = TRAIN_SIZE[name.split("-")[0]]
    table = schedules.table(schedules.build_schedule(config, train_size), config.epochs, train_size)
    assert table[-1]["updates"] == updates


@pytest.mark.parametrize("name", ["paper-decay", "paper-increase", "paper-increase-5120", "paper-lr0.5",
                                  "paper-momentum0.98"])
def test_the_papers_table_starts_at_one_noise_scale(name):
    config = from_args(["--preset", name])
    step = schedules.build_schedule(config, 50_000)(1)
    assert step.noise_scale(50_000) == pytest.approx(390.625)


def test_repro_hybrid_has_repro_lrds_noise_scale_every_epoch():
    hybrid = schedules.build_schedule(from_args(["--preset", "repro-hybrid"]), 45_000)
    lrd = schedules.build_schedule(from_args(["--preset", "repro-lrd"]), 45_000)
    for epoch in range(1, 151):
        assert hybrid(epoch).noise_scale(45_000) == pytest.approx(lrd(epoch).noise_scale(45_000), rel=1e-12)


def test_explicit_parameters_override_the_preset():
    config = from_args(["--preset", "repro-ibs", "--dataset", "fashion_mnist", "--epochs", "3", "--batch_size", "64"])
    assert (config.dataset, config.epochs, config.batch_size, config.schedule) == ("fashion_mnist", 3, 64, "batch-growth")
    # empty text means "not given" (mlflow run passes every parameter): the preset's value stays
    config = from_args(["--preset", "repro-ibs", "--epochs", "", "--learning_rate", ""])
    assert (config.epochs, config.learning_rate) == (150, 0.1)


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(ConfigError, match="preset='repro-xyz' is not allowed: expected empty or one of repro-lrd"):
        from_args(["--preset", "repro-xyz"])
