import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use small tensors: intra-op threads only add spin-wait overhead (×100 on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gmm():
    from epd.backbones import GMMDigits

    return GMMDigits()


@pytest.fixture
def copy(tmp_path):
    """A private copy of the shipped unet and classifier weights, for tests that break them."""
    import shutil

    from epd.data import WEIGHTS_DIR

    for name in ("unet-digits", "digit-classifier"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path
