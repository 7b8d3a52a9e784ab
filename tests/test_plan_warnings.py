"""``distgrow plan`` warns per phase where the grown batch enters the region where growth lost
to ``decay_lr`` in the multi-seed evidence (docs/noise.md, distgrow/core/risk.py)."""

from __future__ import annotations

import json

import pytest

from distgrow.cli import main
from distgrow.config import load_config
from distgrow.core.risk import MAX_BATCH_FRACTION, growth_warnings, noise_kept
from distgrow.planner import make_plan

FMNIST = "configs/fashion_mnist_mlp.yaml"
# The issue's losing recipe: a set of a few thousand samples, MLP 512-512, SGD 0.1/0.9, B0 128,
# ×5 at epochs 10 and 20 of 30 (N = 5,140: the N/10 cap is the issue's batch 514).
ISSUE = ["run.epochs=30", "schedule.milestones=[10,20]"]
ISSUE_N = 5_140


def test_the_evidence_threshold_is_a_tenth_of_the_data() -> None:
    # docs/noise.md: every grown phase at or below N/10 stayed within the baseline's spread
    assert MAX_BATCH_FRACTION == 0.1


def test_the_issue_recipe_without_the_cap_warns_on_each_grown_phase() -> None:
    cfg = load_config(FMNIST, [*ISSUE, "growth.max_dataset_fraction=null"])
    plan = make_plan(cfg, ISSUE_N)
    assert [p.global_batch for p in plan.phases] == [128, 640, 3200]
    assert len(plan.warnings) == 2
    first, second = plan.warnings
    assert first.startswith("epochs 10–20: batch 640 is 0.12 N (N = 5,140), above 0.1 N")
    assert second.startswith("epochs 20–30: batch 3,200 is 0.62 N (N = 5,140), above 0.1 N")
    # the exact SGD noise ε(N/B − 1) kept against the baseline's: (N − B)/(N − B0)
    assert "is 90% of the baseline's" in first  # (5140 − 640)/(5140 − 128) = 0.898
    assert "is 39% of the baseline's" in second  # (5140 − 3200)/(5140 − 128) = 0.387
    for w in plan.warnings:  # what to do: a lower cap, the hybrid earlier, the noise cap
        assert "growth.max_dataset_fraction=0.1" in w
        assert "growth.max_global_batch=514" in w
        assert "growth.noise_cap=1" in w


def test_the_default_cap_keeps_the_issue_recipe_out_of_the_warned_region() -> None:
    plan = make_plan(load_config(FMNIST, ISSUE), ISSUE_N)
    assert [p.global_batch for p in plan.phases] == [128, 514, 514]
    assert plan.warnings == []


def test_a_safe_recipe_does_not_warn() -> None:
    # Fashion-MNIST, N = 60,000: 128 → 640 → 3,200 is at most 0.053 N
    plan = make_plan(load_config(FMNIST, []), 60_000)
    assert max(p.global_batch for p in plan.phases) == 3200
    assert plan.warnings == []


def test_the_baseline_and_batches_at_b0_never_warn() -> None:
    cfg = load_config(FMNIST, [*ISSUE, "growth.mode=decay_lr"])
    assert make_plan(cfg, 1_000).warnings == []
    # B0 itself above N/10 (a tiny set) is the user's baseline, not growth
    cfg = load_config(FMNIST, [*ISSUE, "growth.max_dataset_fraction=null"])
    warnings = make_plan(cfg, 1_000).warnings
    assert [w.split(":")[0] for w in warnings] == ["epochs 10–20", "epochs 20–30"]


def test_noise_kept_is_the_exact_noise_ratio() -> None:
    assert noise_kept(128, 128, 5_140) == 1.0
    assert noise_kept(5_140, 128, 5_140) == 0.0
    assert noise_kept(600, 128, 6_000) == pytest.approx(5_400 / 5_872)
    assert noise_kept(64, 128, 100) == 1.0  # N ≤ B0: nothing to compare


def test_growth_warnings_takes_the_threshold() -> None:
    plan = make_plan(load_config(FMNIST, []), 60_000)

    def warn(fraction: float) -> list[str]:
        return growth_warnings(
            plan.phases,
            mode="grow_batch",
            base_batch=128,
            dataset_size=60_000,
            max_fraction=fraction,
        )

    five = warn(0.05)
    assert [w.split(":")[0] for w in five] == ["epochs 10–15"]
    assert five[0].startswith("epochs 10–15: batch 3,200 is 0.05 N (N = 60,000), above 0.05 N")
    one = warn(0.01)
    assert [w.split(":")[0] for w in one] == ["epochs 5–10", "epochs 10–15"]


def test_plan_prints_the_warnings_and_json_holds_them(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", FMNIST, *ISSUE, "growth.max_dataset_fraction=null", "data.size=5140"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert [line.split(":")[1].strip() for line in lines] == ["epochs 10–20", "epochs 20–30"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [w.split(":")[0] for w in data["warnings"]] == ["epochs 10–20", "epochs 20–30"]
