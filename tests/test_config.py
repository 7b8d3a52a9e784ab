"""The config tree: YAML + overrides, and errors that name the key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distgrow.config import (
    Config,
    ConfigError,
    DataConfig,
    describe_fields,
    dump_config,
    load_config,
    parse_overrides,
)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_documented() -> None:
    cfg = load_config(None)
    assert cfg.growth.mode == "grow_batch"
    assert cfg.growth.max_dataset_fraction == 0.1  # the N/10 rule is on by default
    assert cfg.logging.wandb.mode == "offline"
    rows = describe_fields()
    keys = {r[0] for r in rows}
    for required in (
        "run.epochs", "run.seed", "run.output_dir", "data.name", "model.name", "optim.name",
        "optim.lr", "optim.momentum", "optim.weight_decay", "schedule.type", "growth.mode",
        "growth.base_batch", "growth.max_global_batch", "growth.max_dataset_fraction",
        "growth.max_workers", "growth.micro_batch", "growth.max_micro_batch",
        "growth.max_accum_steps", "backend.name", "launch.launcher", "logging.wandb.mode",
    ):  # fmt: skip
        assert required in keys
    undocumented = [r[0] for r in rows if not r[3]]
    assert undocumented == []


def test_overrides_parse_as_yaml_values() -> None:
    tree = parse_overrides(
        ["growth.max_global_batch=640", "growth.max_dataset_fraction=null", "optim.lr=5e-2",
         "schedule.milestones=[60, 120]", "run.resume=true", "run.name=abc"]
    )  # fmt: skip
    assert tree == {
        "growth": {"max_global_batch": 640, "max_dataset_fraction": None},
        "optim": {"lr": "5e-2"},  # YAML 1.1 needs a dot; the float field accepts it (below)
        "schedule": {"milestones": [60, 120]},
        "run": {"resume": True, "name": "abc"},
    }


def test_file_then_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "optim:\n  lr: 0.2\n  momentum: 0.9\ngrowth:\n  base_batch: 64\n")
    cfg = load_config(p, ["optim.lr=3e-1"])
    assert cfg.optim.lr == 0.3
    assert cfg.optim.momentum == 0.9
    assert cfg.growth.base_batch == 64
    assert isinstance(cfg.optim.lr, float)


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path: Path) -> None:
    p = write(tmp_path, "growth:\n  max_global_batchh: 640\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "growth.max_global_batchh" in msg
    assert str(p) in msg
    assert "max_global_batch" in msg.replace("max_global_batchh", "")


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'optimizer'.*did you mean optim"):
        load_config(write(tmp_path, "optimizer:\n  lr: 0.1\n"))


def test_unknown_key_in_override_names_the_command_line() -> None:
    with pytest.raises(ConfigError, match="'growth.max_batch' in the command-line overrides"):
        load_config(None, ["growth.max_batch=3"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=abc", "optim.lr = 'abc'.*expected float"),
        ("run.epochs=2.5", "run.epochs = 2.5.*expected int"),
        ("run.resume=1", "run.resume = 1.*expected bool"),
        ("model.hidden=[1, x]", r"model.hidden\[1\] = 'x'.*expected int"),
        ("growth.mode=grow", "growth.mode = 'grow'.*did you mean 'grow_batch'"),
        ("optim.name=sgdd", "optim.name = 'sgdd' .*not one of"),
        ("growth=5", "growth in the command-line overrides must be a section"),
    ],
)
def test_wrong_types(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["run.epochs=0"], r"run.epochs = 0: must be at least 1"),
        (["optim.lr=-0.1"], r"optim.lr = -0.1: must be positive"),
        (["optim.momentum=1.0"], r"optim.momentum = 1.0: must be in \[0, 1\)"),
        (["optim.name=adam", "optim.momentum=0.9"], "adam has no momentum"),
        (["optim.nesterov=true"], "Nesterov needs"),
        (["schedule.type=multistep", "schedule.milestones=[]"], "multistep needs milestones"),
        (["schedule.milestones=[120, 60]"], "strictly increasing"),
        (["schedule.milestones=[60]", "schedule.gamma=1.5"], r"gamma = 1.5: must be in \(0, 1\)"),
        (["schedule.type=plateau", "schedule.factor=2"], r"schedule.factor = 2.0"),
        (["growth.max_global_batch=64"], r"growth.max_global_batch = 64: is below .*128"),
        (["growth.max_dataset_fraction=0"], r"growth.max_dataset_fraction = 0.0"),
        (["growth.micro_batch=256", "growth.max_micro_batch=128"], "exceeds growth.max_micro"),
        (["growth.mode=grow_momentum"], "momentum variant needs an optimizer with momentum"),
        (["growth.mode=grow_momentum", "optim.momentum=0.99"], "growth.momentum = 0.98"),
        (["model.ghost_batch=48"], r"growth.micro_batch = 128: must be a multiple of .*48"),
        (["schedule.type=cyclic"], "not a decay and cannot be converted"),
        (["schedule.type=onecycle"], "warms the LR up"),
        (["data.val_fraction=1.0"], "data.val_fraction"),
        (["launch.master_port=70000"], "launch.master_port"),
        (["backend.zero_stage=3"], "backend.zero_stage = 3"),
    ],
)
def test_impossible_values_name_key_value_and_fix(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(None, ["schedule.type=multistep", "schedule.milestones=[5]", *overrides])
    assert "Fix:" in str(err.value)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="has no '='"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["optim..lr=1"])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["schedule.milestones=[3, 6]", "optim.momentum=0.9", "run.name=x"])
    p = tmp_path / "config.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert isinstance(yaml.safe_load(p.read_text()), dict)


def test_output_dir_expands_name() -> None:
    cfg = load_config(None, ["run.name=abc", "schedule.milestones=[1]"])
    assert cfg.run.resolved_output_dir == "runs/abc"
    assert isinstance(cfg, Config)


def test_expected_train_size() -> None:
    base = ["schedule.milestones=[1]"]
    assert load_config(None, [*base, "data.name=cifar10"]).data.expected_train_size() == 50_000
    assert (
        load_config(None, [*base, "data.name=fashion_mnist"]).data.expected_train_size() == 60_000
    )
    # covtype with the article's 25% held out: 581,012 - 145,253
    cov = load_config(None, [*base, "data.name=covtype", "data.val_fraction=0.25"])
    assert cov.data.expected_train_size() == 435_759
    assert load_config(None, [*base, "data.size=1234"]).data.expected_train_size() == 1234
    # An unknown name is refused when the config is read (plan and train alike); a
    # DataConfig built by hand still says how to size a set it cannot size.
    with pytest.raises(ConfigError, match=r"data\.name = 'mystery': unknown data set"):
        load_config(None, [*base, "data.name=mystery"])
    with pytest.raises(ConfigError, match="set data.size"):
        DataConfig(name="mystery").expected_train_size()


def test_yaml_booleans_map_back_to_literal_words() -> None:
    # YAML 1.1 reads `off` as false: logging.progress=off must still mean 'off'
    cfg = load_config(None, ["logging.progress=off"])
    assert cfg.logging.progress == "off"
    with pytest.raises(ConfigError, match="run.device = True"):
        load_config(None, ["run.device=yes"])  # no yes/on/true choice there: still an error
