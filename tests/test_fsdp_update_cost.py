"""The FSDP update's per-update work kept small without changing what it computes: the gradient
sync switch is set only when it changes, and the agreement's buffer (one ``cat``) holds exactly
the loss and the two votes (docs/speed.md, the FSDP2 rows)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from distgrow.agreement import Agreement
from distgrow.config import load_config
from distgrow.runtime import Runtime
from distgrow.signals import StopSignals


class _TwoAlikeRanks:
    """Two ranks that hold the same numbers: the sum is twice this rank's buffer; records it."""

    world_size = 2

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        assert op == "sum"
        self.buffers.append(tensor.clone())
        return tensor * 2


@pytest.mark.parametrize("signalled", [False, True])
@pytest.mark.parametrize("wants_checkpoint", [False, True])
def test_the_agreement_buffer_is_the_loss_and_both_votes(
    signalled: bool, wants_checkpoint: bool
) -> None:
    backend = _TwoAlikeRanks()
    signals = StopSignals()
    if signalled:
        signals.request(15)
    agreement = Agreement(backend, signals, torch.device("cpu"))  # type: ignore[arg-type]
    loss = torch.tensor(0.1 + 2**-40, dtype=torch.float64)  # float64 survives, exactly
    for _ in range(2):  # the table is built once, then reused
        mean = agreement.mean_loss(loss, wants_checkpoint=wants_checkpoint)
        assert mean == 0.1 + 2**-40
        assert agreement.checkpoint_agreed is wants_checkpoint
        assert agreement._votes == 2 * signalled
    sent = backend.buffers[-1]
    assert sent.dtype == torch.float64
    assert sent.tolist() == [0.1 + 2**-40, float(signalled), float(wants_checkpoint)]


def test_the_fsdp_sync_switch_is_set_only_when_it_changes(
    monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from distgrow.backends.fsdp_backend import FSDPBackend

    cfg = load_config(None, ["backend.name=fsdp", "run.device=cpu"])
    backend = FSDPBackend(cfg, Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none"))
    try:
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        train = backend.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        assert isinstance(train, FSDPModule)
        calls: list[bool] = []
        original: Callable[..., Any] = train.set_requires_gradient_sync

        def counting(sync: bool, **kwargs: Any) -> None:
            calls.append(sync)
            original(sync, **kwargs)

        monkeypatch.setattr(train, "set_requires_gradient_sync", counting)
        groups = train._get_fsdp_state()._fsdp_param_groups
        # One micro-step per update (small batches): the switch stays on, never set.
        for sync in (True, True, False, False, True, True, False, True):
            with backend.micro_step(sync):
                assert all(g.reduce_grads is sync for g in groups)
        assert calls == [False, True, False, True]
    finally:
        dist.destroy_process_group()
