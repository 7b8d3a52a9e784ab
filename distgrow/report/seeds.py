"""Several seeds per variant: each variant's mean and spread of the final metric, the
difference to the baseline with a 95% interval paired by seed (Student t), and a plain verdict;
and which of a report's runs are seeds of one variant (:func:`group_by_seed`).

Pure arithmetic on :class:`~distgrow.report.runs.RunData`; no torch, no files.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from distgrow.report.runs import RunData, flat
from distgrow.savings import SavingsError, format_ratio, measured_savings

T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
"""The 97.5% quantile of Student's t with 1..30 degrees of freedom (a two-sided 95% interval)."""

TOLERANCE = {"val_acc": 0.005, "val_loss": 0.02}
"""How close to the baseline counts as "the same quality": 0.5 accuracy points, 0.02 in loss."""


def t_975(df: int) -> float:
    """Student's t 97.5% quantile for ``df`` >= 1 degrees of freedom (table to 30, then the
    first terms of the Cornish-Fisher expansion, within 0.001 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the 95% Student-t interval of the mean (None, None with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def verdict(low: float | None, high: float | None, tolerance: float, metric: str, n: int) -> str:
    """Whether the variant reaches the baseline's quality within ``tolerance``.

    The difference is variant - baseline, oriented so that positive is better (accuracy up,
    loss down). yes: the whole interval is above -tolerance; no: the whole interval is below
    it; otherwise the seeds cannot tell.
    """
    words = _tolerance_words(metric, tolerance)
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    if low is None or high is None:
        return f"within {words}: cannot tell with {seeds} (an interval needs two or more)"
    if low >= -tolerance:
        return f"within {words}: yes ({seeds})"
    if high < -tolerance:
        return f"within {words}: no ({seeds})"
    return f"within {words}: cannot tell with {seeds}"


def _tolerance_words(metric: str, tolerance: float) -> str:
    if metric == "val_acc":
        return f"{tolerance * 100:g} points of the baseline"
    return f"{tolerance:g} in loss of the baseline"


def _final(run: RunData, metric: str) -> float | None:
    value = getattr(run.summary, metric)
    return float(value) if isinstance(value, int | float) else None


def _better(metric: str) -> float:
    """+1 when a larger metric is better (accuracy), -1 when smaller is (loss)."""
    return 1.0 if metric == "val_acc" else -1.0


def seed_section(
    groups: Mapping[str, Mapping[int, RunData]],
    baseline: str | None,
    metric: str,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """The ``seeds`` part of the report's ``summary.json``.

    Args:
        groups: variant → seed → its finished run.
        baseline: The baseline variant (decay_lr), or None (no differences then).
        metric: ``val_acc`` or ``val_loss``.
        tolerance: What counts as the same quality (default :data:`TOLERANCE`).

    Returns:
        ``seeds`` (all of them), ``metric``, ``tolerance`` and one entry per variant: per seed
        its final metric, updates and measured savings against the baseline of the same seed;
        the mean and standard deviation of the final metric and of the updates; and (not for
        the baseline) the paired difference with its 95% interval and the verdict.
    """
    tol = TOLERANCE[metric] if tolerance is None else tolerance
    base = groups.get(baseline) if baseline is not None else None
    variants = [_variant(label, runs, base, metric, tol) for label, runs in groups.items()]
    seeds = sorted({s for runs in groups.values() for s in runs})
    return {
        "seeds": seeds,
        "metric": metric,
        "tolerance": tol,
        "baseline": baseline,
        "variants": variants,
    }


def _variant(
    label: str,
    runs: Mapping[int, RunData],
    base: Mapping[int, RunData] | None,
    metric: str,
    tolerance: float,
) -> dict[str, Any]:
    per_seed = []
    for seed, run in sorted(runs.items()):
        row: dict[str, Any] = {
            "seed": seed,
            "run_dir": str(run.path),
            metric: _final(run, metric),
            "updates": run.summary.total_updates,
        }
        if base is not None and base.get(seed) is not None and base[seed] is not run:
            try:
                row["measured"] = measured_savings(
                    run.summary.to_dict(), base[seed].summary.to_dict(), str(base[seed].path)
                ).to_dict()
            except SavingsError as err:
                row["measured_unavailable"] = str(err)
        per_seed.append(row)
    finals = [r[metric] for r in per_seed if r[metric] is not None]
    updates = [float(r["updates"]) for r in per_seed if r["updates"] is not None]
    out: dict[str, Any] = {
        "label": label,
        "n": len(finals),
        "per_seed": per_seed,
        "mean": statistics.fmean(finals) if finals else None,
        "std": statistics.stdev(finals) if len(finals) > 1 else None,
        "updates_mean": statistics.fmean(updates) if updates else None,
        "updates_std": statistics.stdev(updates) if len(updates) > 1 else None,
    }
    if base is not None and runs is not base:
        out["difference"] = _paired(runs, base, metric, tolerance)
        # The measured wall-clock ratio of each seed's run against the baseline of its seed.
        walls = [
            float(r["measured"]["wall_ratio"])
            for r in per_seed
            if isinstance((r.get("measured") or {}).get("wall_ratio"), int | float)
        ]
        if walls:
            wall_mean, wall_low, wall_high = mean_interval(walls)
            out["difference"].update(
                wall_ratio_mean=wall_mean, wall_ratio_low=wall_low, wall_ratio_high=wall_high
            )
    return out


def _paired(
    runs: Mapping[int, RunData], base: Mapping[int, RunData], metric: str, tolerance: float
) -> dict[str, Any]:
    """The variant - baseline difference over the seeds both have, oriented better-positive."""
    sign = _better(metric)
    diffs = {}
    for seed in sorted(set(runs) & set(base)):
        a, b = _final(runs[seed], metric), _final(base[seed], metric)
        if a is not None and b is not None:
            diffs[seed] = sign * (a - b)
    if not diffs:
        return {"n": 0, "seeds": [], "verdict": verdict(None, None, tolerance, metric, 0)}
    mean, low, high = mean_interval(list(diffs.values()))
    ratios = [
        float(base[s].summary.total_updates) / float(runs[s].summary.total_updates)
        for s in diffs
        if runs[s].summary.total_updates and base[s].summary.total_updates
    ]
    return {
        "n": len(diffs),
        "seeds": list(diffs),
        "per_seed": [diffs[s] for s in diffs],
        "mean": mean,
        "low": low,
        "high": high,
        "better_is": "higher" if sign > 0 else "lower",
        "updates_ratio_mean": statistics.fmean(ratios) if ratios else None,
        "verdict": verdict(low, high, tolerance, metric, len(diffs)),
    }


# --------------------------------------------------------------------------------------------
# Which runs are seeds of one variant
# --------------------------------------------------------------------------------------------

NOT_THE_VARIANT = ("run.seed", "run.name", "run.output_dir", "run.resume")
"""The config keys in which seeds of one variant may differ (``compare --seeds`` gives each
seed's run its own ``run.seed``, name and folder); every other key of ``config.yaml`` is the
variant."""


def run_seed(run: RunData) -> int | None:
    """The ``run.seed`` of the run's ``config.yaml`` (None without one)."""
    seed = (run.config.get("run") or {}).get("seed") if run.config else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _variant_key(run: RunData) -> str:
    tree = {k: v for k, v in flat(run.config).items() if k not in NOT_THE_VARIANT}
    return json.dumps(tree, sort_keys=True, default=str)


def _group_label(runs: Sequence[tuple[int, RunData]]) -> str:
    """The label the seeds share once ``-seed<k>`` is cut (``compare``'s folder names), else
    the first seed's label."""
    stems = {re.sub(rf"[-_.]?seed{seed}$", "", run.label) for seed, run in runs}
    stem = stems.pop() if len(stems) == 1 else ""
    return stem or runs[0][1].label


def group_by_seed(
    runs: Sequence[RunData],
) -> tuple[dict[str, dict[int, RunData]] | None, str | None]:
    """Group the runs whose ``config.yaml`` differ only in :data:`NOT_THE_VARIANT` (one
    variant trained on several seeds), as ``compare --seeds`` groups its own runs.

    Returns:
        (variant label → seed → its run, relabelled; None) when some variant has two or more
        seeds, in the order the variants first appear, seeds ascending; otherwise (None, None),
        or (None, why not) where seeds cannot be told apart (a run without ``config.yaml`` or
        ``run.seed``, or two runs of the same config and seed).
    """
    keyed: dict[str, list[RunData]] = {}
    for i, run in enumerate(runs):
        key = _variant_key(run) if run_seed(run) is not None else f"#{i}"
        keyed.setdefault(key, []).append(run)
    members = list(keyed.values())
    if not any(len({run_seed(r) for r in m}) > 1 for m in members):
        return None, None
    seeded: list[list[tuple[int, RunData]]] = []
    for m in members:
        pairs = [(s, r) for r in m if (s := run_seed(r)) is not None]
        if len(pairs) < len(m):
            return None, (
                f"not grouped by seed: {m[0].path} has no run.seed in its config.yaml, so "
                "its seed is unknown; each run is shown on its own"
            )
        seen: dict[int, RunData] = {}
        for s, r in pairs:
            if s in seen:
                return None, (
                    f"not grouped by seed: {seen[s].path} and {r.path} have the same config "
                    f"and seed {s}; each run is shown on its own"
                )
            seen[s] = r
        seeded.append(sorted(pairs, key=lambda p: p[0]))
    labels = [_group_label(pairs) for pairs in seeded]
    if len(set(labels)) != len(labels):
        labels = [pairs[0][1].label for pairs in seeded]
    return {
        label: {s: replace(r, label=label) for s, r in pairs}
        for label, pairs in zip(labels, seeded, strict=True)
    }, None


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def metric_text(metric: str, value: float | None) -> str:
    """A final metric as the reports print it: accuracy in percent, a loss to 4 places."""
    if value is None:
        return "-"
    return f"{value * 100:.2f}%" if metric == "val_acc" else f"{value:.4f}"


def _spread(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f} pp" if metric == "val_acc" else f"{value:.4f}"


def delta_text(metric: str, value: float | None) -> str:
    """A difference of the metric, signed: percentage points for accuracy."""
    if value is None:
        return "-"
    return f"{value * 100:+.2f} pp" if metric == "val_acc" else f"{value:+.4f}"


def _wall(d: Mapping[str, Any] | None) -> str:
    """The mean measured wall-clock ratio over the seeds and its 95% interval."""
    if not d or d.get("wall_ratio_mean") is None:
        return "-"
    text = format_ratio(d["wall_ratio_mean"], "faster", "slower")
    if d.get("wall_ratio_low") is not None:
        text += f" [{d['wall_ratio_low']:.2f}×, {d['wall_ratio_high']:.2f}×]"
    return text


def seed_markdown(section: Mapping[str, Any]) -> list[str]:
    """The report's "Seeds" section: one table row per variant, then each seed's numbers."""
    metric, seeds = section["metric"], section["seeds"]
    name = "val acc" if metric == "val_acc" else "val loss"
    lines = [
        "## Seeds",
        "",
        f"Every variant trained on seeds {', '.join(map(str, seeds))}. Mean ± standard deviation "
        f"of the final {name} over the seeds; the difference to the baseline "
        f"({section['baseline'] or 'none'}) is paired by seed, with a 95% Student-t interval "
        + ("(positive: better accuracy)." if metric == "val_acc" else "(positive: lower loss)."),
        "",
        "| variant | seeds | final " + name + " (mean ± sd) | updates (mean) | "
        "updates vs baseline | wall-clock vs baseline (95% interval) | "
        "Δ vs baseline (95% interval) | same quality? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in section["variants"]:
        d = v.get("difference")
        interval = "-"
        if d and d.get("mean") is not None:
            interval = delta_text(metric, d["mean"])
            if d.get("low") is not None:
                interval += f" [{delta_text(metric, d['low'])}, {delta_text(metric, d['high'])}]"
        ratio = d.get("updates_ratio_mean") if d else None
        updates = "-" if v["updates_mean"] is None else f"{v['updates_mean']:,.0f}"
        vs = format_ratio(ratio, "fewer", "more") if d else "-"
        if v["label"] == section["baseline"]:
            vs = "1.00× (baseline)"
        lines.append(
            f"| {v['label']} | {v['n']} | {metric_text(metric, v['mean'])} ± "
            f"{_spread(metric, v['std'])} | {updates} | {vs} | {_wall(d)} | {interval} | "
            f"{d['verdict'] if d else '-'} |"
        )
    lines += ["", "Per seed (final " + name + ", updates):", ""]
    for v in section["variants"]:
        cells = [
            f"seed {r['seed']}: {metric_text(metric, r[metric])}, {r['updates']:,} updates"
            for r in v["per_seed"]
        ]
        lines.append(f"- {v['label']}: " + "; ".join(cells))
    return [*lines, ""]
