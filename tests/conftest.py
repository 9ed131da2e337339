import pytest
import torch

# --doctest-modules (pyproject's addopts) would import this file once more as a module to search for
# examples, clashing with src/conftest.py over the module name "conftest"; it holds no examples.
collect_ignore = ["conftest.py"]


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one intra-op thread (restored after): tiny models on a shared 2-core machine
    avoid OpenMP contention, and results do not depend on the machine's core count. A test that needs
    more threads calls ``torch.set_num_threads(n)`` itself; the count is restored after it too.
    (Autouse: the ``usefixtures("one_thread")`` marks some modules still carry are redundant.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
