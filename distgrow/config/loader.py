"""Loading: a YAML file plus dotted ``key=value`` overrides become a checked :class:`Config`.

pydantic does the type checking (see :mod:`distgrow.config.schema`); this module reads the
file, parses the overrides, merges them, and turns the first of pydantic's errors into one
line naming the key, the value, where it was written and the fix. Loading checks three things
before anything runs, each failure a :class:`ConfigError`:

1. keys: an unknown key is an error naming the key, the file (or the command line) and the
   closest valid keys;
2. types: values are checked against the field's annotation (``int``, ``float``, ``bool``,
   ``str``, ``Literal[...]``, ``X | None``, ``list[...]``, nested sections), and every float
   is finite;
3. values: each field's range and the rules between fields, checked as the sections are built
   (:mod:`distgrow.config.fields`); their :class:`ConfigError` is passed on as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import TypeAdapter, ValidationError

from distgrow.config.fields import VALUES_ONLY, WRITTEN
from distgrow.config.schema import NOT_DECAYS, Config, ConfigError
from distgrow.entrypoints import EntryPointError, absolute_entry_point, is_entry_point

# Keys that may name user code; a relative .py path in them is made absolute at load time.
ENTRY_POINT_KEYS = (("model", "name"), ("data", "name"), ("loss", "name"), ("loss", "metric"))

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


@functools.cache
def _adapter() -> TypeAdapter[Config]:
    # Built once, on first use: `distgrow plan` pays for it only when it loads a config.
    return TypeAdapter(Config)


def _strip(tp: Any) -> Any:
    """The type under ``Annotated[...]`` (pydantic's metadata is not the user's business)."""
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def _fields(cls: Any) -> dict[str, Any]:
    """Field name -> pydantic's FieldInfo of a config section, in declaration order."""
    return typing.cast(dict[str, Any], cls.__pydantic_fields__)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    tp = _strip(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _locate(loc: tuple[int | str, ...]) -> tuple[str, Any, Any]:
    """(dotted key, annotation at the key, the section holding it) for a pydantic error loc.

    Union members add tags to the loc (``'int'``, ``'none'``); only field names and list
    indices name the user's key, so the rest is skipped.
    """
    key, tp, section = "", Any, None
    current: Any = Config
    for part in loc:
        bare = _strip(current)
        if get_origin(bare) in (Union, types.UnionType):
            # Optional sections or lists: follow the member that can hold the next part.
            members = [m for m in get_args(bare) if m is not type(None)]
            bare = _strip(members[0]) if len(members) == 1 else bare
        if isinstance(part, int) and get_origin(bare) is list:
            key, current = f"{key}[{part}]", get_args(bare)[0]
        elif isinstance(part, str) and _is_section(bare):
            section = bare
            key = f"{key}.{part}" if key else part
            info = _fields(bare).get(part)
            if info is None:  # an unknown key: nothing below it
                return key, Any, section
            current = info.annotation
        # anything else is a union tag: the key stays as it is
    tp = current
    return key, tp, section


def _explain(err: Mapping[str, Any], source: str) -> ConfigError:
    """One of pydantic's errors as the line a user can act on."""
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):  # a range or a rule: its own words already
        return cause
    key, tp, section = _locate(tuple(err["loc"]))
    kind, value = err["type"], err.get("input")
    if kind == "invalid_key":  # a key YAML read as a number or a bool: not a setting's name
        parent, parent_tp, _ = _locate(tuple(err["loc"])[:-1])
        leaf = str(value)
        key = f"{parent}.{leaf}" if parent else leaf
        section = _strip(parent_tp) if _is_section(_strip(parent_tp)) else Config
    if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        names = list(_fields(section or Config))
        leaf = key.rsplit(".", 1)[-1]
        near = difflib.get_close_matches(leaf, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        return ConfigError(
            f"unknown key '{key}' in {source}. Fix: {hint}valid keys here are {', '.join(names)}."
        )
    if kind in ("dataclass_type", "dataclass_args_type"):
        return ConfigError(
            f"{key} in {source} must be a section (a mapping of keys), got {value!r}. "
            f"Fix: write it as '{key}: {{...}}' or use dotted keys like {key}.<name>=..."
        )
    if kind == "literal_error":
        choices_of = _strip(tp)
        if get_origin(choices_of) in (Union, types.UnionType):
            choices_of = next(a for a in get_args(choices_of) if get_origin(a) is Literal)
        words = get_args(choices_of)
        near = difflib.get_close_matches(str(value), [str(a) for a in words], n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return ConfigError(
            f"{key} = {value!r} in {source} is not one of {', '.join(map(repr, words))}. "
            f"Fix: {hint}use one of them."
        )
    if kind == "finite_number":
        return ConfigError(
            f"{key} = {value!r} in {source}: must be a finite number (not nan or inf). "
            "Fix: give a finite value."
        )
    if kind in ("greater_than_equal", "less_than_equal"):
        return ConfigError(
            f"{key} = {value!r} in {source}: must fit in 64 bits (|value| < 2^63). "
            "Fix: give a realistic count."
        )
    if key == "" or tp is Any:  # keys that are not strings, and the like
        return ConfigError(
            f"{key or 'the config'} in {source}: {err['msg']}. "
            "Fix: see `distgrow config` for every key."
        )
    # A wrong type. An optional value that is not null failed as its non-null type: name that.
    shown = _strip(tp)
    if value is not None and get_origin(shown) in (Union, types.UnionType):
        members = [a for a in get_args(shown) if a is not type(None)]
        shown = members[0] if len(members) == 1 else shown
    name = _type_name(shown)
    return ConfigError(
        f"{key} = {value!r} in {source}: expected {name}, got {type(value).__name__}. "
        f"Fix: give a value of type {name}."
    )


def _build(data: Mapping[str, Any], source: str, values_only: bool = False) -> Config:
    """``data`` as a checked :class:`Config`; ``values_only``: leave the rules between values
    to the whole config (a part of it, such as the overrides, may break them alone)."""
    try:
        return _adapter().validate_python(data, context={VALUES_ONLY: values_only, WRITTEN: True})
    except ValidationError as err:
        raise _explain(err.errors()[0], source) from None


# A config holds hundreds of values. Anchors and aliases may repeat a section, but not multiply
# a few lines into billions of values (the "billion laughs": nine aliases, nine deep, are 10^9
# strings), which whatever walks the result (validation, a message, the run's config.yaml) would
# try to hold in memory. Expansion beyond this many values (and beyond what is written out) is
# refused when the file is read.
MAX_YAML_VALUES = 1_000_000


class YamlExpansionError(yaml.YAMLError):
    """A YAML document whose aliases expand beyond :data:`MAX_YAML_VALUES` or into themselves."""


def _expanded_size(root: yaml.Node) -> int:
    """The values of the document ``root`` with every alias expanded.

    A document written out at length may be as large as it is; aliases may not make it larger
    than :data:`MAX_YAML_VALUES`. Each node is measured once (aliases share their anchor's
    node), so this costs as much as the text, not as the expansion.

    Raises:
        YamlExpansionError: an alias inside its own anchor (an infinite value), or an expansion
            beyond :data:`MAX_YAML_VALUES` (naming the line of the smallest such value).
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YamlExpansionError(
                f"the value at line {node.start_mark.line + 1} contains an alias of itself "
                "(an infinite value). Fix: write the value out without that alias."
            )
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        sizes[key] = total
        if total > MAX_YAML_VALUES and total > len(sizes):
            raise YamlExpansionError(
                f"its aliases expand the value at line {node.start_mark.line + 1} to {total:,} "
                f"values (more than {MAX_YAML_VALUES:,}: a 'billion laughs'). Fix: write the "
                "values out, or use fewer nested aliases."
            )
        return total

    return size(root)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that measures a document's expansion before building it."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node)
        return super().construct_document(node)


def safe_load(text: str) -> Any:
    """``yaml.safe_load``, refusing aliases that expand beyond :data:`MAX_YAML_VALUES`.

    Raises:
        YamlExpansionError: the expansion is too large or infinite, or the values nest deeper
            than PyYAML (recursive) can follow; nothing is built.
        yaml.YAMLError: the text is not valid YAML.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: no Python objects
    except RecursionError:
        raise YamlExpansionError(
            f"its values nest deeper than the {sys.getrecursionlimit()} levels it can read. "
            "Fix: nest lists and mappings less deeply."
        ) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own message spans several)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def read_yaml_file(path: Path) -> tuple[Any, str | None]:
    """A YAML file's tree through the bounded :func:`safe_load`, or what is wrong with it.

    Returns:
        ``(tree, None)``; or ``(None, problem)`` where the file cannot be read, is not valid
        YAML, is an alias bomb or is empty, the problem phrased to follow "<path> is ...".
    """
    try:
        tree = safe_load(path.read_text(encoding="utf-8"))
    except YamlExpansionError as err:
        return None, f"refused: {err}"
    except yaml.YAMLError as err:
        return None, f"not valid YAML: {_yaml_problem(err)}"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"unreadable ({type(err).__name__}: {' '.join(str(err).split())})"
    if tree is None:
        return None, "empty (or only comments)"
    return tree, None


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["growth.base_batch=256", "optim.lr=0.05"]`` into a nested dict.

    Values are parsed as YAML, so ``640`` is an int, ``null`` is None, ``[60, 120]`` a list and
    ``true`` a bool; quote a string that would parse otherwise (``run.name='"0.1"'``).
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} has no '='. Fix: write overrides as dotted.key=value, "
                "e.g. growth.max_global_batch=640."
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key. Fix: e.g. optim.lr=0.1.")
        try:
            value = safe_load(raw) if raw.strip() else ""
        except YamlExpansionError as err:
            raise ConfigError(f"override {key!r} is refused: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}). "
                "Fix: quote it, e.g. run.name='\"a: b\"'."
            ) from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r} conflicts with an earlier override of {part}."
                )
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _absolute_entry_points(
    data: dict[str, Any], over: Mapping[str, Any], base_dir: Path | None
) -> dict[str, Any]:
    """``data`` with relative ``file.py:function`` paths made absolute.

    A value from the file is relative to the file's folder (``base_dir``), one from the
    command line to the working directory: each where its writer stood. The run's
    ``config.yaml`` then finds the file from anywhere (relaunch, resume, compare).
    """
    for section, key in ENTRY_POINT_KEYS:
        node = data.get(section)
        if not isinstance(node, Mapping) or not isinstance(node.get(key), str):
            continue  # a wrong type is reported by the type check
        from_cli = isinstance(over.get(section), Mapping) and key in over[section]
        base = Path.cwd() if from_cli or base_dir is None else base_dir
        try:
            absolute = absolute_entry_point(f"{section}.{key}", node[key], base)
        except EntryPointError as err:
            raise ConfigError(str(err)) from None
        data[section] = {**node, key: absolute}
    return data


# Sections whose ``kwargs`` are those of a ``name`` entry point (a built-in takes none).
KWARGS_OF_ENTRY_POINTS = ("model", "data")


def _cleared_kwargs(over: dict[str, Any]) -> list[str]:
    """The sections whose ``kwargs=null`` override clears them (``{}``, not a merge into the
    file's); ``over`` gets ``{}`` in place of the null."""
    cleared = []
    for section in ("model", "data", "loss"):
        node = over.get(section)
        if isinstance(node, dict) and "kwargs" in node and node["kwargs"] is None:
            node["kwargs"] = {}
            cleared.append(section)
    return cleared


def _leave_entry_points(
    merged: dict[str, Any], data: Mapping[str, Any], over: Mapping[str, Any]
) -> dict[str, Any]:
    """An override of ``model.name`` (or ``data.name``) from an entry point to a built-in drops
    the file's ``kwargs`` of that entry point, which no longer apply (kwargs given on the
    command line stay, and are checked against the built-in)."""
    for section in KWARGS_OF_ENTRY_POINTS:
        new, old = over.get(section), data.get(section)
        if not (isinstance(new, Mapping) and isinstance(old, Mapping)):
            continue
        if not isinstance(new.get("name"), str):
            continue
        was = old.get("name")
        if isinstance(was, str) and is_entry_point(was) and not is_entry_point(new["name"]):
            kept = {k: v for k, v in merged[section].items() if k != "kwargs"}
            merged[section] = {**kept, **({"kwargs": new["kwargs"]} if "kwargs" in new else {})}
    return merged


def config_from_dict(
    data: Mapping[str, Any],
    overrides: Iterable[str] = (),
    source: str = "the config",
    base_dir: Path | None = None,
) -> Config:
    """Build and validate a :class:`Config` from a nested mapping plus dotted overrides.

    ``base_dir`` is the folder relative ``file.py:function`` entry points in ``data`` are
    taken from (the config file's); those in ``overrides`` are relative to the working
    directory, as is everything when ``base_dir`` is None.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source} must be a YAML mapping of sections, got {type(data).__name__}."
        )
    over = parse_overrides(overrides)
    cleared = _cleared_kwargs(over)
    merged = _leave_entry_points(_merge(dict(data), over), data, over)
    for section in cleared:
        merged[section] = {**merged[section], "kwargs": {}}
    sched = merged.get("schedule")
    kind = sched.get("type") if isinstance(sched, Mapping) else None
    if isinstance(kind, str) and kind.lower() in NOT_DECAYS:
        raise ConfigError(
            f"schedule.type = {kind!r} in {source} is not a decay and cannot be converted: "
            f"{NOT_DECAYS[kind.lower()]}. Fix: use a decaying schedule (step, multistep, "
            "exponential, time_based, cosine, linear, inverse_sqrt, wsd, plateau), with "
            "schedule.warmup for a warm-up; run a cycle outside distgrow."
        )
    # Check the overrides on their own first, so an error names the command line, not the file.
    if over:
        _build(over, "the command-line overrides", values_only=True)
    return _build(_absolute_entry_points(merged, over, base_dir), source)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: a missing, unreadable, non-UTF-8 or empty file, invalid YAML, an unknown
            key, a wrong type or an impossible value; the message names the key, the value
            and the fix.
    """
    if path is None:
        return config_from_dict({}, overrides, "the defaults")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(
            f"config file {str(p)!r} is a directory, not a YAML file. Fix: name a file in it "
            "(see configs/ for examples)."
        )
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist. Fix: see configs/ for examples.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{p} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}). "
            "Fix: save the file as UTF-8."
        ) from None
    except OSError as err:
        raise ConfigError(
            f"{p} cannot be read ({err.strerror}). Fix: check its permissions."
        ) from None
    try:
        data = safe_load(text)
    except YamlExpansionError as err:
        raise ConfigError(f"{p} is refused: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{p} is not valid YAML: {_yaml_problem(err)}. Fix: correct the file there."
        ) from None
    if data is None:
        # An empty file would silently train the defaults: almost never what was meant.
        raise ConfigError(
            f"{p} holds no settings (it is empty or only comments): it would train the "
            "defaults. Fix: write the settings (see configs/ for examples)."
        )
    return config_from_dict(data, overrides, str(p), base_dir=p.resolve().parent)


def describe_fields(cls: Any = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every setting, for docs and ``distgrow config --help``."""
    rows: list[tuple[str, str, Any, str]] = []
    instance = cls()
    for name, info in _fields(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        tp = _strip(info.annotation)
        if _is_section(tp):
            rows.extend(describe_fields(tp, key))
        else:
            rows.append((key, _type_name(tp), getattr(instance, name), info.description or ""))
    return rows


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a config file, for editors that complete and check YAML.

    Every key carries its type, default and documentation; unknown keys are refused
    (``additionalProperties: false``), as the loader refuses them.
    """
    schema = _adapter().json_schema()
    schema.update(
        title="distgrow config",
        description="A distgrow YAML config: one section per concern (see `distgrow config`).",
    )
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (secrets never live in the config; keys come from env)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
