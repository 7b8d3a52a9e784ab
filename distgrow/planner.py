"""Turning an LR schedule into a batch schedule with the same noise-scale path.

For a user schedule with decay ``d(t)`` (after any warm-up, see :mod:`distgrow.schedules`),
distgrow moves the decay into the batch:

* ideal batch ``B*(t) = B0 / d(t)``;
* realised batch ``B(t)``: the largest size ``workers × micro_batch × accum_steps`` not above
  ``B*(t)`` or any cap (``max_global_batch``, ``max_dataset_fraction · N``, the hardware);
* learning rate, by ``growth.rule`` (``p`` its exponent), with ``r(t) = w(t) · d(t)``:
  ``ε(t) = lr0 · r(t) · (B(t)/B0)^p · (1 − m)/(1 − m0)``, which keeps, at every update,

  - ``linear`` (p = 1, Smith et al. 2018; SGD): ``ε/(B(1 − m)) = lr0·r(t)/(B0(1 − m0))``, the
    SGD noise scale; ``ε = lr0`` while the batch keeps up;
  - ``sqrt`` (p = 1/2, Malladi et al. 2022, Seesaw 2025; adaptive updates):
    ``ε/√B = lr0·r(t)/√B0``; ``ε = lr0·√d(t)`` while the batch keeps up.

  Where the batch is capped or rounded below ``B*`` the LR takes exactly the rest (the hybrid),
  under either rule. A decay to 0 asks for ``B* = ∞``: the cap takes over and the LR goes to 0.
* the LR warm-up ``w(t)`` is never converted: the batch stays at B0 and the LR rises;
* a batch warm-up (``growth.rampup_*``, Megatron's ``--rampup-batch-size``) runs first, at the
  LR of the base batch, and is the one span where the identity is not kept, by choice.

Realisation rules: workers first (up to ``max_workers``, never fewer than before unless that
count leaves the batch more than ``NEAR_IDEAL`` below ``B*``), each at the preferred
``micro_batch``; then a larger micro-batch (up to ``max_micro_batch``); accumulation only once
both are at their limits. The split is exact; where none exists for ``B*`` the batch is rounded
down and the LR absorbs the difference.

:class:`GrowthPolicy` is the stateful object a training loop asks "what now?" (it replays
exactly after ``load_state_dict``); :func:`make_plan` drives the same policy through a whole run
to produce the phases that ``distgrow plan`` prints.

Pure Python: no torch import.
"""

from distgrow.core.plan import (
    ADJUSTMENT_NOTES,
    RULE_IDENTITIES,
    Phase,
    Plan,
    make_plan,
    plan_from_file,
    plan_is_ladder,
)
from distgrow.core.policy import GrowthPolicy, Setting
from distgrow.core.split import (
    ACCUM_WINDOW,
    NEAR_IDEAL,
    SPLIT_FIELDS,
    Limits,
    Realisation,
    Split,
    flatten_split,
    micro_batch_multiple,
    preferred_micro_batch,
)

__all__ = [
    "ACCUM_WINDOW",
    "ADJUSTMENT_NOTES",
    "NEAR_IDEAL",
    "RULE_IDENTITIES",
    "SPLIT_FIELDS",
    "GrowthPolicy",
    "Limits",
    "Phase",
    "Plan",
    "Realisation",
    "Setting",
    "Split",
    "flatten_split",
    "make_plan",
    "micro_batch_multiple",
    "plan_from_file",
    "plan_is_ladder",
    "preferred_micro_batch",
]
