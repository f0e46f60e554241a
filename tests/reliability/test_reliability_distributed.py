"""Data-parallel training: DistributedDataParallel (gloo, 2 processes on this machine)
over a model holding Highway layers gets the gradients of one process on the whole batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hwbptt.torch import HighwayGRU, HighwayLSTM

WORLD = 2


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = HighwayLSTM(3, 6, iterations=2, batch_first=True)
        self.gru = HighwayGRU(6, 5, iterations=3, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 1)

    def forward(self, x):
        return self.head(self.gru(self.lstm(x)[0])[0]).squeeze(-1)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 30, 3, generator=g), torch.randn(8, 30, generator=g)


def loss_fn(pred, target):
    return ((pred - target) ** 2).mean()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=__import__("datetime").timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = Model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = data()
        shard = slice(rank * 4, rank * 4 + 4)
        loss_fn(ddp(x[shard]), y[shard]).backward()  # mean over the shard; DDP averages the shards
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
        # Both ranks leave together: gloo aborts a process ("terminate called without an
        # active exception") when its peer tears the group down first.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_same_gradients_as_one():
    torch.manual_seed(0)
    model = Model()
    x, y = data()
    loss_fn(model(x), y).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(_worker, args=(init_file, tmp), nprocs=WORLD, join=False, start_method="spawn")
        deadline = 240
        import time

        start = time.monotonic()
        while not ctx.join(timeout=5):
            if time.monotonic() - start > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("DDP workers did not finish within 240 s")
        got = [torch.load(os.path.join(tmp, f"grads{r}.pt")) for r in range(WORLD)]
    for name, g in expected.items():
        for r in range(WORLD):
            torch.testing.assert_close(got[r][name], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"rank {r}, {name}: {m}")
