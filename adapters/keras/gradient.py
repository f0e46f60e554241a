"""The custom-gradient op: forward loop in, Highway-BP (or the exact adjoint) out.

``highway_sequence(math, options, x, s0, params, mask)`` returns, for the time-major
input ``x`` (T, B, D) and initial state ``s0`` (B, S), the state after every step
(T, B, S), followed on the last axis by the raw outputs ``y_t`` for a user cell. Its
gradient is not autograd through the loop but, for the upstream ``ℓ`` on that tensor:

1. the residual multipliers ``K_t`` and the block VJP ``λ ↦ λ J_t`` of every step, from
   one batched recomputation (``math.prepare``) or one autodiff call (user cells);
   a masked step carries its state: ``K_t = I``, ``J_t = 0``;
2. the adjoint ``w``: ``hwbptt.engine.highway_adjoint`` with
   ``a_t = diag K_{t+1}`` and ``block(u)_t = u_{t+1} J_{t+1}`` (``iterations`` capped at
   ``T``, since ``T`` iterations are exact); or, in exact mode (``iterations=None``,
   ``tol=None``), the sequential adjoint ``w_{t-1} = ℓ_{t-1} + w_t (J_t + K_t)``;
3. ``∂L/∂x_t = w_t ∂f_t/∂x_t``, ``∂L/∂θ = Σ_t w_t ∂f_t/∂θ`` in one batched VJP, and
   ``∂L/∂s_0 = w_0 (J_0 + K_0)``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from keras import ops

from hwbptt.auto import ProbePass
from hwbptt.engine import highway_adjoint
from hwbptt.options import Diagnostics, HighwayOptions, effective_iterations

from .backend_ops import KerasArrayOps, is_traced, match_shape
from .steps import AnalyticLinearization

__all__ = ["highway_sequence", "auto_options", "auto_controller", "after_backward", "report_diagnostics",
           "report_vector", "diagnostics_vector", "diagnostics_from"]


def _cosine(a: Any, b: Any, traced: bool) -> Any:
    """Cosine of two adjoints over all steps (a Python float unless ``traced``)."""
    dot, na, nb = ops.sum(a * b), ops.sqrt(ops.sum(a * a)), ops.sqrt(ops.sum(b * b))
    if traced:
        return dot / (na * nb + 1e-30)
    return float(dot) / max(float(na) * float(nb), 1e-300)


def _linearize(math: Any, params: list, x: Any, s_prev: Any, s: Any) -> Any:
    if hasattr(math, "linearize"):
        return math.linearize(params, x, s_prev, s)
    return AnalyticLinearization(math, params, x, s_prev, s)


def _iteration_cap(options: HighwayOptions, steps: int | None) -> int:
    if steps is not None:
        return effective_iterations(options, steps)
    if options.iterations is None:
        raise ValueError(
            "HighwayRNN: tol without iterations caps the iterations at the sequence length, which is not "
            "static here; set iterations as well, or give the Input a fixed length"
        )
    return options.iterations


def backward(math: Any, options: HighwayOptions, params: list, x: Any, s0: Any, seq: Any, mask: Any,
             upstream: Any, report: Callable[[Diagnostics], None] | None) -> tuple[Any, Any, list]:
    """``(∂L/∂x, ∂L/∂s_0, [∂L/∂θ])`` for the upstream gradient of ``seq``."""
    width = sum(math.state_sizes)
    s = seq[..., :width]
    s_prev = ops.concatenate([s0[None], s[:-1]], axis=0)
    m = None if mask is None else ops.cast(mask, x.dtype)
    local = upstream[..., :width]
    gy = upstream[..., width:] if getattr(math, "has_output", False) else None
    lin = _linearize(math, params, x, s_prev, s)
    ops_ = KerasArrayOps(traced=is_traced(upstream))
    if gy is not None and m is not None:
        # A masked step repeats the last valid output: its cotangent belongs to that step.
        # acc_t = gy_t + (1 - m_{t+1}) acc_{t+1}, kept at valid steps only.
        gy = ops_.reverse_scan(ops_.shift_next(1 - m), gy) * m
    exact = options.iterations is None and options.tol is None

    if exact and hasattr(lin, "exact_grads"):
        dx, ds0, dparams, _ = lin.exact_grads(local, gy, m)
        return dx, ds0, dparams

    if gy is not None:  # a separate output feeds s_{t-1} through step t: route it there
        routed = lin.route(gy)
        local = local + ops_.shift_next(routed)
    if exact:
        u, _ = lin.exact_adjoint(local, m)
        diag = Diagnostics()
    else:
        K = lin.residual()
        if m is not None:
            K = m * K + (1 - m)
        a = ops_.shift_next(K)

        def block(u: Any) -> Any:
            r = lin.block(u)
            if m is not None:
                r = r * m
            return lin.fold(ops_.shift_next(r))

        def iterate(observe=None):
            return highway_adjoint(
                a, lin.fold(local), block,
                iterations=_iteration_cap(options, x.shape[0]), ops=ops_,
                tol=options.tol, gamma=options.gamma, record=bool(options.diagnostics), observe=observe,
                diverge=_has_residual(math),
            )

        if options.probe is not None:  # iterations="auto": the exact adjoint, timed, and the ladder
            u, diag = _probe(iterate, lambda: _exact_for_debug(lin, local, m, block, a, options, x.shape[0], ops_),
                             options, ops_.traced)
        else:
            u, diag = iterate()
        if options.diagnostics == "debug":
            exact_u = _exact_for_debug(lin, local, m, block, a, options, x.shape[0], ops_)
            diag.cosine = _cosine(u, exact_u, ops_.traced)
    lam = u if m is None else u * m
    dx, dparams, dprev0 = lin.grads(lam, gy)
    ds0 = dprev0 if m is None else dprev0 + (1 - m[0]) * u[0]
    if gy is not None:
        ds0 = ds0 + routed[0]
    if report is not None and diag.probe is not None:
        report(diag)
    else:
        report_diagnostics(diag, report, bool(options.diagnostics))
    return dx, ds0, dparams


# The fields a traced backward hands back (scalar arrays): what the divergence warning and
# the "auto" controller read. A traced loop records no per-iteration norms.
_TRACED_FIELDS = ("iterations", "diverged", "growth", "used", "rate", "remainder", "unconverged")


def diagnostics_vector(diagnostics: Diagnostics) -> Any:
    """``diagnostics``' ``_TRACED_FIELDS`` as one float64 vector (NaN for a field not measured),
    for a compiled function to return."""
    values = [getattr(diagnostics, f) for f in _TRACED_FIELDS]
    return ops.stack([ops.cast(float("nan") if v is None else v, "float64") for v in values])


def diagnostics_from(vector: Any) -> Diagnostics:
    """The ``Diagnostics`` of a ``diagnostics_vector`` with concrete values."""
    v = [float(x) for x in np.asarray(vector, dtype="float64")]
    field = dict(zip(_TRACED_FIELDS, v))
    opt = lambda x: None if np.isnan(x) else x  # noqa: E731
    used = opt(field["used"])
    return Diagnostics(iterations=int(field["iterations"]),
                       diverged=bool(field["diverged"] == 1.0), growth=opt(field["growth"]),
                       used=None if used is None else int(used), rate=opt(field["rate"]),
                       remainder=opt(field["remainder"]), unconverged=bool(field["unconverged"] == 1.0))


def report_diagnostics(diagnostics: Diagnostics, report: Callable[[Diagnostics], None] | None, always: bool) -> None:
    """Hand one backward's diagnostics to ``report`` (the layer's ``last_diagnostics``, the
    divergence warning, the "auto" controller) when they matter: ``always``
    (``diagnostics=True``), or the iteration diverged or stayed unconverged.

    Eagerly the call is direct. In a TensorFlow graph (``model.fit``'s ``tf.function``) the
    fields are scalar tensors: a ``tf.py_function`` reads them when the step runs and
    reports from there. Under XLA (``jit_compile``) and ``jax.jit`` no host callback runs:
    those steps report nothing (docs/keras.md)."""
    if report is None:
        return
    fields = [getattr(diagnostics, f) for f in _TRACED_FIELDS]
    if all(f is None or isinstance(f, (bool, int, float)) for f in fields):  # concrete values
        if always or diagnostics.diverged or diagnostics.unconverged:
            report(diagnostics)
        return
    import keras

    if keras.backend.backend() == "tensorflow":
        _report_from_graph(diagnostics_vector(diagnostics), report, always)


def report_vector(vector: Any, report: Callable[[Diagnostics], None] | None, always: bool = False) -> None:
    """``report_diagnostics`` for the ``diagnostics_vector`` a compiled TensorFlow function
    returned (``tf_kernels``), eagerly or in a graph."""
    import tensorflow as tf

    if report is None:
        return
    if tf.executing_eagerly():
        report_diagnostics(diagnostics_from(vector.numpy()), report, always)
    else:
        _report_from_graph(vector, report, always)


def _report_from_graph(vector: Any, report: Callable[[Diagnostics], None], always: bool) -> None:
    from .auto_graph import in_xla

    if in_xla():
        return
    import tensorflow as tf

    def run(values):
        d = diagnostics_from(values.numpy())
        if always or d.diverged or d.unconverged:
            report(d)
        return []

    tf.py_function(run, [vector], [], name="highway_report")


def _has_residual(math: Any) -> bool:
    """False for the cells without a residual (SimpleRNN, a user cell with ``residual``
    None or ``"none"``): their iteration is FPI, which the engine never truncates."""
    if type(math).__name__ == "SimpleRNNMath":
        return False
    opt = getattr(math, "residual_option", "identity")
    return not (opt is None or opt == "none")


def _probe(iterate: Callable, exact: Callable, options: HighwayOptions, traced: bool) -> tuple[Any, Diagnostics]:
    """A probe of ``iterations="auto"`` (``hwbptt.auto``): the exact adjoint (returned) and
    the cosine and time of each rung of the ladder, from one pass of the iteration."""
    if traced:  # never on TensorFlow: auto_graph runs the probe eagerly in a py_function
        raise ValueError(
            "HighwayRNN: iterations='auto' measures cosines and times in Python, which a traced graph "
            "(jax.jit) cannot; compile the model with run_eagerly=True, use the TensorFlow or torch backend, "
            "or set a fixed iterations"
        )
    t = time.perf_counter()
    ref = exact()
    ref = ops.convert_to_numpy(ref)  # also waits for the device
    clock = ProbePass(options, time.perf_counter() - t)
    r = ref.astype("float64").ravel()

    def cosine(est: Any) -> float:
        e = est.astype("float64").ravel()
        den = float(np.linalg.norm(e) * np.linalg.norm(r))
        return float(e @ r) / den if den > 0 else float(np.array_equal(e, r))

    def observe(k: int, u: Any, best: bool) -> bool:
        est = ops.convert_to_numpy(u) if best and k in clock.rungs else None  # also waits for the device
        return clock.observe(k, best, lambda: cosine(est))

    clock.start()
    _, diag = iterate(observe)
    diag.probe = clock.result()
    return ops.convert_to_tensor(ref), diag


def _exact_for_debug(lin: Any, local: Any, m: Any, block: Callable, a: Any, options: HighwayOptions,
                     steps: int | None, ops_: KerasArrayOps) -> Any:
    if hasattr(lin, "exact_adjoint"):
        return lin.exact_adjoint(local, m)[0]
    if steps is None:
        raise ValueError("HighwayRNN: diagnostics='debug' on a user cell needs a static sequence length")
    return highway_adjoint(a, lin.fold(local), block, iterations=steps, ops=ops_)[0]


def highway_sequence(math: Any, options: HighwayOptions, x: Any, s0: Any, params: list, mask: Any = None,
                     report: Callable[[Diagnostics], None] | None = None, auto: Any = None) -> Any:
    """The states after every step (and a user cell's raw outputs), with the Highway-BP
    gradient attached. ``mask``: boolean ``(T, B, 1)`` or ``None``. ``auto``: a
    ``auto_graph.GraphAuto`` (``iterations="auto"`` in a TensorFlow graph), whose plan picks
    the backward of each step."""

    @ops.custom_gradient
    def op(x, s0, *params):
        params = list(params)
        sizes = math.state_sizes
        parts, start = [], 0
        for n in sizes:
            parts.append(s0[:, start : start + n])
            start += n
        seq = math.forward(params, x, parts, mask)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream = match_shape(upstream, seq)
            if auto is not None:
                return tuple(_auto_backward(auto, math, params, x, s0, seq, mask, upstream))
            dx, ds0, dparams = backward(math, options, params, x, s0, seq, mask, upstream, report)
            return (dx, ds0, *dparams)

        return seq, grad

    return op(x, s0, *params)


def _auto_backward(auto: Any, math: Any, params: list, x: Any, s0: Any, seq: Any, mask: Any, upstream: Any) -> list:
    """``[∂L/∂x, ∂L/∂s_0, *∂L/∂θ]`` in a graph in auto mode: the planned mode's backward, or
    the probe (run eagerly, reported to the controller)."""
    gates = (getattr(math, "in_gates", None), getattr(math, "rec_gates", None))

    def fixed(o: HighwayOptions) -> list:
        dx, ds0, dparams = auto.ops_backward(o, x, s0, seq, mask, upstream, params, gates)
        return [dx, ds0, *dparams]

    def probe(o: HighwayOptions, x, s0, seq, mask, upstream, in_gates, rec_gates, *params) -> list:
        dx, ds0, dparams = auto.ops_backward(o, x, s0, seq, mask, upstream, list(params), (in_gates, rec_gates))
        return [dx, ds0, *dparams]

    return auto.gradient(fixed, probe, [x, s0, seq, mask, upstream, *gates, *params], [x, s0, *params])


def auto_options(layer: Any, options: HighwayOptions, steps: Any, training: Any, traced: bool) -> HighwayOptions:
    """``iterations="auto"`` resolved for one call of the Keras layer (``hwbptt.auto``): a
    training call plans a step (a probe or the current choice); any other call, which
    runs no backward, is exact."""
    import dataclasses

    if not training:
        return dataclasses.replace(options, iterations=None, tol=None)
    if traced:  # a TensorFlow graph goes through auto_graph.GraphAuto instead (layer.call)
        raise ValueError(
            "HighwayRNN: iterations='auto' measures cosines and times in Python at each probe, which a traced "
            "graph of this backend (jax.jit) cannot; use model.compile(..., run_eagerly=True), the TensorFlow "
            "or torch backend, or a fixed iterations"
        )
    if steps is None:
        raise ValueError("HighwayRNN: iterations='auto' needs a static sequence length (the ladder is capped at T)")
    return auto_controller(layer).plan(options, int(steps))


def auto_controller(layer: Any) -> Any:
    """The layer's ``hwbptt.auto.AutoController`` (created at first use)."""
    from hwbptt.auto import AutoController

    ctl = layer.__dict__.get("_highway_auto")
    if ctl is None:
        ctl = AutoController(layer.fidelity, layer.probe_every)
        object.__setattr__(layer, "_highway_auto", ctl)
    return ctl


def after_backward(layer: Any, diagnostics: Diagnostics) -> None:
    """The probe's report to the controller, or the divergence warning of a fixed ``k``
    (once per layer)."""
    import warnings

    from hwbptt.options import divergence_warning

    ctl = layer.__dict__.get("_highway_auto")
    if ctl is not None and layer.iterations == "auto":
        ctl.report(0, diagnostics)
        return
    if not (diagnostics.diverged or diagnostics.unconverged) or layer.__dict__.get("_highway_divergence_warned"):
        return
    object.__setattr__(layer, "_highway_divergence_warned", True)
    warnings.warn(divergence_warning(f"HighwayRNN ({layer.name})", diagnostics, layer.iterations), stacklevel=2)
