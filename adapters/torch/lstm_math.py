"""LSTM layer backward: the analytic block VJP and the exact sequential adjoint.

One layer, one direction, time-major. PyTorch's LSTM (gate order i, f, g, o):

    [i, f, g, o]_t = [σ, σ, tanh, σ](W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
    m_t = o_t ⊙ tanh(c_t),        h_t = m_t  (or W_hr m_t with proj_size)

``LSTMTape`` rebuilds every gate and cell state from the fused kernel's outputs ``h_t``
with one matmul over all ``T·B`` rows and one forward linear scan (design note,
section 4): no step-by-step replay. The adjoint is carried as the pair
``(dc_t, wh_t)``: ``wh_t`` is the total gradient on ``h_t`` and ``dc_t`` the total
gradient on ``c_t`` including the readout ``c_t -> h_t`` of the same step:

    wh_t = ℓh_t + dpre_{t+1} W_hh
    dc_t = ℓc_t + R_t(wh_t) + f_{t+1} ⊙ dc_{t+1},     R_t(λ) = (λ W_hr) ⊙ o_t ⊙ (1 - tanh² c_t)
    dpre_t = [dc⊙g⊙i(1-i), dc⊙c_{t-1}⊙f(1-f), dc⊙i⊙(1-g²), (wh W_hr)⊙tanh(c)⊙o(1-o)]_t

Two ways to split a step into residual ``K`` and block ``J`` (``split`` option):

- ``"gates"``: the scan variable is ``dc``; only ``h_{t-1} -> gates`` is a block. Each
  iteration forms the new ``wh`` first and feeds its readout into the cell-state scan.
- ``"step"`` (the paper's): the scan variable is the state adjoint ``(w^c, w^h)`` with
  ``dc = w^c + R(w^h)``; the whole step but ``c_{t-1} -> c_t`` (``diag f_t``) is a block.

Both are exact after ``T`` iterations and exact on the last ``k+1`` steps after ``k``.

Two implementations of the tape, compared by ``tests/test_fast_paths.py``:

- ``LSTMTape``: eager torch, the readable reference;
- ``FastLSTMTape`` (chosen by ``make_lstm_tape`` where ``hwbptt.torch.fused.supports``
  the tensors: CPU float32/float64 when the C kernels built, CUDA float32/float16/bfloat16
  with Triton): the gates written in place into one buffer, the cell-state recurrence
  fused into the activation kernel, ``dpre`` in one pass, no ``torch.cat`` copies for
  ``h_{t-1}``, ``c_{t-1}`` or the shifted products (a zero row after the last step makes
  the shifted product one matmul), ``f_{t+1}`` a view into the gate buffer. On CPU its
  forward may come from ``hwbptt.torch.reserve`` (``FastLSTMTape.from_reserve``), which
  keeps the gates, instead of being rebuilt from the saved states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwbptt import Diagnostics, HighwayOptions, effective_iterations, highway_adjoint
from hwbptt.engine import one_iteration_diagnostics

from . import dispatch, fused, gemm, reserve, workspace
from .scan import TORCH_OPS, linear_scan

__all__ = ["LSTMWeights", "LSTMTape", "FastLSTMTape", "make_lstm_tape", "lstm_cell_states"]


@dataclass
class LSTMWeights:
    w_ih: torch.Tensor  # (4H, I)
    w_hh: torch.Tensor  # (4H, P)
    b_ih: torch.Tensor | None  # (4H,)
    b_hh: torch.Tensor | None
    w_hr: torch.Tensor | None  # (P, H) with proj_size, else None

    @classmethod
    def from_flat(cls, flat: list[torch.Tensor], has_bias: bool, has_proj: bool) -> "LSTMWeights":
        it = iter(flat)
        w_ih, w_hh = next(it), next(it)
        b_ih, b_hh = (next(it), next(it)) if has_bias else (None, None)
        w_hr = next(it) if has_proj else None
        return cls(w_ih, w_hh, b_ih, b_hh, w_hr)


def _gate_preactivations(x: torch.Tensor, h_prev: torch.Tensor, w: LSTMWeights) -> torch.Tensor:
    """``W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` for every step at once: (T, B, 4H)."""
    T, B = x.shape[:2]
    pre = torch.matmul(x.reshape(T * B, -1), w.w_ih.t())
    pre = pre.addmm_(h_prev.reshape(T * B, -1), w.w_hh.t())
    if w.b_ih is not None:
        pre += w.b_ih + w.b_hh
    return pre.view(T, B, -1)


def lstm_cell_states(x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w: LSTMWeights) -> torch.Tensor:
    """All cell states ``c_t`` (T, B, H) from the hidden states ``y`` (T, B, P).

    Differentiable: used with autograd for the exact mode of packed sequences, where the
    final cell state sits at ``length - 1`` and the fused kernel only returns ``c_T``.
    """
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]])
    i, f, g, _ = _gate_preactivations(x, h_prev, w).chunk(4, dim=-1)
    i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
    b = i * g
    b = torch.cat([(b[0] + f[0] * c0).unsqueeze(0), b[1:]])
    return linear_scan(f, b)


class LSTMTape:
    """What the backward of one layer needs, rebuilt from the fused forward's outputs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w: LSTMWeights):
        self.x, self.w, self.c0 = x, w, c0
        self.h_prev = torch.cat([h0.unsqueeze(0), y[:-1]])
        pre = _gate_preactivations(x, self.h_prev, w)
        H = pre.shape[-1] // 4
        gates = torch.sigmoid(pre)
        gates[..., 2 * H : 3 * H] = torch.tanh(pre[..., 2 * H : 3 * H])
        self.gates = gates
        self.i, self.f, self.g, self.o = gates.split(H, dim=-1)
        b = self.i * self.g
        b[0].addcmul_(self.f[0], c0)
        self.c = linear_scan(self.f, b)
        self.c_prev = torch.cat([c0.unsqueeze(0), self.c[:-1]])
        self.tanh_c = torch.tanh(self.c)
        # ∂h/∂c through the readout, without the projection: o ⊙ (1 - tanh² c)
        self.readout_gain = self.o * (1 - self.tanh_c * self.tanh_c)
        self.f_next = TORCH_OPS.shift_next(self.f)  # a_t = f_{t+1}

    # -- pieces of the block VJP -------------------------------------------------------
    def to_m(self, wh: torch.Tensor) -> torch.Tensor:
        """Gradient on ``m_t = o ⊙ tanh c`` from the gradient on ``h_t``."""
        return wh if self.w.w_hr is None else torch.matmul(wh, self.w.w_hr)

    def readout(self, wh: torch.Tensor) -> torch.Tensor:
        """``R_t(wh_t)``: the gradient that ``h_t`` sends to ``c_t``."""
        return self.to_m(wh) * self.readout_gain

    def local_c(self, lc: torch.Tensor, lh: torch.Tensor) -> torch.Tensor:
        """``ℓc + R(ℓh)``: the local gradient of the "gates" split's scan variable ``dc``."""
        return lc + self.readout(lh)

    def dpre(self, dc: torch.Tensor, wh: torch.Tensor) -> torch.Tensor:
        """Gradient on the gate pre-activations, (T, B, 4H)."""
        i, f, g, o = self.i, self.f, self.g, self.o
        return torch.cat(
            [
                dc * g * i * (1 - i),
                dc * self.c_prev * f * (1 - f),
                dc * i * (1 - g * g),
                self.to_m(wh) * self.tanh_c * o * (1 - o),
            ],
            dim=-1,
        )

    def to_hidden(self, dpre: torch.Tensor) -> torch.Tensor:
        """``dpre_t W_hh``: the block's gradient on ``h_{t-1}``, (T, B, P)."""
        return torch.matmul(dpre, self.w.w_hh)

    def shifted_to_hidden(self, dpre: torch.Tensor) -> torch.Tensor:
        """``dpre_{t+1} W_hh`` at step ``t``, zero at the last step."""
        return TORCH_OPS.shift_next(self.to_hidden(dpre))

    # -- the adjoint -------------------------------------------------------------------
    def highway(self, lh: torch.Tensor, lc: torch.Tensor, options: HighwayOptions) -> tuple[torch.Tensor, torch.Tensor, Diagnostics]:
        """Highway-BP estimate of ``(dc, wh)`` from the local gradients ``ℓh``, ``ℓc``
        (exact options: the sequential adjoint, which ``T`` iterations would cost ``T`` times).
        A probe (``options.probe``, ``iterations="auto"``) returns the exact adjoint and
        measures the ladder (``hwbptt.torch.auto.probe_adjoint``)."""
        if options.exact:
            dc, wh = self.exact_adjoint(lh, lc)
            return dc, wh, Diagnostics()
        if options.probe is not None:
            from .auto import probe_adjoint

            box: list = []

            def iterate(observe):
                box.append(self._iterate(lh, lc, options, observe)[2])

            (dc, wh), probe = probe_adjoint(
                lambda: self.exact_adjoint(lh, lc), iterate, lambda p: torch.cat([p[0], p[1]], -1), options, lh,
            )
            diag = box[0]
            diag.probe = probe
            return dc, wh, diag
        dc, wh, diag = self._iterate(lh, lc, options, None)
        if options.diagnostics == "debug":
            dc_x, wh_x = self.exact_adjoint(lh, lc)
            est, ref = torch.cat([dc, wh], -1).flatten(), torch.cat([dc_x, wh_x], -1).flatten()
            diag.cosine = float(torch.nn.functional.cosine_similarity(est.double(), ref.double(), dim=0))
        return dc, wh, diag

    def _iterate(self, lh: torch.Tensor, lc: torch.Tensor, options: HighwayOptions, observe) -> tuple:
        """``(dc, wh, diagnostics)`` of the iteration; ``observe(k, current, best)`` (a
        probe's) sees each iterate, ``current()`` giving it as ``(dc, wh)``."""
        k = effective_iterations(options, lh.shape[0])
        record = bool(options.diagnostics)
        if options.split == "gates":
            block, wh_box, kept = self._gates_block(lh)

            def watch(i, u, best):
                if best:  # the wh that belongs to the iterate the engine would return
                    kept[0] = wh_box[0]
                return observe is not None and observe(i, lambda: (u, wh_box[0]), best)

            dc, diag = highway_adjoint(
                self.f_next, self.local_c(lc, lh), block,
                iterations=k, ops=TORCH_OPS, tol=options.tol, gamma=options.gamma, record=record, observe=watch,
            )
            return dc, kept[0], diag
        H = lc.shape[-1]
        residual = torch.cat([self.f_next, torch.zeros_like(lh)], dim=-1)

        def block(u: torch.Tensor) -> torch.Tensor:
            wc, wh = u[..., :H], u[..., H:]
            r = self.readout(wh)
            to_c = r * self.f  # (dc - λc) ⊙ f_t: the readout part of c_{t-1}'s gradient
            to_h = self.to_hidden(self.dpre(wc + r, wh))
            return TORCH_OPS.shift_next(torch.cat([to_c, to_h], dim=-1))

        def split(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            wh = u[..., H:]
            return u[..., :H] + self.readout(wh), wh

        watch = None if observe is None else (lambda i, u, best: observe(i, lambda: split(u), best))
        u, diag = highway_adjoint(
            residual, torch.cat([lc, lh], dim=-1), block,
            iterations=k, ops=TORCH_OPS, tol=options.tol, gamma=options.gamma, record=record, observe=watch,
        )
        dc, wh = split(u)
        return dc, wh, diag

    def _gates_block(self, lh: torch.Tensor) -> tuple:
        """The ``"gates"`` split's block ``dc -> R(q)`` with ``q_t = dpre_{t+1} W_hh``, the
        box holding the latest ``wh = ℓh + q`` (the block's state between calls) and the box
        of the ``wh`` to keep (the caller's; a block must not overwrite it)."""
        wh_box, kept = [lh], [lh]

        def block(dc: torch.Tensor) -> torch.Tensor:
            q = self.shifted_to_hidden(self.dpre(dc, wh_box[0]))
            wh_box[0] = lh + q
            return self.readout(q)

        return block, wh_box, kept

    def exact_adjoint(self, lh: torch.Tensor, lc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact ``(dc, wh)`` by the sequential adjoint recurrence (BPTT's order)."""
        T = lh.shape[0]
        dcs: list[torch.Tensor] = [None] * T  # type: ignore[list-item]
        whs: list[torch.Tensor] = [None] * T  # type: ignore[list-item]
        dc_next = dpre_next = None
        for t in range(T - 1, -1, -1):
            wh = lh[t] if dpre_next is None else lh[t] + torch.matmul(dpre_next, self.w.w_hh)
            m = wh if self.w.w_hr is None else torch.matmul(wh, self.w.w_hr)
            dc = lc[t] + m * self.readout_gain[t]
            if dc_next is not None:
                dc = dc + self.f[t + 1] * dc_next
            i, f, g, o = self.i[t], self.f[t], self.g[t], self.o[t]
            dpre_next = torch.cat(
                [dc * g * i * (1 - i), dc * self.c_prev[t] * f * (1 - f), dc * i * (1 - g * g),
                 m * self.tanh_c[t] * o * (1 - o)], dim=-1,
            )
            dc_next, dcs[t], whs[t] = dc, dc, wh
        return torch.stack(dcs), torch.stack(whs)

    # -- gradients of everything the layer consumed ------------------------------------
    def input_grads(self, dc: torch.Tensor, wh: torch.Tensor, needs: dict[str, bool]) -> dict[str, torch.Tensor | None]:
        """One batched VJP over all steps: ``∂L/∂θ = Σ_t w_t ∂f_t/∂θ`` and friends."""
        T, B = dc.shape[:2]
        dpre = self.dpre(dc, wh)
        flat = dpre.reshape(T * B, -1)
        out: dict[str, torch.Tensor | None] = {}
        out["x"] = torch.matmul(dpre, self.w.w_ih) if needs["x"] else None
        out["h0"] = torch.matmul(dpre[0], self.w.w_hh) if needs["h0"] else None
        out["c0"] = dc[0] * self.f[0] if needs["c0"] else None
        out["w_ih"] = flat.t().mm(self.x.reshape(T * B, -1)) if needs["w_ih"] else None
        out["w_hh"] = flat.t().mm(self.h_prev.reshape(T * B, -1)) if needs["w_hh"] else None
        bias = flat.sum(0) if needs["b_ih"] or needs["b_hh"] else None
        out["b_ih"] = bias if needs["b_ih"] else None
        # Separate tensors: a .grad shared by two parameters would alias in-place updates.
        out["b_hh"] = (bias.clone() if needs["b_ih"] else bias) if needs["b_hh"] else None
        if needs["w_hr"]:
            m = self.o * self.tanh_c
            out["w_hr"] = wh.reshape(T * B, -1).t().mm(m.reshape(T * B, -1))
        else:
            out["w_hr"] = None
        return out


class FastLSTMTape(LSTMTape):
    """``LSTMTape`` on the fused kernels (module docstring); same methods and results.

    Holds the gates (one (T+1, B, 4H) buffer, whose extra zero row makes ``f_{t+1}`` a
    view), ``c``, ``tanh c`` and the readout gain; ``h_prev`` and ``c_prev`` are built
    only if a reference method asks for them.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w: LSTMWeights):
        T, B = x.shape[:2]
        H4, P = w.w_hh.shape
        H = H4 // 4
        self.x, self.y, self.h0, self.c0, self.w = x, y.contiguous(), h0, c0, w
        self._x2 = x.reshape(T * B, -1)
        buf = workspace.empty((T + 1, B, H4), x)
        buf[T].zero_()
        pre = buf[:T]
        pre2 = pre.view(T * B, H4)
        if w.b_ih is not None:
            torch.addmm(w.b_ih + w.b_hh, self._x2, w.w_ih.t(), out=pre2)
        else:
            torch.mm(self._x2, w.w_ih.t(), out=pre2)
        if T > 1:
            pre[1:].view(-1, H4).addmm_(self.y[:-1].view(-1, P), w.w_hh.t())
        pre[0].addmm_(h0, w.w_hh.t())
        self._adopt(buf, *fused.lstm_gates(pre, c0))

    @classmethod
    def from_reserve(cls, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w: LSTMWeights) -> tuple["FastLSTMTape", torch.Tensor]:
        """Run the forward with ``reserve.lstm_forward`` (which keeps the gates) and return
        ``(tape, y)``: no rebuild in the backward. No ``proj_size``."""
        bias = None if w.b_ih is None else w.b_ih + w.b_hh
        buf, y, c, tanh_c, gain = reserve.lstm_forward(x, h0, c0, w.w_ih, w.w_hh, bias)
        return cls.from_kept(x, y, h0, c0, w, buf, c, tanh_c, gain), y

    @classmethod
    def from_kept(cls, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w: LSTMWeights,
                  buf: torch.Tensor, c: torch.Tensor, tanh_c: torch.Tensor, gain: torch.Tensor) -> "FastLSTMTape":
        """The tape on what ``reserve.lstm_forward`` returned (the gate buffer with its zero
        row, the cell states, ``tanh c`` and the readout gain), with nothing rebuilt."""
        tape = cls.__new__(cls)
        tape.x, tape.y, tape.h0, tape.c0, tape.w = x, y, h0, c0, w
        tape._x2 = x.reshape(x.shape[0] * x.shape[1], -1)
        tape._adopt(buf, c, tanh_c, gain)
        return tape

    def _adopt(self, buf: torch.Tensor, c: torch.Tensor, tanh_c: torch.Tensor, gain: torch.Tensor) -> None:
        """Take the gate buffer (T+1, B, 4H) (gates in rows ``0..T-1``, zeros in row ``T``)
        and the cell-state tensors."""
        H = buf.shape[-1] // 4
        self.c, self.tanh_c, self.readout_gain = c, tanh_c, gain
        self.gates = pre = buf[:-1]
        self.i, self.f, self.g, self.o = pre.split(H, dim=-1)
        self.f_next = buf[1:, :, H : 2 * H]  # a_t = f_{t+1}, zero at the last step

    @property
    def h_prev(self) -> torch.Tensor:
        return torch.cat([self.h0.unsqueeze(0), self.y[:-1]])

    @property
    def c_prev(self) -> torch.Tensor:
        return torch.cat([self.c0.unsqueeze(0), self.c[:-1]])

    def local_c(self, lc: torch.Tensor, lh: torch.Tensor) -> torch.Tensor:
        """``ℓc + R(ℓh)`` in one pass into a reused buffer (a fresh tensor pays its page faults)."""
        return torch.addcmul(lc, self.to_m(lh), self.readout_gain, out=workspace.empty(lc.shape, lc))

    def dpre(self, dc: torch.Tensor, wh: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return fused.lstm_dpre(dc, self.to_m(wh), self.gates, self.c, self.c0, self.tanh_c, out=out)

    def shifted_to_hidden(self, dpre: torch.Tensor) -> torch.Tensor:
        T, B, H4 = dpre.shape
        P = self.w.w_hh.shape[1]
        q = workspace.empty((T, B, P), dpre)
        q[-1].zero_()
        if T > 1:
            torch.mm(dpre[1:].view(-1, H4), self.w.w_hh, out=q[:-1].view(-1, P))
        return q

    def _gates_block(self, lh: torch.Tensor) -> tuple:
        """As ``LSTMTape._gates_block``, writing ``dpre``, ``wh`` and ``R(q)`` into buffers
        allocated once per backward: a fresh large tensor per iteration costs its page
        faults again (measured: about as much as the iteration's arithmetic on a 2-core
        CPU). Safe because the engine reads the returned ``R(q)`` before the next call and
        keeps nothing of it, and ``dpre`` is computed from ``wh`` before ``wh`` is rewritten."""
        T, B, P = lh.shape
        H = self.c.shape[-1]
        H4 = self.gates.shape[-1]
        # Two wh buffers: the one the caller keeps (the iterate the engine would return, see
        # ``_iterate``) is never the one written next.
        whs, r = [workspace.empty((T, B, P), lh), workspace.empty((T, B, P), lh)], workspace.empty((T, B, H), lh)
        # dpre with one zero row after the last step: the product of rows 1..T with W_hh
        # is q itself (zero at the last step), with no copy into a shifted buffer.
        dpre_pad = workspace.empty((T + 1, B, H4), self.gates)
        dpre_pad[T].zero_()
        self._dpre_buf = dpre_buf = dpre_pad[:T]  # reused by input_grads
        wh_box, kept = [lh], [lh]

        w_hh_t = self.w.w_hh.t().contiguous()

        def block(dc: torch.Tensor) -> torch.Tensor:
            self.dpre(dc, wh_box[0], out=dpre_buf)
            q = gemm.linear_t(dpre_pad[1:].view(-1, H4), w_hh_t).view(T, B, P)
            wh_box[0] = torch.add(lh, q, out=whs[1] if kept[0] is whs[0] else whs[0])
            return torch.mul(self.to_m(q), self.readout_gain, out=r)

        return block, wh_box, kept

    def _iterate(self, lh: torch.Tensor, lc: torch.Tensor, options: HighwayOptions, observe) -> tuple:
        """As ``LSTMTape._iterate``. One iteration of the ``"gates"`` split with ``γ = 0``
        runs as one C time loop (``reserve.lstm_highway1``, the same estimate, which also
        writes ``dpre`` for ``input_grads``) where ``dispatch.highway_loop_pays``."""
        T, P = lh.shape[0], lh.shape[-1]
        if (
            observe is None
            and options.split == "gates"
            and options.gamma == 0.0
            and effective_iterations(options, T) == 1
            and self.w.w_hr is None
            and dispatch.highway_loop_pays("lstm", P)
            and reserve.supports(lh, lc, self.gates, self.c, self.w.w_hh, self.c0)
        ):
            dc, wh, dpre, (d0, d1, norm1) = reserve.lstm_highway1(
                self.gates, self.c, self.c0.contiguous(), self.tanh_c, self.readout_gain, self.w.w_hh, lh, lc)
            self._kept_dpre = (dc, wh, dpre)
            return dc, wh, one_iteration_diagnostics(d0, d1, norm1, bool(options.diagnostics) or options.tol is not None)
        return super()._iterate(lh, lc, options, observe)

    def exact_adjoint(self, lh: torch.Tensor, lc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On CPU without a projection, one C time loop (``reserve.lstm_adjoint``), which also
        writes ``dpre`` for the adjoint it returns (``input_grads`` takes it once)."""
        if self.w.w_hr is not None or not reserve.supports(lh, lc, self.gates, self.c, self.w.w_hh, self.c0):
            return super().exact_adjoint(lh, lc)
        dc, wh, dpre = reserve.lstm_adjoint(self.gates, self.c, self.c0.contiguous(), self.tanh_c, self.readout_gain,
                                            self.w.w_hh, lh, lc)
        self._kept_dpre = (dc, wh, dpre)
        return dc, wh

    def input_grads(self, dc: torch.Tensor, wh: torch.Tensor, needs: dict[str, bool]) -> dict[str, torch.Tensor | None]:
        T, B = dc.shape[:2]
        done = self.__dict__.pop("_kept_dpre", None)
        if done is not None and done[0] is dc and done[1] is wh:
            dpre = done[2]
        else:
            dpre = self.dpre(dc, wh, out=self.__dict__.pop("_dpre_buf", None))  # the iterations' buffer, if any
        H4 = dpre.shape[-1]
        flat = dpre.view(T * B, H4)
        P = self.w.w_hh.shape[1]
        out: dict[str, torch.Tensor | None] = {}
        out["x"] = gemm.linear_t(flat, self.w.w_ih.t().contiguous()).view(T, B, -1) if needs["x"] else None
        out["h0"] = torch.mm(dpre[0], self.w.w_hh) if needs["h0"] else None
        out["c0"] = dc[0] * self.f[0] if needs["c0"] else None
        # Σ_t dpre_t^T x_t and Σ_t dpre_t^T h_{t-1}, with h_{t-1} = [h_0, y_0 .. y_{T-2}].
        blocks = ([[self._x2]] if needs["w_ih"] else []) + ([[self.h0, self.y[:-1].view(-1, P)]] if needs["w_hh"] else [])
        grads = iter(gemm.tn(flat, blocks))
        out["w_ih"] = next(grads) if needs["w_ih"] else None
        out["w_hh"] = next(grads) if needs["w_hh"] else None
        bias = flat.sum(0) if needs["b_ih"] or needs["b_hh"] else None
        out["b_ih"] = bias if needs["b_ih"] else None
        out["b_hh"] = (bias.clone() if needs["b_ih"] else bias) if needs["b_hh"] else None
        if needs["w_hr"]:
            m = self.o * self.tanh_c
            out["w_hr"] = wh.reshape(T * B, -1).t().mm(m.reshape(T * B, -1))
        else:
            out["w_hr"] = None
        return out


def make_lstm_tape(x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w: LSTMWeights) -> LSTMTape:
    """``FastLSTMTape`` where the fused kernels take these tensors, else ``LSTMTape``
    (same results; ``hwbptt.torch.kernels_status()`` says whether the kernels are loaded)."""
    tensors = [x, y, h0, c0, w.w_ih, w.w_hh] + [t for t in (w.b_ih, w.b_hh, w.w_hr) if t is not None]
    if fused.supports(*tensors):
        return FastLSTMTape(x, y, h0, c0, w)
    return LSTMTape(x, y, h0, c0, w)
