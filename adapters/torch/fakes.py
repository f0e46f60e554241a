"""Fake (meta) implementations of the ``hwbptt::*`` operators, for ``torch.compile`` and
``torch.func`` tracing: each operator writes only into buffers its caller passed (the
schemas mark them), so its fake returns nothing and allocates nothing."""

from __future__ import annotations

import torch

WRITING_OPS = (
    "lstm_gates_", "lstm_dpre_out", "gru_gates_", "gru_dgates_out", "scan_out", "transpose_out",
    "lstm_forward_", "gru_forward_", "lstm_adjoint_out", "gru_adjoint_out",
)


def _writes_only(*args, **kwargs) -> None:
    return None


for _name in WRITING_OPS:
    torch.library.register_fake(f"hwbptt::{_name}", _writes_only)
