"""PyTorch adapter: ``HighwayLSTM``, ``HighwayGRU``, ``HighwayRNN`` (any cell), ``convert``,
the linear scan on torch tensors, and ``kernels_status()`` (what runs on this machine)."""

from hwbptt import Diagnostics, IterationSchedule

from .cell import HighwayRNN
from .convert import convert
from .dispatch import kernels_status
from .rnn import HighwayGRU, HighwayLSTM
from .scan import linear_scan, linear_scan_reference

__all__ = [
    "HighwayLSTM", "HighwayGRU", "HighwayRNN", "convert", "Diagnostics", "IterationSchedule", "kernels_status",
    "linear_scan", "linear_scan_reference",
]
