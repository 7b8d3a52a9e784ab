"""`distgrow compare` for every convertible schedule type and interval: a real hybrid each time.

The hybrid is ``grow_batch`` with the cap :func:`~distgrow.report.hybrid_cap` picks: the batch
must grow above B0, then stop at the cap while the LR carries the rest of the decay. The unit
tests check that on the plans; the integration tests train each tiny config for real and check
every variant's update count against its plan.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distgrow.config import Config, dump_config, load_config
from distgrow.planner import make_plan
from distgrow.report import compare, hybrid_cap, variant_overrides

LR0 = 0.05
B0 = 16
EPOCHS = 3

TINY = [
    "data.name=synthetic_classification",
    "data.synthetic_samples=480",  # 384 training samples: 24 baseline updates per epoch
    "data.synthetic_features=8",
    "model.hidden=[16]",
    f"optim.lr={LR0}",
    "optim.momentum=0.9",
    f"growth.base_batch={B0}",
    "growth.max_dataset_fraction=null",
    "logging.every_steps=1000",
    "logging.wandb.mode=disabled",
    "run.threads=1",  # one OpenMP thread: a loaded machine runs several far slower
]

# Each schedule decays over the 3 epochs (72 baseline updates) enough to grow at least twice.
SCHEDULES: dict[str, list[str]] = {
    "step-epoch": ["schedule.type=step", "schedule.step_size=1", "schedule.gamma=0.5"],
    "step-step": ["schedule.type=step", "schedule.step_size=24", "schedule.gamma=0.5"],
    "multistep-epoch": ["schedule.type=multistep", "schedule.milestones=[1, 2]"],
    "multistep-step": ["schedule.type=multistep", "schedule.milestones=[24, 48]"],
    "exponential-epoch": ["schedule.type=exponential", "schedule.gamma=0.5"],
    "exponential-step": ["schedule.type=exponential", "schedule.gamma=0.97"],
    "time_based-epoch": ["schedule.type=time_based", "schedule.decay=1.0"],
    "time_based-step": ["schedule.type=time_based", "schedule.decay=0.05"],
    "cosine-epoch": ["schedule.type=cosine", "schedule.eta_min=0.001"],
    "cosine-step": ["schedule.type=cosine", "schedule.eta_min=0.0"],
    # Never better than the first epoch by 100: a cut at the end of every later epoch.
    "plateau-epoch": [
        "schedule.type=plateau",
        "schedule.factor=0.5",
        "schedule.patience=0",
        "schedule.threshold=100",
        "schedule.threshold_mode=abs",
        "run.epochs=4",
    ],
}


def tiny(name: str) -> list[str]:
    kind, interval = name.split("-")
    multistep_gamma = ["schedule.gamma=0.5"] if kind == "multistep" else []
    return [
        *TINY,
        f"run.name=tiny-{name}",
        f"run.epochs={EPOCHS}",
        f"schedule.interval={interval}",
        *multistep_gamma,
        *SCHEDULES[name],
    ]


def variant_config(overrides: list[str], variant: str) -> Config:
    cfg = load_config(None, overrides)
    return load_config(None, [*overrides, *variant_overrides(cfg, variant, size(cfg))])


def size(cfg: Config) -> int:
    return cfg.data.expected_train_size()


def plateau_updates(cfg: Config) -> int:
    """Updates of a plateau run whose every epoch after the first is a plateau."""
    rows = make_plan(cfg, size(cfg)).phases
    rungs = [max(0, e - 1) for e in range(cfg.run.epochs)]  # the cut lands at the epoch's end
    return sum(rows[min(r, len(rows) - 1)].updates for r in rungs)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_hybrid_grows_then_the_lr_carries_the_rest(name: str) -> None:
    overrides = tiny(name)
    cfg = load_config(None, overrides)
    n = size(cfg)
    cap = hybrid_cap(cfg, n)
    grow = make_plan(variant_config(overrides, "grow_batch"), n)
    hybrid = make_plan(variant_config(overrides, "hybrid"), n)
    grown = max(p.global_batch for p in grow.phases)
    assert B0 < cap < grown, (cap, grown)  # a cap the batch really reaches, below its top
    # grow_batch stops only at the data set (cosine to 0, the plateau ladder), far above
    assert all(p.global_batch == n for p in grow.phases if p.capped)
    assert max(p.global_batch for p in hybrid.phases) == cap
    capped = [p for p in hybrid.phases if p.capped]
    assert capped and all(p.global_batch == cap for p in capped)
    # the LR carries the rest of the decay: below lr0 by the noise left over at the cap
    last = capped[-1]
    assert last.lr_end < LR0
    assert last.lr == pytest.approx(LR0 * last.noise * cap / B0)
    # the uncapped phases keep lr0 wherever the batch is exact (piecewise) or within rounding
    for p in hybrid.phases:
        if not p.capped:
            assert p.lr <= LR0 * (1 + 1e-12)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_compare_runs_three_real_variants(
    name: str, tmp_path: Path, config_writer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = tiny(name)
    config = config_writer(yaml.safe_load(dump_config(load_config(None, overrides))))
    out = compare(config, out_dir=tmp_path / "cmp", echo=lambda line: None, python=sys.executable)
    rows = {r["label"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert list(rows) == ["decay_lr", "grow_batch", "hybrid"]
    cfg = load_config(None, overrides)
    n = size(cfg)
    for variant, row in rows.items():
        vcfg = variant_config(overrides, variant)
        if cfg.schedule.type == "plateau":
            expected: int | None = plateau_updates(vcfg)
        else:
            expected = make_plan(vcfg, n).total_updates
        assert row["total_updates"] == expected, variant
    assert rows["decay_lr"]["total_updates"] == cfg.run.epochs * math.ceil(n / B0)
    cap = hybrid_cap(cfg, n)
    assert rows["hybrid"]["max_global_batch"] == cap == rows["hybrid"]["final_batch"]
    assert B0 < cap < rows["grow_batch"]["final_batch"]
    assert (
        rows["decay_lr"]["total_updates"]
        > rows["hybrid"]["total_updates"]
        > rows["grow_batch"]["total_updates"]
    )
    # the hybrid's last epoch ran at the cap with the LR below lr0 (it carried the rest)
    records = [json.loads(x) for x in (out / "runs/hybrid/metrics.jsonl").open()]
    last_epoch = [r for r in records if r.get("kind") == "epoch"][-1]
    assert last_epoch["global_batch"] == cap and last_epoch["lr"] < LR0
