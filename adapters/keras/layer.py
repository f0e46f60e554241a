"""``HighwayRNN``: a Keras layer that trains a recurrent layer with Highway-BP.

It wraps ``keras.layers.LSTM``, ``GRU`` (both ``reset_after``), ``SimpleRNN`` or
``keras.layers.RNN(cell)`` and uses that layer's own variables. The forward pass gives
the wrapped layer's outputs for the same call (``mask``, ``initial_state``,
``training``, ``return_sequences``, ``return_state``, ``go_backwards``); the backward
pass is Highway-BP (``hwbptt.engine``) with analytic block VJPs for the built-in cells
and the backend's autodiff for user cells, or the exact adjoint with
``iterations=None``. On the torch backend, LSTM and GRU layers with the default
activations and no mask run through the PyTorch adapter's fused layers instead
(``torch_kernels``): the same gradient, computed faster.
"""

from __future__ import annotations

import copy
from typing import Any

import keras
from keras import ops

from hwbptt.options import HighwayOptionsMixin

from . import auto_graph, cell_dropout, gate_dropout, tf_kernels, torch_kernels
from .backend_ops import is_traced
from .cell_dropout import DropoutRNNCell
from .gradient import after_backward, auto_controller, auto_options, highway_sequence
from .gru import GRUMath
from .lstm import LSTMMath
from .simple_rnn import SimpleRNNMath
from .user_cell import UserCellMath, check_residual, nest_states, state_layout

__all__ = ["HighwayRNN"]

_ANALYTIC = (
    (keras.layers.LSTMCell, LSTMMath),
    (keras.layers.GRUCell, GRUMath),
    (keras.layers.SimpleRNNCell, SimpleRNNMath),
)


def _analytic_math(cell: Any) -> Any:
    for cls, math in _ANALYTIC:
        if type(cell) is cls:
            return math
    return None


def _check_sequences_shape(shape: Any) -> None:
    """``sequences`` must be (batch, time, features) with at least one time step (the
    wrapped layer fails on a wrong rank with its input spec's error, on T = 0 deep inside
    the backend)."""
    shape = tuple(None if n is None else int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"HighwayRNN: sequences must be 3-D (batch, time, features), got shape {shape}")
    if shape[1] == 0:
        raise ValueError(f"HighwayRNN: sequences must have at least one time step, got shape {shape}")


@keras.saving.register_keras_serializable(package="hwbptt")
class HighwayRNN(HighwayOptionsMixin, keras.layers.Layer):
    """Highway-BP for a Keras recurrent layer.

    ``HighwayRNN(layer, iterations=3, tol=None, gamma=0.0, split="gates",
    diagnostics=False, residual=None)``

    - ``layer``: a ``keras.layers.LSTM``, ``GRU``, ``SimpleRNN`` or
      ``keras.layers.RNN(cell)``; anything else is a ``TypeError``.
    - ``iterations``: int >= 0, or ``None`` for the exact gradient (computed by this
      layer's own sequential adjoint, not by autograd through the loop). Capped at the
      sequence length ``T``: ``T`` iterations are exact.
    - ``tol``: stop once an iteration changes the adjoint by less than ``tol ||w||``
      (relative), capped by ``iterations`` (by ``T`` when ``iterations`` is ``None``).
    - ``gamma`` in [0, 1]: moves ``γ K`` from the residual into the block; ``1`` is FPI.
    - ``split``: ``"gates"`` or ``"step"``, for LSTMs (``hwbptt.options``).
    - ``diagnostics``: ``False``, ``True`` or ``"debug"``; after a backward pass in
      eager execution, ``last_diagnostics`` holds a ``hwbptt.Diagnostics``.
    - ``iterations="auto"`` with ``fidelity`` (default 0.99) and ``probe_every`` (default
      50): every ``probe_every`` training calls the exact adjoint and the ladder's cosines
      and times are measured and the fastest faithful mode is used (``hwbptt.auto``;
      ``highway_auto.history``). In eager execution, and in a TensorFlow graph
      (``model.fit`` with the default ``compile()``: ``auto_graph``, without XLA, where
      ``jit_compile=True`` is a ``ValueError``); not under ``jax.jit``. Non-training calls
      are exact. A fixed ``k`` whose updates grow, or shrink far too slowly, warns once
      (``hwbptt.HighwayDivergenceWarning``), eagerly and from a TensorFlow graph (not
      under XLA or ``jax.jit``: docs/keras.md).
    - ``residual`` (user cells only): ``"identity"``, ``None``/``"none"`` (FPI) or a
      callable ``(x_t, states_prev, states_new) -> multipliers`` giving ``diag K_t``.

    The options are validated attributes: ``layer.iterations = 10`` takes effect at the
    next call (in a compiled ``model.fit``, at the next trace).

    ``sequences`` must be (batch, time, features) with at least one time step
    (``ValueError`` naming ``sequences`` otherwise). The inputs of masked steps are never
    read: a NaN/Inf there reaches neither the outputs nor the gradients.
    """

    def __init__(self, layer: Any, iterations: int | None = 3, tol: float | None = None, gamma: float = 0.0,
                 split: str = "gates", diagnostics: bool | str = False, residual: Any = None,
                 fidelity: float = 0.99, probe_every: int = 50, **kwargs: Any):
        if not isinstance(layer, keras.layers.RNN):
            raise TypeError(
                "HighwayRNN wraps a Keras recurrent layer (keras.layers.LSTM, GRU, SimpleRNN or "
                f"keras.layers.RNN(cell)), got {type(layer).__name__}"
            )
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(**kwargs)
        self._set_highway_options(iterations=iterations, tol=tol, gamma=gamma, split=split, diagnostics=diagnostics,
                                  fidelity=fidelity, probe_every=probe_every)
        self.residual = check_residual(residual)
        if residual is not None and _analytic_math(layer.cell) is not None:
            raise ValueError(
                f"residual is for user cells; {type(layer).__name__} has its own residual path, got residual={residual!r}"
            )
        self.layer = layer
        if getattr(self, "_input_shape_arg", None) is None and getattr(layer, "_input_shape_arg", None) is not None:
            # LSTM(..., input_shape=...) as a Sequential model's first layer: the model
            # builds its Input from the first layer's input_shape, which is now this one.
            self._input_shape_arg = layer._input_shape_arg
        self.supports_masking = True
        object.__setattr__(self, "last_diagnostics", None)
        self._check_supported()

    @property
    def highway_auto(self) -> Any:
        """The ``"auto"`` controller (``hwbptt.auto.AutoController``: ``choice``, ``history``)."""
        return auto_controller(self)

    @property
    def supports_jit(self) -> bool:
        """Keras asks every layer before it compiles a step with XLA (``model_supports_jit``).
        With ``iterations="auto"`` on TensorFlow the controller runs in a ``tf.py_function``,
        which XLA cannot compile: ``False``, so ``compile()``'s default ``jit_compile="auto"``
        resolves to no XLA; an explicit ``jit_compile=True`` is a ``ValueError`` here, where
        Keras would otherwise warn and drop it."""
        if self.iterations == "auto" and keras.backend.backend() == "tensorflow":
            if auto_graph.explicit_jit_request():
                raise ValueError(auto_graph.XLA_MESSAGE)
            return False
        return self.__dict__.get("_highway_supports_jit", True)

    @supports_jit.setter
    def supports_jit(self, value: bool) -> None:
        self.__dict__["_highway_supports_jit"] = value

    # ------------------------------------------------------------ checks
    def _check_supported(self) -> None:
        inner, cell = self.layer, self.layer.cell
        name = type(inner).__name__
        if isinstance(inner, keras.layers.ConvLSTM1D.__mro__[1]):  # the ConvLSTM base class
            raise ValueError(
                f"HighwayRNN does not support {name}: its inputs and states are feature maps (batch, time, *spatial, "
                "channels), where HighwayRNN takes (batch, time, features) sequences and flat states; train it "
                "with BPTT (the unwrapped layer)"
            )
        math = _analytic_math(cell)
        if math is not None:
            math(cell)  # refuses unknown activations
            return
        stacked = isinstance(cell, keras.layers.StackedRNNCells)
        for sub in cell.cells if stacked else [cell]:
            if isinstance(sub, keras.layers.StackedRNNCells):
                raise ValueError("HighwayRNN does not support a StackedRNNCells inside a StackedRNNCells; give "
                                 "StackedRNNCells the cells themselves")
            if (getattr(sub, "dropout", 0) or getattr(sub, "recurrent_dropout", 0)) and not isinstance(sub, DropoutRNNCell):
                where = f"a StackedRNNCells' {type(sub).__name__}" if stacked else type(sub).__name__
                raise ValueError(
                    f"HighwayRNN supports dropout inside a user cell only through Keras' DropoutRNNCell mixin, whose "
                    f"masks are drawn once per call; {where} has dropout={getattr(sub, 'dropout', 0)}, "
                    f"recurrent_dropout={getattr(sub, 'recurrent_dropout', 0)} without it: a mask drawn inside the "
                    "cell's call would differ between the steps and the one T·B-row call of Highway-BP's VJPs"
                )
        sizes, _ = state_layout(cell)
        if not all(isinstance(n, int) for n in sizes):
            raise ValueError(f"HighwayRNN: user cells need integer state sizes, got state_size={cell.state_size!r}")

    # ------------------------------------------------------------ forwarding
    @property
    def return_sequences(self) -> bool:
        return self.layer.return_sequences

    @property
    def return_state(self) -> bool:
        return self.layer.return_state

    @property
    def go_backwards(self) -> bool:
        return self.layer.go_backwards

    @property
    def stateful(self) -> bool:
        return self.layer.stateful

    @property
    def states(self) -> Any:
        """The wrapped layer's state variables (``stateful=True``), else ``None``."""
        return self.layer.states

    @property
    def cell(self) -> Any:
        return self.layer.cell

    @property
    def unroll(self) -> bool:
        return self.layer.unroll

    def reset_state(self) -> None:
        """Zero the state variables of a ``stateful=True`` layer, as Keras does (every one of a
        ``StackedRNNCells``' nested states too, where Keras 3.15's own ``reset_state`` raises
        ``AttributeError`` on the nesting)."""
        if self.layer.states is not None:
            for variable in keras.tree.flatten(self.layer.states):
                variable.assign(ops.zeros_like(variable.value))

    def reset_states(self) -> None:  # Keras' compatibility alias
        self.reset_state()

    @property
    def zero_output_for_mask(self) -> bool:
        return self.layer.zero_output_for_mask

    @zero_output_for_mask.setter
    def zero_output_for_mask(self, value: bool) -> None:
        self.layer.zero_output_for_mask = value

    # ------------------------------------------------------------ keras plumbing
    def build(self, sequences_shape: Any, initial_state_shape: Any = None) -> None:
        _check_sequences_shape(sequences_shape)
        self._check_supported()
        if not self.layer.built:
            self.layer.build(sequences_shape)
        self.built = True

    def compute_output_shape(self, sequences_shape: Any, initial_state_shape: Any = None) -> Any:
        return self.layer.compute_output_shape(sequences_shape)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return self.layer.compute_mask(inputs, mask)

    def _make_math(self, split: str, training: Any) -> Any:
        cell = self.layer.cell
        math = _analytic_math(cell)
        if math is not None:
            return math(cell, split=split)
        return UserCellMath(cell, self.residual, training=training)

    def _params(self, dtype: str) -> list:
        cell = self.layer.cell
        if _analytic_math(cell) is not None:
            weights = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if cell.use_bias else [])
        else:
            weights = list(cell.trainable_variables)
        return [ops.cast(w, dtype) for w in weights]

    def call(self, sequences: Any, initial_state: Any = None, mask: Any = None, training: Any = None) -> Any:
        self._check_supported()
        inner, cell = self.layer, self.layer.cell
        options = self.highway_options
        x = ops.convert_to_tensor(sequences, dtype=self.compute_dtype)
        _check_sequences_shape(x.shape)
        batch = ops.shape(x)[0]
        if inner.stateful:
            expected = getattr(inner, "_expected_batch_size", None)
            if expected is not None and x.shape[0] is not None and x.shape[0] != expected:
                raise ValueError(
                    "If an RNN is stateful, the batch size of the input sequences must be the same as the batch "
                    f"size of the initial state. Expected batch size: {expected}, received batch size: {x.shape[0]}"
                )
        # States as one flat list (a StackedRNNCells nests them per sub-cell: _finish nests them again).
        if initial_state is None:
            # A copy of the state variables: the call writes them back in place (_finish),
            # which must not change a tensor the backward still needs (torch autograd).
            states = ([ops.copy(v.value) for v in keras.tree.flatten(inner.states)] if inner.stateful
                      else keras.tree.flatten(inner.get_initial_state(batch)))
        else:
            states = keras.tree.flatten(initial_state)
        states = [ops.cast(ops.convert_to_tensor(s), x.dtype) for s in states]
        s0 = ops.concatenate(states, axis=-1) if len(states) > 1 else states[0]

        # Dropout masks as the wrapped layer draws them (one per sequence, the same seed stream).
        user_masks = []
        if _analytic_math(cell) is None:  # a user cell: its own masks, in its caches (cell_dropout)
            nesting = state_layout(cell)[1]
            user_masks = cell_dropout.draw(inner, cell, x[:, 0], states if nesting is None else nest_states(states, nesting))
            in_mask = in_gates = rec_gates = None
        else:
            in_mask, in_gates, rec_gates = gate_dropout.draw(cell, x[:, 0], states[0], training)
        if in_mask is not None:
            x = x * ops.expand_dims(ops.cast(in_mask, x.dtype), 1)
        gate_masks = None if in_gates is None and rec_gates is None else (in_gates, rec_gates)
        x_tm = ops.transpose(x, (1, 0, 2))
        m_tm = None
        if mask is not None:
            if isinstance(mask, (list, tuple)):
                mask = mask[0]
            m_tm = ops.expand_dims(ops.transpose(ops.cast(mask, "bool"), (1, 0)), -1)
            # Masked steps never reach the outputs; zero their inputs so that a NaN/Inf there
            # cannot reach the gradients either (as 0·NaN through the masking would).
            x_tm = ops.where(m_tm, x_tm, ops.zeros_like(x_tm))
        if inner.go_backwards:
            x_tm = ops.flip(x_tm, axis=0)
            m_tm = None if m_tm is None else ops.flip(m_tm, axis=0)

        def report(d):  # a backward's diagnostics (eager, or from a graph's py_function): probes, warnings
            object.__setattr__(self, "last_diagnostics", d)
            after_backward(self, d)

        def math_for(opts, gates):  # the cell math of one mode, with the gate dropout masks
            exact = opts.iterations is None and opts.tol is None
            math = self._make_math("step" if (exact or m_tm is not None) else opts.split, training)
            if user_masks:
                math.dropout_masks = user_masks
            if gates[0] is not None or gates[1] is not None:
                math.in_gates = None if gates[0] is None else ops.cast(gates[0], x.dtype)
                math.rec_gates = None if gates[1] is None else ops.cast(gates[1], x.dtype)
            return math

        graph_auto = None
        if options.auto:  # "auto" resolved to this call's mode (adapters/keras/gradient.py)
            if training and is_traced(x) and keras.backend.backend() == "tensorflow":
                # In a graph, each executed step plans its mode (adapters/keras/auto_graph.py).
                graph_auto = auto_graph.GraphAuto(self, options, x.shape[1], math_for, report)
            else:
                options = auto_options(self, options, x.shape[1], training, is_traced(x))

        if torch_kernels.applies(cell, x_tm, m_tm, gate_masks):
            out, final = torch_kernels.run(cell, self._params(x.dtype), x_tm, states, options, report)
            return self._finish(out, final)
        if tf_kernels.applies(cell, x_tm, m_tm, gate_masks, options):
            out, final = tf_kernels.run(cell, self._params(x.dtype), x_tm, states, options, graph_auto, report)
            return self._finish(out, final)

        math = math_for(options, (in_gates, rec_gates))
        seq = highway_sequence(math, options, x_tm, s0, self._params(x.dtype), m_tm, report, graph_auto)

        width = sum(math.state_sizes)
        s_seq = seq[..., :width]
        if getattr(math, "has_output", False):
            out = seq[..., width:]  # masked steps already repeat the last output (zeros before any)
        else:
            out = s_seq[..., : math.state_sizes[0]]
            if m_tm is not None:
                seen = ops.cumsum(ops.cast(m_tm, "int32"), axis=0) > 0
                out = ops.where(seen, out, ops.zeros_like(out))
        if m_tm is not None and inner.zero_output_for_mask:
            out = ops.where(m_tm, out, ops.zeros_like(out))
        final, start = [], 0
        for n in math.state_sizes:
            final.append(s_seq[-1][:, start : start + n])
            start += n
        return self._finish(out, final)

    def _finish(self, out: Any, final: list) -> Any:
        """The wrapped layer's return value from the time-major outputs and the final
        states; a stateful layer keeps the final states for its next call (no gradient
        crosses between calls, as in Keras)."""
        inner = self.layer
        if inner.stateful:
            for variable, value in zip(keras.tree.flatten(inner.states), final):
                variable.assign(ops.cast(ops.stop_gradient(value), variable.dtype))
        output = ops.transpose(out, (1, 0, 2)) if inner.return_sequences else out[-1]
        nesting = state_layout(inner.cell)[1]
        final = list(final) if nesting is None else nest_states(list(final), nesting)
        return (output, *final) if inner.return_state else output

    # ------------------------------------------------------------ serialisation
    def get_config(self) -> dict:
        config = super().get_config()
        residual = self.residual
        if callable(residual):
            residual = keras.saving.serialize_keras_object(residual)
        config.update(
            layer=keras.saving.serialize_keras_object(self.layer),
            iterations=self.iterations,
            tol=self.tol,
            gamma=self.gamma,
            split=self.split,
            diagnostics=self.diagnostics,
            fidelity=self.fidelity,
            probe_every=self.probe_every,
            residual=residual,
            go_backwards=self.layer.go_backwards,
        )
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> "HighwayRNN":
        config = copy.deepcopy(config)  # deserialising the wrapped layer pops keys (an RNN's "cell") from its config
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        go_backwards = config.pop("go_backwards", None)
        if go_backwards is not None:  # keras.layers.Bidirectional sets it on our config
            layer.go_backwards = go_backwards
        residual = config.pop("residual", None)
        if isinstance(residual, dict):
            residual = keras.saving.deserialize_keras_object(residual, custom_objects=custom_objects)
        return cls(layer, residual=residual, **config)
