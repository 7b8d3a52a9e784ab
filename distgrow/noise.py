"""The gradient noise scale, measured from two batch sizes (McCandlish et al. 2018).

Notation: ``G`` is the true gradient (the mean of the per-sample gradients over the data
distribution), ``Σ`` the per-sample gradient covariance, and ``G_n`` the mean gradient of ``n``
samples. For samples drawn independently, ``E|G_n|² = |G|² + tr(Σ)/n``: the squared norm of a
batch gradient overestimates ``|G|²`` by ``tr(Σ)/n``. Two observations at batch sizes ``b < B``
remove that bias:

    |G|²  ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

Both are unbiased (each is a linear combination of the two expectations above), but each is
noisy and the first is often negative for a single update. :class:`NoiseScaleEstimator` keeps an
exponential moving average of each and only then takes the ratio ``B_simple = tr(Σ)/|G|²``
(the ratio of two noisy estimates is biased; the ratio of their averages much less so).

Where the two observations come from:

* **Several workers** (DDP): ``G_b`` is one rank's gradient over its whole update (micro-batch ×
  accumulation steps: under ``no_sync`` the micro-steps' gradients add up locally before the one
  all-reduce), ``G_B`` the all-reduced gradient over the global batch. The local squared norms
  are taken by the communication hook of :mod:`distgrow.backends.noise_hook`, before the
  averaging all-reduce, and averaged over ranks with one extra small all-reduce
  (:func:`pack_local_norm` / :func:`unpack_local_norms`, through ``Backend.all_reduce``).
* **One worker with accumulation**: ``G_b`` is one micro-batch's gradient, ``G_B`` the
  accumulated gradient of the update (:class:`MicroStepNorms`).
* **One worker without accumulation**: there is only one batch size; the noise scale cannot be
  measured (:func:`measurable` says so).

Scaling under the trainer's loss convention (``distgrow.backends.base``): each micro-batch's
*summed* loss is multiplied by ``world_size / global_samples``. A rank that accumulated the
gradients of ``n`` samples therefore holds ``(world_size · n / global_samples) · G_n``, and the
backend's mean over ranks is exactly ``G_B`` with ``B = global_samples``. The formulas need
per-sample *mean* gradients, so an observed squared norm is multiplied by
``(global_samples / (world_size · n))²`` (:func:`mean_gradient_scale`); with an even split
(``n = global_samples / world_size``) the factor is 1 and the hook's local norm is ``|G_b|²``
as it stands. On one worker a micro-batch of ``m`` samples adds ``(m / global_samples) · G_m``
to ``.grad``, so its increment is scaled by ``(global_samples / m)²``.

Uneven batches (the last update of an epoch): with per-rank (or per-micro-step) sizes ``n_r``,
the mean of the ``|G_{n_r}|²`` has expectation ``|G|² + tr(Σ)·mean(1/n_r)``, so the small batch
to use is the harmonic mean of the non-empty ``n_r``; empty shares are left out.

This module imports no ``torch.distributed``; the loss scale of mixed precision (divide the
squared norms by the scale squared) and gradient clipping (read the norms before it) are the
caller's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MicroStepNorms",
    "NoiseEstimate",
    "NoiseScaleEstimator",
    "mean_gradient_scale",
    "measurable",
    "pack_local_norm",
    "squared_norm",
    "unbiased_estimates",
    "unpack_local_norms",
]


def measurable(world_size: int, accum_steps: int) -> bool:
    """Whether an update offers two batch sizes: several workers, or accumulation on one."""
    return world_size > 1 or accum_steps > 1


def unbiased_estimates(
    small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float
) -> tuple[float, float]:
    """One update's unbiased ``(|G|², tr(Σ))`` from the squared norms of two mean gradients.

    Args:
        small_sq_norm: ``|G_b|²``, the squared norm of a mean gradient over ``small_batch``
            samples (or the mean of several such, see the module docstring).
        small_batch: ``b`` (a harmonic mean when the shares were uneven, hence a float).
        big_sq_norm: ``|G_B|²``, the squared norm of the mean gradient over ``big_batch``.
        big_batch: ``B``, greater than ``b``.

    Raises:
        ValueError: ``0 < b < B`` does not hold.
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(
            f"noise scale: the small batch ({small_batch:g}) must be positive and smaller than "
            f"the big batch ({big_batch:g}); with one worker it needs accumulation steps > 1."
        )
    grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace_cov = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace_cov


@dataclass(frozen=True)
class NoiseEstimate:
    """What one update measured, and the smoothed values after it.

    Attributes:
        grad_sq: This update's unbiased ``|G|²`` (noisy; may be negative).
        trace_cov: This update's unbiased ``tr(Σ)`` (noisy; may be negative).
        ema_grad_sq: The bias-corrected moving average of ``grad_sq``.
        ema_trace_cov: The bias-corrected moving average of ``trace_cov``.
        b_simple: ``ema_trace_cov / ema_grad_sq`` in samples, None while either average is not
            positive.
        small_batch: ``b`` of this update.
        big_batch: ``B`` of this update.
    """

    grad_sq: float
    trace_cov: float
    ema_grad_sq: float
    ema_trace_cov: float
    b_simple: float | None
    small_batch: float
    big_batch: float

    def metrics(self) -> dict[str, float | None]:
        """The values to log (metrics.jsonl, the report, W&B), under stable names."""
        return {
            "noise/grad_sq": self.grad_sq,
            "noise/trace_cov": self.trace_cov,
            "noise/grad_sq_ema": self.ema_grad_sq,
            "noise/trace_cov_ema": self.ema_trace_cov,
            "noise/b_simple": self.b_simple,
            "noise/small_batch": self.small_batch,
            "noise/big_batch": self.big_batch,
        }


class NoiseScaleEstimator:
    """Moving averages of the unbiased ``|G|²`` and ``tr(Σ)``, and their ratio ``B_simple``.

    Three biases, and how each is handled:

    1. ``|G_b|²`` alone overestimates ``|G|²`` by ``tr(Σ)/b`` (largest at small batches): the
       two-batch combination of :func:`unbiased_estimates` removes it.
    2. The ratio of two noisy estimates is biased, and a single ``|G|²`` estimate is often
       negative: each is averaged first (``decay`` sets the memory, about
       ``(1 + decay)/(1 − decay)`` updates of equivalent sample count), and the ratio is taken
       of the averages.
    3. A moving average started at zero is pulled towards zero for its first updates: each
       average is divided by ``1 − decay^t`` (as Adam does), so the first update's value is
       the average itself.

    The gradient moves during training, so the averages trail it by about ``1/(1 − decay)``
    updates. ``|G|²`` and ``tr(Σ)`` do not depend on the batch sizes, so the averages carry
    over a growth event unchanged.

    Args:
        decay: Weight of the past in each moving average, in ``[0, 1)``.
    """

    def __init__(self, decay: float = 0.95) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"noise scale decay ({decay}) must be in [0, 1): e.g. 0.95.")
        self.decay = decay
        self._grad_sq = 0.0  # the raw (not yet bias-corrected) averages
        self._trace_cov = 0.0
        self.updates = 0
        self.skipped = 0

    def update(
        self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float
    ) -> NoiseEstimate | None:
        """Add one update's observations (see :func:`unbiased_estimates` for the arguments).

        Returns:
            The estimate after this update, or None when a norm is not finite (an update the
            trainer skips: overflowed gradients); that update is counted in :attr:`skipped`
            and leaves the averages as they were.

        Raises:
            ValueError: ``0 < small_batch < big_batch`` does not hold, or a norm is negative.
        """
        if not (math.isfinite(small_sq_norm) and math.isfinite(big_sq_norm)):
            self.skipped += 1
            return None
        if small_sq_norm < 0 or big_sq_norm < 0:
            raise ValueError(
                f"noise scale: squared norms must be >= 0, got {small_sq_norm} and {big_sq_norm}."
            )
        grad_sq, trace_cov = unbiased_estimates(small_sq_norm, small_batch, big_sq_norm, big_batch)
        self._grad_sq = self.decay * self._grad_sq + (1.0 - self.decay) * grad_sq
        self._trace_cov = self.decay * self._trace_cov + (1.0 - self.decay) * trace_cov
        self.updates += 1
        ema_grad_sq, ema_trace_cov = self.ema_grad_sq, self.ema_trace_cov
        assert ema_grad_sq is not None and ema_trace_cov is not None
        return NoiseEstimate(
            grad_sq=grad_sq,
            trace_cov=trace_cov,
            ema_grad_sq=ema_grad_sq,
            ema_trace_cov=ema_trace_cov,
            b_simple=self.b_simple,
            small_batch=small_batch,
            big_batch=big_batch,
        )

    def _corrected(self, raw: float) -> float | None:
        if self.updates == 0:
            return None
        return raw / (1.0 - self.decay**self.updates)

    @property
    def ema_grad_sq(self) -> float | None:
        """The bias-corrected average of ``|G|²``; None before the first update."""
        return self._corrected(self._grad_sq)

    @property
    def ema_trace_cov(self) -> float | None:
        """The bias-corrected average of ``tr(Σ)``; None before the first update."""
        return self._corrected(self._trace_cov)

    @property
    def b_simple(self) -> float | None:
        """``tr(Σ)/|G|²`` from the averages, in samples; None until both are positive."""
        grad_sq, trace_cov = self.ema_grad_sq, self.ema_trace_cov
        if grad_sq is None or trace_cov is None or grad_sq <= 0 or trace_cov <= 0:
            return None
        return trace_cov / grad_sq

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs to continue the averages exactly."""
        return {
            "decay": self.decay,
            "grad_sq": self._grad_sq,
            "trace_cov": self._trace_cov,
            "updates": self.updates,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the saved decay wins over the constructor's)."""
        decay = float(state["decay"])
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"noise scale state: decay ({decay}) must be in [0, 1).")
        self.decay = decay
        self._grad_sq = float(state["grad_sq"])
        self._trace_cov = float(state["trace_cov"])
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])


# --------------------------------------------------------------------------------------------
# The inputs: scaling, and the one small all-reduce of the local norms
# --------------------------------------------------------------------------------------------


def mean_gradient_scale(samples: int, world_size: int, global_samples: int) -> float:
    """The factor that turns an observed gradient into the per-sample mean gradient.

    Under the trainer's loss convention a rank's gradient accumulated over ``samples`` samples
    is ``(world_size · samples / global_samples) · G_samples``; multiply it by the value
    returned (and a squared norm by its square). One worker: ``world_size = 1``.
    """
    if samples <= 0 or global_samples <= 0 or world_size <= 0:
        raise ValueError(
            f"noise scale: samples ({samples}), world size ({world_size}) and global samples "
            f"({global_samples}) must be positive."
        )
    return global_samples / (world_size * samples)


def squared_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``Σ |t|²`` over ``tensors`` as a float32 scalar on their device (no host sync)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.float() for t in tensors])
    return torch.stack(norms).square().sum()


def pack_local_norm(
    local_sq_norm: float | torch.Tensor,
    local_samples: int,
    world_size: int,
    global_samples: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """This rank's share of the one all-reduce (sum) that averages the small-batch norms.

    Args:
        local_sq_norm: ``|g_r|²`` of this rank's accumulated gradient before the all-reduce
            (:class:`distgrow.backends.noise_hook.NoiseHookState`).
        local_samples: Samples this rank accumulated in this update (0 for an empty share).
        world_size: Ranks in the job.
        global_samples: Samples in the whole update over all ranks.
        device: Where the collective runs (the backend's device).

    Returns:
        ``[|G_{n_r}|², 1/n_r, 1]`` as float64 (zeros for an empty share): sum it over ranks
        and hand it to :func:`unpack_local_norms`.
    """
    packed = torch.zeros(3, dtype=torch.float64, device=device)
    if local_samples > 0:
        scale = mean_gradient_scale(local_samples, world_size, global_samples)
        packed[0] = torch.as_tensor(local_sq_norm, dtype=torch.float64) * scale**2
        packed[1] = 1.0 / local_samples
        packed[2] = 1.0
    return packed


def unpack_local_norms(reduced: torch.Tensor) -> tuple[float, float] | None:
    """``(|G_b|², b)`` from the summed :func:`pack_local_norm` tensors.

    ``|G_b|²`` is the mean over the non-empty ranks, ``b`` the harmonic mean of their sample
    counts (the module docstring says why). None when fewer than two ranks had samples: then
    ``b`` equals ``B`` and the update cannot be measured.
    """
    sq_sum, inverse_sum, ranks = (float(v) for v in reduced.detach().cpu())
    count = round(ranks)
    if count < 2:
        return None
    return sq_sum / count, count / inverse_sum


# --------------------------------------------------------------------------------------------
# One worker with accumulation: the micro-batches are the small batches
# --------------------------------------------------------------------------------------------


class MicroStepNorms:
    """Squared norms of each micro-batch's gradient, from the growth of the accumulated ``.grad``.

    One worker only (under DDP the last micro-step's ``.grad`` is already averaged over ranks;
    use the communication hook there). The increment of ``.grad`` over micro-step ``k`` is
    ``(m_k / global_samples) · G_{m_k}``; it is found by keeping a copy of ``.grad`` from the
    previous micro-step (one extra gradient's memory, and two passes over it per micro-step).

    Usage per update: :meth:`begin_update` (gradients zero), then :meth:`after_micro_step`
    after each backward, then :meth:`observations` before the optimizer step (and before
    clipping).

    Args:
        parameters: The parameters whose gradients count.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self._previous: list[torch.Tensor] | None = None
        self._increments: list[tuple[torch.Tensor, int]] = []

    def begin_update(self) -> None:
        """Forget the last update (its gradients have been zeroed)."""
        self._previous = None
        self._increments = []

    def _grads(self) -> list[torch.Tensor]:
        return [
            p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.parameters
        ]

    def after_micro_step(self, samples: int) -> None:
        """Record the micro-step just back-propagated, over ``samples`` samples."""
        grads = self._grads()
        if self._previous is None:
            increment = squared_norm(grads)
        else:
            increment = squared_norm(torch._foreach_sub(grads, self._previous))
        self._previous = [g.clone() for g in grads]
        self._increments.append((increment, samples))

    def observations(self, global_samples: int) -> tuple[float, float, float, float] | None:
        """``(|G_b|², b, |G_B|², B)`` for :meth:`NoiseScaleEstimator.update`.

        ``|G_b|²`` is the mean over the non-empty micro-batches of their mean gradients'
        squared norms, ``b`` the harmonic mean of their sizes, ``|G_B|²`` the accumulated
        gradient's squared norm and ``B = global_samples``. None with fewer than two non-empty
        micro-batches (no second batch size).
        """
        shares = [(sq, n) for sq, n in self._increments if n > 0]
        if len(shares) < 2:
            return None
        small = [float(sq) * mean_gradient_scale(n, 1, global_samples) ** 2 for sq, n in shares]
        small_batch = len(shares) / sum(1.0 / n for _, n in shares)
        big_sq = float(squared_norm(self._grads()))
        return sum(small) / len(small), small_batch, big_sq, float(global_samples)
