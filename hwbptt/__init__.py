"""hwbptt: Highway backpropagation through time.

The core: the Highway-BP iteration, its options, the iteration schedule and the linear
scan's contract with its reference. It imports no framework (NumPy only): the adapters
live in ``hwbptt.torch`` (PyTorch: the layers, the scan, the compiled kernels) and
``hwbptt.keras`` (Keras, any backend); the programs (demo, bench, study) in
``hwbptt.programs``.
"""

from .auto import AutoController
from .engine import ArrayOps, highway_adjoint
from .options import Diagnostics, HighwayDivergenceWarning, HighwayOptions, HighwayOptionsMixin, effective_iterations
from .scan import linear_scan_reference
from .schedule import IterationSchedule

__all__ = [
    "ArrayOps",
    "AutoController",
    "HighwayDivergenceWarning",
    "Diagnostics",
    "HighwayOptions",
    "HighwayOptionsMixin",
    "IterationSchedule",
    "effective_iterations",
    "highway_adjoint",
    "linear_scan_reference",
]

__version__ = "0.1.0"
