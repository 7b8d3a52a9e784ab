"""The per-update agreement: one all-reduce of the loss, the stop and checkpoint votes and the
extras; none at all on a single process; a NaN or a signal on one rank seen by every rank."""

from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path
from typing import Any, cast

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


def _fsdp_carried_rank(rank: int, world: int, port: int, out: str, precision: str) -> None:
    """FSDP's reduce-scatter carries the agreement in fp32 (bf16: its own all-reduce)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from distgrow.backends.fsdp_backend import FSDPBackend, mixed_precision

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    runtime = Runtime(rank, world, rank, world, "127.0.0.1", port, "none")
    cfg = load_config(
        None, ["backend.name=fsdp", "run.device=cpu", f"backend.precision={precision}"]
    )
    backend = FSDPBackend(cfg, runtime)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    reference = copy.deepcopy(model)  # the same model sharded without a carrier
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(reference, mesh=mesh, mp_policy=mixed_precision(precision, root=True))
    root = backend.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    started: list[str] = []
    real_start = backend.all_reduce_async

    def counted(tensor: torch.Tensor, op: Any = "sum") -> Any:
        started.append(op)
        return real_start(tensor, op)

    backend.all_reduce_async = counted  # type: ignore[method-assign]
    agreement = Agreement(backend, _signals(15 if rank == 1 else None), torch.device("cpu"))
    seen: list[Any] = []
    for update in range(3):
        for micro, sync in enumerate((False, True)):  # accumulation: the carry rides the last
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * update + micro))
            x = x + rank
            with backend.micro_step(sync=sync):
                loss = root(x).square().sum()
                if sync:
                    value = math.nan if (rank, update) == (1, 1) else 1.0 + rank + 2**-40
                    agreement.start(
                        torch.tensor(value, dtype=torch.float64),
                        wants_checkpoint=rank == world - 1 and update == 2,
                    )
                backend.backward(loss)
            reference.set_requires_gradient_sync(sync)  # type: ignore[operator]
            reference(x).square().sum().backward()
        mean = agreement.mean_loss()
        grads = [
            (cast(DTensor, p.grad).to_local(), cast(DTensor, q.grad).to_local())
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        ]
        seen.append((mean, agreement.checkpoint_agreed, agreement.stop_signal(), grads))
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    # Validation runs the backend's root (it gathers the shards the model's layers hold).
    with torch.no_grad():
        evaluated = backend.eval_module()(torch.ones(2, 6)).sum().item()
        expected = reference(torch.ones(2, 6)).sum().item()
    torch.save((seen, started, evaluated, expected), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
    exit_spawned_rank()


@pytest.mark.integration
@pytest.mark.parametrize(("world", "precision"), [(2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_fsdp_reduce_scatter_carries_the_agreement(
    tmp_path: Path, world: int, precision: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.start_processes(
        _fsdp_carried_rank,
        args=(world, port, str(tmp_path), precision),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    # The ranks' losses 1 + r + 2**-40: their mean, to float32's rounding where carried (the
    # reduce-scatter averages in float32), exactly where all-reduced in float64.
    want = sum(1.0 + r + 2**-40 for r in range(world)) / world
    for r in range(world):
        seen, started, evaluated, expected = torch.load(tmp_path / f"rank{r}.pt")
        # fp32: no all-reduce of the agreement's own; bf16 (a band reduced in bfloat16 would
        # keep 3 digits of the loss): one per update.
        assert started == ([] if precision == "fp32" else ["sum"] * 3)
        (m0, c0, s0, g0), (m1, c1, s1, _), (m2, c2, s2, g2) = seen
        if precision == "fp32":
            assert m0 == pytest.approx(want, rel=2**-23, abs=0) and m0 != want  # float32
        else:
            assert m0 == want
        assert m2 == m0
        assert math.isnan(m1)  # rank 1's NaN is every rank's
        assert (c0, c1, c2) == (False, False, True)  # the last rank's clock, at update 2
        assert (s0, s1, s2) == (15, 15, 15)  # rank 1's signal stops every rank together
        for mine, ref in g0 + g2:
            if world == 2:  # two terms: the same sums bit for bit (a + b == b + a)
                assert torch.equal(mine, ref)
            else:  # the band moves the ring's chunk bounds: the same 3 terms, another order
                torch.testing.assert_close(mine, ref, rtol=4 * 2**-24, atol=1e-7)
        assert evaluated == expected
