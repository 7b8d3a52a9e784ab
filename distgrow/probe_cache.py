"""``distgrow probe``'s results, their text, what they depend on, and their cache.

A probe's answer holds for one model on one device: :func:`probe_identity` names what it depends
on, :func:`cache_key` hashes that, and the result is kept under ``~/.cache/distgrow/probe/``
(``$XDG_CACHE_HOME`` if set), one JSON file per key, written atomically. :mod:`distgrow.probe`
measures and re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from distgrow.atomic import atomic_write_bytes
from distgrow.config import Config
from distgrow.data import DataBundle, LoaderDataset
from distgrow.gpu import PinnedArrays, data_placement

DEFAULT_TOLERANCE = 0.05
"""A micro-batch within this fraction of the best throughput counts as saturated."""
CACHE_VERSION = 2

Status = Literal["ok", "over_budget", "out_of_memory"]


@dataclass(frozen=True)
class ProbeRow:
    """One micro-batch: its throughput and peak memory, or why it stopped the probe."""

    micro_batch: int
    status: Status
    samples_per_s: float | None = None
    peak_bytes: int | None = None
    """CUDA: peak allocated; CPU: peak resident-set growth; None when not measurable."""
    reserved_bytes: int | None = None
    """CUDA only: peak reserved by the caching allocator."""


@dataclass
class ProbeResult:
    """A probe of one model on one device: the table and the two answers."""

    key: str
    device: str
    memory_kind: str
    budget_bytes: int | None
    rows: list[ProbeRow]
    preferred_micro_batch: int
    max_micro_batch: int
    stopped: str
    """Why the doubling stopped (a phrase)."""
    tolerance: float = DEFAULT_TOLERANCE
    identity: dict[str, Any] = field(default_factory=dict)
    """What the key hashes (:func:`probe_identity`)."""
    measured_at: float = 0.0
    budget_spec: str | None = None
    """The ``--memory-budget`` it was measured under (None: the device's default)."""
    overhead_bytes: int = 0
    """Added to every row's peak: what training holds that the probe does not build."""

    def to_json(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeResult:
        fields = {k: v for k, v in data.items() if k != "version"}
        fields["rows"] = [ProbeRow(**row) for row in fields["rows"]]
        return cls(**fields)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/distgrow/probe`` (``~/.cache/distgrow/probe`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distgrow" / "probe"


def device_name(device: torch.device) -> str:
    """The device as the cache knows it: the GPU's name, or the CPU's model (not its thread
    count: the answer the cache serves, the memory limit, does not depend on it)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"cpu: {cpu}"


def probe_identity(
    cfg: Config,
    input_shape: Sequence[int],
    device: str,
    placement: str = "host",
    world_size: int = 1,
) -> dict[str, Any]:
    """What a probe's answer depends on: the model, the optimizer (its state's size), the
    input shape, the precision, the device, where the data lives (``device``: on the GPU beside
    the model), the world size (DDP's buckets), the backend, the noise meter, and compilation
    and memory format."""
    return {
        "model": asdict(cfg.model),
        "optim": cfg.optim.name,
        "input_shape": list(input_shape),
        "precision": cfg.backend.precision,
        "device": device,
        "placement": placement,
        "world_size": world_size,
        "backend": cfg.backend.name,
        "noise": cfg.noise.enabled(cfg.growth),
        "compile": cfg.run.compile,
        "channels_last": cfg.run.channels_last,
    }


def data_placement_of(cfg: Config, data: DataBundle, device: torch.device) -> str:
    """Where training keeps ``data`` on ``device``: ``device``, ``pinned``, ``host`` (the CPU)
    or ``loader`` (read sample by sample), as :func:`distgrow.gpu.place_data` decides."""
    train, val = data.train, data.val
    if isinstance(train, LoaderDataset) or isinstance(val, LoaderDataset):
        return "loader"
    if device.type != "cuda":
        return "host"
    if isinstance(train, PinnedArrays):
        return "pinned"
    if train.x.device.type == "cuda":
        return "device"
    total = sum(t.numel() * t.element_size() for t in (train.x, train.y, val.x, val.y))
    free, _ = torch.cuda.mem_get_info(device)
    return data_placement(total, free, cfg.data.device_fraction, device.type)


def training_overhead_bytes(cfg: Config, model: torch.nn.Module, world_size: int) -> int:
    """What training holds on the device beyond one process's forward, backward and step:
    DDP's gradient buckets on several workers of the torch backend (one more copy of the
    gradients), and the noise meter's float64 copy of the flat gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    extra = grad_bytes if world_size > 1 and cfg.backend.name == "torch" else 0
    if cfg.noise.enabled(cfg.growth):
        extra += sum(p.numel() for p in params) * 8
    return extra


def cache_key(identity: dict[str, Any]) -> str:
    """A short hash of :func:`probe_identity`."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def read_cache(key: str) -> ProbeResult | None:
    """The cached probe of ``key``; None when absent or unreadable (it is measured again)."""
    try:
        data = json.loads(cache_path(key).read_text(encoding="utf-8"))
        return ProbeResult.from_json(data) if data.get("version") == CACHE_VERSION else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def write_cache(result: ProbeResult) -> Path:
    """Write ``result`` atomically (:func:`distgrow.atomic.atomic_write_bytes`); its file."""
    path = cache_path(result.key)
    atomic_write_bytes(path, json.dumps(result.to_json(), indent=2).encode("utf-8"))
    return path


def gib(value: int | None) -> str:
    """Bytes as GiB for the probe's table (``-`` when unmeasured)."""
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def format_row(row: ProbeRow) -> str:
    rate = "-" if row.samples_per_s is None else f"{row.samples_per_s:,.0f}"
    return f"{row.micro_batch:>10}  {rate:>12}  {gib(row.peak_bytes):>12}  {row.status}"


def format_result(result: ProbeResult, source: str | None = None) -> str:
    """The table and the two answers, as ``distgrow probe`` prints them."""
    memory = (
        "peak reserved + CUDA context (CUDA)"
        if result.memory_kind == "cuda_peak_reserved"
        else "peak RSS growth (CPU)"
    )
    if result.overhead_bytes:
        memory += f" + {gib(result.overhead_bytes)} training adds (DDP buckets, noise meter)"
    lines = [
        f"probe: {result.device}; memory = {memory}; budget {gib(result.budget_bytes)}"
        + (f"; {source}" if source else ""),
        f"{'micro':>10}  {'samples/s':>12}  {'memory':>12}  status",
        *(format_row(r) for r in result.rows),
        f"stopped: {result.stopped}",
        f"throughput saturates at micro-batch {result.preferred_micro_batch} (the smallest within "
        f"{result.tolerance:.0%} of the best): growth.micro_batch={result.preferred_micro_batch}",
        f"memory limit: micro-batch {result.max_micro_batch}: growth.max_micro_batch="
        f"{result.max_micro_batch} (or growth.max_micro_batch=auto, which reads this cache)",
    ]
    return "\n".join(lines)
