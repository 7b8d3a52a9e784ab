"""The sweep's files: ``sweep.json``, ``sweep.md`` and ``sweep.png`` from its result rows."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distgrow.report.markdown import _num, _table
from distgrow.report.render import all_or_nothing
from distgrow.rundir import (
    atomic_write_bytes,
    write_json,
)

SWEEP_FILES = {"json": "sweep.json", "markdown": "sweep.md", "plot": "sweep.png"}


def write_sweep(
    results: Sequence[Mapping[str, Any]],
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    out: Path,
    *,
    command: str | None = None,
) -> dict[str, Any]:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` from the sweep's result rows.

    Raises:
        ReportError: ``out`` cannot be written (see :func:`all_or_nothing`).
    """
    with all_or_nothing(out):
        return _write_sweep(results, batch_sizes, lrs, out, command)


def _write_sweep(
    results: Sequence[Mapping[str, Any]],
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    out: Path,
    command: str | None,
) -> dict[str, Any]:
    from distgrow import plots

    final = sweep_points(results)
    plots.plot_sweep(final, batch_sizes, lrs, out / SWEEP_FILES["plot"])
    finite = [r for r in final.values() if isinstance(r.get("val_loss"), int | float)]
    best = min(finite, key=lambda r: r["val_loss"]) if finite else None
    seeded = any("seed" in r for r in results)
    data = {
        "command": command,
        "batch_sizes": list(batch_sizes),
        "lrs": list(lrs),
        "results": [dict(r) for r in results],
        "best": None if best is None else {k: best[k] for k in ("batch", "lr", "val_loss")},
        "plot": SWEEP_FILES["plot"],
    }
    if seeded:
        data["means"] = list(final.values())
    write_json(out / SWEEP_FILES["json"], data)

    def cell(r: Mapping[str, Any] | None, key: str) -> str:
        if r is None:
            return "-"
        if r.get("status") != "completed":
            return str(r.get("status"))
        text = _num(r.get(key), ".4f")
        if seeded:
            text += f" ± {_num(r.get(f'{key}_std'), '.4f')}"
            if r["completed"] < r["seeds"]:
                text += f" ({r['completed']} of {r['seeds']} seeds; the others diverged or failed)"
        return text

    lines = ["# distgrow sweep: final loss by batch size × learning rate", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if seeded:
        seeds = sorted({r["seed"] for r in results if "seed" in r})
        lines += [
            f"Each cell: mean ± standard deviation over seeds {', '.join(map(str, seeds))} "
            "(the seeds whose run completed).",
            "",
        ]
    for key, name in (("val_loss", "final validation loss"), ("train_loss", "final train loss")):
        lines += [f"## {name}", ""]
        lines += _table(
            ["batch \\ lr", *(f"{lr:g}" for lr in lrs)],
            [[str(b), *(cell(final.get((b, lr)), key) for lr in lrs)] for b in batch_sizes],
        )
        lines.append("")
    if best is not None:
        lines += [
            f"Lowest validation loss: {best['val_loss']:.4f} at batch {best['batch']}, "
            f"lr {best['lr']:g}.",
            "",
        ]
    caption = "final loss against batch size, one line per learning rate"
    lines += [f"![{caption}]({SWEEP_FILES['plot']})", ""]
    atomic_write_bytes(out / SWEEP_FILES["markdown"], "\n".join(lines).encode("utf-8"))
    return data


def sweep_points(results: Sequence[Mapping[str, Any]]) -> dict[tuple[int, float], dict[str, Any]]:
    """(batch, lr) → its result; with several seeds per pair, the mean and standard deviation
    of each loss over the seeds that completed (``train_loss_std``, ``seeds``, ``completed``;
    the status of the first seed when none completed)."""
    by_pair: dict[tuple[int, float], list[Mapping[str, Any]]] = {}
    for r in results:
        by_pair.setdefault((int(r["batch"]), float(r["lr"])), []).append(r)
    out: dict[tuple[int, float], dict[str, Any]] = {}
    for (b, lr), rows in by_pair.items():
        if not any("seed" in r for r in rows):
            out[(b, lr)] = dict(rows[-1])
            continue
        done = [r for r in rows if r.get("status") == "completed"]
        point: dict[str, Any] = {
            "batch": b,
            "lr": lr,
            "seeds": len(rows),
            "completed": len(done),
            "status": "completed" if done else rows[0].get("status"),
        }
        for key in ("train_loss", "val_loss", "val_acc"):
            values = [float(r[key]) for r in done if isinstance(r.get(key), int | float)]
            point[key] = statistics.fmean(values) if values else None
            point[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out[(b, lr)] = point
    return out
