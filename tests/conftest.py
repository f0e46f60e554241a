"""Session-wide test setup, and the fixtures every test folder shares.

Triton, which ``torch._dynamo``, ``torch.compile`` and the torch profiler import, crashes
the interpreter when it is first imported after TensorFlow (loaded by the Keras tests).
Importing it first, before any test module, avoids that.
"""

import contextlib
import importlib.util

import pytest

if importlib.util.find_spec("triton") is not None:
    import torch._dynamo  # noqa: F401


@contextlib.contextmanager
def _threads(n: int):
    import torch  # only where a test asks for the fixture

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_threads():
    """``with torch_threads(n):`` runs a block on ``n`` intra-op threads (the count the
    kernels split over; oneDNN's threaded RNN kernels also stall on a loaded 2-core machine)."""
    return _threads
