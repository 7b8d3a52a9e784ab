"""The config tree: YAML + overrides, and errors that name the key, the value and the fix."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distgrow.config import (
    Config,
    ConfigError,
    DataConfig,
    config_from_dict,
    describe_fields,
    dump_config,
    json_schema,
    load_config,
    parse_overrides,
)
from distgrow.config.schema import MAX_EPOCHS
from distgrow.planner import make_plan

ROOT = Path(__file__).resolve().parent.parent


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


def test_keys_that_are_not_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^unknown key 'run.1' in .*valid keys here are name,"):
        load_config(write(tmp_path, "run:\n  1: 2\n"))
    with pytest.raises(ConfigError, match=r"^unknown key 'True' in .*valid keys here are run,"):
        load_config(write(tmp_path, "yes: 2\n"))


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
        (["schedule.type=warmup"], "set schedule.warmup"),
        (["schedule.type=wsd"], "wsd needs a positive length"),
        (["schedule.type=wsd", "schedule.decay_length=5", "schedule.t_max=3"], "longer than"),
        (["schedule.type=linear", "schedule.eta_min=0.5"], "a linear from lr0 to eta_min"),
        (["schedule.interval=tokens"], "set data.seq_len"),
        (["schedule.warmup=-1"], r"schedule.warmup = -1.0: must be >= 0"),
        (["schedule.warmup=10"], "leaves no epoch of the 10"),
        (["schedule.warmup=2", "schedule.warmup_shape=exponential"], "cannot start from 0"),
        (["schedule.type=inverse_sqrt", "schedule.timescale=0"], "schedule.timescale = 0"),
        (["growth.beta2_half_life=true"], "needs an optimizer with betas, not sgd"),
        (["growth.weight_decay_timescale=true", "optim.name=adam"], "needs decoupled"),
        (
            ["growth.mode=grow_momentum", "optim.momentum=0.9", "growth.rule=sqrt"],
            "no square-root form",
        ),
        (["growth.rampup_start_batch=128"], "rampup_start_batch = 128: must be between"),
        (
            [
                "growth.rampup_start_batch=32",
                "growth.rampup_increment=40",
                "growth.rampup_samples=100",
            ],
            "must divide base_batch − rampup_start_batch \\(96\\)",
        ),
        (["growth.rampup_start_batch=32"], "needs a positive number of samples"),
        (["growth.rampup_samples=100"], "needs a start batch"),
        (
            [
                "growth.rampup_start_batch=32",
                "growth.rampup_samples=100",
                "growth.mode=grow_batch_lr",
            ],
            "already starts with a larger batch",
        ),
        (["data.val_fraction=1.0"], "data.val_fraction"),
        (["launch.master_port=70000"], "launch.master_port"),
        (["backend.zero_stage=4"], "backend.zero_stage = 4"),
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
    # An unknown name is refused when the config is read (plan and train alike) and when a
    # DataConfig is built by hand; your own data set's size is not known without loading it.
    with pytest.raises(ConfigError, match=r"data\.name = 'mystery': unknown data set"):
        load_config(None, [*base, "data.name=mystery"])
    with pytest.raises(ConfigError, match=r"data\.name = 'mystery': unknown data set"):
        DataConfig(name="mystery")
    with pytest.raises(ConfigError, match="set data.size"):
        DataConfig(name="my_pkg.data:build").expected_train_size()


def test_yaml_booleans_map_back_to_literal_words() -> None:
    # YAML 1.1 reads `off` as false: logging.progress=off must still mean 'off'
    cfg = load_config(None, ["logging.progress=off"])
    assert cfg.logging.progress == "off"
    with pytest.raises(ConfigError, match="run.device = True"):
        load_config(None, ["run.device=yes"])  # no yes/on/true choice there: still an error


def test_sections_stay_dataclasses() -> None:
    """replace/asdict/fields on the config work as the trainer, planner and report use them."""
    cfg = load_config(None, ["growth.base_batch=64"])
    grown = dataclasses.replace(cfg, growth=dataclasses.replace(cfg.growth, mode="decay_lr"))
    assert (grown.growth.mode, grown.growth.base_batch, cfg.growth.mode) == (
        "decay_lr",
        64,
        "grow_batch",
    )
    assert dataclasses.asdict(cfg)["growth"]["base_batch"] == 64
    assert "base_batch" in {f.name for f in dataclasses.fields(cfg.growth)}
    with pytest.raises(ValueError, match="finite"):  # replace re-checks the types
        dataclasses.replace(cfg.optim, lr=math.nan)
    with pytest.raises(ValueError, match="finite"):  # and so does an assignment
        cfg.optim.lr = math.inf
    assert cfg.optim.lr == 0.1


# -- every number finite and in range ---------------------------------------------------------


def _numeric_keys() -> list[tuple[str, str]]:
    """(key, base type) of every int/float setting, list items included, read off the schema."""
    keys = []
    for key, tp, _default, _doc in describe_fields():
        for base in ("int", "float"):
            if tp in (base, f"{base} | null", f"list[{base}]"):
                keys.append((key, tp))
    return keys


NUMERIC_KEYS = _numeric_keys()
NON_FINITE = [math.nan, math.inf, -math.inf]


def _nested(key: str, value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def test_the_numeric_keys_are_all_found() -> None:
    keys = {k for k, _ in NUMERIC_KEYS}
    assert {"run.epochs", "optim.lr", "optim.eps", "growth.lr_scale", "optim.betas"} <= keys
    assert "schedule.milestones" in keys and "model.hidden" in keys
    assert len(keys) >= 40


@pytest.mark.parametrize(("key", "tp"), [k for k in NUMERIC_KEYS if "float" in k[1]])
@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_by_every_float_key(key: str, tp: str, bad: float) -> None:
    value = [bad] if tp.startswith("list") else bad
    shown = f"{key}[0]" if tp.startswith("list") else key
    # as YAML (.nan / .inf in a file)
    with pytest.raises(ConfigError) as err:
        config_from_dict(_nested(key, value), source="c.yaml")
    assert str(err.value).startswith(f"{shown} = {bad!r} in c.yaml: must be a finite number")
    assert "Fix:" in str(err.value)
    # as an override, spelled the way people type them
    word = {"nan": "nan", "inf": "inf", "-inf": "-inf"}[repr(bad)]
    typed = f"[{word}]" if tp.startswith("list") else word
    with pytest.raises(ConfigError, match=rf"^{re.escape(shown)} = {bad!r} in the command-line"):
        load_config(None, [f"{key}={typed}"])


def test_non_finite_in_a_yaml_file(tmp_path: Path) -> None:
    for text in ("optim:\n  lr: .nan\n", "optim:\n  lr: .inf\n", "optim:\n  lr: 1e400\n"):
        with pytest.raises(ConfigError, match=r"optim.lr = (nan|inf) in .*must be a finite"):
            load_config(write(tmp_path, text))


EXTREMES: list[Any] = [
    *NON_FINITE, 0, -1, 1, 1e-308, -1e-308, 1e308, -1e308, 10**21, -(10**21), 2**63, 2**64,
    MAX_EPOCHS + 1, 0.5, 1.5,
]  # fmt: skip
BASES = [
    [],
    ["schedule.type=step"],
    ["schedule.type=exponential", "schedule.gamma=0.9"],
    ["schedule.type=time_based", "schedule.decay=0.1"],
    ["schedule.type=cosine", "schedule.interval=step"],
    ["schedule.type=multistep", "schedule.milestones=[2, 4]"],
    ["schedule.type=plateau"],
    ["growth.mode=grow_momentum", "optim.momentum=0.9"],
]


@settings(
    max_examples=int(os.environ.get("DISTGROW_HYPOTHESIS_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    key=st.sampled_from(NUMERIC_KEYS),
    value=st.one_of(
        st.sampled_from(EXTREMES),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**25), max_value=10**25),
    ),
    base=st.sampled_from(BASES),
)
def test_extreme_numbers_are_refused_in_one_line_or_plan(
    key: tuple[str, str], value: Any, base: list[str]
) -> None:
    """Any number, at any numeric key: a one-line error naming a key, or a finite config whose
    plan is made in bounded time (no hang on 10^21 epochs, no exception other than ours)."""
    name, tp = key
    written = [value] if tp.startswith("list") else value
    try:
        cfg = config_from_dict(_nested(name, written), base, source="c.yaml")
    except ConfigError as err:
        msg = str(err)
        event("refused")
        assert "\n" not in msg and "Fix:" in msg
        assert re.match(r"^[a-z_]+(\.[a-z_]+)+(\[\d+\])? (=|in) ", msg), msg  # names a key
        if isinstance(value, float) and not math.isfinite(value):
            assert msg.startswith(name)  # the key's own message, never a later rule
        return
    flat = dataclasses.asdict(cfg)
    for section in flat.values():
        for v in section.values() if isinstance(section, dict) else ():
            for x in v if isinstance(v, list) else [v]:
                assert not isinstance(x, float) or math.isfinite(x)
    assert cfg.run.epochs <= MAX_EPOCHS
    try:
        n = cfg.data.expected_train_size()
        if cfg.schedule.interval == "step" and cfg.run.epochs * n // cfg.growth.base_batch > 10**6:
            return  # a legitimately long plan (one row per update): not what this test is for
        make_plan(cfg, n)
        event("planned")
    except ConfigError as err:
        event("plan refused")
        assert "\n" not in str(err)


# -- the run directory is the run's own -------------------------------------------------------


@pytest.mark.parametrize("name", [".", "..", "/tmp/x", "a/b", "../up", "a\\b", "", "  ", "C:run"])
def test_run_name_must_be_a_plain_folder_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^run.name = .*plain folder name.*Fix: e.g."):
        config_from_dict({"run": {"name": name}})


@pytest.mark.parametrize("output_dir", [".", "./", "", "..", "/", "{name}/.."])
def test_output_dir_is_never_the_users_directory(output_dir: str) -> None:
    with pytest.raises(ConfigError, match=r"^run.output_dir = .*current directory.*Fix:"):
        config_from_dict({"run": {"output_dir": output_dir}})


def test_plain_names_and_dirs_still_load() -> None:
    cfg = config_from_dict({"run": {"name": "cifar-10_v2.1", "output_dir": "./out/{name}"}})
    assert cfg.run.resolved_output_dir == "./out/cifar-10_v2.1"
    assert config_from_dict({"run": {"output_dir": "/abs/run"}}).run.resolved_output_dir == (
        "/abs/run"
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.eps=0"], r"^optim.eps = 0.0: must be positive"),
        (["growth.lr_scale=0"], r"^growth.lr_scale = 0.0: must be positive"),
        (["growth.lr_scale=-2"], r"^growth.lr_scale = -2.0: must be positive"),
        ([f"run.epochs={MAX_EPOCHS + 1}"], rf"^run.epochs = {MAX_EPOCHS + 1}: must be at most"),
        (["run.epochs=1000000000000000000000"], r"^run.epochs = 10{21} .*must fit in 64 bits"),
        (["growth.max_workers=10000000"], r"^growth.max_workers = 10000000: must be at most"),
        (["run.seed=-9223372036854775809"], r"^run.seed = .*must fit in 64 bits"),
        (["data.synthetic_samples=1000000000000"], r"^data.synthetic_samples = .*not fit"),
    ],
)
def test_out_of_range_numbers(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(None, overrides)
    assert "Fix:" in str(err.value)


# -- files that are not configs ---------------------------------------------------------------


def test_empty_file_is_refused(tmp_path: Path) -> None:
    for text in ("", "\n", "# only a comment\n"):
        with pytest.raises(ConfigError, match=r"holds no settings.*would train the defaults"):
            load_config(write(tmp_path, text))


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 16\)"):
        load_config(p)


# -- the JSON Schema editors use --------------------------------------------------------------


def _check(schema: dict[str, Any], node: dict[str, Any], value: Any, where: str) -> list[str]:
    """A small JSON Schema check (the subset pydantic emits), to test the schema without a
    validator package: types, enums, bounds, $ref, anyOf, items, additionalProperties."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    if "anyOf" in node:
        tries = [_check(schema, n, value, where) for n in node["anyOf"]]
        return [] if any(not t for t in tries) else tries[0]
    kind = node.get("type")
    ok = {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
        None: True,
    }[kind]
    if not ok:
        return [f"{where}: {value!r} is not {kind}"]
    if "enum" in node and value not in node["enum"]:
        return [f"{where}: {value!r} not in {node['enum']}"]
    if kind == "integer" and not node.get("minimum", value) <= value <= node.get("maximum", value):
        return [f"{where}: {value} out of bounds"]
    errors: list[str] = []
    if kind == "object":
        props = node.get("properties", {})
        for k, v in value.items():
            if k not in props:
                errors.append(f"{where}.{k}: unknown key")
            else:
                errors += _check(schema, props[k], v, f"{where}.{k}")
    if kind == "array":
        for i, v in enumerate(value):
            errors += _check(schema, node.get("items", {}), v, f"{where}[{i}]")
    return errors


def test_json_schema_describes_every_key_and_accepts_every_shipped_config() -> None:
    schema = json_schema()
    assert schema["$schema"].endswith("/draft/2020-12/schema")
    assert schema["additionalProperties"] is False
    growth = schema["$defs"]["GrowthConfig"]
    assert growth["additionalProperties"] is False
    assert growth["properties"]["base_batch"]["type"] == "integer"
    assert growth["properties"]["base_batch"]["default"] == 128
    assert growth["properties"]["mode"]["enum"] == [
        "decay_lr", "grow_batch", "grow_batch_lr", "grow_momentum", "adaptive"
    ]  # fmt: skip
    assert "B0" in growth["properties"]["base_batch"]["description"]
    # every key `distgrow config` lists is in the schema, with its documentation
    for key, _tp, _default, doc in describe_fields():
        node: dict[str, Any] = schema
        for part in key.split("."):
            if "$ref" in node:
                node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
            node = node["properties"][part]
        assert node["description"] == doc, key
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for path in files:
        data = yaml.safe_load(path.read_text())
        assert _check(schema, schema, data, path.name) == [], path.name
    assert _check(schema, schema, {"growth": {"max_global_batchh": 640}}, "c") == [
        "c.growth.max_global_batchh: unknown key"
    ]
    assert _check(schema, schema, {"optim": {"name": "sgdd"}}, "c") != []
