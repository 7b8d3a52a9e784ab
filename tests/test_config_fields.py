"""The config's rules live where its types are: on the fields and the sections' constraints.

Building a section, ``dataclasses.replace``, assigning a field and ``with_updates`` all check
ranges and rules, and `distgrow config --schema` publishes the same ranges that are enforced.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import distgrow.config as config_pkg
from distgrow.config import (
    Config,
    ConfigError,
    GrowthConfig,
    OptimConfig,
    ScheduleConfig,
    json_schema,
    load_config,
)
from distgrow.config.fields import Range, Section
from distgrow.launch import with_updates

SECTIONS: list[type[Any]] = [
    cls
    for cls in vars(config_pkg).values()
    if isinstance(cls, type) and issubclass(cls, Section) and cls is not Config
]


def _ranges(cls: type[Any]) -> list[tuple[str, Range]]:
    return [
        (name, r)
        for name, info in cls.__pydantic_fields__.items()
        for r in info.metadata
        if isinstance(r, Range)
    ]


def test_building_a_section_checks_its_ranges() -> None:
    with pytest.raises(ConfigError) as err:
        GrowthConfig(base_batch=-5)
    assert str(err.value) == "growth.base_batch = -5: must be positive. Fix: e.g. 128."
    with pytest.raises(ConfigError) as err:
        OptimConfig(lr=-1)
    assert str(err.value) == "optim.lr = -1.0: must be positive. Fix: e.g. optim.lr=0.1."
    assert GrowthConfig(base_batch=1).base_batch == 1  # the bound itself is allowed (ge=1)


def test_building_a_section_checks_its_rules() -> None:
    with pytest.raises(ConfigError, match=r"^growth\.max_global_batch = 64: is below"):
        GrowthConfig(base_batch=128, max_global_batch=64)
    with pytest.raises(ConfigError, match=r"^optim\.nesterov = True: Nesterov needs"):
        OptimConfig(name="adam", nesterov=True)
    with pytest.raises(ConfigError, match=r"^schedule\.milestones = \[\]: multistep needs"):
        ScheduleConfig(type="multistep")


def test_replace_and_assignment_check_again_and_keep_the_old_value() -> None:
    growth = GrowthConfig(max_global_batch=256)
    with pytest.raises(ConfigError, match=r"growth\.base_batch = 0: must be positive"):
        dataclasses.replace(growth, base_batch=0)
    with pytest.raises(ConfigError, match=r"max_global_batch = 256: is below .*\(512\)"):
        dataclasses.replace(growth, base_batch=512)
    with pytest.raises(ConfigError, match=r"max_global_batch = 256: is below .*\(512\)"):
        growth.base_batch = 512  # the rule is broken by the assignment: refused, value kept
    assert growth.base_batch == 128
    growth.base_batch = 256
    assert growth.base_batch == 256
    cfg = Config()
    with pytest.raises(ConfigError, match=r"schedule\.warmup = 20\.0: leaves no epoch"):
        dataclasses.replace(cfg, schedule=ScheduleConfig(warmup=20))  # a rule across sections
    with pytest.raises(ConfigError, match=r"schedule\.eta_min = 0\.5: is above optim\.lr"):
        cfg.schedule = ScheduleConfig(type="cosine", eta_min=0.5)
    assert cfg.schedule.type == "constant"


def test_a_type_error_stays_pydantics_with_the_value() -> None:
    with pytest.raises(ValidationError, match="finite"):
        OptimConfig(lr=math.nan)
    with pytest.raises(ValidationError, match="valid integer"):
        GrowthConfig(base_batch="3")  # type: ignore[arg-type]


def test_with_updates_checks_the_rules(tmp_path: Path) -> None:
    cfg = load_config(None, ["growth.base_batch=64"])
    assert with_updates(cfg, "growth", max_global_batch=512).growth.max_global_batch == 512
    with pytest.raises(ConfigError, match=r"growth\.max_global_batch = 32: is below .*\(64\)"):
        with_updates(cfg, "growth", max_global_batch=32)
    with pytest.raises(ConfigError, match=r"optim\.momentum = 1\.5: must be in \[0, 1\)"):
        with_updates(cfg, "optim", momentum=1.5)


def test_overrides_alone_wait_for_the_whole_config_for_rules(tmp_path: Path) -> None:
    # nesterov needs momentum > 0: the file gives it, the command line only nesterov
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  momentum: 0.9\n")
    assert load_config(path, ["optim.nesterov=true"]).optim.nesterov is True
    with pytest.raises(ConfigError, match=r"optim\.nesterov = True: Nesterov needs"):
        load_config(None, ["optim.nesterov=true"])


def test_a_cap_that_does_nothing_is_refused_where_written_not_in_a_derived_variant() -> None:
    with pytest.raises(ConfigError, match=r"caps grow_batch .*not growth\.mode=decay_lr"):
        load_config(None, ["growth.mode=decay_lr", "growth.noise_cap=2"])
    capped = load_config(None, ["growth.noise_cap=2"])
    baseline = dataclasses.replace(capped.growth, mode="decay_lr")  # the planner's baseline
    assert (baseline.mode, baseline.noise_cap) == ("decay_lr", 2.0)


def test_every_range_is_enforced_just_outside_each_bound() -> None:
    checked = 0
    for cls in SECTIONS:
        for name, r in _ranges(cls):
            integral = re.search(r"\bint\b", repr(cls.__pydantic_fields__[name].annotation))
            step = 1 if integral else 1e-9
            outside = [
                *([r.ge - step] if r.ge is not None else []),
                *([r.gt] if r.gt is not None else []),
                *([r.le + step] if r.le is not None else []),
                *([r.lt] if r.lt is not None else []),
            ]
            for value in outside:
                value = int(value) if integral else float(value)
                with pytest.raises(ConfigError) as err:
                    cls(**{name: value})
                assert str(err.value).startswith(f"{cls.KEY}.{name} = {value!r}: "), err.value
                assert str(err.value).endswith(f"Fix: {r.fix}.")
                checked += 1
    assert checked >= 60  # every section's ranges, not a few


def test_the_schema_carries_every_range_and_choice() -> None:
    defs = json_schema()["$defs"]
    for cls in SECTIONS:
        props = defs[cls.__name__]["properties"]
        for name, r in _ranges(cls):
            assert r.json_schema().items() <= props[name].items(), (cls.KEY, name)
    growth, optim, run = (
        defs[n]["properties"] for n in ("GrowthConfig", "OptimConfig", "RunConfig")
    )
    assert growth["base_batch"]["minimum"] == 1
    assert optim["lr"]["exclusiveMinimum"] == 0
    assert (optim["momentum"]["minimum"], optim["momentum"]["exclusiveMaximum"]) == (0, 1)
    assert (run["epochs"]["minimum"], run["epochs"]["maximum"]) == (1, 100_000)
    assert growth["mode"]["enum"] == [
        "decay_lr",
        "grow_batch",
        "grow_batch_lr",
        "grow_momentum",
        "adaptive",
    ]
    assert optim["name"]["enum"] == ["sgd", "adam", "adamw", "rmsprop"]


def test_no_config_module_is_over_600_lines() -> None:
    folder = Path(config_pkg.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert max(sizes.values()) <= 600, sizes
