"""Plans at the scale of a pre-training run: the same plan as the update-by-update walk, fast.

:func:`reference_simulate` is the planner's walk as it was before the bisection (one policy
question per update): the property test compares whole plans, byte for byte in JSON, over every
schedule type, interval, warm-up, batch warm-up and limit; the scale tests plan 10^10 samples
and 10^12 tokens with per-update schedules well under a second.
"""

from __future__ import annotations

import json
import math
import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import distgrow.core.plan as plan_module
from distgrow.config import Config, ConfigError, load_config
from distgrow.core.plan import Phase, _batch_to_ideal, _Span
from distgrow.planner import ACCUM_WINDOW, GrowthPolicy, Limits, Plan, Split, make_plan


def reference_simulate(policy: GrowthPolicy, epochs: int) -> tuple[list[Phase], int]:
    """The walk over every update (distgrow 0.x's ``_simulate``), kept as the oracle."""
    n = policy.dataset_size
    per_epoch = policy.cfg.schedule.interval == "epoch"
    continuous = policy.schedule.continuous
    phases: list[Phase] = []
    total = 0
    for epoch in range(epochs):
        position = 0
        while position < n:
            s = policy.setting(epoch, position)
            if per_epoch and not s.rampup:
                steps = math.ceil((n - position) / s.global_batch)
                samples = n - position
            else:
                steps, samples = 1, min(s.global_batch, n - position)
            start = epoch + position / n
            last = phases[-1] if phases else None
            same = last is not None and (
                last.split == s.split
                and last.capped == s.capped
                and last.warmup == s.warmup
                and last.rampup == s.rampup
                and (continuous or s.warmup or math.isclose(last.lr_end, s.lr, rel_tol=1e-12))
            )
            share = _batch_to_ideal(s)
            if last is not None and same:
                last.updates += steps
                last.samples += samples
                last.lr_end = s.lr
                last.batch_to_ideal = min(last.batch_to_ideal, share)
            else:
                phases.append(
                    Phase(
                        start_epoch=start,
                        end_epoch=start,
                        split=s.split,
                        lr=s.lr,
                        lr_end=s.lr,
                        momentum=s.momentum,
                        noise=s.ratio,
                        updates=steps,
                        samples=samples,
                        capped=s.capped,
                        batch_to_ideal=share,
                        warmup=s.warmup,
                        rampup=s.rampup,
                    )
                )
            phases[-1].end_epoch = epoch + (position + samples) / n
            total += steps
            position += samples
    return phases, total


def reference_largest(lim: Limits, target: int, w_lo: int) -> Split | None:
    """The realiser's search over every worker count and step (before its early exits)."""
    u = lim.multiple
    top_micro = None if lim.max_micro_batch is None else lim.max_micro_batch // u * u
    if top_micro == 0 or target < w_lo * u:
        return None
    one_pass = top_micro is None or target <= lim.max_workers * top_micro
    best, best_key = None, None
    for w in range(w_lo, lim.max_workers + 1):
        steps = [1]
        if not one_pass:
            assert top_micro is not None
            a_full = max(1, target // (w * top_micro))
            a_min = math.ceil(target / (w * top_micro))
            a_max = lim.max_accum_steps or a_min + ACCUM_WINDOW
            steps = [1, *range(max(2, min(a_full, a_max)), min(a_max, a_min + ACCUM_WINDOW) + 1)]
        for a in steps:
            micro = target // (w * a * u) * u
            micro = micro if top_micro is None else min(micro, top_micro)
            if micro == 0:
                continue
            busy = micro <= lim.micro_batch
            key = (w * a * micro, -a, int(busy), -w if busy else w)
            if best_key is None or key > best_key:
                best_key, best = key, Split(w * a * micro, w, micro, a)
    return best


@settings(max_examples=300, deadline=None)
@given(
    target=st.integers(1, 5000),
    max_workers=st.integers(1, 80),
    micro=st.integers(1, 16),
    max_micro=st.one_of(st.none(), st.integers(1, 32)),
    max_accum=st.one_of(st.none(), st.integers(1, 40)),
    multiple=st.sampled_from([1, 1, 2, 4]),
    w_lo=st.integers(1, 80),
)
def test_the_realisers_early_exits_choose_the_full_searchs_split(
    target: int,
    max_workers: int,
    micro: int,
    max_micro: int | None,
    max_accum: int | None,
    multiple: int,
    w_lo: int,
) -> None:
    lim = Limits(
        cap=10**6, max_workers=max_workers, micro_batch=micro, max_micro_batch=max_micro,
        max_accum_steps=max_accum, multiple=multiple,
    )  # fmt: skip
    assert lim._largest(target, w_lo) == reference_largest(lim, target, w_lo)


@settings(max_examples=300, deadline=None)
@given(
    target=st.integers(1, 3000),
    more=st.integers(1, 400),
    max_workers=st.integers(1, 40),
    micro=st.integers(1, 16),
    max_micro=st.one_of(st.none(), st.integers(1, 32)),
    max_accum=st.one_of(st.none(), st.integers(1, 40)),
    multiple=st.sampled_from([1, 1, 2, 4]),
    floor=st.integers(1, 40),
)
def test_a_larger_target_never_realises_a_smaller_batch(
    target: int,
    more: int,
    max_workers: int,
    micro: int,
    max_micro: int | None,
    max_accum: int | None,
    multiple: int,
    floor: int,
) -> None:
    """What the plan's span search relies on to skip the realiser (see ``_Span``)."""
    lim = Limits(
        cap=10**6, max_workers=max_workers, micro_batch=micro, max_micro_batch=max_micro,
        max_accum_steps=max_accum, multiple=multiple,
    )  # fmt: skip
    floor = min(floor, max_workers)
    low, high = lim.realise(target, floor), lim.realise(target + more, floor)
    assert (low.global_batch if low else 0) <= (high.global_batch if high else 0)


def test_a_batch_realised_from_a_larger_target_may_not_realise_itself() -> None:
    """Why the span search bounds growth by the target asked, not by the batch it got."""
    lim = Limits(
        cap=10**6, max_workers=3, micro_batch=4, max_micro_batch=None, max_accum_steps=None,
        multiple=4,
    )  # fmt: skip
    # 3 × 44 = 132 is under 95 % of 139: the search widens to 2 × 68 = 136; asked for 136,
    # 132 is within 5 %, and the three workers are kept
    assert lim.realise(139, 3) == Split(136, 2, 68, 1)
    assert lim.realise(136, 3) == Split(132, 3, 44, 1)
    cfg = load_config(
        None,
        ["schedule.type=linear", "schedule.interval=samples", "run.epochs=1",
         "growth.base_batch=132", "growth.max_workers=3", "growth.micro_batch=4",
         "model.ghost_batch=4", "schedule.eta_min=0"],
    )  # fmt: skip
    policy = GrowthPolicy(cfg, 20000, 1)
    first = policy.setting(0, 0)
    assert first.split == Split(132, 3, 44, 1)
    span = _Span(policy, 0, 0, first)
    assert span._grows(139) and not span._grows(136) and not span._grows(138)
    assert as_json(make_plan(cfg, 20000)) == as_json(reference_plan(cfg, 20000))


def reference_plan(cfg: Config, n: int, min_workers: int = 1) -> Plan:
    """``make_plan`` with the update-by-update walk in place of the bisection."""
    with mock.patch.object(plan_module, "_simulate", reference_simulate):
        return make_plan(cfg, n, min_workers)


def as_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# The same plan as the walk, over every schedule type
# ---------------------------------------------------------------------------------------------


def _schedule(kind: str, h: float, f: float, g: float, shape: str) -> list[str]:
    """Overrides for a ``kind`` schedule over a horizon of ``h`` units of t (f, g in (0, 1))."""
    if kind == "step":
        return [f"schedule.step_size={max(1.0, f * h / 2):.6g}", f"schedule.gamma={g:.3g}"]
    if kind == "multistep":
        ms = sorted({max(1, round(x * h)) for x in (f / 2, f, (1 + f) / 2)})
        return [f"schedule.milestones=[{','.join(map(str, ms))}]", f"schedule.gamma={g:.3g}"]
    if kind == "exponential":
        return [f"schedule.gamma={math.exp(math.log(g / 4) / h)!r}"]
    if kind == "time_based":
        return [f"schedule.decay={(1 + 20 * g) / h!r}"]
    if kind in ("cosine", "linear"):
        return [f"schedule.eta_min={0.0 if g < 0.4 else 0.001 * g:.3g}"]
    if kind == "inverse_sqrt":
        return [f"schedule.timescale={f * h / 4:.6g}"]
    if kind == "wsd":
        return [f"schedule.decay_length={f * h / 2:.6g}", f"schedule.decay_shape={shape}"]
    return []


KINDS = [
    "constant", "step", "multistep", "exponential", "time_based", "cosine", "linear",
    "inverse_sqrt", "wsd", "plateau",
]  # fmt: skip
MODES = ["grow_batch", "decay_lr", "grow_batch_lr", "grow_momentum", "adaptive"]


@st.composite
def configs(draw: st.DrawFn) -> tuple[Config, int, int]:
    kind = draw(st.sampled_from(KINDS))
    interval = draw(st.sampled_from(["epoch", "step", "samples", "tokens"]))
    n, b0 = draw(st.integers(50, 3000)), draw(st.sampled_from([4, 8, 12, 16, 32]))
    epochs, seq_len = draw(st.integers(1, 6)), 16
    h = {
        "epoch": epochs,
        "step": epochs * math.ceil(n / b0),
        "samples": epochs * n,
        "tokens": epochs * n * seq_len,
    }[interval]
    f, g = draw(st.floats(0.05, 0.95)), draw(st.floats(0.05, 0.95))
    shape = draw(st.sampled_from(["linear", "cosine", "sqrt"]))
    warm = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3]))
    mw = draw(st.integers(1, 6))
    limit = st.one_of(st.none(), st.sampled_from(["16", "32", "48"]))
    null = lambda x: "null" if x is None else x  # noqa: E731
    overrides = [
        f"schedule.type={kind}", *_schedule(kind, h * (1 - warm), f, g, shape),
        f"schedule.interval={interval}", f"run.epochs={epochs}", f"data.seq_len={seq_len}",
        "optim.lr=0.1", f"optim.momentum={draw(st.sampled_from([0.0, 0.9]))}",
        f"growth.mode={draw(st.sampled_from(MODES))}",
        "growth.lr_scale=2", "growth.momentum=0.95", f"growth.base_batch={b0}",
        f"growth.max_workers={mw}", f"growth.micro_batch={b0}",
        f"growth.max_micro_batch={null(draw(limit))}",
        f"growth.max_accum_steps={null(draw(st.one_of(st.none(), st.integers(1, 8))))}",
        f"growth.max_global_batch={null(draw(st.one_of(st.none(), st.sampled_from([64, 256]))))}",
        f"growth.max_dataset_fraction={null(draw(st.one_of(st.none(), st.just(0.25))))}",
        f"model.ghost_batch={draw(st.sampled_from(['null', 'null', '2', '4']))}",
        f"growth.noise_cap={draw(st.sampled_from(['null', 'null', 'null', '2']))}",
    ]  # fmt: skip
    if warm and (interval != "epoch" or epochs > 1):
        start = draw(st.sampled_from([0.0, 0.1]))
        overrides += [
            f"schedule.warmup={warm * h:.6g}",
            f"schedule.warmup_start={start}",
            f"schedule.warmup_shape={'exponential' if start else 'linear'}",
        ]
    if draw(st.booleans()) and b0 % 4 == 0:
        overrides += [
            f"growth.rampup_start_batch={b0 // 4}",
            f"growth.rampup_increment={b0 // 4}",
            f"growth.rampup_samples={draw(st.integers(1, 2 * n))}",
        ]
    try:
        cfg = load_config(None, overrides)
    except ConfigError:
        assume(False)
        raise
    return cfg, n, draw(st.integers(1, mw))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=configs())
def test_plans_are_the_update_by_update_walks(case: tuple[Config, int, int]) -> None:
    cfg, n, min_workers = case
    try:
        fast = make_plan(cfg, n, min_workers)
    except ConfigError:
        assume(False)  # B0 or a ramp size not realisable under these limits: tested elsewhere
        return
    assert as_json(fast) == as_json(reference_plan(cfg, n, min_workers))


@pytest.mark.parametrize(
    "config",
    ["lm_tiny", "cifar10_wrn16_4", "fashion_mnist_adam", "ionosphere_time_based"],
)
def test_the_shipped_configs_plan_as_the_walk_at_a_larger_scale(config: str) -> None:
    """Thousands to a hundred thousand updates per run: still the walk's plan exactly."""
    cfg = load_config(f"configs/{config}.yaml", ["data.size=60000"])
    assert as_json(make_plan(cfg, 60000)) == as_json(reference_plan(cfg, 60000))


# ---------------------------------------------------------------------------------------------
# Pre-training scale
# ---------------------------------------------------------------------------------------------


def _timed_plan(cfg: Config, n: int, min_workers: int = 1) -> tuple[Plan, float]:
    """The plan and the CPU seconds it took (on a shared machine the wall clock also counts
    the neighbours; benchmarks/plan_scale.py prints both)."""
    start = time.process_time()
    plan = make_plan(cfg, n, min_workers)
    return plan, time.process_time() - start


def _check_totals(plan: Plan, n: int, epochs: int, b0: int, ramp_updates: int = 0) -> None:
    assert plan.total_samples == sum(p.samples for p in plan.phases) == n * epochs
    total, baseline = plan.total_updates, plan.baseline_total_updates
    assert total is not None and baseline is not None
    assert total == sum(p.updates for p in plan.phases) and total < baseline
    assert epochs * math.ceil(n / b0) <= baseline <= epochs * math.ceil(n / b0) + ramp_updates
    batches = [p.global_batch for p in plan.phases]
    assert batches == sorted(batches) and batches[-1] >= 64 * b0
    ends = [p.end_epoch for p in plan.phases]
    assert ends == sorted(ends) and ends[-1] == epochs


def test_ten_billion_samples_per_step_cosine_plan_well_under_a_second() -> None:
    n = 10**10
    cfg = load_config(
        "configs/lm_tiny.yaml",
        [f"data.size={n}", "schedule.eta_min=0", "growth.max_workers=64", "growth.micro_batch=8",
         "growth.max_micro_batch=32", "growth.max_accum_steps=64", "model.ghost_batch=null"],
    )  # fmt: skip
    plan, seconds = _timed_plan(cfg, n, min_workers=8)
    _check_totals(plan, n, 2, 8)
    assert plan.baseline_total_updates == 2_500_000_000
    assert seconds < 1.0, f"{seconds:.2f} s for {plan.baseline_total_updates:,} baseline updates"


def test_a_trillion_tokens_per_token_wsd_plan_well_under_a_second() -> None:
    seq_len, n = 4096, 244_140_625  # 10^12 tokens in one epoch
    cfg = load_config(
        None,
        ["schedule.type=wsd", "schedule.interval=tokens", f"data.seq_len={seq_len}",
         "schedule.warmup=2000000000", "schedule.decay_length=200000000000",
         "run.epochs=1", "optim.name=adamw", "optim.lr=0.0003", "growth.base_batch=256",
         "growth.max_workers=256", "growth.micro_batch=4", "growth.max_micro_batch=8",
         "growth.rampup_start_batch=64", "growth.rampup_increment=64",
         "growth.rampup_samples=2000000", "growth.max_global_batch=16384"],
    )  # fmt: skip
    plan, seconds = _timed_plan(cfg, n, min_workers=64)
    assert plan.total_samples * seq_len == 10**12
    _check_totals(plan, n, 1, 256, ramp_updates=2_000_000 // 64)
    assert sorted({p.global_batch for p in plan.phases if p.rampup}) == [64, 128, 192]
    assert plan.phases[-1].global_batch == 16384 and plan.phases[-1].capped
    assert seconds < 1.0, f"{seconds:.2f} s for {plan.baseline_total_updates:,} baseline updates"
