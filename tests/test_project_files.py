"""The project's own files agree: pins, MLproject parameters, the README's commands and CI."""

import dataclasses
import os
import re
import tomllib

import yaml

from growing_batch.config import Config, format_value, from_strings

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(PROJECT_DIR, name), encoding="utf-8") as handle:
        return handle.read()


def pins(requirements):
    result = {}
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        assert version, f"{requirement!r} is not pinned with =="
        result[name.strip().lower()] = version.strip()
    return result


def pyproject_pins():
    return pins(tomllib.loads(read("pyproject.toml"))["project"]["dependencies"])


def test_conda_yaml_pins_equal_pyproject_pins():
    conda = yaml.safe_load(read("conda.yaml"))
    pip_section = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert pins(pip_section) == pyproject_pins()
    assert "python=3.11" in conda["dependencies"]


def test_constraints_pin_the_same_versions():
    constraints = pins(
        line for line in read("constraints.txt").splitlines() if line.strip() and not line.startswith("#")
    )
    test_pins = pins(tomllib.loads(read("pyproject.toml"))["project"]["optional-dependencies"]["test"])
    for name, version in {**pyproject_pins(), **test_pins}.items():
        assert constraints.get(name) == version, name


def test_mlproject_parameters_are_the_config_fields_passed_as_flags():
    entry = yaml.safe_load(read("MLproject"))["entry_points"]["main"]
    parameters = entry["parameters"]
    assert list(parameters) == [field.name for field in dataclasses.fields(Config)]
    for name, spec in parameters.items():
        assert spec["type"] == ("float" if Config.__dataclass_fields__[name].type in ("int", "float") else "string")
        assert f"--{name} {{{name}}}" in entry["command"], name


def test_mlproject_defaults_are_empty_meaning_not_given():
    # Empty lets a preset set the field; the built-in default is documented [in brackets].
    parameters = yaml.safe_load(read("MLproject"))["entry_points"]["main"]["parameters"]
    assert all(spec["default"] == "" for spec in parameters.values())
    assert from_strings({name: "" for name in parameters}) == Config()
    documented = dict(re.findall(r"^      (\w+): \{.*?\}\s+# \[([^\]]*)\]", read("MLproject"), re.M))
    for field in dataclasses.fields(Config):
        assert documented[field.name] == (format_value(field.default) or "none"), field.name


def test_ci_runs_exactly_the_readme_test_command():
    readme = read("README.md")
    match = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match, "README must mark its test command with <!-- test-command -->"
    command = match.group(1).strip()
    ci_lines = [line.strip() for line in read(".ci/run").splitlines() if line.strip() and not line.startswith("#")]
    assert ci_lines[-1] == command


def test_readme_main_command_is_the_make_target():
    readme = read("README.md")
    match = re.search(r"<!-- main-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match and match.group(1).strip() == "make main"
    assert re.search(r"^main: ", read("Makefile"), re.M)
