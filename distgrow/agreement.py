"""What every rank must decide alike between updates: stop (by signal) or go on.

A signal may reach only some of the workers (a scheduler signals one process, a user presses
Ctrl-C in one terminal), yet every rank must stop after the *same* update, or the ones still
training wait forever in the next all-reduce. :class:`Agreement` is the one object the loop
asks, once per update, whether to stop; it settles the question with as few collectives as it
can:

* each update's loss all-reduce (:meth:`Agreement.mean_loss`) also counts the ranks holding a
  stop signal, so while no rank holds one the question costs nothing;
* otherwise (a count above 0, or nothing counted since: the start of an epoch or of the run,
  after an elastic wait) one scalar all-reduce (max) agrees on the signal.

:meth:`Agreement.wait_for_stop` is the elastic idle wait: every rank polls the same
all-reduce, so all leave it after the same number of collectives.
"""

from __future__ import annotations

import time

import torch

from distgrow.backends import Backend
from distgrow.signals import StopSignals


class Agreement:
    """The ranks' common answer to "stop now?", asked once per update.

    Args:
        backend: The started backend (its all-reduce).
        signals: Where this process notes a stop signal (installed by the caller, or not).
        device: Where the backend's collectives want their tensors.
    """

    def __init__(self, backend: Backend, signals: StopSignals, device: torch.device) -> None:
        self.backend = backend
        self.signals = signals
        self.device = device
        # Ranks that held a stop signal at the last update's loss all-reduce; None: not known.
        self._votes: int | None = None
        self.checkpoint_agreed = False
        """Some rank wanted a checkpoint at the last update's loss all-reduce (so all do)."""

    def forget(self) -> None:
        """Collectives ran since the last update (validation, a wait): ask the ranks again."""
        self._votes = None

    def mean_loss(self, loss_sum: torch.Tensor, wants_checkpoint: bool = False) -> float:
        """The update's mean loss over ranks, from this rank's ``loss_sum``: the update's one
        all-reduce, which also counts the ranks holding a stop signal and those that want a
        checkpoint (a clock that ran out: :attr:`checkpoint_agreed`)."""
        votes = loss_sum.new_tensor([float(self.signals.received is not None), wants_checkpoint])
        reduced = self.backend.all_reduce(torch.cat([loss_sum.reshape(1), votes]), "sum")
        self._votes = round(float(reduced[1]))
        self.checkpoint_agreed = float(reduced[2]) > 0
        return float(reduced[0]) / self.backend.world_size

    def stop_signal(self) -> int:
        """The stop signal any rank received (0: none), the same on every rank."""
        votes, self._votes = self._votes, None
        if votes == 0:
            return 0  # a signal that came after the count is seen at the next update
        flag = torch.tensor(
            float(self.signals.received or 0), dtype=torch.float64, device=self.device
        )
        return int(self.backend.all_reduce(flag, "max"))

    def wait_for_stop(self, seconds: float) -> bool:
        """Idle until a stop signal (the restart that brings new workers) or ``seconds`` pass.

        Returns:
            True (on every rank) when a stop signal ended the wait.
        """
        start = time.monotonic()
        self.forget()
        while seconds > 0:
            flags = torch.tensor(
                [float(self.signals.received or 0), time.monotonic() - start >= seconds],
                dtype=torch.float64,
                device=self.device,
            )
            signalled, timed_out = self.backend.all_reduce(flags, "max").tolist()
            if signalled or timed_out:
                return bool(signalled)
            time.sleep(0.1)
        return False
