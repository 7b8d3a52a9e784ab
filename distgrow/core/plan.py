"""Plans: a whole run's phases, simulated through the :class:`GrowthPolicy`.

:func:`make_plan` drives the policy through a run to produce the phases ``distgrow plan``
prints. A span of updates at one split is not walked update by update: the first update where
the phase changes is found by bisection on the update's index (r(t) never rises, so once the
setting differs from the span's first it differs from there on), and the updates before it are
added in one go. The plan is the update-by-update walk's (tests/test_plan_scale.py compares
them over every schedule type) at a cost of O(phases × log updates). Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from distgrow.config import FLOORED, Config, load_config
from distgrow.core.policy import GrowthPolicy, Setting, _SplitView
from distgrow.core.risk import growth_warnings
from distgrow.core.split import Split, flatten_split


@dataclass
class Phase(_SplitView):
    """A span of training with one batch realisation (and, for piecewise schedules, one LR)."""

    start_epoch: float
    end_epoch: float
    split: Split
    lr: float
    lr_end: float
    momentum: float
    noise: float
    """The noise scale at the start of the phase, relative to the run's start (= r(t))."""
    updates: int
    samples: int
    capped: bool
    """True when the batch could not follow the schedule (the LR carries part of the decay)."""
    rung: int = 0
    batch_to_ideal: float = 1.0
    """``B / B*`` at the phase's farthest update (1.0: the batch carries the whole decay; the
    LR is ``lr0 · B / B*`` there)."""
    warmup: bool = False
    """The phase is (part of) the LR warm-up: the LR rises at the base batch."""
    rampup: bool = False
    """The phase is a step of the batch warm-up (at the LR of the base batch)."""


@dataclass
class Plan:
    """A whole run's phases, totals, and the ``decay_lr`` baseline's totals."""

    mode: str
    schedule: str
    dataset_size: int
    epochs: int
    base_batch: int
    phases: list[Phase]
    total_updates: int | None
    baseline_total_updates: int | None
    total_samples: int
    ladder: bool = False
    """True for plateau schedules: phases are rungs (successive cuts), not epoch ranges."""
    notes: list[str] = field(default_factory=list)
    rule: str = "linear"
    """``growth.rule`` as resolved for the optimizer: linear (ε/B kept) or sqrt (ε/√B kept)."""
    adjustments: list[str] = field(default_factory=list)
    """The optional Adam adjustments switched on (``beta2_half_life``, ``weight_decay_timescale``).
    """
    cap_from_epoch: float | None = None
    """Where the cap first binds (the hybrid takes over), in epochs; None if it never does."""
    warnings: list[str] = field(default_factory=list)
    """Phases in the region where growth lost to decay_lr in the evidence (core/risk.py)."""

    @property
    def update_ratio(self) -> float | None:
        """Baseline updates / planned updates (how many times fewer updates)."""
        if not self.total_updates or not self.baseline_total_updates:
            return None
        return self.baseline_total_updates / self.total_updates

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the ladder's rungs have no epochs (null)."""
        out = asdict(self)
        out["phases"] = [flatten_split(phase) for phase in out["phases"]]
        for phase in out["phases"]:
            for key in ("start_epoch", "end_epoch"):
                if isinstance(phase[key], float) and math.isnan(phase[key]):
                    phase[key] = None
        out["update_ratio"] = self.update_ratio
        return out


def _batch_to_ideal(s: Setting) -> float:
    """``B / B*`` of one update, at most 1 (0 when B* is unbounded)."""
    return min(1.0, s.global_batch / s.ideal_batch)


def _alike(last: Phase | Setting, s: Setting, continuous: bool) -> bool:
    """Whether update ``s`` continues the phase whose latest update is ``last``."""
    lr = last.lr_end if isinstance(last, Phase) else last.lr
    return (
        last.split == s.split
        # a phase is capped in all its updates or in none: a continuous decay that reaches
        # the cap inside a split starts a new (capped) phase there
        and last.capped == s.capped
        and last.warmup == s.warmup
        and last.rampup == s.rampup
        and (continuous or s.warmup or math.isclose(lr, s.lr, rel_tol=1e-12))
    )


class _Span:
    """The updates of one epoch at one batch, from ``position`` on, whose first is ``first``.

    Update k starts at ``position + k·B``. Whether it continues ``first``'s phase is asked of
    the policy as it stands after ``first`` (its state is restored after each question). For
    the schedule's batch the question needs no realisation where the answer is known: a target
    at or under a target that did not grow the batch does not, one at or over a target that
    did, does (the largest split under a target never shrinks as the target grows).
    """

    def __init__(self, policy: GrowthPolicy, epoch: int, position: int, first: Setting) -> None:
        self.policy, self.epoch, self.position, self.first = policy, epoch, position, first
        self.batch = first.global_batch
        self.count = math.ceil((policy.dataset_size - position) / self.batch)
        self.continuous = policy.schedule.continuous
        self.state = policy._current
        # the quick question holds for the schedule's batch alone (past the batch warm-up, which
        # never comes back, and without measurements of the noise scale: not adaptive)
        self.quick = not first.rampup and policy.noise_rule is None
        self.stays_below = self.batch  # the largest target known not to grow the batch
        self.grows_from = math.inf  # the smallest target known to grow it
        self.asked_next = False

    def setting(self, k: int) -> Setting:
        """The setting of update ``k``, the policy left as it was."""
        s = self.policy.setting(self.epoch, self.position + k * self.batch)
        self.policy._current = self.state
        return s

    def _grows(self, target: int) -> bool:
        if target > self.batch and not self.asked_next:
            self.asked_next = True
            self._ask_realiser(self.batch + 1)  # most often the next batch up already grows
        if target <= self.stays_below:
            return False
        if target >= self.grows_from:
            return True
        return self._ask_realiser(target)

    def _ask_realiser(self, target: int) -> bool:
        cand = self.policy.limits.realise(target, self.state.workers)
        if cand is not None and cand.global_batch > self.batch:
            # not from cand's size on: under the previous workers' count that size may round
            # down further (NEAR_IDEAL), so the target it was asked for is the bound
            self.grows_from = min(self.grows_from, target)
            return True
        self.stays_below = max(self.stays_below, target)
        return False

    def same(self, k: int) -> bool:
        """Whether update ``k`` continues the phase (what :func:`_alike` says of its setting)."""
        if not self.quick:
            return _alike(self.first, self.setting(k), self.continuous)
        p, first = self.policy, self.first
        epoch, position = self.epoch, self.position + k * self.batch
        warm, decay = p.warmup_factor(epoch, position), p.decay_ratio(epoch, position)
        if (warm < 1.0) != first.warmup:
            return False
        _, binds, target = p.schedule_target(decay)
        if p.grows and (binds != first.capped or self._grows(target)):
            return False
        lr = p._lr(warm * decay, self.batch)  # adaptive growth measures: never quick
        return self.continuous or warm < 1.0 or math.isclose(first.lr, lr, rel_tol=1e-12)

    def length(self) -> int:
        """How many updates continue the phase: galloping, then bisection on k (r(t) never
        rises, so once an update leaves the phase every later one does)."""
        lo, hi, step = 0, self.count, 1
        while lo + step < self.count:
            if not self.same(lo + step):
                hi = lo + step
                break
            lo, step = lo + step, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.same(mid):
                lo = mid
            else:
                hi = mid
        return lo + 1


def _span(policy: GrowthPolicy, epoch: int, position: int, first: Setting) -> tuple[int, Setting]:
    """How many updates from ``position`` on (in this epoch, at ``first``'s batch) continue
    ``first``'s phase, and the setting of the last of them."""
    span = _Span(policy, epoch, position, first)
    steps = span.length()
    return steps, first if steps == 1 else span.setting(steps - 1)


def _add(
    phases: list[Phase], first: Setting, last: Setting, start: float, steps: int, continuous: bool
) -> None:
    """Updates ``first`` … ``last`` (``steps`` of them, one phase) at the end of ``phases``."""
    share = min(_batch_to_ideal(first), _batch_to_ideal(last))
    prev = phases[-1] if phases else None
    if prev is not None and _alike(prev, first, continuous):
        prev.updates += steps
        prev.lr_end = last.lr
        prev.batch_to_ideal = min(prev.batch_to_ideal, share)
        return
    phases.append(
        Phase(
            start_epoch=start,
            end_epoch=start,
            split=first.split,
            lr=first.lr,
            lr_end=last.lr,
            momentum=first.momentum,
            noise=first.ratio,
            updates=steps,
            samples=0,
            capped=first.capped,
            batch_to_ideal=share,
            warmup=first.warmup,
            rampup=first.rampup,
        )
    )


def _simulate(policy: GrowthPolicy, epochs: int) -> tuple[list[Phase], int]:
    """The phases of a run and its number of updates (see the module's docstring)."""
    n = policy.dataset_size
    per_epoch = policy.cfg.schedule.interval == "epoch"
    phases: list[Phase] = []
    total = 0
    for epoch in range(epochs):
        position = 0
        while position < n:
            s = policy.setting(epoch, position)
            if per_epoch and not s.rampup:
                # the rest of the epoch in one go (t is the epoch: nothing changes within it)
                steps, last = math.ceil((n - position) / s.global_batch), s
            else:
                steps, last = _span(policy, epoch, position, s)
            samples = min(steps * s.global_batch, n - position)
            _add(phases, s, last, epoch + position / n, steps, policy.schedule.continuous)
            phases[-1].samples += samples
            phases[-1].end_epoch = epoch + (position + samples) / n
            total += steps
            position += samples
    return phases, total


def _ladder(policy: GrowthPolicy, max_rungs: int = 12) -> list[Phase]:
    """Plateau schedules: one row per successive cut, until the LR stops changing."""
    rows: list[Phase] = []
    n = policy.dataset_size
    capped_rows = 0
    for rung in range(max_rungs):
        policy.rung = rung
        s = policy._settle(policy.decay_ratio(0))  # a rung's setting after any warm-up
        if rows and math.isclose(s.ratio, rows[-1].noise, rel_tol=1e-12):
            break  # min_lr reached: further plateaus change nothing
        capped = s.capped
        rows.append(
            Phase(
                start_epoch=math.nan,
                end_epoch=math.nan,
                split=s.split,
                lr=s.lr,
                lr_end=s.lr,
                momentum=s.momentum,
                noise=s.ratio,
                updates=math.ceil(n / s.global_batch),
                samples=n,
                capped=capped,
                rung=rung,
                batch_to_ideal=_batch_to_ideal(s),
            )
        )
        capped_rows += capped
        if capped_rows >= 3:
            break  # the batch has stopped; the LR decays by the same factor from here on
    policy.rung = 0
    return rows


def _adaptive_ladder(policy: GrowthPolicy, max_rungs: int = 24) -> list[Phase]:
    """``growth.mode=adaptive``: the batches the run may grow to (× ``growth.factor`` each, as
    realised), until the limits stop it; when it grows is measured at run time."""
    rows: list[Phase] = []
    n = policy.dataset_size
    split = policy._start
    lr0 = policy._lr(1.0, policy.start_batch)
    for rung in range(max_rungs):
        rows.append(
            Phase(
                start_epoch=math.nan,
                end_epoch=math.nan,
                split=split,
                lr=lr0,  # while the schedule has not decayed below B0/B; min(lr0, lr0·r·B/B0)
                lr_end=lr0,
                momentum=policy.momentum,
                noise=policy.start_batch / split.global_batch,
                updates=math.ceil(n / split.global_batch),
                samples=n,
                capped=False,
                rung=rung,
            )
        )
        wanted = max(
            split.global_batch + 1, math.floor(split.global_batch * policy.cfg.growth.factor)
        )
        cand = policy.limits.realise(wanted, split.workers)
        if cand is None or cand.global_batch <= split.global_batch:
            rows[-1].capped = True  # the limits stop it: the LR carries the decay from here
            break
        split = cand
    return rows


def _noise_notes(cfg: Config) -> list[str]:
    """What the plan says about decisions taken from the measured noise scale."""
    g = cfg.growth
    a = g.adaptive
    notes = []
    if g.mode == "adaptive":
        notes.append(
            f"adaptive: each row is one more growth (× {g.factor:g}); the batch grows when the "
            f"smoothed noise scale B_simple exceeds {a.ratio:g} × the batch for {a.patience} "
            f"evaluations in a row (one every {a.every} updates): growth times are decided at "
            "run time from the measurements, so totals are unknown here"
        )
        notes.append(
            "adaptive: the LR is min(lr0·w(t), lr0·r(t)·(B/B0)^p): the schedule's decay still "
            "applies to the LR the batch has not taken, and the noise scale stays at or below "
            "the schedule's path"
        )
    if g.noise_cap is not None:
        notes.append(
            f"possible cap: growth stops where the batch would exceed {g.noise_cap:g} × the "
            "noise scale B_simple measured during the run (growth.noise_cap); the LR carries "
            "the rest of the decay from there (hybrid); where, is decided at run time"
        )
    return notes


def make_plan(cfg: Config, dataset_size: int, min_workers: int = 1) -> Plan:
    """The phases of a run of ``cfg`` on ``dataset_size`` samples, with the baseline's totals.

    For plateau schedules the phases are the ladder of successive cuts (``updates`` is then
    per epoch) and the totals are None: they depend on when the plateaus come.
    """
    policy = GrowthPolicy(cfg, dataset_size, min_workers)
    baseline_cfg = replace(cfg, growth=replace(cfg.growth, mode="decay_lr"))
    notes = []
    if cfg.schedule.type == "plateau":
        phases = _ladder(policy)
        total: int | None = None
        baseline: int | None = None
        notes.append(
            f"plateau schedule: each row is one more cut (×{cfg.schedule.factor}); updates are "
            "per epoch at that rung; totals depend on when the plateaus come"
        )
    elif cfg.growth.mode == "adaptive":
        phases, total = _adaptive_ladder(policy), None
        _, baseline = _simulate(
            GrowthPolicy(baseline_cfg, dataset_size, min_workers), cfg.run.epochs
        )
    else:
        phases, total = _simulate(policy, cfg.run.epochs)
        _, baseline = _simulate(
            GrowthPolicy(baseline_cfg, dataset_size, min_workers), cfg.run.epochs
        )
    notes += _schedule_notes(cfg, policy) + _noise_notes(cfg)
    if cfg.growth.max_micro_batch == "auto":
        notes.append(
            "growth.max_micro_batch=auto is not resolved here (no probe of the training device "
            "cached): planned without a memory limit; `distgrow probe CONFIG` measures it"
        )
    cap_from = next((p.start_epoch for p in phases if p.capped), None)
    if cap_from is not None and cfg.growth.mode != "decay_lr":
        where = "" if plan_is_ladder(cfg) else f" from epoch {cap_from:.4g}"
        notes.append(
            f"the batch is capped at {policy.limits.cap}{where} (hybrid): the LR carries the rest "
            "of the decay from there"
        )
    adjustments = [
        name
        for name, on in (
            ("beta2_half_life", cfg.growth.beta2_half_life),
            ("weight_decay_timescale", cfg.growth.weight_decay_timescale),
        )
        if on
    ]
    return Plan(
        mode=cfg.growth.mode,
        schedule=cfg.schedule.type,
        dataset_size=dataset_size,
        epochs=cfg.run.epochs,
        base_batch=cfg.growth.base_batch,
        phases=phases,
        total_updates=total,
        baseline_total_updates=baseline,
        total_samples=dataset_size * cfg.run.epochs,
        ladder=plan_is_ladder(cfg),
        notes=notes,
        rule=policy.rule,
        adjustments=adjustments,
        cap_from_epoch=None if plan_is_ladder(cfg) else cap_from,
        warnings=growth_warnings(
            phases,
            mode=cfg.growth.mode,
            base_batch=cfg.growth.base_batch,
            dataset_size=dataset_size,
        ),
    )


def plan_is_ladder(cfg: Config) -> bool:
    """Plateau schedules and adaptive growth plan as a ladder of rungs, not as epoch ranges."""
    return cfg.schedule.type == "plateau" or cfg.growth.mode == "adaptive"


RULE_IDENTITIES = {
    "linear": "ε/B = lr0·r(t)/B0 kept (SGD noise scale; LR fixed, batch × 1/α)",
    "sqrt": "ε/√B = lr0·r(t)/√B0 kept (adaptive updates; LR × √α, batch × 1/α)",
}
"""What each ``growth.rule`` keeps at every update (α: the schedule's factor at a cut)."""

ADJUSTMENT_NOTES = {
    "beta2_half_life": "β₂ = β₂0^(B/B0): its half-life stays constant in samples",
    "weight_decay_timescale": "weight decay λ so that ε·λ/B is the baseline's: the decay's "
    "timescale stays constant in samples",
}


def _amount(x: float) -> str:
    """``x`` for a note: whole numbers with thousands separators (2,000,000 tokens)."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.6g}"


def _schedule_notes(cfg: Config, policy: GrowthPolicy) -> list[str]:
    """What the plan says about the warm-ups and a decay to zero."""
    s, g = cfg.schedule, cfg.growth
    unit = {"epoch": "epochs", "step": "baseline updates"}.get(s.interval, s.interval)
    notes = []
    if s.warmup:
        notes.append(
            f"LR warm-up ({s.warmup_shape}) over the first {_amount(s.warmup)} {unit}: it stays "
            f"an LR warm-up at the base batch (not converted); the {s.type} decay after it is"
        )
    if policy.rampup:
        notes.append(
            f"batch warm-up: {policy.rampup[0]} → {g.base_batch} in steps of "
            f"{g.rampup_increment or g.base_batch - policy.rampup[0]} over the first "
            f"{g.rampup_samples:,} samples, at the LR of the base batch (no conversion there)"
        )
    horizon = policy.time(cfg.run.epochs)
    end = s.warmup + (s.t_max if s.t_max is not None else horizon - s.warmup)
    floored = s.type in FLOORED and s.eta_min == 0
    if floored and end <= horizon and cfg.growth.mode != "decay_lr":
        notes.append(
            f"the {s.type} decay reaches 0 at t = {_amount(end)} {unit}: B* = B0/r(t) is unbounded "
            "there, so the cap takes over before it and the LR carries the decay to 0"
        )
    return notes


def plan_from_file(path: str, overrides: list[str] | None = None) -> Plan:
    """Load a config and plan it, with N from ``data.size`` or the known size of the data set."""
    cfg = load_config(path, overrides or [])
    return make_plan(cfg, cfg.expected_train_size())
