import pytest

from tests.dist_workers import DistWorkers


@pytest.fixture(scope="session")
def dist_workers():
    """Four gloo ranks shared by every distributed test of the session."""
    workers = DistWorkers()
    yield workers
    workers.close()
