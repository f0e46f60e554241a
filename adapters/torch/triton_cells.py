"""The fused LSTM/GRU gate kernels of ``hwbptt.torch.fused`` as Triton kernels, for CUDA
tensors.

Same functions, arguments, outputs and ``out=`` contracts as the C kernels of
``hwbptt.torch.fused`` (which dispatches CUDA tensors here, importing this module at first
use): ``lstm_gates``, ``lstm_dpre``, ``gru_gates``, ``gru_dgates``. Notation as there:
``T`` steps, ``B`` batch rows, hidden size ``H``; a "row" is one ``(t, b)`` pair of the
``R = T·B`` rows, time-major (row ``r = t·B + b``), and ``c_{t-1}``/``h_{t-1}`` of the
rows ``r < B`` come from ``c0``/``h0``.

Layout and arithmetic:

- float32, float16 and bfloat16 tensors (one dtype per call, as the C kernels); every value
  is loaded in its storage dtype, converted to float32, and every result rounded once to
  the storage dtype when stored. ``lstm_gates`` carries ``c_t`` from step to step in float32
  registers (the C kernel re-reads the stored ``c_{t-1}``: the same value in float32, a
  value rounded once less in float16/bfloat16).
- ``σ(x) = 1 / (1 + exp(-x))`` as in the C kernels; ``tanh`` from ``exp`` (Triton's
  language has no ``tanh`` that also runs in its interpreter): ``sign(x) (1 - e)/(1 + e)``
  with ``e = exp(-2|x|)`` for ``|x| ≥ 1/4`` and its odd Taylor polynomial to ``x⁹`` below.
  Divisions are rounded to nearest (``div_rn``). In the interpreter (NumPy's ``exp``) the
  tests hold σ within 4 and tanh within 8 units of 2⁻²⁴ relative of float64 (tanh measured
  at about 4, largest just above ``|x| = 1/4``).
- The row kernels (``lstm_dpre``, ``gru_gates``, ``gru_dgates``) run one program per
  block of ``BLOCK_R`` rows and ``BLOCK_H`` hidden units (the hidden axis is tiled too when
  ``H`` exceeds ``BLOCK_H``). ``lstm_gates`` is sequential over time: one program per block
  of ``BLOCK_B`` batch rows and ``BLOCK_H`` units walks the ``T`` steps, holding ``c_t``.
- Inputs that are not contiguous are copied first (the C kernels assume contiguous
  ``gates``, ``c``, ``tanh_c``, ``gh``); outputs are contiguous, on the input's device.
  Offsets are 64-bit.

Switches and errors: ``HWBPTT_TRITON=0`` makes ``available()`` false (CUDA tensors then take
the tapes' eager torch path; ``HWBPTT_KERNELS=0`` turns off every compiled kernel); a kernel
that Triton cannot compile or launch on the GPU at hand raises a ``RuntimeError`` naming the
kernel and that switch (``hwbptt.torch.triton_scan.launch``).

Checks: ``tests/test_triton_cells.py`` runs each kernel on CPU tensors under
``TRITON_INTERPRET=1`` against the C kernel and the eager torch reference (float32, odd
shapes over several blocks, the ``out=`` contract, float16/bfloat16 inputs), the fast
tapes with these kernels in place of the C ones against the eager tapes, and ``fused``'s
CUDA dispatch with stand-in tensors; and it compiles every kernel for sm_90 (H100) to a
CUDA binary with Triton's own toolchain, which needs no GPU.

Unmeasured (no GPU where this was written; ``python -m hwbptt gpucheck``, the tests in
``tests/cuda`` and the bench against cuDNN, is the one command that measures them when a GPU
is lent):

- no kernel here has run on a GPU: they ran only in Triton's interpreter, which executes
  the kernel source with NumPy on the CPU, and were compiled (not run) for sm_90. On CUDA,
  ``tl.exp`` compiles to ``ex2.approx.f32`` (a couple of ulps, more for large ``|x|``)
  and multiply-adds may fuse, so GPU results differ from the interpreter's and the C
  kernels' in the last bits; how much has not been measured;
- no timing: the block sizes (``_TILE`` elements per row-kernel program, ``_SCAN_TILE``
  lanes per ``lstm_gates`` program, at most ``_MAX_BLOCK_H`` units wide) and the default
  ``num_warps`` are guesses, not tuned; whether the fast tapes on these kernels beat the
  eager tapes on a GPU, and by how much, is not known. ``lstm_gates`` has only
  ``B·H / _SCAN_TILE`` programs, each sequential over ``T``: little parallelism for
  small batches;
- the end-to-end CUDA path (``fused.supports`` true for CUDA tensors, so ``make_lstm_tape``
  and ``make_gru_tape`` pick the fast tapes, then the layers' backward) has not been run
  on CUDA tensors. The fast tapes on these kernels were run on CPU tensors in the
  interpreter only (float32, float16, bfloat16), not through the layers.
"""

from __future__ import annotations

import os

import torch

# The HWBPTT_TRITON switch, and the launcher that names a kernel Triton cannot compile, are
# shared with the Triton scan.
from .triton_scan import enabled as _triton_enabled, launch as _shared_launch

__all__ = ["available", "DTYPES", "lstm_gates", "lstm_dpre", "gru_gates", "gru_dgates"]

#: The storage dtypes these kernels take (arithmetic in float32).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Block sizes (module attributes so that tests can shrink them to cover many blocks).
_TILE = 1024  # elements per program of a row kernel
_SCAN_TILE = 256  # lanes per program of lstm_gates
_MAX_BLOCK_H = 256

try:  # Triton is optional: without it CUDA tensors take the tapes' eager path.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    _HAVE_TRITON = False


def available() -> bool:
    """Triton is installed, kernels are not switched off (``HWBPTT_KERNELS=0``, or
    ``HWBPTT_TRITON=0`` for the Triton kernels alone: then ``fused.supports`` is false for
    CUDA tensors and the tapes take their eager torch path), and there is a GPU for it (or
    its interpreter was chosen with ``TRITON_INTERPRET=1``)."""
    if not _HAVE_TRITON or not _triton_enabled():
        return False
    from .native import kernels_enabled

    return kernels_enabled() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _launch(name: str, grid, like: torch.Tensor, *args, **meta) -> None:
    """Launch this module's kernel ``name``; a kernel Triton cannot compile or launch on this
    GPU raises a ``RuntimeError`` naming it and ``HWBPTT_TRITON=0`` (``triton_scan.launch``).
    The kernel is looked up by name at each call, so that tests can replace it."""
    _shared_launch(__name__, name, globals()[name], grid, like, *args, **meta)


if _HAVE_TRITON:

    # Divisions rounded to nearest (``div_rn``): Triton's ``/`` on float32 compiles to an
    # approximate division for CUDA.

    @triton.jit
    def _sigmoid(x):
        return tl.math.div_rn(tl.zeros_like(x) + 1.0, 1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        big = tl.math.div_rn(1.0 - e, 1.0 + e)
        x2 = x * x
        # tanh x = x - x³/3 + 2x⁵/15 - 17x⁷/315 + 62x⁹/2835 - ...; the next term is below
        # 1e-8 relative for |x| < 1/4.
        small = ax * (1.0 + x2 * (-0.33333333333 + x2 * (0.13333333333 + x2 * (-0.053968253968 + x2 * 0.021869488536))))
        t = tl.where(ax < 0.25, small, big)
        return tl.where(x < 0.0, -t, t)

    @triton.jit
    def _lstm_gates_kernel(pre, c0, c, tc, gain, T, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
        b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (b < B)[:, None] & (h < H)[None, :]
        b2 = b.to(tl.int64)[:, None]
        h2 = h[None, :]
        cp = tl.load(c0 + b2 * H + h2, mask=mask, other=0.0).to(tl.float32)
        for t in range(T):
            r = b2 + t * B
            p = pre + r * (4 * H) + h2
            i = _sigmoid(tl.load(p, mask=mask, other=0.0).to(tl.float32))
            f = _sigmoid(tl.load(p + H, mask=mask, other=0.0).to(tl.float32))
            g = _tanh(tl.load(p + 2 * H, mask=mask, other=0.0).to(tl.float32))
            o = _sigmoid(tl.load(p + 3 * H, mask=mask, other=0.0).to(tl.float32))
            cp = f * cp + i * g
            th = _tanh(cp)
            ty = pre.dtype.element_ty
            tl.store(p, i.to(ty), mask=mask)
            tl.store(p + H, f.to(ty), mask=mask)
            tl.store(p + 2 * H, g.to(ty), mask=mask)
            tl.store(p + 3 * H, o.to(ty), mask=mask)
            q = r * H + h2
            tl.store(c + q, cp.to(ty), mask=mask)
            tl.store(tc + q, th.to(ty), mask=mask)
            tl.store(gain + q, (o * (1.0 - th * th)).to(ty), mask=mask)

    @triton.jit
    def _row_tile(R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        """This program's tile of rows (as an int64 column) and hidden units (a row), and
        the mask of those inside (R, H)."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        return r.to(tl.int64)[:, None], h[None, :], (r < R)[:, None] & (h < H)[None, :]

    @triton.jit
    def _lstm_dpre_kernel(dc, m, gates, c, c0, tc, out, R, B, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        r2, h2, mask = _row_tile(R, H, BLOCK_R, BLOCK_H)
        q = r2 * H + h2
        g4 = r2 * (4 * H) + h2
        d = tl.load(dc + q, mask=mask, other=0.0).to(tl.float32)
        mm = tl.load(m + q, mask=mask, other=0.0).to(tl.float32)
        th = tl.load(tc + q, mask=mask, other=0.0).to(tl.float32)
        i = tl.load(gates + g4, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(gates + g4 + H, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gates + g4 + 2 * H, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(gates + g4 + 3 * H, mask=mask, other=0.0).to(tl.float32)
        later = r2 >= B  # c_{t-1} from c, else from c0
        cp = tl.load(c + (q - B * H), mask=mask & later, other=0.0).to(tl.float32)
        cp += tl.load(c0 + q, mask=mask & (r2 < B), other=0.0).to(tl.float32)
        ty = out.dtype.element_ty
        tl.store(out + g4, (d * g * i * (1.0 - i)).to(ty), mask=mask)
        tl.store(out + g4 + H, (d * cp * f * (1.0 - f)).to(ty), mask=mask)
        tl.store(out + g4 + 2 * H, (d * i * (1.0 - g * g)).to(ty), mask=mask)
        tl.store(out + g4 + 3 * H, (mm * th * o * (1.0 - o)).to(ty), mask=mask)

    @triton.jit
    def _gru_gates_kernel(gi, gh, R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        r2, h2, mask = _row_tile(R, H, BLOCK_R, BLOCK_H)
        g3 = r2 * (3 * H) + h2
        a = gi + g3
        b = gh + g3
        rr = _sigmoid(tl.load(a, mask=mask, other=0.0).to(tl.float32) + tl.load(b, mask=mask, other=0.0).to(tl.float32))
        z = _sigmoid(tl.load(a + H, mask=mask, other=0.0).to(tl.float32) + tl.load(b + H, mask=mask, other=0.0).to(tl.float32))
        n = _tanh(tl.load(a + 2 * H, mask=mask, other=0.0).to(tl.float32) + rr * tl.load(b + 2 * H, mask=mask, other=0.0).to(tl.float32))
        ty = gi.dtype.element_ty
        tl.store(a, rr.to(ty), mask=mask)
        tl.store(a + H, z.to(ty), mask=mask)
        tl.store(a + 2 * H, n.to(ty), mask=mask)

    @triton.jit
    def _gru_dgates_kernel(lam, gates, gh, h0, y, dgh, dgi, R, B, H, WITH_INPUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        r2, h2, mask = _row_tile(R, H, BLOCK_R, BLOCK_H)
        q = r2 * H + h2
        g3 = r2 * (3 * H) + h2
        lm = tl.load(lam + q, mask=mask, other=0.0).to(tl.float32)
        rr = tl.load(gates + g3, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(gates + g3 + H, mask=mask, other=0.0).to(tl.float32)
        n = tl.load(gates + g3 + 2 * H, mask=mask, other=0.0).to(tl.float32)
        hn = tl.load(gh + g3 + 2 * H, mask=mask, other=0.0).to(tl.float32)
        hp = tl.load(y + (q - B * H), mask=mask & (r2 >= B), other=0.0).to(tl.float32)  # h_{t-1} from y, else h0
        hp += tl.load(h0 + q, mask=mask & (r2 < B), other=0.0).to(tl.float32)
        dn = lm * (1.0 - z) * (1.0 - n * n)
        dz = lm * (hp - n) * z * (1.0 - z)
        dr = dn * hn * rr * (1.0 - rr)
        ty = dgh.dtype.element_ty
        tl.store(dgh + g3, dr.to(ty), mask=mask)
        tl.store(dgh + g3 + H, dz.to(ty), mask=mask)
        tl.store(dgh + g3 + 2 * H, (dn * rr).to(ty), mask=mask)
        if WITH_INPUT:
            tl.store(dgi + g3, dr.to(ty), mask=mask)
            tl.store(dgi + g3 + H, dz.to(ty), mask=mask)
            tl.store(dgi + g3 + 2 * H, dn.to(ty), mask=mask)


def _need_triton() -> None:
    if not _HAVE_TRITON:
        raise RuntimeError("Triton is not installed; the Triton gate kernels are unavailable")


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _blocks(rows: int, H: int, tile: int) -> tuple[int, int]:
    """``(BLOCK_rows, BLOCK_H)``: powers of two, ``BLOCK_H`` at least 16 and at most
    ``_MAX_BLOCK_H``, about ``tile`` elements in all."""
    bh = max(16, min(_pow2(H), _MAX_BLOCK_H))
    br = max(2, min(_pow2(rows), tile // bh))
    return br, bh


def _grid(rows: int, H: int, br: int, bh: int) -> tuple[int, int]:
    return (-(-rows // br), -(-H // bh))


def _check_out(out: torch.Tensor, like: torch.Tensor) -> None:
    assert out.shape == like.shape and out.dtype == like.dtype and out.is_contiguous() and out.device == like.device


def lstm_gates(pre: torch.Tensor, c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: ``pre`` (T, B, 4H) contiguous becomes ``[i, f, g, o]``. Returns ``c``,
    ``tanh(c)`` and ``o (1 - tanh² c)``, each (T, B, H).

    ``[i, f, g, o] = [σ, σ, tanh, σ](pre)``; ``c_t = f_t c_{t-1} + i_t g_t`` from
    ``c_{-1} = c0`` (B, H), sequential over time per lane (one program per block of lanes).
    """
    _need_triton()
    T, B, H4 = pre.shape
    H = H4 // 4
    assert pre.is_contiguous()
    c0 = _c(c0)
    c, tc, gain = (torch.empty((T, B, H), dtype=pre.dtype, device=pre.device) for _ in range(3))
    if T * B * H:
        bb, bh = _blocks(B, H, _SCAN_TILE)
        _launch("_lstm_gates_kernel", _grid(B, H, bb, bh), pre, pre, c0, c, tc, gain, T, B, H, BLOCK_B=bb, BLOCK_H=bh)
    return c, tc, gain


def lstm_dpre(dc: torch.Tensor, m: torch.Tensor, gates: torch.Tensor, c: torch.Tensor, c0: torch.Tensor, tanh_c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient on the gate pre-activations (T, B, 4H) from ``dc`` and the gradient ``m``
    on ``o ⊙ tanh(c)``; ``c_{t-1}`` is read from ``c`` and ``c0``. Written into ``out``
    (contiguous, like ``gates``, overlapping no input) when given.

    ``dpre = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g²), m tanh(c) o(1-o)]`` with the
    gates ``[i, f, g, o]`` read from ``gates``; one program per block of rows.
    """
    _need_triton()
    T, B, H4 = gates.shape
    H = H4 // 4
    dc, m, gates, c, c0, tanh_c = (_c(t) for t in (dc, m, gates, c, c0, tanh_c))
    if out is None:
        out = torch.empty_like(gates, memory_format=torch.contiguous_format)
    _check_out(out, gates)
    R = T * B
    if R * H:
        br, bh = _blocks(R, H, _TILE)
        _launch("_lstm_dpre_kernel", _grid(R, H, br, bh), gates, dc, m, gates, c, c0, tanh_c, out, R, B, H, BLOCK_R=br, BLOCK_H=bh)
    return out


def gru_gates(gi: torch.Tensor, gh: torch.Tensor) -> None:
    """In place: ``gi`` (T, B, 3H) becomes ``[r, z, n]``; ``gh`` is read (``gh_n`` stays).

    ``r, z = σ(gi_r + gh_r), σ(gi_z + gh_z)``, ``n = tanh(gi_n + r gh_n)``; one program per
    block of rows.
    """
    _need_triton()
    T, B, H3 = gi.shape
    assert gi.is_contiguous() and gh.is_contiguous()
    H, R = H3 // 3, T * B
    if R * H:
        br, bh = _blocks(R, H, _TILE)
        _launch("_gru_gates_kernel", _grid(R, H, br, bh), gi, gi, gh, R, H, BLOCK_R=br, BLOCK_H=bh)


def gru_dgates(lam: torch.Tensor, gates: torch.Tensor, gh: torch.Tensor, h0: torch.Tensor, y: torch.Tensor, with_input: bool, out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(dgi, dgh)`` (T, B, 3H) for the cotangent ``lam`` (T, B, H) on the outputs;
    ``h_{t-1}`` is read from ``h0`` and ``y``. ``dgi`` only when ``with_input``. ``dgh`` is
    written into ``out`` (contiguous, like ``gates``, overlapping no input) when given.

    With ``[r, z, n]`` from ``gates`` and ``gh_n`` from ``gh``: ``dn = λ(1-z)(1-n²)``,
    ``dz = λ(h_{t-1} - n) z(1-z)``, ``dr = dn gh_n r(1-r)``;
    ``dgi = [dr, dz, dn]``, ``dgh = [dr, dz, dn r]``. One program per block of rows.
    """
    _need_triton()
    T, B, H3 = gates.shape
    H = H3 // 3
    lam, gates, gh, h0, y = (_c(t) for t in (lam, gates, gh, h0, y))
    if out is None:
        out = torch.empty_like(gates, memory_format=torch.contiguous_format)
    _check_out(out, gates)
    dgh = out
    dgi = torch.empty_like(gates, memory_format=torch.contiguous_format) if with_input else None
    R = T * B
    if R * H:
        br, bh = _blocks(R, H, _TILE)
        _launch(
            "_gru_dgates_kernel", _grid(R, H, br, bh), gates, lam, gates, gh, h0, y, dgh, dgh if dgi is None else dgi, R, B, H,
            WITH_INPUT=bool(with_input), BLOCK_R=br, BLOCK_H=bh,
        )
    return dgi, dgh
