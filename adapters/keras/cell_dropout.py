"""Dropout inside a user cell: the masks the wrapped layer draws, fixed for the call.

A Keras cell with dropout (``DropoutRNNCell``: ``LSTMCell``, ``GRUCell``,
``SimpleRNNCell`` in a ``StackedRNNCells``, or a user cell with the mixin) draws its masks
once per layer call and caches them: ``RNN.call`` draws them from ``sequences[:, 0]`` and
the first initial state (``_maybe_config_dropout_masks``, which for a stack also runs each
sub-cell once to get the next one's input) and clears the cache after the loop. Every step
then reads the same ``(B, n)`` masks, so they are constants inside each step's map
``F_t``, and Highway-BP's VJPs see them as they see the weights.

``draw`` runs Keras' own drawing (the same seed stream as the wrapped layer) and keeps the
masks. ``masks_in`` puts them in the cells' caches for one call of the cell: as they are
for a ``(B, ·)`` step, or tiled ``tiles`` times for the flattened ``T·B`` batch of the
VJPs (row ``t·B + b`` belongs to sequence ``b``), and clears the caches after, so a cell
never draws a mask of its own inside Highway-BP.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import keras
from keras import ops
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell  # not in Keras' public API (3.15)

__all__ = ["DropoutRNNCell", "dropout_cells", "draw", "masks_in"]


def dropout_cells(cell: Any) -> list:
    """The ``DropoutRNNCell`` cells in ``cell`` (itself, or a stack's sub-cells)."""
    cells = cell.cells if isinstance(cell, keras.layers.StackedRNNCells) else [cell]
    return [c for c in cells if isinstance(c, DropoutRNNCell)]


def draw(layer: Any, cell: Any, first_input: Any, nested_states: Any) -> list:
    """``[(cell, input_mask, recurrent_mask), ...]`` for each dropout cell, drawn as
    ``layer`` (the wrapped ``keras.layers.RNN``) draws them; the caches are left clear."""
    cells = dropout_cells(cell)
    if not any(c.dropout or c.recurrent_dropout for c in cells):
        return []
    layer._maybe_config_dropout_masks(cell, first_input, nested_states)
    masks = [(c, getattr(c, "_dropout_mask", None), getattr(c, "_recurrent_dropout_mask", None)) for c in cells]
    layer._maybe_reset_dropout_masks(cell)
    return masks


def _tiled(mask: Any, tiles: Any) -> Any:
    if mask is None or tiles is None:
        return mask
    if isinstance(mask, (list, tuple)):
        return [ops.tile(m, (tiles, 1)) for m in mask]
    return ops.tile(mask, (tiles, 1))


@contextlib.contextmanager
def masks_in(masks: list, tiles: Any = None) -> Iterator[None]:
    """The drawn masks in the cells' caches for one call (``tiles``: sequence steps
    flattened into the rows, ``None`` for one step)."""
    for c, dp, rec in masks:
        c._dropout_mask, c._recurrent_dropout_mask = _tiled(dp, tiles), _tiled(rec, tiles)
    try:
        yield
    finally:
        for c, _, _ in masks:
            c.reset_dropout_mask()
            c.reset_recurrent_dropout_mask()
