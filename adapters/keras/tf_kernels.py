"""On TensorFlow, Keras' LSTM and GRU run through compiled loops that keep their gates.

The ``keras.ops`` path (``gradient.py``) runs the forward as ``keras.ops.scan`` and, in the
backward, rebuilds the gates with one batched matmul and runs each Highway iteration as
some thirty separate elementwise passes. Here, for a ``LSTMCell`` or a ``GRUCell`` with
``reset_after=True`` (known activations, float32/float64, no mask, no per-gate dropout
masks, ``diagnostics=False``):

- the forward is one ``tf.while_loop`` (the input projection ``x W + b`` is one matmul
  before it) that writes every step's state and activated gates, so the backward
  rebuilds nothing;
- the backward's adjoint, everything but the weight-gradient matmuls, is one XLA-compiled
  function (``tf.function(jit_compile=True)``): the Highway iterations
  (``hwbptt.engine.highway_adjoint`` with the scans as compiled loops, ``tol`` and
  ``gamma`` included) or, in exact mode, BPTT's adjoint as one compiled reverse loop on
  the kept gates; the elementwise work fuses;
- the weight gradients ``xᵀ δ``, ``h_{t-1}ᵀ δ`` are plain TensorFlow matmuls over all
  ``T·B`` rows (XLA's CPU matmul with a transposed operand measured 2x slower), and
  ``∂L/∂x = δ Wᵀ`` is a separate op that a graph prunes when nothing needs it (the first
  layer of a model).

The gradient is the one the ``keras.ops`` path computes (``tests/keras/test_tf_kernels.py``
compares them), except where the iteration diverges: both keep their best iterate, and the
LSTM's default ``"gates"`` iteration here judges it by the cell-state adjoint's updates
(as the torch layers do) where the ``keras.ops`` path takes both halves of the adjoint. The
engine's diagnostics come back from the compiled adjoint and are reported as on the other
paths (``gradient.report_vector``: the divergence warning, the "auto" controller).
``use(False)`` switches this route off, ``levers(...)`` the compiled pieces (the bench
times each).
"""

from __future__ import annotations

from typing import Any, Callable

import keras

from hwbptt.engine import highway_adjoint
from hwbptt.options import HighwayOptions

from .switch import switch

__all__ = ["applies", "levers", "run", "use"]

_state = {"enabled": True, "forward_xla": False, "backward_xla": True}
_DERIVATIVE_FROM_OUTPUT = ("tanh", "sigmoid", "relu", "linear")


def use(on: bool) -> Any:
    """Switch this route on or off within a block (for comparisons with ``keras.ops``)."""
    return switch(_state, on, "use")


def levers(forward_xla: bool | None = None, backward_xla: bool | None = None) -> dict:
    """Set which pieces XLA compiles (``None`` leaves one as it is); returns the settings
    before. Takes effect for functions traced afterwards."""
    before = {k: _state[k] for k in ("forward_xla", "backward_xla")}
    for key, value in (("forward_xla", forward_xla), ("backward_xla", backward_xla)):
        if value is not None:
            if not isinstance(value, bool):
                raise TypeError(f"levers({key}=...) takes a bool, got {key}={value!r}")
            _state[key] = value
    _FUNCTIONS.clear()
    return before


def _act_name(fn: Any) -> str | None:
    from .activations import _FUNCTIONS as known

    return "linear" if fn is None else known.get(fn)


def applies(cell: Any, x: Any, mask: Any, gate_masks: Any, options: HighwayOptions) -> bool:
    """Whether ``run`` takes this cell and time-major input."""
    if not _state["enabled"] or keras.backend.backend() != "tensorflow":
        return False
    if mask is not None or gate_masks is not None or options.diagnostics or options.probe is not None:
        return False  # diagnostics=True (per-iteration norms) and "auto" probes: the keras.ops path
    # An unresolved "auto" (a graph: auto_graph) runs its modes here and its probes on the keras.ops path.
    if str(x.dtype) not in ("float32", "float64", "<dtype: 'float32'>", "<dtype: 'float64'>"):
        return False
    if type(cell) is keras.layers.GRUCell and not cell.reset_after:
        return False
    if type(cell) not in (keras.layers.LSTMCell, keras.layers.GRUCell):
        return False
    names = (_act_name(cell.activation), _act_name(cell.recurrent_activation))
    return all(n in _DERIVATIVE_FROM_OUTPUT for n in names)


# ----------------------------------------------------------------------------- helpers


def _apply(name: str, z: Any) -> Any:
    import tensorflow as tf

    return {"tanh": tf.tanh, "sigmoid": tf.sigmoid, "relu": tf.nn.relu, "linear": tf.identity}[name](z)


def _deriv(name: str, y: Any) -> Any:
    """``φ'`` from the output ``y = φ(z)`` (``relu``: ``y > 0`` iff ``z > 0``)."""
    import tensorflow as tf

    if name == "tanh":
        return 1.0 - y * y
    if name == "sigmoid":
        return y * (1.0 - y)
    if name == "relu":
        return tf.cast(y > 0, y.dtype)
    return tf.ones_like(y)


class _TFOps:
    """``hwbptt.engine.ArrayOps`` inside a traced (XLA) function: the reverse scan is a
    ``tf.while_loop`` (a compiled loop under XLA: ~4 µs a step at B·H = 4096)."""

    traced = True

    @staticmethod
    def reverse_scan(a: Any, b: Any) -> Any:
        import tensorflow as tf

        a = tf.broadcast_to(a, tf.shape(b))
        steps = tf.shape(b)[0]
        out = tf.TensorArray(b.dtype, size=steps, element_shape=b.shape[1:])

        def body(t, u, out):
            u = b[t] + a[t] * u
            return t - 1, u, out.write(t, u)

        _, _, out = tf.while_loop(lambda t, *_: t >= 0, body, (steps - 1, tf.zeros_like(b[0]), out))
        return out.stack()

    @staticmethod
    def shift_next(u: Any) -> Any:
        import tensorflow as tf

        return tf.concat([u[1:], tf.zeros_like(u[:1])], axis=0)

    @staticmethod
    def norm(x: Any) -> Any:
        import tensorflow as tf

        return tf.sqrt(tf.reduce_sum(tf.square(x)))

    @staticmethod
    def where(cond: Any, x: Any, y: Any) -> Any:
        import tensorflow as tf

        return tf.where(cond, x, y)


def _rows(a: Any) -> Any:
    import tensorflow as tf

    return tf.reshape(a, (-1, a.shape[-1]))


def _project(a: Any, w: Any, transpose_b: bool = False) -> Any:
    """``a @ w`` over the last axis of a ``(T, B, n)`` array, as one 2-D matmul."""
    import tensorflow as tf

    out = tf.matmul(_rows(a), w, transpose_b=transpose_b)
    n = w.shape[0] if transpose_b else w.shape[1]
    return tf.reshape(out, tf.concat([tf.shape(a)[:-1], [n]], axis=0))


def _weight_grad(a: Any, d: Any) -> Any:
    """``Σ_{t,b} a[t,b]ᵀ d[t,b]`` as one matmul over ``T·B`` rows."""
    import tensorflow as tf

    return tf.matmul(_rows(a), _rows(d), transpose_a=True)


def _iterations(options: HighwayOptions, steps: int | None) -> int:
    """The iteration cap (``gradient._iteration_cap``: k >= T give the exact adjoint, as T do)."""
    from .gradient import _iteration_cap

    return _iteration_cap(options, steps)


_FUNCTIONS: dict = {}


def _compiled(key: tuple, build: Callable[[], Callable], xla: bool) -> Callable:
    import tensorflow as tf

    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = _FUNCTIONS[key] = tf.function(build(), jit_compile=xla, reduce_retracing=True)
    return fn


def _options_key(options: HighwayOptions, steps: int | None) -> tuple:
    exact = options.iterations is None and options.tol is None
    return ("exact",) if exact else (_iterations(options, steps), options.tol, options.gamma, options.split)


from .tf_lstm import lstm_run  # noqa: E402  (the cells use the helpers above)
from .tf_gru import gru_run  # noqa: E402


def run(cell: Any, params: list, x: Any, states: list, options: HighwayOptions, auto: Any = None,
        report: Any = None) -> tuple[Any, list]:
    """``(y, final_states)`` for time-major ``x`` (T, B, D) and the initial ``states``:
    ``y`` (T, B, H) the outputs, ``final_states`` the Keras states after the last step.
    ``auto``: an ``auto_graph.GraphAuto`` (``iterations="auto"`` in a graph): each step's
    backward is the compiled adjoint of the planned mode, or the probe (run eagerly on the
    ``keras.ops`` path)."""
    if type(cell) is keras.layers.LSTMCell:
        return lstm_run(cell, params, x, states, options, auto, report)
    return gru_run(cell, params, x, states, options, auto, report)
