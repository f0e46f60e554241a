"""``iterations="auto"`` in a traced TensorFlow graph (``tf.function``: ``model.fit``).

The decision is ``hwbptt.auto.AutoController``'s, in Python, as in eager execution; a
graph reaches it through ``tf.py_function`` at every executed backward:

1. ``plan``: one ``py_function`` calls ``AutoController.plan`` (the step count, the probe
   schedule and the choice are the controller's) and returns which mode this step runs,
   as an index into the modes the controller can choose: a fixed ``k`` of the ladder
   below ``T`` (``hwbptt.auto.ladder_for``) or exact, built as ``plan`` builds them;
2. ``tf.switch_case`` over one graph branch per mode (on the TensorFlow route, the
   compiled adjoint of ``tf_kernels`` for that mode) and one branch for the probe;
3. the probe branch is a ``py_function`` that runs, eagerly, the same backward an eager
   probe runs (``gradient.backward`` with the planned probe options: the exact adjoint
   returned, the ladder's cosines and times measured by ``gradient._probe``), which
   reports to the controller; the next ``plan`` decides from it.

Only the branch taken runs. ``py_function`` is a host callback that XLA cannot compile:
with ``iterations="auto"`` the layer tells Keras it does not support ``jit_compile``
(``supports_jit``), so ``compile()``'s default resolves to no XLA; an explicit
``jit_compile=True``, or the layer called inside a ``tf.function(jit_compile=True)``
while training, is a ``ValueError`` (``refuse_xla``).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Any, Callable, Sequence

from hwbptt.auto import ladder_for
from hwbptt.options import HighwayOptions

__all__ = ["GraphAuto", "in_xla", "refuse_xla", "explicit_jit_request"]

XLA_MESSAGE = (
    "HighwayRNN: iterations='auto' runs its controller in Python (tf.py_function) at every training step, "
    "which XLA cannot compile; compile the model with jit_compile=False (what compile()'s default "
    "jit_compile='auto' resolves to for this layer), or set a fixed iterations (an int k, or None for the "
    "exact gradient) to train under XLA"
)


def in_xla() -> bool:
    """Whether the graph being built is compiled by XLA (``tf.function(jit_compile=True)``)."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def refuse_xla() -> None:
    if in_xla():
        raise ValueError(XLA_MESSAGE)


def explicit_jit_request() -> bool:
    """Whether Keras asks for ``supports_jit`` from its ``jit_compile`` setter with a true
    value: ``compile(jit_compile=True)`` or ``model.jit_compile = True`` (Keras 3's
    ``Trainer``). Keras resolves ``compile()``'s default ``"auto"`` elsewhere, so this is an
    explicit request. False when Keras' code is not laid out so (it then warns and
    compiles without XLA itself)."""
    try:
        from keras.src.trainers.trainer import Trainer

        setter = Trainer.jit_compile.fset.__code__
    except (ImportError, AttributeError):  # pragma: no cover - another Keras layout
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is setter:
            return bool(frame.f_locals.get("value"))
        frame = frame.f_back
    return False


class GraphAuto:
    """One traced call of a layer in auto mode: the plan op and the switch over the modes.

    ``math_for(options, gates)`` builds the call's cell math for one mode (the gate dropout
    masks ``(in_gates, rec_gates)`` given); ``report(diagnostics)`` is the layer's report of
    an eager backward (``layer.last_diagnostics``, ``gradient.after_backward``)."""

    def __init__(self, layer: Any, options: HighwayOptions, steps: int | None,
                 math_for: Callable[[HighwayOptions, tuple], Any], report: Callable[[Any], None]):
        from .gradient import auto_controller

        refuse_xla()
        if steps is None:
            raise ValueError("HighwayRNN: iterations='auto' needs a static sequence length (the ladder is capped at T)")
        self.layer, self.options, self.steps = layer, options, int(steps)
        self.math_for, self.report = math_for, report
        rungs = ladder_for(self.steps, auto_controller(layer).ladder)
        # What plan returns between probes (hwbptt.auto.AutoController.plan), for each choice
        # it can make: a rung k, or None (exact). plan's result is looked up in this list.
        self.modes = [dataclasses.replace(options, iterations=k, probe=None) for k in (*rungs, None)]
        # A planned probe's options, until its py_function takes them: keyed by a token that
        # the plan op hands to the probe op, so no other step's plan can come between.
        self._probes: dict[int, HighwayOptions] = {}
        self._tokens = itertools.count()

    # -- run time (eager, inside py_function) ----------------------------------------------
    def _plan(self) -> list:
        import numpy as np

        from .gradient import auto_controller

        planned = auto_controller(self.layer).plan(self.options, self.steps)
        token = next(self._tokens)
        if planned.probe is not None:
            self._probes[token] = planned
            return [np.int32(len(self.modes)), np.int64(token)]
        if planned not in self.modes:
            raise RuntimeError(
                f"HighwayRNN: the auto controller chose {planned}, which is not among the graph's modes "
                f"(iterations in {[m.iterations for m in self.modes]}); the ladder changed after the trace"
            )
        return [np.int32(self.modes.index(planned)), np.int64(token)]

    # -- graph ------------------------------------------------------------------------------
    def gradient(self, fixed: Callable[[HighwayOptions], Sequence[Any]], probe: Callable[..., Sequence[Any]],
                 inputs: Sequence[Any], like: Sequence[Any]) -> list:
        """This step's gradients: ``fixed(options)`` in graph for the chosen mode, or
        ``probe(probe_options, *inputs)`` run eagerly in a ``py_function`` (``None`` inputs
        stay ``None``). Both return tensors shaped and typed as ``like``."""
        import tensorflow as tf

        index, token = tf.py_function(self._plan, [], [tf.int32, tf.int64], name="highway_auto_plan")
        index.set_shape([])
        branches = [(lambda o=o: [tf.convert_to_tensor(g) for g in fixed(o)]) for o in self.modes]
        branches.append(lambda: self._eager_probe(probe, inputs, like, token))
        out = tf.switch_case(index, branches, name="highway_auto_mode")
        for o, ref in zip(out, like):
            o.set_shape(ref.shape)
        return list(out)

    def _eager_probe(self, probe: Callable[..., Sequence[Any]], inputs: Sequence[Any], like: Sequence[Any],
                     token: Any) -> list:
        import tensorflow as tf

        given = [t for t in inputs if t is not None]

        def run(token, *tensors):
            it = iter(tensors)
            full = [None if t is None else next(it) for t in inputs]
            outs = probe(self._probes.pop(int(token)), *full)
            return [tf.cast(o, ref.dtype) for o, ref in zip(outs, like)]

        out = tf.py_function(run, [token, *given], [ref.dtype for ref in like], name="highway_auto_probe")
        for o, ref in zip(out, like):
            o.set_shape(ref.shape)
        return list(out)

    def ops_backward(self, options: HighwayOptions, x: Any, s0: Any, seq: Any, mask: Any, upstream: Any,
                     params: list, gates: tuple = (None, None),
                     route: Callable[[HighwayOptions], Any] | None = None) -> tuple[Any, Any, list]:
        """``gradient.backward`` (the ``keras.ops`` path) for one mode: ``(dx, ds0, dparams)``,
        reporting to the layer (from the graph, ``gradient.report_diagnostics``).

        ``route(options)``, given for a probe on the TensorFlow route, runs that route's
        compiled adjoint for a mode on this step's tensors: the probe's cosines come from
        the ``keras.ops`` pass, its times from ``route`` (``retime``), since the compiled
        adjoint is what runs between probes."""
        from .gradient import auto_controller, backward

        report = self.report
        if route is not None and options.probe is not None:
            options = dataclasses.replace(options, probe_stops_on_cost=False)  # the pass's times are not the route's

            def report(diag: Any) -> None:
                ctl = auto_controller(self.layer)
                if diag.probe is not None and ctl.timing is None:  # a cost model replaces the times anyway
                    retime(diag.probe, route, {m.iterations: m for m in self.modes}, ctl.fidelity)
                self.report(diag)

        return backward(self.math_for(options, gates), options, list(params), x, s0, seq, mask, upstream, report)


_WARM: set = set()  # ids of the compiled adjoints (cached tf.function objects) run once: traced, compiled


def retime(probe: dict, route: Callable[[HighwayOptions], tuple], modes: dict, fidelity: float) -> None:
    """Replace a probe's times (``Diagnostics.probe``, measured on the ``keras.ops`` path)
    by those of the compiled adjoint for the modes the decision compares: exact, and each
    rung up to the first faithful one (``hwbptt.auto``: the only Highway candidate), as
    ``modes`` (``{iterations: options}``, what the graph runs between probes) holds them; the
    rungs above it, and every rung where none is faithful, keep their cosine and lose
    their time. ``route(mode)`` is ``(compiled function, its arguments)``. Each function
    runs once untimed the first time (its trace and XLA compilation), then twice timed
    (the lesser counts); ``probe["timed"]`` says so."""
    import time

    def seconds(mode: HighwayOptions) -> float:
        fn, args = route(mode)
        if id(fn) not in _WARM:
            _block(fn(*args))
            _WARM.add(id(fn))
        best = float("inf")
        for _ in range(2):  # the lesser of two runs: one slow moment of a shared machine is not the cost
            t = time.perf_counter()
            _block(fn(*args))
            best = min(best, time.perf_counter() - t)
        return best

    rungs = sorted(probe["cosines"])
    first = next((k for k in rungs if probe["cosines"][k] >= fidelity), None)
    timed = [] if first is None else [k for k in rungs if k <= first]
    probe["pass_seconds"] = probe["seconds"]  # the keras.ops pass's own times (hwbptt.auto._carried's slope)
    probe["seconds"] = {k: seconds(modes[k]) for k in timed}
    probe["exact_seconds"] = seconds(modes[None])
    probe["timed"] = "compiled TensorFlow route"


def _block(outputs: Any) -> None:
    """Wait for the values (``numpy()`` of each tensor)."""
    for t in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
        if t is not None and hasattr(t, "numpy"):
            t.numpy()
