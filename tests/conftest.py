import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import fake_data  # noqa: E402

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """240 training and 80 test images of a learnable toy problem, as Fashion-MNIST's IDX files."""
    return fake_data.write_fashion_mnist(str(tmp_path_factory.mktemp("fashion")))


@pytest.fixture(scope="session")
def fashion_dir_1400(tmp_path_factory):
    """1,400 training images: with 40 held out, N/10 = 136 admits the default batch of 128."""
    return fake_data.write_fashion_mnist(str(tmp_path_factory.mktemp("fashion1400")), train=1400, test=80)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh sqlite tracking store whose artifacts stay in tmp_path."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    # set, then delete: monkeypatch then restores its absence, even if the test (train.main --run_id) sets it
    monkeypatch.setenv("MLFLOW_RUN_ID", "")
    monkeypatch.delenv("MLFLOW_RUN_ID")
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


# Caches that pytest and Python write on purpose; anything else a test leaves here is a bug.
EXPECTED_LEFTOVERS = {".pytest_cache", "__pycache__"}


def _entries(folders):
    return {os.path.join(folder, name) for folder in folders if os.path.isdir(folder) for name in os.listdir(folder)}


@pytest.fixture(scope="session", autouse=True)
def working_directory_stays_clean():
    """Tests leave nothing in the project or the working directory (no mlruns/, mlflow.db,
    checkpoints/, ...): they write under tmp_path (the `tracking_uri` fixture changes into it)."""
    folders = {PROJECT_DIR, os.path.join(PROJECT_DIR, "notebooks"), os.getcwd()}
    before = _entries(folders)
    yield
    left = sorted(path for path in _entries(folders) - before if os.path.basename(path) not in EXPECTED_LEFTOVERS)
    assert not left, f"tests left these behind: {left}"
