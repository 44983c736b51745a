"""Test-session environment: offline Flower, interpreted Triton, a private FLWR_HOME
and a private data cache (fl.datacache).

TRITON_INTERPRET must be set before triton is imported: with it, Triton kernels
run on CPU tensors, which is how the tests check them against the references.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads: tests use local files
_HOME = tempfile.mkdtemp(prefix="bonsai-flwr-home-")
os.environ.setdefault("FLWR_HOME", _HOME)
_CACHE = tempfile.mkdtemp(prefix="bonsai-data-cache-")
os.environ["BONSAI_CACHE_DIR"] = _CACHE
# experiment trackers (fl.tracking) never reach the network in tests: W&B offline with its
# settings, cache and staging in a private folder, no error reports or telemetry
_WANDB = tempfile.mkdtemp(prefix="bonsai-wandb-")
for _key, _value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                     "WANDB_ERROR_REPORTING": "false", "WANDB_CONFIG_DIR": f"{_WANDB}/config",
                     "WANDB_CACHE_DIR": f"{_WANDB}/cache", "WANDB_DATA_DIR": f"{_WANDB}/data",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}.items():
    os.environ[_key] = _value


@pytest.fixture(scope="session", autouse=True)
def _remove_flwr_home():
    yield
    shutil.rmtree(_HOME, ignore_errors=True)
    shutil.rmtree(_CACHE, ignore_errors=True)
    shutil.rmtree(_WANDB, ignore_errors=True)


@pytest.fixture
def flower_task():
    """Flower's task identity set as a ServerApp has it, for tests that build Messages in
    this process (``pytestmark = pytest.mark.usefixtures("flower_task")``)."""
    from loopback import task_identity

    with task_identity():
        yield


@pytest.fixture
def on_test_device():
    """Tensors a test makes land on BONSAI_TEST_DEVICE (cpu unless the GPU check sets
    cuda; kernel_checks)."""
    import torch
    from kernel_checks import TEST_DEVICE

    if TEST_DEVICE == "cpu":  # the default already; the context would add a TorchFunctionMode
        yield
        return
    with torch.device(TEST_DEVICE):
        yield


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A `bonsai deploy keys` folder: CA, a SuperLink certificate for two extra hosts, two
    node keys."""
    from fl.deploy import make_keys

    return make_keys(tmp_path_factory.mktemp("keys"), ["10.1.2.3", "link.example.org"], 2)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    """A second, unrelated keys folder (its CA signed nothing of ``keys``)."""
    from fl.deploy import make_keys

    return make_keys(tmp_path_factory.mktemp("other"), [], 1)


@pytest.fixture(scope="session")
def autoflip_run(tmp_path_factory):
    """One real AutoFLIP simulation (`bonsai run` through Flower and Ray) whose results
    several tests read (test_simulation, test_export): quickstart with 3 clients, 3
    rounds, a new mask every round with the final targets from round 2, and the guidance
    diagnostic every round. A test that changes the folder copies it first."""
    import uuid

    from processes import bonsai, wait_gone

    out = tmp_path_factory.mktemp("autoflip-run")
    sets = ["rounds=3", "partition.num_clients=3", "strategy.min_train_clients=3",
            "strategy.name=autoflip", "pruning.mask_every=1", "pruning.schedule_rounds=2",
            "diagnostics.guidance_every=1", "diagnostics.guidance_units=8",
            f"output_dir={out}", "name=af"]
    mark = uuid.uuid4().hex
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet",
                   *[a for s in sets for a in ("--set", s)]], mark)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert not (left := wait_gone(mark)), left
    (run_dir,) = out.iterdir()
    return run_dir
