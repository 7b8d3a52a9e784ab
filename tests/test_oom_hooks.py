"""The OOM retry is the one wrapper around run_update (distgrow.engine.hooks, its place).

A retried update runs anew from ``begin_update``: every hook sees the failed attempt's
beginning, then one whole update at the smaller split, and the gradient is that split's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from test_engine import N, Recorder
from test_trainer import syn_config

from distgrow.engine import run_update
from distgrow.loop import GrowthSchedule, MicroBatch
from distgrow.oom import OomFallback
from distgrow.planner import Setting, Split


def test_a_retried_update_runs_every_hook_anew_at_the_smaller_split(tmp_path: Path) -> None:
    schedule = GrowthSchedule(syn_config(tmp_path), N, 0, 1)
    planned = replace(schedule.policy.setting(0, 0), split=Split(16, 1, 8, 2))
    indices = torch.arange(16)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(N, 16)
    calls: list[str] = []

    def step(hooks_calls: list[str], fits: int) -> Callable[[torch.Tensor, Setting], float]:
        def loss_of(micro: MicroBatch) -> torch.Tensor:
            n = int(micro.indices.numel())
            if n > fits:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried {n} samples")
            hooks_calls.append(f"forward {n}")
            return model(x[micro.indices]).sum()

        def train_step(idx: torch.Tensor, setting: Setting) -> float:
            update = schedule.make_update(0, 0, 0, setting, idx)
            total = run_update(update, loss_of, reseed=None, hooks=[Recorder("a", hooks_calls)])
            return float(total)

        return train_step

    oom = OomFallback(True, model, optimizer, optimizer.zero_grad, 1, lambda *a, **k: None, print)
    loss, ran = oom.run(step(calls, fits=4), indices, planned)
    assert ran.split == Split(16, 1, 4, 4) and oom.ceiling == 4 and oom.retries == 1
    # The failed attempt began the update (its first forward ran out); the retry began anew
    # and ran one whole update: four micro-steps of 4, then the end, once.
    assert calls[:2] == ["a.begin", "a.begin"]
    assert calls.count("a.end") == 1 and calls[-1] == "a.end"
    assert calls.count("forward 4") == 4 and "a.last" in " ".join(calls)
    retried = [torch.clone(p.grad) for p in model.parameters() if p.grad is not None]
    # The gradient is the one of that update run directly at the smaller split.
    optimizer.zero_grad()
    direct: list[str] = []
    direct_loss = step(direct, fits=4)(indices, ran)
    assert direct == calls[1:] and direct_loss == loss
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(retried) == len(grads) == 2
    for got, want in zip(retried, grads, strict=True):
        assert torch.equal(got, want)
