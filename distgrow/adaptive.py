"""Growth decisions from the measured gradient noise scale (``growth.mode=adaptive``, and
``growth.noise_cap``); pure Python, no torch.

The trainer measures ``B_simple = tr(Σ)/|G|²`` (:mod:`distgrow.noise`) and, every
``growth.adaptive.every`` updates, hands the smoothed value to :meth:`NoiseRule.evaluate`.
The rule keeps only what it decided (a streak, a target batch, a cap), so the decisions are a
pure function of the sequence of evaluations: a resume that restores the estimator and this
state makes the same ones at the same updates.

* **adaptive**: when ``B_simple > ratio × B`` for ``patience`` evaluations in a row, ask for
  ``B × factor``. ``ratio = 1`` is McCandlish et al.'s critical batch: below ``B_simple`` one
  more sample per update still buys almost a full sample's progress (the optimal step's gain
  is ``1/(1 + B_simple/B)`` of the noiseless one, ≥ 1/2 while ``B ≤ B_simple``), so growing
  trades updates for samples at little loss. A ratio above 1 waits for more headroom and
  grows later; the patience (hysteresis) keeps one noisy evaluation from growing the batch.
  The batch never shrinks.
* **noise cap**: the largest batch allowed is ``⌊noise_cap × B_simple⌋`` as last evaluated;
  the schedule's batch stops there and the LR takes the rest (see
  :class:`distgrow.planner.GrowthPolicy`).

Before ``min_updates`` measured updates the moving averages have not settled: evaluations
count as "no headroom" and the cap does not bind (growth follows the schedule).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["NoiseDecision", "NoiseRule"]


@dataclass(frozen=True)
class NoiseDecision:
    """An adaptive growth: what was measured and the batch it asks for.

    Attributes:
        b_simple: The smoothed noise scale evaluated, in samples.
        batch: The global batch at the evaluation.
        target: The batch asked for.
        evaluation: The evaluation's number (1, 2, ...).
        streak: The consecutive evaluations above the ratio that led to it.
    """

    b_simple: float
    batch: int
    target: int
    evaluation: int
    streak: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoiseRule:
    """The state of the noise-scale decisions of one run.

    Args:
        adaptive: Decide growth (``growth.mode=adaptive``).
        ratio: Grow when ``B_simple > ratio × B`` ...
        patience: ... for this many consecutive evaluations.
        factor: The batch × this at each growth.
        noise_cap: Cap the batch at this × ``B_simple`` (None: no cap).
        min_updates: Measured updates before an evaluation counts.
    """

    def __init__(
        self,
        adaptive: bool,
        ratio: float,
        patience: int,
        factor: float,
        noise_cap: float | None,
        min_updates: int,
    ) -> None:
        self.adaptive = adaptive
        self.ratio = ratio
        self.patience = patience
        self.factor = factor
        self.noise_cap = noise_cap
        self.min_updates = min_updates
        self.evaluations = 0
        self.streak = 0
        self.target: int | None = None
        """adaptive: the batch last asked for (None: none yet, the base batch)."""
        self.cap: int | None = None
        """noise cap: the largest batch allowed (None: not measured yet, no cap)."""
        self.b_simple: float | None = None
        """The noise scale of the last evaluation that counted."""

    def evaluate(self, b_simple: float | None, measured: int, batch: int) -> NoiseDecision | None:
        """One evaluation; returns the growth it asks for (adaptive), else None.

        The noise cap, if any, is updated to ``⌊noise_cap × b_simple⌋`` (:attr:`cap`).

        Args:
            b_simple: The smoothed noise scale (None while it cannot be formed).
            measured: Updates measured so far (the estimator's count).
            batch: The current global batch.
        """
        self.evaluations += 1
        settled = b_simple is not None and measured >= self.min_updates
        if settled:
            self.b_simple = b_simple
        if self.noise_cap is not None and settled:
            assert b_simple is not None
            self.cap = max(1, math.floor(self.noise_cap * b_simple))
        if not self.adaptive:
            return None
        above = settled and b_simple is not None and b_simple > self.ratio * batch
        self.streak = self.streak + 1 if above else 0
        if self.streak < self.patience:
            return None
        assert b_simple is not None
        self.target = max(batch + 1, math.floor(batch * self.factor))
        decision = NoiseDecision(b_simple, batch, self.target, self.evaluations, self.streak)
        self.streak = 0
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "streak": self.streak,
            "target": self.target,
            "cap": self.cap,
            "b_simple": self.b_simple,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = int(state["evaluations"])
        self.streak = int(state["streak"])
        self.target = None if state["target"] is None else int(state["target"])
        self.cap = None if state["cap"] is None else int(state["cap"])
        self.b_simple = None if state["b_simple"] is None else float(state["b_simple"])
