import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
