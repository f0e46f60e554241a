"""Session-wide test setup.

Triton, which ``torch._dynamo``, ``torch.compile`` and the torch profiler import, crashes
the interpreter when it is first imported after TensorFlow (loaded by the Keras tests).
Importing it first, before any test module, avoids that.
"""

import importlib.util

if importlib.util.find_spec("triton") is not None:
    import torch._dynamo  # noqa: F401
