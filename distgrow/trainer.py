"""The training loop: a growth plan, realised update by update on a data-parallel backend.

:class:`Trainer` reads top to bottom: ``train()`` runs epochs, ``train_epoch()`` cuts the
epoch's permutation into global batches, ``train_step()`` runs one update as ``accum_steps``
micro-batches on this rank. Before each update the :class:`~distgrow.planner.GrowthPolicy`
says which setting to use; when the batch or its split changes the trainer logs a growth event
and checkpoints; when the plan needs more workers than the job has, it checkpoints and exits
with :data:`EXIT_NEED_WORKERS`.

Exactness. A micro-batch's loss is its summed per-sample loss × ``world_size / n`` (``n`` the
samples in the global batch); the backend averages over ranks and accumulates over micro-steps,
so the gradient is exactly the global batch's mean gradient, for partial batches and for empty
micro-batches too. Dropout is reseeded per micro-batch from ``(run.seed, epoch, first sample
index)`` and the sample order is one permutation per epoch, so 1 worker × 4 accumulation steps,
2 × 2 and 4 × 1 compute the same updates. Batch-norm running statistics from several workers are
merged as one worker would have accumulated them (:class:`RunningStatsMerger`).

Exit statuses (also in ``distgrow train --help``):

* :data:`EXIT_OK` (0): trained to ``run.epochs``.
* :data:`EXIT_FAILURE` (1): an unexpected error (a traceback is printed).
* :data:`EXIT_USAGE` (2): a config, data, run-directory or checkpoint problem; nothing trained.
* :data:`EXIT_NONFINITE` (65): the loss became NaN/inf; the last good checkpoint is kept.
* :data:`EXIT_NEED_WORKERS` (75): the plan needs more workers than the job has; a checkpoint and
  ``resize.json`` (``need_workers``, ``have_workers``, ``epoch``, ``step``, ``checkpoint``) are
  in the run directory. Relaunch with that many workers and ``--resume``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distgrow import __version__
from distgrow.backends import Backend, BackendError, make_backend
from distgrow.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    fingerprint,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)
from distgrow.config import Config, ConfigError, OptimConfig, dump_config
from distgrow.data import (
    DataBundle,
    DatasetFormatError,
    DatasetNotFoundError,
    epoch_permutation,
    load_dataset,
    shard_global_batch,
)
from distgrow.metrics import JsonlLogger, Logger, NullLogger, ThroughputMeter, write_json
from distgrow.models import build_model, uses_batch_norm
from distgrow.planner import GrowthPolicy, Realisation, Setting, make_plan
from distgrow.runtime import Runtime, RuntimeEnvError, detect_runtime, export_environment

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NONFINITE = 65  # sysexits EX_DATAERR: the numbers went bad, not the program
EXIT_NEED_WORKERS = 75  # sysexits EX_TEMPFAIL: retry with more workers

RESIZE_FILE = "resize.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

# Validation runs in fixed chunks, each on one rank, summed in chunk order: the metrics are
# bit-identical for any world size (given the same parameters).
_VAL_CHUNK = 500


class TrainError(RuntimeError):
    """A run that cannot start or continue as asked; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Pieces the loop uses
# --------------------------------------------------------------------------------------------


def build_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    """The optimizer of ``optim.name`` with the config's start values.

    The learning rate and momentum are overwritten before every update from the plan; betas,
    eps and weight decay stay as configured.
    """
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.RMSprop(
        params, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def loss_sum(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The sum over samples of each sample's loss (cross-entropy, or MSE for regression).

    A sum, not a mean, so that the trainer can divide by the global batch's size: an empty
    micro-batch gives 0 with gradients of 0 for every parameter.
    """
    if num_classes > 0:
        return F.cross_entropy(outputs, targets, reduction="sum")
    if outputs.numel() == targets.numel():
        outputs = outputs.reshape(targets.shape)
    squared = (outputs - targets) ** 2
    return squared.flatten(1).mean(1).sum() if squared.dim() > 1 else squared.sum()


def micro_batch_seed(seed: int, epoch: int, first_index: int) -> int:
    """The RNG seed of a micro-batch: a hash of (run seed, epoch, its first sample's index).

    Dropout masks then depend on which samples are processed, not on the rank, the world size
    or the accumulation step that processes them.
    """
    value = 0
    for part in (seed, epoch, first_index):
        value = _splitmix64(value ^ (part & 0xFFFFFFFFFFFFFFFF))
    return value & 0x7FFFFFFFFFFFFFFF


def _splitmix64(value: int) -> int:
    z = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def configure_threads(runtime: Runtime, threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else this node's cores shared by its workers.

    torchrun would leave every worker with one thread (``OMP_NUM_THREADS=1``) however many
    cores there are; a single process would take them all.

    Returns:
        The thread count set.
    """
    if threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        threads = max(1, cores // runtime.local_world_size)
    torch.set_num_threads(threads)
    return threads


class RunningStatsMerger:
    """Batch-norm running statistics as one worker would have accumulated them.

    Under DDP each rank updates its running mean/var only from its own micro-batches. The
    update of a BN layer with momentum ``m`` is linear: after the ghost chunks ``j = 0..T-1`` of
    one global batch, in global order, ``r = (1-m)^T r0 + Σ_j m (1-m)^(T-1-j) μ_j``. Each rank
    measures its micro-batches' contributions (the change of the buffers, minus the decay of
    the value before), weights them by the decay of the chunks that follow them in global
    order, and one all-reduce sums them: every rank ends with the single-worker value (up to
    float rounding), so checkpoints, validation and resumes do not depend on the world size.
    The number of statistic updates per micro-batch is read from ``num_batches_tracked``, so
    plain and ghost batch norm are handled alike.

    Args:
        model: The unwrapped model.
        backend: For the two all-reduces per update.

    Raises:
        TrainError: a batch-norm layer with ``momentum=None`` (a cumulative average is not
            linear in this way).
    """

    def __init__(self, model: nn.Module, backend: Backend) -> None:
        self.backend = backend
        # (running_mean, running_var, num_batches_tracked, momentum) of each BN layer.
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
        for module in model.modules():
            buffers = [getattr(module, name, None) for name in _BN_BUFFERS]
            if not all(isinstance(b, torch.Tensor) for b in buffers):
                continue
            momentum = getattr(module, "momentum", None)
            if momentum is None:
                raise TrainError(
                    f"{type(module).__name__} has momentum=None (a cumulative average), which "
                    "cannot be merged exactly across workers. Fix: use a batch-norm momentum "
                    "such as 0.1, or train on one worker."
                )
            mean, var, count = (typing.cast(torch.Tensor, b) for b in buffers)
            self.layers.append((mean, var, count, float(momentum)))
        self._start: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        # Per micro-batch: (chunk, [(updates, Δmean, Δvar) per layer]).
        self._parts: list[tuple[int, list[tuple[int, torch.Tensor, torch.Tensor]]]] = []

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        return [
            (mean.detach().double().clone(), var.detach().double().clone(), int(count))
            for mean, var, count, _ in self.layers
        ]

    def begin_update(self) -> None:
        """Call before the first micro-batch of an update."""
        self._start = self._snapshot()
        self._parts = []

    def before_micro_batch(self) -> None:
        """Call before each micro-batch's forward."""
        self._before = self._snapshot()

    def after_micro_batch(self, chunk: int) -> None:
        """Call after each micro-batch's forward; ``chunk`` is its index in the global batch."""
        parts = []
        for (_, _, _, m), (mean0, var0, count0), (mean1, var1, count1) in zip(
            self.layers, self._before, self._snapshot(), strict=True
        ):
            q = count1 - count0
            decay = (1.0 - m) ** q
            parts.append((q, mean1 - decay * mean0, var1 - decay * var0))
        self._parts.append((chunk, parts))

    def end_update(self, chunks: int) -> None:
        """Merge over ranks; ``chunks`` = workers × accum_steps of this update."""
        if not self.layers:
            return
        n = len(self.layers)
        device = self.layers[0][0].device
        counts = torch.zeros(n, chunks, dtype=torch.float64, device=device)
        for chunk, parts in self._parts:
            for i, (q, _, _) in enumerate(parts):
                counts[i, chunk] = q
        self.backend.all_reduce(counts, "sum")
        # later[i, k]: statistic updates of layer i in the chunks after chunk k (global order).
        later = counts.flip(1).cumsum(1).flip(1) - counts
        sums = [torch.zeros_like(mean) for mean, _, _ in self._start]
        sums += [torch.zeros_like(var) for _, var, _ in self._start]
        for chunk, parts in self._parts:
            for i, (_, d_mean, d_var) in enumerate(parts):
                weight = (1.0 - self.layers[i][3]) ** float(later[i, chunk])
                sums[i] += weight * d_mean
                sums[n + i] += weight * d_var
        flat = self.backend.all_reduce(torch.cat([t.flatten() for t in sums]), "sum")
        merged = list(flat.split([t.numel() for t in sums]))
        totals = counts.sum(1)
        with torch.no_grad():
            for i, ((mean, var, count, m), (mean0, var0, count0)) in enumerate(
                zip(self.layers, self._start, strict=True)
            ):
                decay = (1.0 - m) ** float(totals[i])
                mean.copy_(decay * mean0 + merged[i].view_as(mean0))
                var.copy_(decay * var0 + merged[n + i].view_as(var0))
                count.fill_(count0 + round(float(totals[i])))


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """One run of a growth plan on one backend.

    Args:
        cfg: The validated config.
        backend: A started backend (its rank and world size are this job's).
        data: The loaded data set.
        echo: Where rank 0 prints progress lines (``print`` by default).

    Raises:
        ConfigError: the plan cannot be realised on this many workers.
        TrainError: the model cannot be built for this data.
    """

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        data: DataBundle,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.data = data
        self.world = backend.world_size
        self.rank = backend.rank
        self.device = backend.device
        self.echo = echo or _print_flush
        self.num_train = len(data.train)
        self.run_dir = Path(cfg.run.resolved_output_dir)
        self.align = cfg.model.ghost_batch or 1

        self.policy = GrowthPolicy(cfg, self.num_train, min_workers=self.world)
        self.plan = make_plan(cfg, self.num_train, min_workers=self.world)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.model = self._build_model().to(self.device)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.train_model = backend.setup(self.model, self.optimizer)
        self.bn_merger = (
            RunningStatsMerger(self.model, backend)
            if self.world > 1 and uses_batch_norm(self.model)
            else None
        )
        self.logger: Logger = NullLogger()
        self.fingerprint = fingerprint(cfg, self.num_train)

        # Where training stands; all of it goes into checkpoints.
        self.epoch = 0  # the epoch in progress (0-based); == epochs completed when position 0
        self.position = 0  # samples of this epoch already consumed
        self.step = 0  # parameter updates so far
        self.samples_seen = 0
        self.realisation: Realisation | None = None  # the split of the last update
        self.last_setting: Setting | None = None
        self.epoch_loss_sum = 0.0  # Σ mean-loss × samples over this epoch's updates
        self.epoch_samples = 0
        self.growth_events = 0
        self.last_val: dict[str, float | None] = {"val_loss": None, "val_acc": None}
        self.last_train_loss: float | None = None
        self.prior_wall_s = 0.0  # from earlier processes of this run (resumes)
        self.prior_worker_s = 0.0
        self._last_checkpoint: tuple[tuple[int, int, int], Path] | None = None
        self._start_time = time.perf_counter()
        self._epoch_start = self._start_time
        self._meter = ThroughputMeter()
        self._epoch_meter = ThroughputMeter()
        self._window_loss = 0.0
        self._window_samples = 0

    def _build_model(self) -> nn.Module:
        m, d = self.cfg.model, self.data
        if d.num_classes > 0:
            outputs = d.num_classes
        else:
            outputs = 1 if d.train.y.dim() == 1 else int(d.train.y.shape[1])
        try:
            return build_model(
                m.name,
                input_shape=d.input_shape,
                num_outputs=outputs,
                hidden=list(m.hidden) if m.name == "mlp" else None,
                dropout=m.dropout,
                depth=m.depth,
                width=m.width,
                ghost_batch=m.ghost_batch,
            )
        except (ValueError, ImportError) as err:  # the model does not fit this data or install
            raise TrainError(
                f"model.name = {m.name!r} cannot be built for data.name = {d.name!r} (samples "
                f"of shape {d.input_shape}): {err}"
            ) from err

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to ``run.epochs`` (resuming when asked); returns the exit status."""
        self.open_run()
        try:
            code = EXIT_OK
            while self.epoch < self.cfg.run.epochs and code == EXIT_OK:
                code = self.train_epoch()
                if code == EXIT_OK:
                    self.end_epoch()
            if code == EXIT_OK:
                self.finish()
            # Rank 0 may still be writing its files; nobody leaves before it is done.
            self.backend.barrier()
            return code
        finally:
            self.logger.close()

    def train_epoch(self) -> int:
        """Consume the rest of the current epoch, one global batch per update."""
        order = epoch_permutation(self.num_train, self.cfg.run.seed, self.epoch)
        while self.position < self.num_train:
            setting = self.next_setting()
            if setting.workers > self.world:
                return self.stop_for_workers(setting)
            indices = order[self.position : self.position + setting.global_batch]
            loss = self.train_step(indices, setting)
            if not math.isfinite(loss):
                return self.stop_nonfinite(loss, setting)
            self.after_update(int(indices.numel()), loss, setting)
        return EXIT_OK

    def train_step(self, indices: torch.Tensor, setting: Setting) -> float:
        """One update from the global batch ``indices``; returns its mean loss over all ranks.

        The optimizer steps only when every rank's loss is finite (the loss is all-reduced
        first, so all ranks agree); otherwise the gradients are dropped and the NaN/inf is
        returned.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = setting.lr
            if self.cfg.optim.name in ("sgd", "rmsprop"):
                group["momentum"] = setting.momentum
        shards = shard_global_batch(
            indices,
            workers=setting.workers,
            micro_batch=setting.micro_batch,
            accum_steps=setting.accum_steps,
            rank=self.rank,
            align=self.align,
        )
        scale = self.world / indices.numel()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.bn_merger is not None:
            self.bn_merger.begin_update()
        for k, shard in enumerate(shards):
            if self.bn_merger is not None:
                self.bn_merger.before_micro_batch()
            with self.backend.micro_step(sync=k == len(shards) - 1):
                if shard.numel():
                    seed = micro_batch_seed(self.cfg.run.seed, self.epoch, int(shard[0]))
                    torch.manual_seed(seed)
                x, y = self.data.train.batch(shard, self.epoch)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss = loss_sum(self.train_model(x), y, self.data.num_classes) * scale
                self.backend.backward(loss)
            total += loss.detach()
            if self.bn_merger is not None:
                self.bn_merger.after_micro_batch(k * setting.workers + self.rank)
        if self.bn_merger is not None:
            self.bn_merger.end_update(setting.workers * setting.accum_steps)
        mean_loss = float(self.backend.all_reduce(total, "sum")) / self.world
        if math.isfinite(mean_loss):
            self.backend.step(self.optimizer, self.cfg.optim.grad_clip)
        else:
            self.backend.zero_grad(self.optimizer)
        return mean_loss

    def next_setting(self) -> Setting:
        """The plan's setting for the next update; logs and checkpoints a change of split."""
        setting = self.policy.setting(self.epoch, self.position)
        if setting.workers > self.world:
            return setting  # the caller stops for more workers
        new, old = setting.realisation, self.realisation
        self.realisation = new
        if old is None or new == old:
            return setting
        kind = "growth" if new.global_batch != old.global_batch else "resplit"
        self.growth_events += kind == "growth"
        self._log_event(kind, setting, previous=asdict(old))
        self._say(
            f"epoch {self.epoch + 1}: {kind}: batch {old.global_batch} → {new.global_batch} "
            f"= {_split(new)}, lr {setting.lr:.4g}, momentum {setting.momentum:g}"
        )
        self.save(kind)
        return setting

    def after_update(self, samples: int, loss: float, setting: Setting) -> None:
        """Advance the counters; log a step record every ``logging.every_steps`` updates."""
        self.position += samples
        self.samples_seen += samples
        self.step += 1
        self.epoch_loss_sum += loss * samples
        self.epoch_samples += samples
        self._window_loss += loss * samples
        self._window_samples += samples
        self._meter.add(samples)
        self._epoch_meter.add(samples)
        self.last_setting = setting
        if self.step % self.cfg.logging.every_steps:
            return
        train_loss = self._window_loss / self._window_samples
        self._window_loss, self._window_samples = 0.0, 0
        record = self._record("step", setting, train_loss=train_loss)
        record["samples_per_s"] = self._meter.rate()
        self.logger.log(record)
        self._say(
            f"epoch {self.epoch + 1}/{self.cfg.run.epochs}  step {self.step:,}  batch "
            f"{setting.global_batch} = {_split(setting.realisation)}  lr {setting.lr:.4g}  "
            f"loss {train_loss:.4f}  {record['samples_per_s']:,.0f} samples/s"
        )

    def end_epoch(self) -> None:
        """Validate, let the plateau rule decide (rank 0, broadcast), log and checkpoint."""
        train_rate = self._epoch_meter.rate()  # before validation: the training throughput
        val = self.validate()
        train_loss = self.epoch_loss_sum / max(1, self.epoch_samples)
        self.last_val, self.last_train_loss = val, train_loss
        if self.policy.trigger is not None:
            monitored = {**val, "train_loss": train_loss}[self.cfg.schedule.monitor]
            metric = math.nan if monitored is None else monitored
            if self.backend.is_main:
                self.policy.end_epoch(metric)
            decided = self.backend.broadcast_object(
                self.policy.state_dict() if self.backend.is_main else None
            )
            self.policy.load_state_dict(decided)
        now = time.perf_counter()
        epoch_wall = now - self._epoch_start
        self._epoch_start = now
        # The last update's setting: asking the policy again here could move its state.
        setting = self.last_setting or self.policy.setting(self.epoch, self.position)
        self.epoch += 1
        self.position = 0
        record = self._record("epoch", setting, train_loss=train_loss, **val)
        record["samples_per_s"] = train_rate
        record["epoch_wall_s"] = epoch_wall
        self.epoch_loss_sum, self.epoch_samples = 0.0, 0
        self.logger.log(record)
        acc = "" if val["val_acc"] is None else f"  val_acc {val['val_acc']:.4f}"
        self._say(
            f"epoch {self.epoch}/{self.cfg.run.epochs} done: train_loss {train_loss:.4f}  "
            f"val_loss {val['val_loss']:.4f}{acc}  ({epoch_wall:.1f} s, {self.step:,} updates)"
        )
        self.save("epoch")
        self._meter.restart()
        self._epoch_meter.restart()

    @torch.no_grad()
    def validate(self) -> dict[str, float | None]:
        """Mean validation loss (and accuracy for classification), the same on every rank."""
        val = self.data.val
        n = len(val)
        chunks = math.ceil(n / _VAL_CHUNK)
        sums = torch.zeros(chunks, 2, dtype=torch.float64, device=self.device)
        self.model.eval()
        try:
            for c in range(self.rank, chunks, self.world):
                idx = torch.arange(c * _VAL_CHUNK, min(n, (c + 1) * _VAL_CHUNK))
                x, y = val.batch(idx, 0)
                x, y = x.to(self.device), y.to(self.device)
                out = self.model(x)
                sums[c, 0] = loss_sum(out, y, self.data.num_classes).double()
                if self.data.num_classes > 0:
                    sums[c, 1] = (out.argmax(1) == y).sum().double()
        finally:
            self.model.train()
        self.backend.all_reduce(sums, "sum")
        totals = sums.sum(0)
        return {
            "val_loss": float(totals[0]) / n,
            "val_acc": float(totals[1]) / n if self.data.num_classes > 0 else None,
        }

    def finish(self) -> None:
        """Write ``summary.json`` (rank 0)."""
        wall, worker_s = self._clock()
        summary = {
            "status": "completed",
            "epochs": self.epoch,
            "total_updates": self.step,
            "samples_seen": self.samples_seen,
            "train_loss": self.last_train_loss,
            **self.last_val,
            "wall_s": wall,
            "worker_seconds": worker_s,
            "world_size": self.world,
            "growth_events": self.growth_events,
            "final_setting": asdict(self.realisation) if self.realisation else None,
            "growth_mode": self.cfg.growth.mode,
            "planned_total_updates": self.plan.total_updates,
            "baseline_total_updates": self.plan.baseline_total_updates,
            "update_ratio_vs_baseline": (
                self.plan.baseline_total_updates / self.step
                if self.plan.baseline_total_updates and self.step
                else None
            ),
            "distgrow_version": __version__,
        }
        if self.backend.is_main:
            write_json(self.run_dir / SUMMARY_FILE, summary)
        self.logger.log({"kind": "event", "event": "end", **summary})
        acc = "" if summary["val_acc"] is None else f", val_acc {summary['val_acc']:.4f}"
        self._say(
            f"done: {self.step:,} updates, {self.samples_seen:,} samples{acc}, {wall:.1f} s; "
            f"results in {self.run_dir}"
        )

    # -- stopping ------------------------------------------------------------------------------

    def stop_for_workers(self, setting: Setting) -> int:
        """Checkpoint and write ``resize.json``: the plan needs more workers than the job has."""
        path = self.save("need_workers")
        info = {
            "need_workers": setting.workers,
            "have_workers": self.world,
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "global_batch": setting.global_batch,
            "micro_batch": setting.micro_batch,
            "accum_steps": setting.accum_steps,
            "checkpoint": str(path),
            "exit_code": EXIT_NEED_WORKERS,
        }
        if self.backend.is_main:
            write_json(self.run_dir / RESIZE_FILE, info)
        self._log_event("need_workers", setting, **info)
        self._say(
            f"epoch {self.epoch + 1}: the plan needs {setting.workers} workers for a global batch "
            f"of {setting.global_batch}, the job has {self.world}. Checkpoint {path}; wrote "
            f"{self.run_dir / RESIZE_FILE}. Relaunch with {setting.workers} workers and --resume "
            f"(exit status {EXIT_NEED_WORKERS})."
        )
        return EXIT_NEED_WORKERS

    def stop_nonfinite(self, loss: float, setting: Setting) -> int:
        """Stop on a NaN/inf loss; the last good checkpoint stays as it is."""
        last = self._last_checkpoint[1] if self._last_checkpoint else None
        self._log_event("nonfinite", setting, loss=str(loss))
        if self.backend.is_main:
            print(
                f"distgrow: stopping: the training loss is {loss} at epoch {self.epoch + 1}, "
                f"update {self.step + 1} (global batch {setting.global_batch}, lr "
                f"{setting.lr:.4g}); the parameters were not updated with it. Last good "
                f"checkpoint: {last or 'none yet'}. Fix: lower optim.lr (now "
                f"{self.cfg.optim.lr:g}) or set optim.grad_clip (e.g. 1.0), then rerun with "
                "--resume.",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_NONFINITE

    # -- run directory, checkpoints, resume --------------------------------------------------

    def open_run(self) -> None:
        """Refuse to overwrite a run; resume from its newest checkpoint when asked.

        Rank 0 looks at the run directory and loads the checkpoint; the decision (or the error)
        is broadcast, so every rank resumes from the same state without a shared file system.

        Raises:
            TrainError: the directory holds a run and ``run.resume`` is false.
            CheckpointError: the newest checkpoint is unreadable or from another run.
        """
        payload: tuple[str, Any] = ("fresh", None)
        if self.backend.is_main:
            payload = self._inspect_run_dir()
        kind, value = self.backend.broadcast_object(payload)
        if kind == "refuse":
            raise TrainError(value)
        if kind == "checkpoint_error":
            raise CheckpointError(value)
        if self.backend.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RESIZE_FILE).unlink(missing_ok=True)  # it described the last exit
            (self.run_dir / CONFIG_FILE).write_text(dump_config(self.cfg))
            self.logger = JsonlLogger(self.run_dir / METRICS_FILE)
        if kind == "resume":
            path, state = value
            self.load_state(state)
            self._last_checkpoint = ((self.epoch, self.position, self.step), Path(path))
            self._log_event("resume", None, checkpoint=str(path), world_size=self.world)
            self._say(
                f"resuming from {path}: epoch {self.epoch + 1}, {self.position:,} samples in, "
                f"{self.step:,} updates, on {self.world} worker(s)"
            )
        else:
            if self.cfg.run.resume:
                self._say(f"no checkpoint in {self.run_dir}: starting a fresh run")
            self._log_event("start", None, world_size=self.world)
        self._say(
            f"training {self.cfg.model.name} on {self.data.name} (N={self.num_train:,}) for "
            f"{self.cfg.run.epochs} epochs on {self.world} worker(s), {self.device}; "
            f"plan: {self.plan.total_updates or '?'} updates (decay_lr baseline: "
            f"{self.plan.baseline_total_updates or '?'}); run dir {self.run_dir}"
        )
        self._start_time = self._epoch_start = time.perf_counter()
        self._meter, self._epoch_meter = ThroughputMeter(), ThroughputMeter()

    def _inspect_run_dir(self) -> tuple[str, Any]:
        """Rank 0: ('fresh' | 'resume' | 'refuse' | 'checkpoint_error', detail)."""
        if not self.cfg.run.resume:
            present = [p.name for p in list_checkpoints(self.run_dir)[-1:]] + [
                name for name in (SUMMARY_FILE, METRICS_FILE) if (self.run_dir / name).exists()
            ]
            if present:
                return (
                    "refuse",
                    f"run directory {self.run_dir} already holds a run ({', '.join(present)}); "
                    "distgrow never overwrites a run's results. Fix: pass --resume "
                    "(run.resume=true) to continue it, or choose another run.output_dir "
                    "(or run.name).",
                )
            return ("fresh", None)
        try:
            found = load_latest(self.run_dir, self.fingerprint)
        except CheckpointError as err:
            return ("checkpoint_error", str(err))
        if found is None:
            return ("fresh", None)
        return ("resume", (str(found[0]), found[1]))

    def state_dict(self, reason: str) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain types (``weights_only`` loads it)."""
        wall, worker_s = self._clock()
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "model": self.backend.model_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "plan_state": self.policy.state_dict(),
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "rng": torch.get_rng_state(),
            "world_size": self.world,
            "realisation": asdict(self.realisation) if self.realisation else None,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_samples": self.epoch_samples,
            "growth_events": self.growth_events,
            "last_val": dict(self.last_val),
            "last_train_loss": self.last_train_loss,
            "wall_s": wall,
            "worker_seconds": worker_s,
            "reason": reason,
            "distgrow_version": __version__,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written at any world size.

        Raises:
            TrainError: the checkpoint's global batch cannot be split over this job's workers.
        """
        self.backend.load_model_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        plan_state = dict(state["plan_state"])
        if int(state.get("world_size", self.world)) != self.world:
            # The sample order depends only on the global batch: split it anew for this job.
            batch = int(plan_state["current"]["global_batch"])
            split = self.policy.limits.realise(batch)
            if split is None:
                raise TrainError(
                    f"the checkpoint's global batch ({batch}) cannot be split over "
                    f"{self.world} workers in micro-batches that are multiples of "
                    f"{self.align}. Fix: resume on {state['world_size']} workers, or on a "
                    f"number of workers that divides {batch // self.align}."
                )
            if split.global_batch != batch:
                self._say(
                    f"warning: the global batch {batch} of the checkpoint is not realisable on "
                    f"{self.world} workers; continuing with {split.global_batch} = {_split(split)}"
                )
            plan_state["current"] = asdict(split)
        self.policy.load_state_dict(plan_state)
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        torch.set_rng_state(state["rng"])
        real = state.get("realisation")
        self.realisation = Realisation(**real) if real else None
        self.epoch_loss_sum = float(state.get("epoch_loss_sum", 0.0))
        self.epoch_samples = int(state.get("epoch_samples", 0))
        self.growth_events = int(state.get("growth_events", 0))
        self.last_val = dict(state.get("last_val", self.last_val))
        self.last_train_loss = state.get("last_train_loss")
        self.prior_wall_s = float(state.get("wall_s", 0.0))
        self.prior_worker_s = float(state.get("worker_seconds", 0.0))

    def save(self, reason: str) -> Path:
        """Checkpoint now (rank 0 writes); a no-op returning the file if nothing moved since."""
        key = (self.epoch, self.position, self.step)
        if self._last_checkpoint is not None and self._last_checkpoint[0] == key:
            return self._last_checkpoint[1]
        path = self.run_dir / f"ckpt-{self.step:09d}.pt"
        if self.backend.is_main:
            path = save_checkpoint(
                self.run_dir, self.state_dict(reason), self.cfg.run.keep_checkpoints
            )
        self._last_checkpoint = (key, path)
        return path

    # -- helpers -------------------------------------------------------------------------------

    def _clock(self) -> tuple[float, float]:
        """(wall seconds, worker seconds) of this run, over all its processes so far."""
        elapsed = time.perf_counter() - self._start_time
        return self.prior_wall_s + elapsed, self.prior_worker_s + elapsed * self.world

    def _record(self, kind: str, setting: Setting, **metrics: float | None) -> dict[str, Any]:
        wall, _ = self._clock()
        record: dict[str, Any] = {
            "kind": kind,
            "epoch": self.epoch + (0 if kind == "epoch" else 1),
            "step": self.step,
            "samples_seen": self.samples_seen,
            "global_batch": setting.global_batch,
            "workers": setting.workers,
            "micro_batch": setting.micro_batch,
            "accum_steps": setting.accum_steps,
            "lr": setting.lr,
            "momentum": setting.momentum,
            "train_loss": None,
            "val_loss": None,
            "val_acc": None,
            "wall_s": wall,
        }
        record.update(metrics)
        return record

    def _log_event(self, event: str, setting: Setting | None, **extra: Any) -> None:
        record: dict[str, Any] = {"kind": "event", "event": event}
        if setting is not None:
            record = {**self._record("event", setting), "event": event}
        else:
            record.update(epoch=self.epoch + 1, step=self.step, samples_seen=self.samples_seen)
        record.update(extra)
        self.logger.log(record)

    def _say(self, line: str) -> None:
        if self.backend.is_main and self.cfg.logging.progress != "off":
            self.echo(f"distgrow: {line}")


def _split(r: Realisation) -> str:
    return f"{r.workers}×{r.micro_batch}×{r.accum_steps}"


def _print_flush(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Entry point of `distgrow train`
# --------------------------------------------------------------------------------------------


def load_data(cfg: Config) -> DataBundle:
    """The data set of ``cfg.data``, split with ``run.seed``."""
    d = cfg.data
    return load_dataset(
        d.name,
        root=d.root,
        val_fraction=d.val_fraction,
        seed=cfg.run.seed,
        download=d.download,
        augment=d.augment,
        limit_train=d.limit_train,
        limit_val=d.limit_val,
        synthetic_samples=d.synthetic_samples,
        synthetic_features=d.synthetic_features,
    )


def run(cfg: Config) -> int:
    """Train ``cfg`` as this process's part of the job, then end the process.

    Reads the launcher's environment (torchrun, mpirun, srun, PMI, or none), starts the backend,
    trains, and leaves through ``backend.shutdown`` (which never returns once a job was joined;
    it raises ``SystemExit`` in a single process). Errors before the job is joined are printed
    and returned as :data:`EXIT_USAGE`.
    """
    prefix = "distgrow: error"
    try:
        runtime = detect_runtime(
            os.environ,
            default_addr=cfg.launch.master_addr,
            default_port=cfg.launch.master_port,
        )
        if runtime.world_size > 1:
            prefix = f"distgrow[rank {runtime.rank}]: error"
        export_environment(runtime, os.environ)
        configure_threads(runtime, cfg.run.threads)
        data = load_data(cfg)
        backend = make_backend(cfg.backend, runtime, cfg.run)
    except (
        RuntimeEnvError,
        DatasetNotFoundError,
        DatasetFormatError,
        BackendError,
        ValueError,
    ) as err:
        print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    code = EXIT_FAILURE
    try:
        code = Trainer(cfg, backend, data).train()
    except (TrainError, CheckpointError, ConfigError, BackendError) as err:
        # Decided on rank 0 and broadcast, or the same on every rank: say it once.
        if backend.is_main:
            print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except Exception:
        traceback.print_exc()
        code = EXIT_FAILURE
    backend.shutdown(code)
