"""What every config section is made of: the strict scalar types, ranged fields and the base.

A section is a pydantic dataclass whose fields carry their own checks:

* scalars are strict (``"3"`` is not an int, ``1`` is not a bool), except that an integral
  float is an int (``10.0``) and a numeric string is a float (YAML 1.1 reads ``6e-4`` as one);
* every float is finite: ``nan``, ``inf`` and ``-inf`` are refused wherever they are written;
* a choice (``Literal``) written as a YAML 1.1 boolean (``off``) maps back to the word typed;
* a field's range (:class:`Range`: ``ge``, ``gt``, ``le``, ``lt``) is checked whenever the
  field is set, and lands in the JSON Schema as ``minimum``/``exclusiveMinimum``/...;
* rules between fields are each section's ``@constraint`` methods (pydantic model validators).

Building a section, ``dataclasses.replace`` and assigning a field all check; a broken range or
rule raises :class:`ConfigError`, one line naming the key, the value and the fix.
This module imports neither torch nor anything distributed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, TypeVar, cast, get_args, get_origin

from pydantic import (
    AliasChoices,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message says how to fix it."""


def _integral_float(value: Any) -> Any:
    # YAML writes 1e3 and 10.0 as floats; a whole number is what the user meant for a count.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _numeric_string(value: Any) -> Any:
    # YAML 1.1 reads 6e-4 (no dot) as a string; a number is what the user meant.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Every int fits in 64 bits (torch's int64): 10**21 is refused as a type error, not met mid-run.
# (The validator comes last: it runs first, and the bounds stay in the JSON Schema.)
Int = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(_integral_float)]
Float = Annotated[float, Strict(), BeforeValidator(_numeric_string)]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]

# extra="forbid": an unknown key is an error; allow_inf_nan=False: every float is finite, and
# validate_assignment keeps it so after construction (no NaN slips past a later `x < 0`).
# defer_build: the validators are built at the first load, not at import.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True, defer_build=True)

# Counts that drive loops (the plan simulates every epoch; the realisation tries every worker
# count): a bound far above any real run keeps a typo like 1e21 from hanging `distgrow plan`.
MAX_EPOCHS = 100_000
MAX_WORKERS = 100_000
MIN_STEP_SIZE = 1e-6
MAX_LR_SCALE = 1_000
# Synthetic data is generated in memory: beyond this it would not fit (samples × features).
MAX_SYNTHETIC_VALUES = 2_000_000_000

# The validation context of a build that checks values one by one and leaves the rules between
# them to the full config (the loader's check of the command-line overrides on their own).
VALUES_ONLY = "values_only"
# The validation context of a config the loader reads: what a user wrote (see `constraint`).
WRITTEN = "written"


def fail(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    """The one-line error of a config value: ``key = value: problem. Fix: fix.``"""
    return ConfigError(f"{key} = {value!r}: {problem}. Fix: {fix}.")


def _bound(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number may take, with the words of the error when it does not.

    Set at most one lower (``ge``/``gt``) and one upper (``le``/``lt``) bound. ``problem``
    defaults to the bounds in words (``must be positive``, ``must be in [0, 1)``).
    """

    fix: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    problem: str = ""

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def words(self) -> str:
        """What the value must be, as the error says it."""
        if self.problem:
            return self.problem
        low = "[" if self.ge is not None else "(" if self.gt is not None else ""
        high = "]" if self.le is not None else ")" if self.lt is not None else ""
        lo, hi = (
            (self.ge if self.ge is not None else self.gt),
            (self.le if self.le is not None else self.lt),
        )
        if lo is not None and hi is not None:
            return f"must be in {low}{_bound(lo)}, {_bound(hi)}{high}"
        if self.gt == 0:
            return "must be positive"
        if lo is not None:
            return f"must be {'>=' if self.ge is not None else '>'} {_bound(lo)}"
        assert hi is not None, "a Range needs a bound"
        return f"must be {'<=' if self.le is not None else '<'} {_bound(hi)}"

    def json_schema(self) -> dict[str, float]:
        """The JSON Schema keywords of the range."""
        keys = {
            "ge": "minimum",
            "gt": "exclusiveMinimum",
            "le": "maximum",
            "lt": "exclusiveMaximum",
        }
        return {keys[k]: getattr(self, k) for k in keys if getattr(self, k) is not None}


def setting(default: Any, doc: str, *ranges: Range, names: tuple[str, ...] = ()) -> Any:
    """A field with a default, its documentation and its ranges (checked in order).

    Lists and dicts get a fresh copy; ``names``: the field's name and the other names the key
    may also be written as.
    """
    extra: dict[str, Any] = {}
    for r in ranges:
        extra.update(r.json_schema())
    kwargs: dict[str, Any] = {"description": doc, "json_schema_extra": extra or None}
    if names:
        kwargs["validation_alias"] = AliasChoices(*names)
    if isinstance(default, list | dict):
        info = Field(default_factory=lambda: type(default)(default), **kwargs)
    else:
        info = Field(default, **kwargs)
    info.metadata.extend(ranges)  # read back by Section._in_range
    return info


def section(cls: Any, doc: str) -> Any:
    """A nested section field, built from its own defaults."""
    return Field(default_factory=cls, description=doc)


def _context(info: ValidationInfo, key: str) -> bool:
    return bool(info.context and info.context.get(key))


_R = TypeVar("_R")


def constraint(check: Callable[[Any], None] | None = None, *, written_only: bool = False) -> Any:
    """A section method that checks a rule between its fields, run after they are each valid.

    It raises :class:`ConfigError`; it is skipped while only values are checked. A
    ``written_only`` rule refuses a setting that would do nothing where the user wrote it (a
    cap on growth in a mode that does not grow): it checks configs the loader reads, not
    variants code derives from them (the planner's baseline of a run, without growth).
    """

    def wrap(check: Callable[[Any], None]) -> Any:
        def run(self: _R, info: ValidationInfo) -> _R:
            if not _context(info, VALUES_ONLY) and (_context(info, WRITTEN) or not written_only):
                check(self)
            return self

        run.__name__ = check.__name__
        run.__doc__ = check.__doc__
        return model_validator(mode="after")(run)

    return wrap if check is None else wrap(check)


_S = TypeVar("_S", bound=type)


def _config_error(err: ValidationError) -> ConfigError | None:
    """The :class:`ConfigError` a range or a rule raised, if that is the first error."""
    first = err.errors()[0]
    cause = first.get("ctx", {}).get("error") if first["type"] == "value_error" else None
    return cause if isinstance(cause, ConfigError) else None


class _Checked(type):
    """Building a section raises the :class:`ConfigError` of a broken range or rule itself
    (pydantic would wrap it in its ValidationError); type errors stay pydantic's."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise (_config_error(err) or err) from None


def raises_config_errors(cls: _S) -> _S:
    """Assigning to a field of ``cls`` raises the :class:`ConfigError` of a broken range or rule
    itself, as building it does (see :class:`_Checked`), and leaves the field as it was.

    (pydantic sets the value before it runs the rules: a broken rule would otherwise leave it.
    A rule between sections is checked when the whole config is built, replaced or assigned a
    section, not when a field inside a section changes.)"""
    setattr_ = cast(Callable[[Any, str, Any], None], cls.__setattr__)

    @functools.wraps(setattr_)
    def __setattr__(self: Any, name: str, value: Any) -> None:
        missing = object()
        before = self.__dict__.get(name, missing)
        try:
            setattr_(self, name, value)
        except ValidationError as err:
            if before is not missing:
                object.__setattr__(self, name, before)
            raise (_config_error(err) or err) from None

    cls.__setattr__ = __setattr__  # type: ignore[method-assign,assignment]
    return cls


@dataclass(config=STRICT)
class Section(metaclass=_Checked):
    """What every section shares: its key, ranged fields and YAML 1.1 words for choices."""

    KEY: ClassVar[str] = ""
    """The section's dotted key in a config (``growth``, ``launch.chain``)."""

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_words(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, bool) or info.field_name is None:
            return value
        tp = cls.__pydantic_fields__[info.field_name].annotation  # type: ignore[attr-defined]
        if get_origin(tp) is not Literal:
            return value
        # YAML 1.1 reads off/on/no/yes as booleans: map back to the choice the user typed.
        words = ("off", "no", "false") if value is False else ("on", "yes", "true")
        return next((w for w in words if w in get_args(tp)), value)

    @field_validator("*", mode="after")
    @classmethod
    def _in_range(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value  # null, a word ('auto'), a list: ranges bound numbers
        assert info.field_name is not None
        for r in cls.__pydantic_fields__[info.field_name].metadata:  # type: ignore[attr-defined]
            if isinstance(r, Range) and not r.holds(value):
                raise fail(f"{cls.KEY}.{info.field_name}", value, r.words(), r.fix)
        return value

    def validate(self) -> None:
        """Check the section again (building it already did): ranges and rules.

        Raises:
            ConfigError: a value out of its range or a broken rule.
        """
        dataclasses.replace(self)
