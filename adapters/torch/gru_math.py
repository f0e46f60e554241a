"""GRU layer backward: the analytic block VJP and the exact sequential adjoint.

One layer, one direction, time-major. PyTorch's GRU (gate order r, z, n):

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

Residual ``K_t = diag(z_t)``; the block is everything through ``r``, ``z`` and ``n``.
For a cotangent ``λ_t`` on ``h_t``:

    dn = λ(1-z),  dz = λ(h_{t-1} - n),  dn_pre = dn(1-n²)
    dgi = [dr_pre, dz_pre, dn_pre],  dgh = [dr_pre, dz_pre, dn_pre ⊙ r]
    with dr_pre = dn_pre ⊙ (W_hn h_{t-1} + b_hn) ⊙ r(1-r),  dz_pre = dz ⊙ z(1-z)
    to h_{t-1}: dgh W_hh  (block)  +  λ ⊙ z  (residual)

The adjoint ``w_t`` (total gradient on ``h_t``) solves ``w_t = ℓ_t + w_{t+1} (J + K)_{t+1}``.

``GRUTape`` is the eager-torch reference; ``FastGRUTape`` (chosen by ``make_gru_tape``
where ``hwbptt.torch.fused.supports`` the tensors: CPU float32/float64 when the C kernels
built, CUDA float32/float16/bfloat16 with Triton) computes the same with one-pass kernels
and no ``torch.cat`` copies; on CPU its forward may come from ``hwbptt.torch.reserve``
(``FastGRUTape.from_reserve``). ``tests/test_fast_paths.py`` compares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwbptt import Diagnostics, HighwayOptions, effective_iterations, highway_adjoint

from . import fused, gemm, reserve, workspace
from .scan import TORCH_OPS

__all__ = ["GRUWeights", "GRUTape", "FastGRUTape", "make_gru_tape"]


@dataclass
class GRUWeights:
    w_ih: torch.Tensor  # (3H, I)
    w_hh: torch.Tensor  # (3H, H)
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None

    @classmethod
    def from_flat(cls, flat: list[torch.Tensor], has_bias: bool, has_proj: bool = False) -> "GRUWeights":
        return cls(flat[0], flat[1], flat[2] if has_bias else None, flat[3] if has_bias else None)


class GRUTape:
    """What the backward of one GRU layer needs, rebuilt from the fused forward's outputs."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, w: GRUWeights):
        T, B = x.shape[:2]
        self.x, self.w = x, w
        self.h_prev = torch.cat([h0.unsqueeze(0), y[:-1]])
        gi = torch.matmul(x.reshape(T * B, -1), w.w_ih.t()).view(T, B, -1)
        gh = torch.matmul(self.h_prev.reshape(T * B, -1), w.w_hh.t()).view(T, B, -1)
        if w.b_ih is not None:
            gi += w.b_ih
            gh += w.b_hh
        H = gi.shape[-1] // 3
        rz = torch.sigmoid(gi[..., : 2 * H] + gh[..., : 2 * H])
        self.r, self.z = rz[..., :H], rz[..., H:]
        self.gh_n = gh[..., 2 * H :]  # W_hn h_{t-1} + b_hn
        self.n = torch.tanh(gi[..., 2 * H :] + self.r * self.gh_n)
        self.z_next = TORCH_OPS.shift_next(self.z)  # a_t = z_{t+1}

    def gate_grads(self, lam: torch.Tensor, t: int | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dgi, dgh)``: gradients on the input and hidden pre-activations of steps ``t``
        for the cotangent ``lam`` on their outputs, (..., 3H) each."""
        r, z, n, h_prev = self.r[t], self.z[t], self.n[t], self.h_prev[t]
        dn_pre = lam * (1 - z) * (1 - n * n)
        dz_pre = lam * (h_prev - n) * z * (1 - z)
        dr_pre = dn_pre * self.gh_n[t] * r * (1 - r)
        return torch.cat([dr_pre, dz_pre, dn_pre], -1), torch.cat([dr_pre, dz_pre, dn_pre * r], -1)

    def block(self, lam: torch.Tensor) -> torch.Tensor:
        """The block part of every step's VJP, aligned for the engine: ``v_t = λ_{t+1} J_{t+1}``."""
        return TORCH_OPS.shift_next(torch.matmul(self.gate_grads(lam)[1], self.w.w_hh))

    def highway(self, lh: torch.Tensor, options: HighwayOptions) -> tuple[torch.Tensor, Diagnostics]:
        """The adjoint estimate ``w``; a probe (``options.probe``, ``iterations="auto"``)
        returns the exact adjoint and measures the ladder (``hwbptt.torch.auto.probe_adjoint``)."""
        if options.exact:  # BPTT's sequential adjoint (T Highway iterations would give it at T times the cost)
            return self.exact_adjoint(lh), Diagnostics()
        k = effective_iterations(options, lh.shape[0])

        def iterate(observe=None):
            watch = None if observe is None else (lambda i, u, best: observe(i, lambda: u, best))
            return highway_adjoint(
                self.z_next, lh, self.block, iterations=k, ops=TORCH_OPS, tol=options.tol, gamma=options.gamma,
                record=bool(options.diagnostics), observe=watch,
            )

        if options.probe is not None:
            from .auto import probe_adjoint

            box: list = []
            w, probe = probe_adjoint(lambda: self.exact_adjoint(lh), lambda obs: box.append(iterate(obs)[1]),
                                     lambda w: w, options, lh)
            box[0].probe = probe
            return w, box[0]
        w, diag = iterate()
        if options.diagnostics == "debug":
            ref = self.exact_adjoint(lh)
            diag.cosine = float(torch.nn.functional.cosine_similarity(w.flatten().double(), ref.flatten().double(), dim=0))
        return w, diag

    def exact_adjoint(self, lh: torch.Tensor) -> torch.Tensor:
        """The exact adjoint by the sequential recurrence (BPTT's order)."""
        T = lh.shape[0]
        ws: list[torch.Tensor] = [None] * T  # type: ignore[list-item]
        w_next = None
        for t in range(T - 1, -1, -1):
            w = lh[t]
            if w_next is not None:
                _, dgh = self.gate_grads(w_next, t + 1)
                w = w + torch.matmul(dgh, self.w.w_hh) + w_next * self.z[t + 1]
            ws[t] = w_next = w
        return torch.stack(ws)

    def input_grads(self, w: torch.Tensor, needs: dict[str, bool]) -> dict[str, torch.Tensor | None]:
        T, B = w.shape[:2]
        dgi, dgh = self.gate_grads(w)
        out: dict[str, torch.Tensor | None] = {}
        out["x"] = torch.matmul(dgi, self.w.w_ih) if needs["x"] else None
        out["h0"] = torch.matmul(dgh[0], self.w.w_hh) + w[0] * self.z[0] if needs["h0"] else None
        out["w_ih"] = dgi.reshape(T * B, -1).t().mm(self.x.reshape(T * B, -1)) if needs["w_ih"] else None
        out["w_hh"] = dgh.reshape(T * B, -1).t().mm(self.h_prev.reshape(T * B, -1)) if needs["w_hh"] else None
        out["b_ih"] = dgi.sum((0, 1)) if needs["b_ih"] else None
        out["b_hh"] = dgh.sum((0, 1)) if needs["b_hh"] else None
        out["w_hr"] = None
        return out


class FastGRUTape(GRUTape):
    """``GRUTape`` on the fused kernels; same methods and results."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, w: GRUWeights):
        T, B = x.shape[:2]
        H3, H = w.w_hh.shape
        self.x, self.y, self.h0, self.w = x, y.contiguous(), h0, w
        self._x2 = x.reshape(T * B, -1)
        buf = workspace.empty((T + 1, B, H3), x)
        buf[T].zero_()
        gi = buf[:T]
        if w.b_ih is not None:
            torch.addmm(w.b_ih, self._x2, w.w_ih.t(), out=gi.view(T * B, H3))
        else:
            torch.mm(self._x2, w.w_ih.t(), out=gi.view(T * B, H3))
        gh = workspace.empty((T, B, H3), x)
        if T > 1:
            if w.b_hh is not None:
                torch.addmm(w.b_hh, self.y[:-1].view(-1, H), w.w_hh.t(), out=gh[1:].view(-1, H3))
            else:
                torch.mm(self.y[:-1].view(-1, H), w.w_hh.t(), out=gh[1:].view(-1, H3))
        gh[0] = h0 @ w.w_hh.t() if w.b_hh is None else torch.addmm(w.b_hh, h0, w.w_hh.t())
        fused.gru_gates(gi, gh)
        self._adopt(buf, gh)

    @classmethod
    def from_reserve(cls, x: torch.Tensor, h0: torch.Tensor, w: GRUWeights) -> tuple["FastGRUTape", torch.Tensor]:
        """Run the forward with ``reserve.gru_forward`` (which keeps the gates) and return
        ``(tape, y)``: no rebuild in the backward."""
        buf, gh, y = reserve.gru_forward(x, h0, w.w_ih, w.w_hh, w.b_ih, w.b_hh)
        return cls.from_kept(x, y, h0, w, buf, gh), y

    @classmethod
    def from_kept(cls, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, w: GRUWeights,
                  buf: torch.Tensor, gh: torch.Tensor) -> "FastGRUTape":
        """The tape on what ``reserve.gru_forward`` returned (the gate buffer with its zero
        row and the hidden pre-activations), with nothing rebuilt."""
        tape = cls.__new__(cls)
        tape.x, tape.y, tape.h0, tape.w = x, y, h0, w
        tape._x2 = x.reshape(x.shape[0] * x.shape[1], -1)
        tape._adopt(buf, gh)
        return tape

    def _adopt(self, buf: torch.Tensor, gh: torch.Tensor) -> None:
        """Take the gate buffer (T+1, B, 3H) (gates in rows ``0..T-1``, zeros in row ``T``)
        and the hidden pre-activations ``gh`` (T, B, 3H)."""
        H = buf.shape[-1] // 3
        self.gates, self._gh = buf[:-1], gh
        self.r, self.z, self.n = self.gates.split(H, dim=-1)
        self.gh_n = gh[..., 2 * H :]
        self.z_next = buf[1:, :, H : 2 * H]  # a_t = z_{t+1}, zero at the last step

    @property
    def h_prev(self) -> torch.Tensor:
        return torch.cat([self.h0.unsqueeze(0), self.y[:-1]])

    def _w_hh_t(self) -> torch.Tensor:
        if "_w_hh_t_" not in self.__dict__:
            self._w_hh_t_ = self.w.w_hh.t().contiguous()
        return self._w_hh_t_

    def exact_adjoint(self, lh: torch.Tensor) -> torch.Tensor:
        """On CPU, one C time loop (``reserve.gru_adjoint``) that also writes the gate
        gradients for the adjoint it returns (``gate_grads`` hands them out once)."""
        if not reserve.supports(lh, self.gates, self._gh, self.w.w_hh, self.h0, self.y):
            return super().exact_adjoint(lh)
        w, dgi, dgh = reserve.gru_adjoint(self.gates, self._gh, self.w.w_hh, self.h0.contiguous(), self.y, lh)
        self._exact_gate_grads = (w, dgi, dgh)
        return w

    def gate_grads(self, lam: torch.Tensor, t: int | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        done = self.__dict__.pop("_exact_gate_grads", None)
        if done is not None and done[0] is lam and t == slice(None):
            return done[1], done[2]
        if t != slice(None):
            return super().gate_grads(lam, t)
        # The caller owns the result: it takes the iterations' buffer (a later block makes another).
        return fused.gru_dgates(lam, self.gates, self._gh, self.h0, self.y, with_input=True, out=self.__dict__.pop("_dgh_buf", None))

    def block(self, lam: torch.Tensor) -> torch.Tensor:
        # dgh's buffer is allocated once per tape: a fresh large tensor per iteration costs
        # its page faults again (about as much as the arithmetic on a 2-core CPU).
        T, B, H3 = self.gates.shape
        H = H3 // 3
        if "_dgh_buf" not in self.__dict__:  # (again after input_grads took the last one)
            # dgh with one zero row after the last step: the product of rows 1..T with
            # W_hh is the shifted result itself (zero at the last step), with no copy.
            self._dgh_pad = workspace.empty((T + 1, B, H3), self.gates)
            self._dgh_pad[T].zero_()
            self._dgh_buf = self._dgh_pad[:T]
        fused.gru_dgates(lam, self.gates, self._gh, self.h0, self.y, with_input=False, out=self._dgh_pad[:T])
        return gemm.linear_t(self._dgh_pad[1:].view(-1, H3), self._w_hh_t()).view(T, B, H)

    def input_grads(self, w: torch.Tensor, needs: dict[str, bool]) -> dict[str, torch.Tensor | None]:
        T, B = w.shape[:2]
        dgi, dgh = self.gate_grads(w)
        H3 = dgh.shape[-1]
        H = H3 // 3
        gi2, gh2 = dgi.view(T * B, H3), dgh.view(T * B, H3)
        out: dict[str, torch.Tensor | None] = {}
        out["x"] = gemm.linear_t(gi2, self.w.w_ih.t().contiguous()).view(T, B, -1) if needs["x"] else None
        out["h0"] = torch.mm(dgh[0], self.w.w_hh) + w[0] * self.z[0] if needs["h0"] else None
        out["w_ih"] = gemm.tn(gi2, [[self._x2]])[0] if needs["w_ih"] else None
        # Σ_t dgh_t^T h_{t-1}, with h_{t-1} = [h_0, y_0 .. y_{T-2}].
        out["w_hh"] = gemm.tn(gh2, [[self.h0, self.y[:-1].view(-1, H)]])[0] if needs["w_hh"] else None
        out["b_ih"] = gi2.sum(0) if needs["b_ih"] else None
        out["b_hh"] = gh2.sum(0) if needs["b_hh"] else None
        out["w_hr"] = None
        return out


def make_gru_tape(x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, w: GRUWeights) -> GRUTape:
    """``FastGRUTape`` where the fused kernels take these tensors, else ``GRUTape``."""
    tensors = [x, y, h0, w.w_ih, w.w_hh] + [t for t in (w.b_ih, w.b_hh) if t is not None]
    if fused.supports(*tensors):
        return FastGRUTape(x, y, h0, w)
    return GRUTape(x, y, h0, w)
