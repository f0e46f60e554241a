"""PyTorch adapter: ``HighwayLSTM``, ``HighwayGRU``, ``HighwayRNN`` (any cell) and ``convert``."""

from hwbptt import Diagnostics, IterationSchedule

from .cell import HighwayRNN
from .convert import convert
from .rnn import HighwayGRU, HighwayLSTM

__all__ = ["HighwayLSTM", "HighwayGRU", "HighwayRNN", "convert", "Diagnostics", "IterationSchedule"]
