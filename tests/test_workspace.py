"""The CPU workspace (``hwbptt.torch.workspace``): a buffer is handed out again only once
nothing refers to it, and the layers' results do not depend on it."""

from __future__ import annotations

import pytest
import torch

from hwbptt.torch import HighwayGRU, HighwayLSTM, workspace

pytestmark = pytest.mark.skipif(workspace._ALONE is None, reason="this PyTorch does not expose storage use counts")

LIKE = torch.empty(1)
BIG = (512, 1024)  # 2 MiB of float32: pooled


@pytest.fixture(autouse=True)
def _empty_pool():
    workspace.clear()
    yield
    workspace.clear()


def test_a_buffer_in_use_is_not_handed_out_again():
    a = workspace.empty(BIG, LIKE)
    b = workspace.empty(BIG, LIKE)
    assert a.data_ptr() != b.data_ptr()
    a.fill_(1.0)
    b.fill_(2.0)
    assert torch.all(a == 1.0)


def test_a_kept_view_keeps_its_buffer_busy():
    a = workspace.empty(BIG, LIKE)
    where = a.data_ptr()
    row = a[-1]
    row.fill_(3.0)
    del a
    b = workspace.empty(BIG, LIKE)
    assert b.data_ptr() != where
    b.fill_(0.0)
    assert torch.all(row == 3.0)
    del row, b
    # Both free now: the pool holds two buffers and hands one of them out.
    assert workspace.pooled_bytes() == 2 * 2 * 2**20
    assert workspace.empty(BIG, LIKE).data_ptr() is not None and workspace.pooled_bytes() == 4 * 2**20


def test_a_released_buffer_is_reused_by_the_next_request():
    a = workspace.empty(BIG, LIKE)
    where = a.data_ptr()
    del a
    assert workspace.empty(BIG, LIKE).data_ptr() == where
    assert workspace.empty((500, 1024), LIKE, torch.float32).data_ptr() == where  # smaller, within 2x
    assert workspace.empty((200, 1024), LIKE).data_ptr() != where  # less than half: a new one


def test_small_tensors_other_devices_and_the_switch_bypass_the_pool():
    workspace.empty((4, 4), LIKE)
    assert workspace.pooled_bytes() == 0
    with workspace.use(False):
        workspace.empty(BIG, LIKE)
    assert workspace.pooled_bytes() == 0
    workspace.empty(BIG, LIKE)
    assert workspace.pooled_bytes() == 2 * 2**20
    with pytest.raises(TypeError, match="on="):
        with workspace.use(1):
            pass


def test_free_buffers_over_the_cap_are_dropped(monkeypatch):
    monkeypatch.setattr(workspace, "_CAP_BYTES", 3 * 2**21)
    keep = [workspace.empty(BIG, LIKE) for _ in range(2)]  # 4 MiB in use
    sizes = [(512 + 300 * n) * 1024 * 4 for n in range(4)]  # each too big for the last: a new buffer
    for n in sizes:
        workspace.empty((n // 4,), LIKE)  # released at once
    # The older free buffers went; the busy ones and the newest stay.
    assert workspace.pooled_bytes() == 2 * 2**21 + sizes[-1]
    keep[0].fill_(1.0)
    keep[1].fill_(2.0)
    assert torch.all(keep[0] == 1.0)


@pytest.mark.parametrize("cls", [HighwayLSTM, HighwayGRU])
def test_layers_give_the_same_results_with_and_without_the_pool_and_kept_states_survive(cls):
    torch.manual_seed(0)
    T, B, H = 300, 16, 64  # the gate buffers are over a MiB: pooled
    mod = cls(H, H, iterations=2)
    xs = [torch.randn(T, B, H, requires_grad=True) for _ in range(2)]

    def step(x):
        y, state = mod(x)
        grads = torch.autograd.grad((y * y).sum(), [x, *mod.parameters()])
        return y.detach().clone(), state, grads

    with workspace.use(False):
        plain = [step(x) for x in xs]
    y0, state0, g0 = step(xs[0])
    kept = [s.clone() for s in (state0 if isinstance(state0, tuple) else (state0,))]
    y1, state1, g1 = step(xs[1])  # runs while the first step's states are still held
    for got, ref in zip([y0, *g0, y1, *g1], [plain[0][0], *plain[0][2], plain[1][0], *plain[1][2]]):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for s, k in zip(state0 if isinstance(state0, tuple) else (state0,), kept):
        assert torch.equal(s, k), "a state returned by the first step was overwritten by the second"
    assert workspace.pooled_bytes() > 0
