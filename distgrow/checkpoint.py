"""Atomic, world-size-independent checkpoints, loaded without running pickled code.

A checkpoint is one ``torch.save`` dict of plain types and tensors, written by rank 0 as
:meth:`RunDir.checkpoint(step) <distgrow.rundir.RunDir.checkpoint>` in the run directory:

``format_version``, ``fingerprint`` (what must match to resume: model, data, seed, optimizer),
``model`` (the unwrapped state dict, CPU tensors), ``optimizer`` (its state dict: replicated
under DDP, so valid at any world size; under a sharded backend, FSDP, both entries are
``{"sharded_dcp": "ckpt-<step>.dcp"}``, the ``torch.distributed.checkpoint`` directory beside
the file that each rank wrote its shards into, see :mod:`distgrow.backends.sharded_state`),
``plan_state`` (the growth policy), ``epoch`` and ``position`` (where the next update starts:
samples already consumed in that epoch), ``step``
(updates so far), ``samples_seen``, ``rng`` (torch's CPU RNG state), plus the rest of the
trainer's counters (:class:`distgrow.state.TrainState`: ``wall_s``, ``worker_seconds``, ...),
the phase tracker's ``phases`` and ``metrics_bytes`` (the size of ``metrics.jsonl`` then: a
resume drops the records that follow, see :func:`distgrow.metrics.drop_replayed_records`).

Writes go to a temporary file in the same directory, are fsync'ed and renamed over the final
name (``os.replace``), so a crash at any moment leaves either the old or the new file, never a
torn one; then only the newest ``keep`` checkpoints are kept. A write that fails (a disk full
part-way through ``torch.save``, a read-only one) removes its temporary file and raises the
:class:`OSError`, naming the checkpoint; a temporary file a kill left is removed when the run
next starts (:meth:`RunDir.remove_temporaries <distgrow.rundir.RunDir.remove_temporaries>`).

Loading uses ``torch.load(..., weights_only=True)``: a file holding anything but tensors and
plain containers is refused instead of executed. A file that cannot be read, or that belongs to
another run, raises :class:`CheckpointError` naming the file and the fix; it is never
overwritten or deleted, and there is no silent fall-back to an older checkpoint (a run that
quietly rewinds is worse than one that stops and says why).
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distgrow.config import Config
from distgrow.rundir import RunDir, atomic_write

FORMAT_VERSION = 1

SHARDED_KEY = "sharded_dcp"
"""The key of a sharded checkpoint's ``model``/``optimizer`` entry: the name of the DCP directory
beside the file (:mod:`distgrow.backends.sharded_state`, which writes and reads it)."""

REQUIRED_KEYS = (
    "format_version",
    "fingerprint",
    "model",
    "optimizer",
    "plan_state",
    "epoch",
    "position",
    "step",
    "samples_seen",
    "rng",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file, the problem and the fix."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """The file of the checkpoint after ``step`` updates (see :meth:`RunDir.checkpoint`)."""
    return RunDir(directory).checkpoint(step)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first (see :meth:`RunDir.checkpoints`)."""
    return RunDir(directory).checkpoints()


def fingerprint(cfg: Config, dataset_size: int) -> dict[str, Any]:
    """What a checkpoint and the config resuming from it must agree on.

    The model architecture, the data (which samples, hence the sample order), the seed and the
    optimizer's kind. Everything else (epochs, schedule, growth limits, loss, logging) may change
    between a run and its resume. An entry point's ``kwargs`` are part of the model or data they
    build; they appear only when set, so checkpoints written before they were fingerprinted (and
    runs without them) still match.
    """
    d = cfg.data
    found: dict[str, Any] = {
        "model": {
            "name": cfg.model.name,
            "hidden": list(cfg.model.hidden),
            "dropout": cfg.model.dropout,
            "depth": cfg.model.depth,
            "width": cfg.model.width,
            "ghost_batch": cfg.model.ghost_batch,
        },
        "data": {
            "name": d.name,
            "limit_train": d.limit_train,
            "limit_val": d.limit_val,
            "val_fraction": d.val_fraction,
            "synthetic_samples": d.synthetic_samples,
            "synthetic_features": d.synthetic_features,
            "train_size": dataset_size,
        },
        "seed": cfg.run.seed,
        "optimizer": cfg.optim.name,
    }
    if cfg.model.kwargs:
        found["model"]["kwargs"] = dict(cfg.model.kwargs)
    if d.kwargs:
        found["data"]["kwargs"] = dict(d.kwargs)
    return found


IDENTITY_KEYS = (
    "model.name",
    "model.hidden",
    "model.dropout",
    "model.depth",
    "model.width",
    "model.ghost_batch",
    "model.kwargs",
    "data.name",
    "data.limit_train",
    "data.limit_val",
    "data.val_fraction",
    "data.synthetic_samples",
    "data.synthetic_features",
    "data.kwargs",
    "run.seed",
    "optim.name",
)
"""The config keys of :func:`fingerprint`: a run directory whose ``config.yaml`` differs in
one of them (or, for a mapping such as ``model.kwargs``, in a key below it) holds another run."""

PER_LAUNCH_KEYS = ("run.resume", "run.threads", "growth.max_workers", "launch.", "logging.")
"""Config keys (prefixes) that may differ between the launches of one run: the controller sets
``run.resume``, ``run.threads`` and ``growth.max_workers`` for each job it starts, and launch
and logging settings do not change what is trained."""


def config_differences(
    existing: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    only: tuple[str, ...] | None = None,
    ignore: tuple[str, ...] = (),
) -> list[str]:
    """The dotted keys whose values differ, as ``key: A in config.yaml, B now``.

    Args:
        existing: The run directory's ``config.yaml`` as a tree.
        current: The config of this launch as a tree (``Config.to_dict()``).
        only: Compare only these keys and the keys below them (None: all).
        ignore: Leave out keys starting with one of these.
    """
    have, want = _flatten(existing), _flatten(current)
    every = sorted(set(have) | set(want))
    keys = every if only is None else [k for k in every if k in only or k.startswith(_below(only))]
    return [
        f"{key}: {have.get(key)!r} in config.yaml, {want.get(key)!r} now"
        for key in keys
        if not key.startswith(ignore) and have.get(key) != want.get(key)
    ]


def _below(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{key}." for key in keys)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def save_checkpoint(directory: str | Path, state: Mapping[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of its step, atomically; keep the newest ``keep``.

    Args:
        directory: The run directory (created if needed).
        state: The checkpoint dict; must hold every key of :data:`REQUIRED_KEYS` (and only
            tensors and plain types, so that it loads with ``weights_only=True``).
        keep: How many checkpoints to keep, newest first (>= 1).

    Returns:
        The path written.

    Raises:
        ValueError: a required key is missing or ``keep < 1`` (a bug in the caller).
        OSError: the write failed (``filename``: the checkpoint; also when ``torch.save``
            turned the disk's error into a RuntimeError); the previous checkpoints are
            untouched and no temporary file is left.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)}; a bug in the trainer.")
    if keep < 1:
        raise ValueError(f"keep = {keep}: at least the newest checkpoint must be kept.")
    run_dir = RunDir(directory)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    path = run_dir.checkpoint(int(state["step"]))
    atomic_write(path, lambda f: torch.save(dict(state), f))
    for old in run_dir.checkpoints()[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
    remove_orphan_shards(run_dir.path)
    return path


def remove_orphan_shards(directory: str | Path) -> list[Path]:
    """Remove sharded-checkpoint directories no checkpoint file names any more.

    A sharded backend's ``ckpt-<step>.dcp/`` (:mod:`distgrow.backends.sharded_state`) belongs to
    ``ckpt-<step>.pt``: it goes when its file was pruned, or was never written (a crash between
    the two), and so do the temporary ``.ckpt-<step>.dcp.tmp/`` and ``.old/`` a kill left. Called
    by rank 0 right after a checkpoint is written, when no rank writes shards.

    Returns:
        The directories removed.
    """
    root = Path(directory)
    removed = []
    for p in root.iterdir() if root.is_dir() else ():
        orphan = (_SHARDS.match(p.name) and not p.with_suffix(".pt").exists()) or (
            _SHARD_TEMPORARY.match(p.name)
        )
        if orphan and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


_SHARDS = re.compile(r"^ckpt-\d{9,}\.dcp$")
_SHARD_TEMPORARY = re.compile(r"^\.ckpt-\d{9,}\.dcp\.(tmp|old)$")


def load_checkpoint(path: str | Path, expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load and check one checkpoint, without executing any pickled code.

    Args:
        path: A checkpoint file.
        expected: The fingerprint of the resuming config (:func:`fingerprint`); None skips
            the comparison.

    Returns:
        The checkpoint dict (tensors on the CPU).

    Raises:
        CheckpointError: unreadable, not a distgrow checkpoint, of another format version,
            holding non-tensor objects, or from a run whose fingerprint differs. The file is
            left as it is.
    """
    p = Path(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {p} holds objects other than tensors and plain data, so it was not "
            f"loaded (weights_only=True refuses to run pickled code): {_refusal(err)}. Fix: "
            "resume only from checkpoints distgrow wrote; move this file away or point "
            "run.output_dir elsewhere."
        ) from err
    except Exception as err:  # truncated zip, wrong magic, I/O error: all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {p} cannot be read ({type(err).__name__}: {_first_line(err)}). It was "
            "left untouched. Fix: move it out of the run directory to resume from the previous "
            "checkpoint, or set run.output_dir to a new directory to start over."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(state).__name__}, not a distgrow checkpoint dict. "
            "Fix: move it out of the run directory."
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {p} lacks {', '.join(missing)}: not a distgrow checkpoint. Fix: move "
            "it out of the run directory."
        )
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {p} has format_version {state['format_version']!r}; this distgrow "
            f"reads version {FORMAT_VERSION}. Fix: resume it with the distgrow that wrote it, "
            "or start a new run."
        )
    shards = state["model"].get(SHARDED_KEY) if isinstance(state["model"], dict) else None
    if isinstance(shards, str) and not (p.parent / shards / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {p} keeps its model and optimizer in {p.parent / shards}, which is "
            "missing or incomplete (no .metadata). Fix: restore that directory beside the "
            "file, or move the file out of the run directory to resume from the previous one."
        )
    if expected is not None:
        have, want = _flatten(state["fingerprint"]), _flatten(expected)
        diffs = [
            f"{key}: checkpoint {have.get(key)!r}, config {want.get(key)!r}"
            for key in sorted(set(have) | set(want))
            if have.get(key) != want.get(key)
        ]
        if diffs:
            raise CheckpointError(
                f"checkpoint {p} belongs to a different run ({'; '.join(diffs)}). It was left "
                "untouched. Fix: resume with the same model, data, seed and optimizer, or set "
                "run.output_dir to a new directory."
            )
    return state


def load_latest(
    directory: str | Path, expected: Mapping[str, Any] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` and its state, or None when there is none.

    Raises:
        CheckpointError: the newest checkpoint is unusable (see :func:`load_checkpoint`); older
            ones are not tried, so a run never silently rewinds.
    """
    newest = RunDir(directory).latest_checkpoint()
    if newest is None:
        return None
    return newest, load_checkpoint(newest, expected)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _refusal(err: BaseException) -> str:
    """What ``weights_only=True`` refused, without torch's advice around it.

    torch's message suggests loading with ``weights_only=False`` or allow-listing the class:
    both run the file's pickled code, which is what the refusal protects against, so neither
    is passed on. What stays is the object it refused (``Unsupported global: GLOBAL x.Y``).
    """
    text = _ANSI.sub("", str(err))
    found = _UNSUPPORTED.search(text)
    if found:
        return found.group(0).strip()
    return "an object that is not a tensor or plain data"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSUPPORTED = re.compile(r"Unsupported (global|operand)[^.\n]*(?:\.[A-Za-z_][^\s.]*)*")
