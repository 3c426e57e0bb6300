import pytest
import torch

from tests.dist_workers import DistWorkers


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the single-device op tests, e.g. cuda")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but CUDA is not available")
    return torch.device(name)


@pytest.fixture(scope="session")
def dist_workers():
    """Six gloo ranks shared by every distributed test of the session."""
    workers = DistWorkers()
    yield workers
    workers.close()
