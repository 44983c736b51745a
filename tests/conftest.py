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


@pytest.fixture(scope="session", autouse=True)
def _remove_flwr_home():
    yield
    shutil.rmtree(_HOME, ignore_errors=True)
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def on_test_device():
    """Tensors a test makes land on BONSAI_TEST_DEVICE (cpu unless the GPU check sets
    cuda; fl.kernels.testing)."""
    import torch

    from fl.kernels.testing import TEST_DEVICE

    if TEST_DEVICE == "cpu":  # the default already; the context would add a TorchFunctionMode
        yield
        return
    with torch.device(TEST_DEVICE):
        yield
