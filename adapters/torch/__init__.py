"""PyTorch adapter: ``HighwayLSTM``, ``HighwayGRU``, ``HighwayRNN`` and ``convert``."""

from hwbptt import Diagnostics, IterationSchedule

from .convert import convert
from .rnn import HighwayGRU, HighwayLSTM

__all__ = ["HighwayLSTM", "HighwayGRU", "convert", "Diagnostics", "IterationSchedule"]
