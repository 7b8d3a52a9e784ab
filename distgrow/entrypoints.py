"""The user's own code, named in the config: ``"module:function"`` or ``"file.py:function"``.

One resolver for ``model.name``, ``data.name``, ``loss.name`` and ``loss.metric``: split the
string at its last ``:``, import the module (by its dotted name, or from the ``.py`` file), look
the attribute up by name (dotted names walk attributes; nothing is ever ``eval``-ed), call it,
and check what it returned. Importing the user's module runs its code: that is what naming it
in the config asks for.

A relative ``file.py`` path is made absolute when the config is loaded (see
:func:`absolute_entry_point`): against the config file's folder for a value written in the file,
against the working directory for one given on the command line. The run's ``config.yaml``
therefore names the file absolutely, and a relaunch, a resume or ``distgrow compare`` finds it
from any working directory.

Every failure is an :class:`EntryPointError` (a ``ValueError``): one line naming the key, what
was found and what was expected. This module imports neither torch nor anything distributed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "EntryPoint",
    "EntryPointError",
    "absolute_entry_point",
    "call_entry_point",
    "is_entry_point",
    "parse_entry_point",
    "resolve_entry_point",
]


class EntryPointError(ValueError):
    """An entry point that cannot be used; the message names the key, what was found and the fix."""


@dataclass(frozen=True)
class EntryPoint:
    """A parsed ``"module:attribute"`` or ``"path/to/file.py:attribute"``.

    Attributes:
        module: The dotted module name, or the path of a ``.py`` file.
        attribute: The attribute's name in the module (dots walk nested attributes).
    """

    module: str
    attribute: str

    @property
    def is_file(self) -> bool:
        """Whether ``module`` is a ``.py`` file rather than a dotted module name."""
        return self.module.endswith(".py")

    def __str__(self) -> str:
        return f"{self.module}:{self.attribute}"


def is_entry_point(value: str) -> bool:
    """Whether a config value names user code (it has a ``:``) rather than a built-in name.

    A Windows drive (``C:\\x``) alone is not one: an entry point has its ``:`` after the module.
    """
    return ":" in value.strip()


def parse_entry_point(key: str, value: str) -> EntryPoint:
    """Split ``value`` into module and attribute, checking the form only (nothing is imported).

    Args:
        key: The config key, for the message (``model.name``).
        value: ``"package.module:function"`` or ``"path/to/file.py:function"``.

    Raises:
        EntryPointError: Not of that form.
    """
    module, sep, attribute = value.strip().rpartition(":")
    example = f'e.g. {key}: "mypackage.models:build" or "models.py:build"'
    if not sep or not module or not attribute:
        raise EntryPointError(
            f"{key} = {value!r}: expected 'module:function' or 'path/to/file.py:function'. "
            f"Fix: {example}."
        )
    if not all(part.isidentifier() for part in attribute.split(".")):
        raise EntryPointError(
            f"{key} = {value!r}: {attribute!r} after the ':' is not a Python name. Fix: {example}."
        )
    if not module.endswith(".py") and not all(part.isidentifier() for part in module.split(".")):
        raise EntryPointError(
            f"{key} = {value!r}: {module!r} is neither a dotted module name nor a .py file. "
            f"Fix: {example}."
        )
    return EntryPoint(module, attribute)


def absolute_entry_point(key: str, value: str, base_dir: Path) -> str:
    """``value`` with a relative ``.py`` path made absolute against ``base_dir``.

    Built-in names and module entry points come back unchanged.

    Raises:
        EntryPointError: ``value`` has a ``:`` but is not an entry point.
    """
    if not is_entry_point(value):
        return value
    entry = parse_entry_point(key, value)
    if not entry.is_file or Path(entry.module).is_absolute():
        return value.strip()
    return f"{(base_dir / entry.module).resolve()}:{entry.attribute}"


def _import_file(key: str, value: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise EntryPointError(
            f"{key} = {value!r}: the file {str(path)!r} does not exist. Fix: give the path of "
            "the .py file (relative to the config file's folder, or absolute)."
        )
    # One module per file (the hash keeps two models.py apart); registered in sys.modules so
    # that pickling its classes and DataLoader workers find it again.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"distgrow_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EntryPointError(f"{key} = {value!r}: {str(path)!r} cannot be loaded as Python.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise EntryPointError(
            f"{key} = {value!r}: running {str(path)!r} failed ({_brief(exc)}). "
            "Fix: the error is in that file."
        ) from exc
    return module


def _import_module(key: str, value: str, dotted: str) -> ModuleType:
    try:
        return importlib.import_module(dotted)
    except Exception as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if dotted.split(".")[0] == "torchvision" and (missing or "torchvision").startswith(
            "torchvision"
        ):
            # Optional: absent, or its wheel was built for another torch (a CUDA torchvision
            # does not load with a CPU torch).
            raise EntryPointError(
                f"{key} = {value!r}: torchvision is not importable here ({_brief(exc)}). "
                f"Fix: install the torchvision built for your torch ({_torch_version()}), or "
                "use a built-in model (e.g. model.name=wrn)."
            ) from exc
        if missing is not None:
            raise EntryPointError(
                f"{key} = {value!r}: no module named {missing!r}. Fix: install it, put its "
                "folder on PYTHONPATH, or name the file instead ('path/to/file.py:function')."
            ) from exc
        raise EntryPointError(
            f"{key} = {value!r}: importing {dotted!r} failed ({_brief(exc)}). "
            "Fix: the error is in that module or its install."
        ) from exc


def resolve_entry_point(key: str, value: str) -> Any:
    """Import the module of ``value`` and return its attribute (nothing is called).

    Args:
        key: The config key, for messages.
        value: An entry point (see :func:`parse_entry_point`); a relative ``.py`` path is taken
            relative to the working directory (the loader has made config paths absolute).

    Raises:
        EntryPointError: A missing file or module, a module that fails to import, or a missing
            attribute.
    """
    entry = parse_entry_point(key, value)
    if entry.is_file:
        module = _import_file(key, value, Path(entry.module))
    else:
        module = _import_module(key, value, entry.module)
    found: Any = module
    for part in entry.attribute.split("."):
        if not hasattr(found, part):
            public = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
            )
            shown = ", ".join(public[:8]) + (", ..." if len(public) > 8 else "")
            raise EntryPointError(
                f"{key} = {value!r}: {entry.module!r} has no attribute {entry.attribute!r}. "
                f"Fix: name one of its functions ({shown or 'it defines none'})."
            )
        found = getattr(found, part)
    return found


def call_entry_point(
    key: str, value: str, kwargs: Mapping[str, Any], expected: str, check: Callable[[Any], bool]
) -> Any:
    """Resolve ``value``, call it with ``kwargs`` and check what it returned.

    Args:
        key: The config key (``model.name``), for messages.
        value: The entry point.
        kwargs: Keyword arguments (the config's ``*.kwargs`` mapping).
        expected: What it should return, in words (``a torch.nn.Module``).
        check: True when the returned value is acceptable.

    Returns:
        What the function returned.

    Raises:
        EntryPointError: Not resolvable, not callable, the call failed, or the value returned
            does not pass ``check``.
    """
    target = resolve_entry_point(key, value)
    if not callable(target):
        raise EntryPointError(
            f"{key} = {value!r}: found {type(target).__name__} {target!r:.60}, expected a "
            f"function returning {expected}. Fix: name a function."
        )
    try:
        result = target(**dict(kwargs))
    except Exception as exc:
        raise EntryPointError(
            f"{key} = {value!r}: calling it with {_kwargs_words(key, kwargs)} failed "
            f"({_brief(exc)}). Fix: make the kwargs match its parameters."
        ) from exc
    if not check(result):
        raise EntryPointError(
            f"{key} = {value!r}: returned {_describe(result)}, expected {expected}. "
            "Fix: return that from the function."
        )
    return result


def _kwargs_words(key: str, kwargs: Mapping[str, Any]) -> str:
    section = key.rsplit(".", 1)[0]
    return f"{section}.kwargs {dict(kwargs)!r}" if kwargs else "no arguments"


def _describe(value: Any) -> str:
    if isinstance(value, tuple | list):
        inner = ", ".join(type(v).__name__ for v in value[:4])
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _brief(exc: BaseException) -> str:
    """An exception in one line, at most 200 characters."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _torch_version() -> str:
    try:
        import torch

        return f"torch {torch.__version__}"
    except Exception:  # pragma: no cover - torch is a dependency
        return "your torch"
