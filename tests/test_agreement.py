"""The per-update agreement: one all-reduce of the loss, the stop and checkpoint votes and the
extras; none at all on a single process; a NaN or a signal on one rank seen by every rank."""

from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import exit_spawned_rank

from distgrow.agreement import Agreement
from distgrow.backends.torch_ddp import ProcessGroupMember, TorchBackend, join_process_group
from distgrow.config import load_config
from distgrow.runtime import Runtime
from distgrow.signals import StopSignals


class _OneProcess:
    """A world of one that counts its collectives (there must be none per update)."""

    world_size = 1

    def __init__(self) -> None:
        self.collectives = 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.collectives += 1
        return tensor


def _signals(signum: int | None) -> StopSignals:
    signals = StopSignals()
    if signum is not None:
        signals.request(signum)
    return signals


def test_one_process_reads_the_loss_back_without_a_collective() -> None:
    backend = _OneProcess()
    agreement = Agreement(backend, _signals(None), torch.device("cpu"))  # type: ignore[arg-type]
    loss = torch.tensor(2.5, dtype=torch.float64)
    assert agreement.mean_loss(loss, wants_checkpoint=True) == 2.5
    assert agreement.checkpoint_agreed and agreement.extras_sum is None
    assert agreement.stop_signal() == 0
    assert agreement.mean_loss(torch.tensor(math.nan, dtype=torch.float64)) != 0.0
    assert not agreement.checkpoint_agreed
    assert backend.collectives == 0


def test_one_process_with_a_signal_stops_and_extras_come_back() -> None:
    backend = _OneProcess()
    agreement = Agreement(backend, _signals(15), torch.device("cpu"))  # type: ignore[arg-type]
    assert agreement.mean_loss(torch.tensor(1.0, dtype=torch.float64), extras=[1.0, 2.0]) == 1.0
    assert agreement.extras_sum is not None
    assert agreement.extras_sum.tolist() == [1.0, 2.0]
    assert agreement.stop_signal() == 15


def _rank(rank: int, port: int, out: str, overlapped: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    runtime = Runtime(rank, 2, rank, 2, "127.0.0.1", port, "none")
    member: ProcessGroupMember
    if overlapped:  # DDP's backend: the all-reduce runs in the background between start and read
        member = TorchBackend(load_config(None, []).backend, runtime, device="cpu")
        assert hasattr(member, "all_reduce_async")
    else:
        member = ProcessGroupMember(runtime, torch.device("cpu"), "gloo")
        member._owns_group = join_process_group(runtime, "gloo")
    # Rank 1 alone holds a signal (SIGTERM), a NaN loss and a checkpoint clock that ran out.
    agreement = Agreement(member, _signals(15 if rank else None), torch.device("cpu"))  # type: ignore[arg-type]
    seen: list[Any] = []
    for update in range(3):
        loss = torch.tensor(
            math.nan if (rank, update) == (1, 1) else 1.0 + rank, dtype=torch.float64
        )
        agreement.start(
            loss, wants_checkpoint=rank == 1 and update == 2, extras=[rank + 1.0, update, 1.0]
        )
        # Work between the start and the read (the backward, under DDP) must not disturb it.
        torch.distributed.all_reduce(torch.ones(1000))
        mean = agreement.mean_loss()
        extras = agreement.extras_sum
        assert extras is not None
        seen.append((mean, agreement.checkpoint_agreed, extras.tolist(), agreement.stop_signal()))
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
    exit_spawned_rank()


@pytest.mark.integration
@pytest.mark.parametrize("overlapped", [False, True], ids=["blocking", "overlapped"])
def test_two_ranks_see_one_ranks_nan_signal_and_clock_at_the_same_update(
    tmp_path: Path, overlapped: bool
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.start_processes(
        _rank, args=(port, str(tmp_path), overlapped), nprocs=2, join=True, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for seen in ranks:
        (m0, c0, e0, s0), (m1, c1, e1, s1), (m2, c2, e2, s2) = seen
        assert m0 == 1.5 and m2 == 1.5  # the mean of 1.0 and 2.0
        assert math.isnan(m1)  # rank 1's NaN is every rank's: no rank steps
        assert (c0, c1, c2) == (False, False, True)  # rank 1's clock, agreed at update 2
        assert (e0, e1, e2) == ([3.0, 0.0, 2.0], [3.0, 2.0, 2.0], [3.0, 4.0, 2.0])
        assert (s0, s1, s2) == (15, 15, 15)  # rank 1's signal stops rank 0 at the same update


def _carried_rank(rank: int, port: int, out: str) -> None:
    """DDP's gradient all-reduce carries the agreement: no collective of its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    runtime = Runtime(rank, 2, rank, 2, "127.0.0.1", port, "none")
    backend = TorchBackend(load_config(None, []).backend, runtime, device="cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    reference = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    ddp = backend.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    started: list[str] = []
    backend.all_reduce_async = lambda t, op="sum": started.append(op)  # type: ignore[assignment,method-assign,return-value]
    agreement = Agreement(backend, _signals(15 if rank else None), torch.device("cpu"))
    seen: list[Any] = []
    for update in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * update + rank))
        with backend.micro_step(sync=True):
            loss = ddp(x).square().sum()
            value = math.nan if (rank, update) == (1, 1) else 1.0 + rank
            agreement.start(
                torch.tensor(value, dtype=torch.float64), wants_checkpoint=rank == 1 and update == 2
            )
            backend.backward(loss)
        reference(x).square().sum().backward()
        mean = agreement.mean_loss()
        same = all(
            torch.equal(p.grad, q.grad)  # type: ignore[arg-type]
            for p, q in zip(model.parameters(), reference.module.parameters(), strict=True)
        )
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        seen.append((mean, agreement.checkpoint_agreed, agreement.stop_signal(), same))
    torch.save((seen, started), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
    exit_spawned_rank()


@pytest.mark.integration
def test_ddp_gradients_carry_the_agreement_without_changing_them(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.start_processes(
        _carried_rank, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    for r in range(2):
        seen, started = torch.load(tmp_path / f"rank{r}.pt")
        assert started == []  # no all-reduce of the agreement's own
        (m0, c0, s0, g0), (m1, c1, s1, g1), (m2, c2, s2, g2) = seen
        assert m0 == 1.5 and m2 == 1.5
        assert math.isnan(m1)  # rank 1's NaN is every rank's
        assert (c0, c1, c2) == (False, False, True)
        assert (s0, s1, s2) == (15, 15, 15)
        assert g0 and g1 and g2  # the model's gradients bit for bit as DDP's without the carrier
