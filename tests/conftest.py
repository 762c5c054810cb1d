import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use small tensors: one thread avoids oversubscription slowdowns when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
