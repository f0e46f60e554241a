"""hwbptt: Highway backpropagation through time.

The core: the linear scan, the Highway-BP iteration and its options. Framework adapters
live in ``hwbptt.torch`` and ``hwbptt.keras``; the programs (demo, bench, study) in
``hwbptt.programs``.
"""

from .engine import ArrayOps, highway_adjoint
from .options import Diagnostics, HighwayOptions, HighwayOptionsMixin, effective_iterations
from .scan import TORCH_OPS, linear_scan, linear_scan_reference
from .schedule import IterationSchedule

__all__ = [
    "ArrayOps",
    "Diagnostics",
    "HighwayOptions",
    "HighwayOptionsMixin",
    "IterationSchedule",
    "TORCH_OPS",
    "effective_iterations",
    "highway_adjoint",
    "linear_scan",
    "linear_scan_reference",
]

__version__ = "0.1.0"
