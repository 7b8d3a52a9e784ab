"""The gradient noise scale, measured while training (``noise.measure``; docs/noise.md).

:class:`NoiseMeter` is what the trainer asks, at four points of an update: ``begin_update``
(before the first micro-step), ``after_micro_step`` (after each backward), ``end_update``
(after the last backward, *before* the optimizer step, so before gradient clipping) and, at
each log record, ``window_metrics``. Where the two batch sizes come from depends on the job
(:func:`distgrow.backends.noise_hook.attach`):

* several workers under DDP: a measured update runs all its micro-steps under ``no_sync()``
  (:attr:`NoiseMeter.syncs_itself`) and then averages the gradients itself with one flat
  all-reduce, taking the local and averaged squared norms on the way
  (:func:`distgrow.backends.noise_hook.all_reduce_measured`), plus one all-reduce of three
  numbers; the other updates are DDP's own, untouched (no communication hook);
* one worker of the torch backend with accumulation: the micro-batches (one worker without
  accumulation offers a single batch size: that update is not measured, and the log says so
  once);
* Horovod and DeepSpeed: not measured (the engines reduce each gradient in place, so no rank's
  local gradient is kept); the log says so once.

Under fp16 the gradients carry the loss scale ``s``: both squared norms are divided by ``s²``.
The meter's state (the estimator's moving averages and the log window's sums) goes into the
checkpoint, so a resumed run logs and decides exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distgrow.backends import Backend
from distgrow.backends.noise_hook import all_reduce_measured, attach, mean_local_norm
from distgrow.config import Config
from distgrow.noise import MicroStepNorms, NoiseEstimate, NoiseScaleEstimator

__all__ = ["NoiseMeter", "open_noise_meter"]


def open_noise_meter(
    cfg: Config,
    backend: Backend,
    train_model: nn.Module,
    model: nn.Module,
    say: Callable[[str], None],
) -> NoiseMeter | None:
    """The run's meter, or None when ``noise.measure`` leaves it off (nothing is installed)."""
    if not cfg.noise.enabled(cfg.growth):
        return None
    return NoiseMeter(cfg, backend, train_model, model, say)


class NoiseMeter:
    """Measures ``|G|²``, ``tr(Σ)`` and ``B_simple`` over a run (see the module docstring).

    Args:
        cfg: The run's config (``noise`` section).
        backend: The started backend (its all-reduce, device, loss scaler).
        train_model: The module the backend returned (DDP under several workers).
        model: The unwrapped model (one worker: its parameters' gradients).
        say: Where the one-time "cannot measure" line goes (rank 0's log).
    """

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        train_model: nn.Module,
        model: nn.Module,
        say: Callable[[str], None],
    ) -> None:
        self.backend = backend
        self.every = cfg.noise.every
        self.estimator = NoiseScaleEstimator(cfg.noise.ema_decay)
        self.source, _, why = attach(backend, train_model)  # no communication hook
        self._parameters = [p for p in model.parameters() if p.requires_grad]  # as DDP
        self._group = getattr(train_model, "process_group", None)
        self._micro = MicroStepNorms(model.parameters()) if self.source == "micro" else None
        self._say = say
        self._why_not = why
        self._said = False
        self._measuring = False
        self.syncs_itself = False
        """This update is measured under DDP: the trainer runs every micro-step under
        ``no_sync()`` and :meth:`end_update` averages the gradients (set by
        :meth:`begin_update`)."""
        self.last: NoiseEstimate | None = None
        # The log window: sums of the per-update unbiased estimates, and their count.
        self._sum_grad_sq = 0.0
        self._sum_trace_cov = 0.0
        self._count = 0

    def cannot_decide(self, accum_steps: int) -> str | None:
        """Why ``growth.mode=adaptive`` could never grow in this job (None: it can), given the
        accumulation steps of the starting split: it grows only from measurements."""
        if self.source == "none":
            return (
                f"growth.mode=adaptive grows from the measured noise scale, which this job "
                f"cannot measure: {self._why_not}."
            )
        if self.source == "micro" and accum_steps < 2:
            return (
                "growth.mode=adaptive grows from the measured noise scale, which one worker "
                "measures only from accumulated micro-batches, and the base batch runs in one "
                "micro-batch. Fix: set growth.max_micro_batch below growth.base_batch (e.g. "
                "half of it), or train on 2+ workers."
            )
        return None

    # -- the update -----------------------------------------------------------------------------

    def begin_update(self, step: int, accum_steps: int, global_batch: int) -> None:
        """Before the first micro-step of update ``step`` (0-based), with its split."""
        due = step % self.every == 0
        if self.source == "micro" and accum_steps < 2:
            self._once(
                f"noise scale: not measured at a global batch of {global_batch} on one worker "
                "without accumulation (one batch size only). Fix: set growth.max_micro_batch "
                "below the batch to accumulate, or train on 2+ workers."
            )
            due = False
        elif self.source == "none":
            self._once(f"noise scale: not measured: {self._why_not}.")
            due = False
        self._measuring = due
        self.syncs_itself = due and self.source == "ddp"
        if not due:
            return
        if self._micro is not None:
            self._micro.begin_update()

    def after_micro_step(self, samples: int) -> None:
        """After the backward of a micro-batch of ``samples`` samples on this rank."""
        if self._measuring and self._micro is not None:
            self._micro.after_micro_step(samples)

    def end_update(self, local_samples: int, global_samples: int) -> None:
        """After the last backward, before the optimizer step (and its clipping).

        A collective under DDP on measured updates: every rank calls it. Under ``"ddp"`` it is
        also the update's gradient all-reduce (:attr:`syncs_itself`).
        """
        if not self._measuring:
            return
        self._measuring = self.syncs_itself = False
        observed: tuple[float, float, float, float] | None
        if self._micro is not None:
            observed = self._micro.observations(global_samples)
        else:  # DDP: this rank's |g_r|² and the averaged |G_B|², as it averages the update
            local_sq, global_sq = all_reduce_measured(self._parameters, self._group)
            small = mean_local_norm(
                local_sq, local_samples, global_samples, self._group, self.backend.device
            )
            big = float(global_sq)
            observed = None if small is None else (small[0], small[1], big, float(global_samples))
        if observed is None:
            return
        small_sq, small_batch, big_sq, big_batch = observed
        unscale = self._loss_scale() ** -2
        estimate = self.estimator.update(
            small_sq * unscale, small_batch, big_sq * unscale, big_batch
        )
        if estimate is None:  # overflowed gradients (fp16): the trainer skips the step too
            return
        self.last = estimate
        self._sum_grad_sq += estimate.grad_sq
        self._sum_trace_cov += estimate.trace_cov
        self._count += 1

    def _loss_scale(self) -> float:
        scaler = getattr(self.backend, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
            return float(scaler.get_scale())  # the scale of this update (it changes after it)
        return 1.0

    def _once(self, line: str) -> None:
        if not self._said:
            self._said = True
            self._say(line)

    # -- what is logged -------------------------------------------------------------------------

    @property
    def b_simple(self) -> float | None:
        """The smoothed ``B_simple`` now (None until it can be formed)."""
        return self.estimator.b_simple

    def window_metrics(self) -> dict[str, float | int | None]:
        """The values for a step record since the last one (and start a new window).

        ``noise/grad_sq`` and ``noise/trace_cov`` are the window's means of the per-update
        unbiased estimates, ``noise/b_simple_window`` their ratio; the ``*_ema`` values and
        ``noise/b_simple`` are the moving averages and their ratio (what decisions use);
        ``noise/measured`` counts the window's measured updates. Empty before any update was
        measured.
        """
        if self.estimator.updates == 0:
            return {}
        n = self._count
        grad_sq = self._sum_grad_sq / n if n else None
        trace_cov = self._sum_trace_cov / n if n else None
        window_ratio = (
            trace_cov / grad_sq
            if grad_sq is not None and trace_cov is not None and grad_sq > 0 and trace_cov > 0
            else None
        )
        self._sum_grad_sq = self._sum_trace_cov = 0.0
        self._count = 0
        return {
            "noise/grad_sq": grad_sq,
            "noise/trace_cov": trace_cov,
            "noise/b_simple_window": window_ratio,
            "noise/grad_sq_ema": self.estimator.ema_grad_sq,
            "noise/trace_cov_ema": self.estimator.ema_trace_cov,
            "noise/b_simple": self.estimator.b_simple,
            "noise/measured": n,
        }

    def summary(self) -> dict[str, Any]:
        """For ``summary.json``: where the values came from and the last smoothed ones."""
        return {
            "source": self.source,
            "measured_updates": self.estimator.updates,
            "skipped_updates": self.estimator.skipped,
            "grad_sq_ema": self.estimator.ema_grad_sq,
            "trace_cov_ema": self.estimator.ema_trace_cov,
            "b_simple": self.estimator.b_simple,
        }

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "window": [self._sum_grad_sq, self._sum_trace_cov, self._count],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])
        grad_sq, trace_cov, count = state["window"]
        self._sum_grad_sq, self._sum_trace_cov, self._count = (
            float(grad_sq),
            float(trace_cov),
            int(count),
        )
