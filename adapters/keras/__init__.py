"""hwbptt.keras: Highway backpropagation for Keras recurrent layers, on every Keras backend.

>>> import keras
>>> from hwbptt.keras import HighwayRNN
>>> layer = HighwayRNN(keras.layers.LSTM(64, return_sequences=True), iterations=3)

``HighwayRNN`` wraps ``keras.layers.LSTM``, ``GRU``, ``SimpleRNN`` or
``keras.layers.RNN(cell)``; it works in ``Sequential`` and functional models, under
``keras.layers.Bidirectional``, with masks, ``fit``/``evaluate``/``predict`` and
``model.save``/``keras.models.load_model``. See ``docs/keras.md``.
"""

from hwbptt.options import Diagnostics

from .layer import HighwayRNN

__all__ = ["Diagnostics", "HighwayRNN"]
