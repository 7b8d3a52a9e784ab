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
* 130, 138, 143 (``128 +`` SIGINT, SIGUSR1, SIGTERM): stopped by that signal. The workers
  finished the update in progress, agreed on stopping after the same one, and checkpointed the
  exact position (epoch, sample, update); ``--resume`` (at any world size) continues from there
  with no sample repeated or skipped. See :mod:`distgrow.signals`.

Elastic runs (``launch.elastic=true``, torchrun agents joining one rendezvous): when the plan
needs more workers than the job has, rank 0 writes ``resize.json`` and training goes on with the
same global batch on the workers there are (more accumulation, the same updates); when the new
workers join, torchrun stops the old ones with SIGTERM (a checkpoint as above) and restarts all
of them at the new world size.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import asdict, replace
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
    checkpoint_path,
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
from distgrow.exits import (
    EXIT_FAILURE,
    EXIT_NEED_WORKERS,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_USAGE,
)
from distgrow.metrics import (
    JsonlLogger,
    Logger,
    MultiLogger,
    NullLogger,
    ThroughputMeter,
    write_json,
)
from distgrow.models import build_model, uses_batch_norm
from distgrow.planner import GrowthPolicy, Plan, Realisation, Setting, make_plan
from distgrow.progress import Progress, ProgressState
from distgrow.rundir import RESIZE_FILE
from distgrow.runtime import (
    Runtime,
    RuntimeEnvError,
    cpu_cores,
    detect_runtime,
    export_environment,
)
from distgrow.savings import PhaseTracker, process_age_s, try_estimated_savings
from distgrow.signals import StopSignals, exit_status, signal_name
from distgrow.wandb_logger import open_wandb_logger

# Elastic: how long workers that cannot split the batch among themselves wait for the workers
# they asked for before giving up (exit 75); torchrun's own rendezvous join timeout is 600 s.
ELASTIC_JOIN_WAIT_S = 300.0
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
        threads = max(1, cpu_cores() // runtime.local_world_size)
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
            (
                mean.detach().to(torch.float64, copy=True),
                var.detach().to(torch.float64, copy=True),
                int(count),
            )
            for mean, var, count, _ in self.layers
        ]

    def begin_update(self) -> None:
        """Call before the first micro-batch of an update."""
        self._start = self._before = self._snapshot()
        self._parts = []

    def after_micro_batch(self, chunk: int) -> None:
        """Call after each micro-batch's forward; ``chunk`` is its index in the global batch.

        Micro-batches follow each other with nothing else touching the statistics, so this
        one's end is the next one's start.
        """
        after = self._snapshot()
        parts = []
        for (_, _, _, m), (mean0, var0, count0), (mean1, var1, count1) in zip(
            self.layers, self._before, after, strict=True
        ):
            q = count1 - count0
            decay = (1.0 - m) ** q
            parts.append((q, mean1 - decay * mean0, var1 - decay * var0))
        self._parts.append((chunk, parts))
        self._before = after

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
        started_at: ``time.perf_counter()`` when this process began working on the run (its
            start, for ``distgrow train``); start-up lasts from there to the first update.
            Default: now.
        stop_signals: Installed by the caller (``run``): a signal it notes stops training
            after the current update, with a checkpoint (see :meth:`stop_for_signal`).
            Default: none installed, so signals keep their usual effect.
        startup_marks: Wall-clock times (``time.time()``) of this process's start-up stages,
            logged with the ``start``/``resume`` event (the resize-latency benchmark reads
            them).

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
        started_at: float | None = None,
        stop_signals: StopSignals | None = None,
        startup_marks: dict[str, float] | None = None,
    ) -> None:
        self._started_at = time.perf_counter() if started_at is None else started_at
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
        self.prior_startup_s = 0.0
        self.startup_s = 0.0  # all processes' start-up, up to the first update
        self.phases = PhaseTracker()  # throughput and time per batch realisation
        self.progress: Progress | None = None  # rank 0's bar or periodic lines
        # Phases in the plan as the tracker counts them (a change of realisation); plateau
        # schedules cannot know theirs in advance.
        self.planned_phases = None if self.plan.ladder else _count_realisations(self.plan)
        self._last_checkpoint: tuple[tuple[int, int, int], Path] | None = None
        self.stop_signals = stop_signals or StopSignals()  # not installed: no stop by signal
        self.startup_marks = startup_marks if startup_marks is not None else {}
        self._asked_for_workers = 0  # elastic: the worker count resize.json last asked for
        # Ranks that held a stop signal at the last update's all-reduce; None: not known.
        self._stop_votes: int | None = None
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
            if self.progress is not None:
                self.progress.close()
            self.logger.close()

    def train_epoch(self) -> int:
        """Consume the rest of the current epoch, one global batch per update."""
        order = epoch_permutation(self.num_train, self.cfg.run.seed, self.epoch)
        self._stop_votes = None  # validation ran since the last update: ask the ranks again
        while self.position < self.num_train:
            setting = self.next_setting()
            signum = self.agreed_stop_signal()
            if signum:
                return self.stop_for_signal(signum)
            if setting.workers > self.world:
                return self.stop_for_workers(setting)
            indices = order[self.position : self.position + setting.global_batch]
            started = time.perf_counter()
            loss = self.train_step(indices, setting)
            self.phases.record_update(int(indices.numel()), time.perf_counter() - started)
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
        self.backend.begin_update(setting.micro_batch, setting.accum_steps)
        if self.bn_merger is not None:
            self.bn_merger.begin_update()
        for k, shard in enumerate(shards):
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
        # The loss and the number of ranks holding a stop signal, in one all-reduce: the
        # stop check costs no collective of its own (see agreed_stop_signal).
        vote = float(self.stop_signals.received is not None)
        reduced = self.backend.all_reduce(torch.stack([total, total.new_tensor(vote)]), "sum")
        mean_loss = float(reduced[0]) / self.world
        self._stop_votes = round(float(reduced[1]))
        if math.isfinite(mean_loss):
            self.backend.step(self.optimizer, self.cfg.optim.grad_clip)
        else:
            self.backend.zero_grad(self.optimizer)
        return mean_loss

    def next_setting(self) -> Setting:
        """The plan's setting for the next update; logs and checkpoints a change of split."""
        setting = self.policy.setting(self.epoch, self.position)
        if setting.workers > self.world:
            interim = self.elastic_interim(setting)
            if interim is None:
                return setting  # the caller stops for more workers
            setting = interim
        new, old = setting.realisation, self.realisation
        self.realisation = new
        finished = None
        if self.phases.current is None or new != old:
            finished = self.phases.begin(
                global_batch=new.global_batch,
                workers=new.workers,
                micro_batch=new.micro_batch,
                accum_steps=new.accum_steps,
                lr=setting.lr,
                momentum=setting.momentum,
                start_epoch=self.epoch + self.position / self.num_train,
                start_step=self.step,
                world_size=self.world,
            )
        if old is None or new == old:
            return setting
        kind = "growth" if new.global_batch != old.global_batch else "resplit"
        self.growth_events += kind == "growth"
        self._log_event(
            kind,
            setting,
            previous=asdict(old),
            finished_phase=finished.to_dict() if finished is not None else None,
        )
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
        if self.progress is not None:
            self.progress.update(
                ProgressState(
                    epoch=self.epoch + 1,
                    samples_seen=self.samples_seen,
                    step=self.step,
                    phase=len(self.phases.phases),
                    phases=self.planned_phases,
                    global_batch=setting.global_batch,
                    lr=setting.lr,
                )
            )
        if self.step % self.cfg.logging.every_steps:
            return
        train_loss = self._window_loss / self._window_samples
        self._window_loss, self._window_samples = 0.0, 0
        record = self._record("step", setting, train_loss=train_loss)
        record["samples_per_s"] = self._meter.rate()
        record["samples_per_s_per_worker"] = record["samples_per_s"] / setting.workers
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
        """Write ``summary.json`` (rank 0), with per-phase throughput and estimated savings."""
        self.phases.tick()
        wall, worker_s = self._clock()
        train_s = self.phases.train_seconds()
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
            # Wall-clock above is training only; start-up is counted apart.
            "startup_s": self.startup_s,
            "train_s": train_s,
            "samples_per_s": self.samples_seen / train_s if train_s > 0 else None,
            "worker_hours": worker_s / 3600,
            "gpu_hours": worker_s / 3600 if self.device.type == "cuda" else None,
            "device": self.device.type,
            "base_batch": self.cfg.growth.base_batch,
            "dataset_size": self.num_train,
            "phases": self.phases.to_list(),
        }
        # Measured savings need a baseline run: `distgrow compare` / `distgrow report`.
        summary["savings"] = {"estimated": try_estimated_savings(summary)}
        if self.backend.is_main:
            write_json(self.run_dir / SUMMARY_FILE, summary)
        self.logger.log({"kind": "event", "event": "end", **summary})
        acc = "" if summary["val_acc"] is None else f", val_acc {summary['val_acc']:.4f}"
        self._say(
            f"done: {self.step:,} updates, {self.samples_seen:,} samples{acc}, {wall:.1f} s; "
            f"results in {self.run_dir}"
        )

    # -- stopping ------------------------------------------------------------------------------

    def agreed_stop_signal(self) -> int:
        """The stop signal any rank received (0: none), the same on every rank.

        Every rank stops after the same update, even when the signal reached only some of
        them. The last update's loss all-reduce also counted the ranks holding a signal: when
        it counted none, the answer is 0 without a collective (a signal that came after it is
        seen at the next update). Otherwise (a count above 0, or no update since: the start of
        an epoch or of the run, an elastic wait) one scalar all-reduce (max) agrees on it.
        """
        votes, self._stop_votes = self._stop_votes, None
        if votes == 0:
            return 0
        flag = torch.tensor(
            float(self.stop_signals.received or 0), dtype=torch.float64, device=self.device
        )
        return int(self.backend.all_reduce(flag, "max"))

    def _wait_for_stop(self, seconds: float) -> bool:
        """Idle until a stop signal (the restart that brings new workers) or ``seconds`` pass.

        Every rank takes the same decision at each poll (one all-reduce), so all leave the
        loop after the same number of collectives.

        Returns:
            True (on every rank) when a stop signal ended the wait.
        """
        start = time.monotonic()
        self._stop_votes = None  # what the ranks hold is asked again after the wait
        while seconds > 0:
            flags = torch.tensor(
                [float(self.stop_signals.received or 0), time.monotonic() - start >= seconds],
                dtype=torch.float64,
                device=self.device,
            )
            signalled, timed_out = self.backend.all_reduce(flags, "max").tolist()
            if signalled or timed_out:
                return bool(signalled)
            time.sleep(0.1)
        return False

    def stop_for_signal(self, signum: int) -> int:
        """Checkpoint at this update boundary and return ``128 + signum``.

        Called between updates, so the checkpoint holds the exact (epoch, position, step): a
        resume at any world size continues with the next global batch of the same epoch.
        """
        path = self.save("signal")
        name, code = signal_name(signum), exit_status(signum)
        self._log_event(
            "stopped",
            self.last_setting,  # its width: a resume by the controller starts as wide
            signal=name,
            exit_code=code,
            position=self.position,
            checkpoint=str(path),
        )
        if self.backend.is_main:
            where = (
                f"after update {self.step:,} (epoch {self.epoch + 1}, {self.position:,} of "
                f"{self.num_train:,} samples in); checkpoint {path}"
            )
            if self.cfg.launch.elastic and self._asked_for_workers > self.world:
                # The expected stop: torchrun restarts every worker when the ones asked joined.
                then = (
                    f"The {self._asked_for_workers} workers asked for are joining; torchrun "
                    "restarts all of them from it"
                )
            else:
                then = (
                    "Resume with the same command and --resume (run.resume=true), on any "
                    f"number of workers; exit status {code}"
                )
            print(f"distgrow: stopped by {name} {where}. {then}.", file=sys.stderr, flush=True)
        return code

    def elastic_interim(self, setting: Setting) -> Setting | None:
        """``launch.elastic``: the planned global batch on the workers the job has, for now.

        The plan wants ``setting.workers`` workers. Rank 0 asks for them in ``resize.json``
        (once per count; the elastic controller starts them), the workers wait up to
        ``launch.elastic_wait_s`` for them, then go on with the same global batch split over
        this job's workers (more accumulation: the same updates). When the new workers join,
        torchrun stops these with SIGTERM (see :meth:`stop_for_signal`) and restarts all.

        Returns:
            The interim setting; None when not elastic, when a stop signal ended the wait (the
            caller stops for it before any update), or when the batch cannot be split exactly
            over this job's workers and no worker joined within :data:`ELASTIC_JOIN_WAIT_S`
            (the caller then stops for more workers, exit 75).
        """
        if not self.cfg.launch.elastic:
            return None
        here = replace(self.policy.limits, max_workers=self.world)
        split = here.realise(setting.global_batch, self.world)
        exact = split is not None and split.global_batch == setting.global_batch
        if self._asked_for_workers != setting.workers:
            self._asked_for_workers = setting.workers
            self._ask_for_workers(setting, elastic=True)
            wait = self.cfg.launch.elastic_wait_s if exact else ELASTIC_JOIN_WAIT_S
            then = (
                f"going on as {_split(split)} until they join"
                if exact and split is not None
                else f"the batch cannot be split over {self.world} worker(s) until they join"
            )
            self._say(
                f"epoch {self.epoch + 1}: the plan needs {setting.workers} workers for a global "
                f"batch of {setting.global_batch}; asked for them in {self.run_dir / RESIZE_FILE}"
                + (f"; waiting up to {wait:g} s for them; " if wait > 0 else "; ")
                + f"{then} (launch.elastic)"
            )
            if self._wait_for_stop(wait):
                # The workers asked for joined (or the job is being stopped): no update runs
                # at this width, so no growth is logged for it; train_epoch stops next.
                return None
        if not exact or split is None:
            return None
        return replace(
            setting,
            workers=split.workers,
            micro_batch=split.micro_batch,
            accum_steps=split.accum_steps,
        )

    def _ask_for_workers(self, setting: Setting, **extra: Any) -> None:
        """Write ``resize.json`` (rank 0) and log a ``need_workers`` event: where the run is,
        how many workers the plan needs for ``setting`` and how many it has, plus ``extra``."""
        info = {
            "need_workers": setting.workers,
            "have_workers": self.world,
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "global_batch": setting.global_batch,
            **extra,
            "time": time.time(),
        }
        if self.backend.is_main:
            write_json(self.run_dir / RESIZE_FILE, info)
        self._log_event("need_workers", setting, **info)

    def stop_for_workers(self, setting: Setting) -> int:
        """Checkpoint and write ``resize.json``: the plan needs more workers than the job has."""
        path = self.save("need_workers")
        self._ask_for_workers(
            setting,
            micro_batch=setting.micro_batch,
            accum_steps=setting.accum_steps,
            checkpoint=str(path),
            exit_code=EXIT_NEED_WORKERS,
        )
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
            if self.cfg.logging.progress != "off":
                self.progress = Progress(
                    self.cfg.logging.progress,
                    total_samples=self.num_train * self.cfg.run.epochs,
                    total_epochs=self.cfg.run.epochs,
                )
            wandb = open_wandb_logger(
                self.cfg, self.run_dir, rank=self.rank, plan=self.plan.to_json(), echo=self._line
            )
            self.logger = MultiLogger([JsonlLogger(self.run_dir / METRICS_FILE), wandb])
        if kind == "resume":
            path, state = value
            self.load_state(state)
            self._last_checkpoint = ((self.epoch, self.position, self.step), Path(path))
            self._log_event(
                "resume",
                None,
                checkpoint=str(path),
                world_size=self.world,
                startup=self.startup_marks,
            )
            self._say(
                f"resuming from {path}: epoch {self.epoch + 1}, {self.position:,} samples in, "
                f"{self.step:,} updates, on {self.world} worker(s)"
            )
        else:
            if self.cfg.run.resume:
                self._say(f"no checkpoint in {self.run_dir}: starting a fresh run")
            self._log_event("start", None, world_size=self.world, startup=self.startup_marks)
        self._say(
            f"training {self.cfg.model.name} on {self.data.name} (N={self.num_train:,}) for "
            f"{self.cfg.run.epochs} epochs on {self.world} worker(s), {self.device}; "
            f"plan: {self.plan.total_updates or '?'} updates (decay_lr baseline: "
            f"{self.plan.baseline_total_updates or '?'}); run dir {self.run_dir}"
        )
        self.startup_s = self.prior_startup_s + time.perf_counter() - self._started_at
        self._start_time = self._epoch_start = time.perf_counter()
        self.phases.start()
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
            "optimizer": self.backend.optimizer_state_dict(self.optimizer),
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
            "startup_s": self.startup_s,
            "phases": self.phases.state_dict(),
            "reason": reason,
            "distgrow_version": __version__,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written at any world size.

        Raises:
            TrainError: the checkpoint's global batch cannot be split over this job's workers.
        """
        self.backend.load_model_state_dict(state["model"])
        self.backend.load_optimizer_state_dict(self.optimizer, state["optimizer"])
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
        self.prior_startup_s = float(state.get("startup_s", 0.0))
        self.phases.load_state_dict(state.get("phases") or {})

    def save(self, reason: str) -> Path:
        """Checkpoint now (rank 0 writes); a no-op returning the file if nothing moved since."""
        key = (self.epoch, self.position, self.step)
        if self._last_checkpoint is not None and self._last_checkpoint[0] == key:
            return self._last_checkpoint[1]
        path = checkpoint_path(self.run_dir, self.step)
        # Every rank builds the state: engines that partition the optimizer (ZeRO) gather it.
        state = self.state_dict(reason)
        if self.backend.is_main:
            path = save_checkpoint(self.run_dir, state, self.cfg.run.keep_checkpoints)
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
            "time": time.time(),  # wall-clock (Unix seconds): lines up records across relaunches
        }
        record.update(metrics)
        return record

    def _log_event(self, event: str, setting: Setting | None, **extra: Any) -> None:
        record: dict[str, Any] = {"kind": "event", "event": event}
        if setting is not None:
            record = {**self._record("event", setting), "event": event}
        else:
            record.update(epoch=self.epoch + 1, step=self.step, samples_seen=self.samples_seen)
            record["time"] = time.time()
        record.update(extra)
        self.logger.log(record)

    def _say(self, line: str) -> None:
        if self.backend.is_main and self.cfg.logging.progress != "off":
            self._line(f"distgrow: {line}")

    def _line(self, line: str) -> None:
        """Print a line on rank 0's console, above the progress bar if one is shown."""
        if self.progress is not None:
            self.progress.write(line)
        else:
            self.echo(line)


def _count_realisations(plan: Plan) -> int:
    """Phases of a plan as the trainer counts them: a new one at each change of split."""
    keys = [(p.global_batch, p.workers, p.micro_batch, p.accum_steps) for p in plan.phases]
    return sum(1 for i, key in enumerate(keys) if i == 0 or key != keys[i - 1])


def _split(r: Realisation) -> str:
    return f"{r.workers}×{r.micro_batch}×{r.accum_steps}"


def _print_flush(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Entry point of `distgrow train`
# --------------------------------------------------------------------------------------------


def load_data(cfg: Config) -> DataBundle:
    """The data set of ``cfg.data``, split with ``run.seed``."""
    return load_dataset(cfg.data, seed=cfg.run.seed)


def run(cfg: Config) -> int:
    """Train ``cfg`` as this process's part of the job, then end the process.

    Reads the launcher's environment (torchrun, mpirun, srun, PMI, or none), starts the backend,
    trains, and leaves through ``backend.shutdown`` (which never returns once a job was joined;
    it raises ``SystemExit`` in a single process). Errors before the job is joined are printed
    and returned as :data:`EXIT_USAGE`.
    """
    # Start-up counts from the birth of the process: imports, data, rendezvous, W&B.
    age = process_age_s() or 0.0
    started_at = time.perf_counter() - age
    # From here a SIGTERM/SIGINT/SIGUSR1 stops training after the current update, with a
    # checkpoint (during start-up: before the first update).
    stop_signals = StopSignals()
    stop_signals.install()
    marks = {"process_start": time.time() - age, "main": time.time()}
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
        marks["data_loaded"] = time.time()
        backend = make_backend(cfg, runtime)
        marks["backend_ready"] = time.time()
    except (
        RuntimeEnvError,
        DatasetNotFoundError,
        DatasetFormatError,
        BackendError,
        ValueError,
    ) as err:
        print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        stop_signals.restore()
        return EXIT_USAGE
    code = EXIT_FAILURE
    try:
        trainer = Trainer(
            cfg,
            backend,
            data,
            started_at=started_at,
            stop_signals=stop_signals,
            startup_marks=marks,
        )
        marks["trainer_ready"] = time.time()  # model, optimizer (torch imports its compiler)
        code = trainer.train()
        while backend.rejoin(code):
            # Horovod Elastic: workers joined; the trainer stopped with a checkpoint, and the
            # job was re-formed in place. Resume from it at the new world size.
            stop_signals.received = None
            resumed = replace(cfg, run=replace(cfg.run, resume=True))
            code = Trainer(resumed, backend, data, stop_signals=stop_signals).train()
    except (TrainError, CheckpointError, ConfigError, BackendError) as err:
        # Decided on rank 0 and broadcast, or the same on every rank: say it once.
        if backend.is_main:
            print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except Exception:
        traceback.print_exc()
        code = EXIT_FAILURE
    stop_signals.restore()
    backend.shutdown(code)
