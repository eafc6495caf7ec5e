"""Config: parsing, validation, one-line errors, and one name per concept."""

import dataclasses

import pytest

from growing_batch import config as config_module
from growing_batch.config import Config, ConfigError, from_args, from_strings, validate, validate_against_data


def test_defaults_are_valid():
    assert validate(Config()) == Config()


def test_command_line_parses_every_type():
    config = from_args(
        ["--schedule", "step-batch", "--learning_rate", "1e-3", "--batch_size", "256.0", "--milestones", "5, 10,20",
         "--nesterov", "true", "--momentum", "0.9", "--data_dir", "", "--max_examples", "64"]
    )
    assert config.schedule == "step-batch"
    assert config.learning_rate == 0.001
    assert config.batch_size == 256 and isinstance(config.batch_size, int)
    assert config.milestones == (5, 10, 20)
    assert config.nesterov is True
    assert config.data_dir == ""
    assert config.max_examples == 64


def test_params_round_trip_through_their_text():
    config = Config(milestones=(3, 7), nesterov=True, momentum=0.9, learning_rate=0.25)
    assert from_strings(config.to_params()) == config
    assert config.to_params()["milestones"] == "3,7"
    assert config.to_params()["nesterov"] == "true"


BAD_INPUTS = [
    (["--learning_rate", "0"], "learning_rate='0.0' is not allowed: expected a number > 0"),
    (["--learning_rate", "-0.1"], "learning_rate='-0.1'"),
    (["--learning_rate", "abc"], "learning_rate='abc' is not allowed: expected a number"),
    (["--learning_rate", "nan"], "learning_rate='nan' is not allowed: expected a finite number"),
    (["--batch_size", "0"], "batch_size='0' is not allowed: expected a whole number >= 1"),
    (["--batch_size", "12.5"], "batch_size='12.5' is not allowed: expected a whole number"),
    (["--schedule", "batch-growth", "--batch_growth", "0.9"], "batch_growth='0.9' is not allowed: expected a number >= 1"),
    (["--lr_decay", "1.5"], "lr_decay='1.5' is not allowed: expected a number in (0, 1]"),
    (["--lr_decay", "0"], "lr_decay='0.0'"),
    (["--dataset", "imagenet"], "dataset='imagenet' is not allowed: expected one of fashion_mnist, mnist, cifar10, cifar100"),
    (["--model", "resnet"], "model='resnet' is not allowed: expected one of small-cnn"),
    (["--schedule", "cosine"], "schedule='cosine' is not allowed: expected one of constant, lr-decay"),
    (["--optimizer", "rmsprop"], "optimizer='rmsprop' is not allowed"),
    (["--milestones", "60,30"], "milestones='60,30' is not allowed: expected comma-separated whole numbers >= 1 in strictly increasing order"),
    (["--milestones", "60,60"], "milestones='60,60'"),
    (["--milestones", "0,5"], "milestones='0,5'"),
    (["--milestones", "a,b"], "milestones='a' is not allowed: expected a whole number"),
    (["--preset", "paper"], "preset='paper' is not allowed: expected empty or one of repro-lrd"),
    (["--weight_decay", "-1e-4"], "weight_decay='-0.0001' is not allowed: expected a number >= 0"),
    (["--ghost_batch_size", "128"], "ghost_batch_size='128' is not allowed: expected 0 for model small-cnn, which has no batch norm"),
    (["--model", "wrn-16-4", "--ghost_batch_size", "-1"], "ghost_batch_size='-1'"),
    (["--model", "wrn-16-4", "--ghost_batch_size", "128", "--max_device_batch_size", "200"],
     "max_device_batch_size='200' is not allowed: expected a multiple of ghost_batch_size (128)"),
    (["--augment", "sometimes"], "augment='sometimes' is not allowed: expected true or false"),
    (["--step_factor", "0.5"], "step_factor='0.5' is not allowed: expected a number >= 1"),
    (["--momentum", "1"], "momentum='1.0' is not allowed: expected a number in [0, 1)"),
    (["--nesterov", "maybe"], "nesterov='maybe' is not allowed: expected true or false"),
    (["--nesterov", "true"], "nesterov='true' is not allowed: expected false unless optimizer is sgd with momentum > 0"),
    (["--epochs", "0"], "epochs='0' is not allowed: expected a whole number >= 1"),
    (["--seed", "-1"], "seed='-1'"),
    (["--validation_size", "-5"], "validation_size='-5'"),
    (["--max_examples", "-1"], "max_examples='-1'"),
    (["--max_batch_size", "64"], "max_batch_size='64' is not allowed: expected 0 (N/10) or a whole number >= batch_size (128)"),
    (["--data_dir", "/no/such/folder"], "data_dir='/no/such/folder' is not allowed: expected an existing folder"),
    (["--learning_rates", "0.1"], "unrecognized arguments: --learning_rates 0.1"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(argv) for argv, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_parameter_value_and_what_is_allowed(argv, message):
    with pytest.raises(ConfigError) as raised:
        from_args(argv)
    text = str(raised.value)
    assert message in text
    assert "\n" not in text


def test_step_schedules_need_a_milestone():
    # from the command line an empty value means "not given" (the default 60,120,160 applies)
    assert from_args(["--schedule", "step-lr", "--milestones", ""]).milestones == (60, 120, 160)
    with pytest.raises(ConfigError, match="milestones='' is not allowed: expected at least one milestone for schedule step-lr"):
        validate(Config(schedule="step-lr", milestones=()))


def test_checks_against_the_data():
    validate_against_data(Config(batch_size=100), train_size=100)
    with pytest.raises(ConfigError, match="batch_size='101' is not allowed: expected at most the 100 training examples"):
        validate_against_data(Config(batch_size=101), train_size=100)
    with pytest.raises(ConfigError, match="max_batch_size='500'"):
        validate_against_data(Config(max_batch_size=500), train_size=400)


def test_every_field_has_help_and_a_flag():
    parser = config_module.make_parser()
    flags = {action.dest for action in parser._actions} - {"help", "run_id"}  # run_id: which run, not how
    assert flags == {field.name for field in dataclasses.fields(Config)}
    assert all(field.metadata["help"] for field in dataclasses.fields(Config))


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().epochs = 3


# --- the Keras backend -------------------------------------------------------------------------


def test_backend_is_tensorflow_unless_given_or_in_the_environment(monkeypatch):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert from_strings({}).backend == "tensorflow"
    assert from_args(["--backend", "jax"]).backend == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert from_strings({"backend": ""}).backend == "jax"  # not given (mlflow run's empty default): honoured
    assert from_args(["--backend", "tensorflow"]).backend == "tensorflow"  # given: the parameter wins
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    with pytest.raises(ConfigError, match=r"^KERAS_BACKEND='torch' is not allowed: expected one of tensorflow, jax"):
        from_strings({})


@pytest.mark.parametrize("argv, message", [
    (["--backend", "torch"], "backend='torch' is not allowed: expected one of tensorflow, jax"),
    (["--backend", "jax", "--model", "wrn-16-4"], "ghost_batch_size='0' is not allowed: expected > 0 for model "
                                                  "wrn-16-4 with jit_compile or backend jax"),
    (["--backend", "jax", "--max_device_batch_size", "32"], "max_device_batch_size='32' is not allowed: expected 0 "
                                                            "with backend jax"),
])
def test_what_the_jax_engine_does_not_do_is_refused_in_one_line(monkeypatch, argv, message):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as caught:
        from_args(argv)
    assert "\n" not in str(caught.value)


def test_the_noise_scale_and_the_adaptive_schedule_are_allowed_on_jax(monkeypatch):
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert from_args(["--backend", "jax", "--preset", "paper-decay"]).ghost_batch_size == 128  # the paper's WRN
    assert from_args(["--backend", "jax", "--schedule", "adaptive"]).measure_noise_scale is True


def test_jax_without_jax_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(config_module, "jax_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"^backend='jax' is not allowed: .*pip install jax==0\.10\.2") as caught:
        config_module.activate_backend(from_args(["--backend", "jax"]))
    assert "\n" not in str(caught.value)


def test_a_process_whose_keras_runs_on_another_backend_refuses(monkeypatch):
    import keras  # noqa: F401  (this test process runs Keras on TensorFlow)

    monkeypatch.setattr(config_module, "jax_installed", lambda: True)
    with pytest.raises(ConfigError, match=r"^backend='jax' is not allowed in this process: expected tensorflow"):
        config_module.activate_backend(from_args(["--backend", "jax"]))
    config_module.activate_backend(from_args(["--backend", "tensorflow"]))  # the one it runs: fine


def test_a_checkpoint_written_before_the_backend_field_resumes_on_tensorflow_only(tracking_uri, tmp_path):
    import json
    import os

    from mlflow.tracking import MlflowClient

    from growing_batch import checkpoint, train

    config = from_args(["--checkpoint_dir", str(tmp_path / "checkpoints")])
    run_id = MlflowClient(tracking_uri).create_run("0").info.run_id
    older = {name: value for name, value in config.to_dict().items() if name != "backend"}
    os.makedirs(checkpoint.run_directory(config.checkpoint_dir, run_id))
    with open(checkpoint.path(config.checkpoint_dir, run_id), "w") as handle:
        json.dump({"version": checkpoint.FORMAT_VERSION, "weights": "epoch-0001.weights.h5", "config": older,
                   "epoch": 1, "updates": 10, "examples_seen": 1000, "rows": []}, handle)
    assert train.plan_resume(config, run_id).epoch == 1
    with pytest.raises(train.Refused, match="its checkpoint .* is of another configuration"):
        train.plan_resume(dataclasses.replace(config, backend="jax"), run_id)
