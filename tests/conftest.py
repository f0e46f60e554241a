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


@pytest.fixture(autouse=True)
def _compiled_exact_adjoint_at_every_size(monkeypatch):
    """Exact mode takes the LSTM's compiled adjoint only up to H = 256 in use (wider,
    oneDNN's exact BPTT is faster: ``dispatch.exact_adjoint_pays``). The suite raises that
    bar to test the compiled path at every width (H = 257 included);
    ``tests/test_native.py::test_plan_is_the_one_decision`` checks the real bar."""
    import sys

    dispatch = sys.modules.get("hwbptt.torch.dispatch")
    if dispatch is None and importlib.util.find_spec("torch") is not None:
        import hwbptt.torch.dispatch as dispatch
    if dispatch is not None:
        monkeypatch.setattr(dispatch, "EXACT_LSTM_MAX_H", 1 << 30)
