"""What every rank must decide alike between updates: stop (by signal) or go on.

A signal may reach only some of the workers (a scheduler signals one process, a user presses
Ctrl-C in one terminal), yet every rank must stop after the *same* update, or the ones still
training wait forever in the next all-reduce. :class:`Agreement` is the one object the loop
asks, once per update, whether to stop; it settles the question with as few collectives as it
can:

* each update's loss agreement (:meth:`Agreement.mean_loss`) also counts the ranks holding a
  stop signal, so while no rank holds one the question costs nothing;
* otherwise (a count above 0, or nothing counted since: the start of an epoch or of the run,
  after an elastic wait) one scalar all-reduce (max) agrees on the signal.

Under DDP (the torch backend on several workers) the update's three numbers ``[loss_sum, stop
votes, checkpoint votes]`` need no collective of their own: the trainer calls :meth:`start`
inside the synchronising micro-step, before its backward, and :meth:`TorchBackend.carry
<distgrow.backends.torch_ddp.TorchBackend.carry>` adds them to that backward as the gradient of
a small extra parameter, which DDP reduces in its first bucket with the last layers' gradients.
The model's gradients are unchanged bit for bit (``tests/test_agreement.py``), and every rank
still knows, before its optimizer step, whether any rank's loss was NaN/inf and whether any
rank holds a stop signal or a checkpoint clock that ran out: the same guarantees as a
collective per update, at the cost of a few tiny tensor operations (docs/speed.md, figures).

FSDP in fp32 on several ranks carries them the same way
(:meth:`FSDPBackend.carry <distgrow.backends.fsdp_backend.FSDPBackend.carry>`): the band, one row
per rank, is sharded with the root and rides its reduce-scatter.

Elsewhere (FSDP in bf16, Horovod, DeepSpeed, a measured noise-scale update that reduces its
gradients itself, or ``extras``) the numbers travel in one float64 buffer, reduced in place and
read back once: ``[loss_sum, stop votes, checkpoint votes, *extras]`` (without extras, one
``cat`` of the loss and a row of a flags table kept on the device); under DDP and FSDP
(``all_reduce_async``) that all-reduce runs in the background during the backward. A single
process runs no collective at all: its loss is read back once and its own signal and clock are
the answer.

Why the loss is agreed every update rather than every K updates: the guarantee "a NaN/inf is
never applied" needs every rank to know, before its optimizer step, whether any rank's loss was
finite. A local check of the reduced gradient would agree across ranks only under DDP (Horovod
reduces inside its optimizer step, DeepSpeed's ZeRO 1/2 leaves each rank a different gradient
partition), would miss a NaN loss whose gradient is finite, and reads every gradient; carried
by DDP, the agreement costs less than that check.

**Extras** (a hook for per-update statistics, e.g. the gradient noise scale): a caller that
needs a few more numbers summed over ranks at every update passes them as ``extras`` to
:meth:`Agreement.start` (a 1-D tensor or a sequence of floats, the same length on every rank
and at every update); after :meth:`Agreement.mean_loss` their sum over ranks is
:attr:`Agreement.extras_sum` (a float64 tensor of that length, on the collectives' device,
valid until the next update). They cost no extra collective: they travel in the same buffer
as the loss. Numbers known only after the backward (gradient norms) need the all-reduce
started after it: call ``start`` there instead (the overlap with the backward is then lost),
or ``mean_loss(loss_sum, wants_checkpoint, extras)``, which starts and collects at once.

:meth:`Agreement.wait_for_stop` is the elastic idle wait: every rank polls the same
all-reduce, so all leave it after the same number of collectives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

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
        # Ranks that held a stop signal at the last update's loss agreement; None: not known.
        self._votes: int | None = None
        self._buffer: torch.Tensor | None = None  # the update's all-reduce, reused
        self._pending: Callable[[], torch.Tensor] | None = None  # its result, when started
        self._local: tuple[torch.Tensor, bool, bool] | None = None  # one process: no collective
        self._flags: torch.Tensor | None = None  # (stop, checkpoint) rows for a carried update
        self._flags64: torch.Tensor | None = None  # the same rows, float64, for the all-reduce
        self.checkpoint_agreed = False
        """Some rank wanted a checkpoint at the last update's loss agreement (so all do)."""
        self.extras_sum: torch.Tensor | None = None
        """The last update's ``extras`` summed over ranks (see the module docstring)."""

    def forget(self) -> None:
        """Collectives ran since the last update (validation, a wait): ask the ranks again."""
        self._votes = None

    def start(
        self,
        loss_sum: torch.Tensor,
        wants_checkpoint: bool = False,
        extras: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        """Begin the update's one all-reduce: this rank's ``loss_sum``, whether it holds a stop
        signal, whether it wants a checkpoint (a clock that ran out), and ``extras``.

        Where the backend can (``all_reduce_async``: DDP), it runs in the background until
        :meth:`mean_loss`; the trainer starts it before the last backward, so it overlaps the
        gradient all-reduce instead of adding a round trip after it.
        """
        signalled = self.signals.received is not None
        n_extra = 0 if extras is None else len(extras)
        if self.backend.world_size == 1 and n_extra == 0:
            # Nothing to agree with: no collective, one read-back (free on the CPU).
            self._local = (loss_sum, signalled, wants_checkpoint)
            return
        carry = getattr(self.backend, "carry", None)
        if carry is not None and n_extra == 0:
            # The gradients carry the 3 numbers (TorchBackend.carry, FSDPBackend.carry): no
            # collective of their own. The flags are a row of a table kept on the device.
            flags = self._flags
            if flags is None:
                flags = self._flags = torch.tensor(
                    [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], device=self.device
                )
            row = flags[2 * signalled + wants_checkpoint]
            carried = carry(torch.cat((loss_sum.detach().reshape(1).to(row.dtype), row)))
            if carried is not None:
                self._pending = carried
                return
        if n_extra == 0:
            # One cat of the loss and a row of the flags table (float64, on the device): one
            # tensor operation per update where three element writes took twice the time.
            table = self._flags64
            if table is None:
                table = self._flags64 = torch.tensor(
                    [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
                    dtype=torch.float64,
                    device=self.device,
                )
            loss = loss_sum.detach().reshape(1).to(self.device, torch.float64)
            buffer = torch.cat((loss, table[2 * signalled + wants_checkpoint]))
        else:
            reused = self._buffer
            if reused is None or reused.numel() != 3 + n_extra:
                reused = self._buffer = torch.zeros(
                    3 + n_extra, dtype=torch.float64, device=self.device
                )
            buffer = reused
            buffer[0] = loss_sum.detach().reshape(())
            buffer[1] = float(signalled)
            buffer[2] = float(wants_checkpoint)
            buffer[3:] = torch.as_tensor(extras, dtype=torch.float64).to(self.device)
        start_async = getattr(self.backend, "all_reduce_async", None)
        if start_async is not None:
            self._pending = start_async(buffer, "sum")
        else:
            reduced = self.backend.all_reduce(buffer, "sum")
            self._pending = lambda: reduced

    def mean_loss(
        self,
        loss_sum: torch.Tensor | None = None,
        wants_checkpoint: bool = False,
        extras: torch.Tensor | Sequence[float] | None = None,
    ) -> float:
        """The update's mean loss over ranks: the result of the all-reduce :meth:`start` began
        (or, given ``loss_sum``, of one started here with these arguments). It also sets the
        ranks' stop votes, :attr:`checkpoint_agreed` and :attr:`extras_sum`."""
        if loss_sum is not None:
            self.start(loss_sum, wants_checkpoint, extras)
        if self._local is not None:
            local_loss, signalled, wants = self._local
            self._local = None
            self._votes = int(signalled)
            self.checkpoint_agreed = wants
            self.extras_sum = None
            return float(local_loss)
        if self._pending is None:
            raise RuntimeError("Agreement.mean_loss: no all-reduce started (call start first).")
        reduced, self._pending = self._pending(), None
        loss, votes, checkpoints = reduced[:3].tolist()  # the one read-back
        self._votes = round(votes)
        self.checkpoint_agreed = checkpoints > 0
        self.extras_sum = reduced[3:].clone() if reduced.numel() > 3 else None
        return loss / self.backend.world_size

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
