"""The training loop: a growth plan, realised update by update on a data-parallel backend.

:class:`Trainer` reads top to bottom: ``train()`` runs epochs, ``train_epoch()`` cuts the
epoch's permutation into global batches, ``train_step()`` runs one update as ``accum_steps``
micro-batches on this rank. Before each update the :class:`~distgrow.planner.GrowthPolicy`
says which setting to use; when the batch or its split changes the trainer logs a growth event
(no checkpoint: a resume replays the plan); when the plan needs more workers than the job has,
it checkpoints and exits with :data:`EXIT_NEED_WORKERS`. Checkpoints: at each epoch's end, at
``run.checkpoint_every_steps`` / ``run.checkpoint_every_s``, at a stop (signal, more workers).

Around the loop: :mod:`distgrow.startup` starts the process; :class:`~distgrow.state.TrainState`
holds the counters; :class:`~distgrow.agreement.Agreement` answers "stop now?" once per update.

Exactness. A micro-batch's loss is its summed per-sample loss × ``world_size / n`` (``n`` the
samples in the global batch); the backend averages over ranks and accumulates over micro-steps,
so the gradient is exactly the global batch's mean gradient, for partial batches and for empty
micro-batches too. Dropout is reseeded per micro-batch from ``(run.seed, epoch, first sample
index)`` and the sample order is one permutation per epoch, so 1 worker × 4 accumulation steps,
2 × 2 and 4 × 1 compute the same updates. Batch-norm running statistics from several workers are
merged as one worker would have accumulated them (:class:`~distgrow.bn_merge.RunningStatsMerger`).

Exit statuses (also in ``distgrow train --help``):

* :data:`EXIT_OK` (0): trained to ``run.epochs``.
* :data:`EXIT_FAILURE` (1): an unexpected error (a traceback is printed).
* :data:`EXIT_USAGE` (2): a config, data, run-directory or checkpoint problem; nothing trained.
  Also a run directory that cannot be written (a full disk at a checkpoint or a metrics record,
  a read-only or missing directory, a file in the way): one line with the errno, the path and
  the fix, on every rank; the last good checkpoint is untouched.
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

import functools
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distgrow import __version__
from distgrow.agreement import Agreement
from distgrow.backends import Backend
from distgrow.backends.torch_ddp import autocast_model
from distgrow.bn_merge import RunningStatsMerger
from distgrow.checkpoint import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    PER_LAUNCH_KEYS,
    CheckpointError,
    config_differences,
    fingerprint,
    load_latest,
    save_checkpoint,
)
from distgrow.config import Config, OptimConfig, dump_config
from distgrow.data import (
    DataBundle,
    LoaderDataset,
    micro_batch_seed,
)
from distgrow.data.checks import check_class_labels
from distgrow.data.feed import LoaderFeed
from distgrow.engine.hooks import AgreementHook, BatchNormMergeHook, NoiseMeterHook, UpdateHook
from distgrow.engine.step import run_update
from distgrow.entrypoints import EntryPointError, is_entry_point
from distgrow.exits import EXIT_NEED_WORKERS, EXIT_NONFINITE, EXIT_OK
from distgrow.gpu import cuda_peak_memory, prepare_model
from distgrow.held import held_so_far
from distgrow.loop import GrowthBatchSampler, GrowthSchedule, MicroBatch, apply_setting
from distgrow.losses import build_objective, loss_sum
from distgrow.metrics import (
    JsonlLogger,
    Logger,
    MultiLogger,
    NullLogger,
    ThroughputMeter,
    drop_replayed_records,
)
from distgrow.models import build_entry_model, build_model, output_width, uses_batch_norm
from distgrow.noise_meter import open_noise_meter
from distgrow.oom import OomFallback, fallback_wanted
from distgrow.planner import GrowthPolicy, Plan, Setting, make_plan
from distgrow.progress import Progress, ProgressState
from distgrow.rundir import ResizeRequest, RunDir, Summary, atomic_write_bytes
from distgrow.savings import PhaseTracker, try_estimated_savings
from distgrow.signals import StopSignals, exit_status, signal_name
from distgrow.state import RunDirWriteError, TrainError, TrainState, write_error
from distgrow.wandb_logger import open_wandb_logger

__all__ = ["TrainError", "Trainer", "build_optimizer", "loss_sum", "micro_batch_seed"]

# Elastic: how long workers that cannot split the batch among themselves wait for the workers
# they asked for before giving up (exit 75); torchrun's own rendezvous join timeout is 600 s.
ELASTIC_JOIN_WAIT_S = 300.0

# Validation runs in fixed chunks, each on one rank, summed in chunk order: the metrics are
# bit-identical for any world size (given the same parameters).
_VAL_CHUNK = 500


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


def build_run_model(cfg: Config, data: DataBundle) -> nn.Module:
    """The model of ``cfg.model`` for ``data`` (on the CPU; also what ``distgrow probe`` runs).

    Raises:
        TrainError: the model cannot be built for this data (or this install).
    """
    m, d = cfg.model, data
    if is_entry_point(m.name):
        try:
            return build_entry_model(m.name, m.kwargs)
        except EntryPointError as err:
            raise TrainError(str(err)) from err
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
        stop_signals: Installed by the caller (:func:`distgrow.startup.run`): a signal it notes
            stops training after the current update, with a checkpoint (see
            :meth:`stop_for_signal`). Default: none installed, so signals keep their usual
            effect.
        startup_marks: Wall-clock times (``time.time()``) of this process's start-up stages,
            logged with the ``start``/``resume`` event (the resize-latency benchmark reads
            them).
        plan_cfg: The config the plan is made from: ``cfg`` with ``growth.max_micro_batch:
            auto`` resolved (:func:`distgrow.probe.resolve_auto`); default ``cfg``. The run
            directory's ``config.yaml`` keeps ``cfg`` as written.

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
        plan_cfg: Config | None = None,
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
        self.run_dir = RunDir(cfg.run.resolved_output_dir)
        self.align = cfg.model.ghost_batch or 1

        self.plan_cfg = plan_cfg or cfg
        self.policy = GrowthPolicy(self.plan_cfg, self.num_train, min_workers=self.world)
        self.plan = make_plan(self.plan_cfg, self.num_train, min_workers=self.world)
        # The one source of updates (distgrow.loop), on this run's policy: it decides each
        # update when asked for it; _fit_to_job logs the decisions and asks for workers.
        self.schedule = GrowthSchedule(
            self.plan_cfg,
            self.num_train,
            self.rank,
            self.world,
            policy=self.policy,
            fit=self._fit_to_job,
        )
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        # channels_last and torch.compile as run.* asks (distgrow.gpu); the state keeps its keys.
        self.model = prepare_model(self._build_model().to(self.device), self.device, cfg.run)
        try:  # the loss contract is checked on a few samples before anything is written
            self.objective = build_objective(cfg.loss, data.num_classes)
            x, y = data.train.batch(torch.arange(min(8, self.num_train)))
            if is_entry_point(cfg.model.name):  # a built-in head is sized from the labels
                where = cfg.data.path or cfg.data.name
                width = functools.partial(output_width, self.model, x.to(self.device))
                check_class_labels(data, cfg.loss.name, width, where)
            self.objective.check(self.model, x.to(self.device), y.to(self.device), cfg.model.name)
        except ValueError as err:
            raise TrainError(str(err)) from err
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.train_model = backend.setup(self.model, self.optimizer)
        # Reseeding per micro-batch (so dropout masks do not depend on the split) is skipped
        # only for models that provably draw nothing at random in training.
        self._draws_random = draws_random(self.model)
        self.bn_merger = (
            RunningStatsMerger(self.model, backend)
            if self.world > 1 and uses_batch_norm(self.model)
            else None
        )
        self.logger: Logger = NullLogger()
        self._jsonl: JsonlLogger | None = None  # rank 0's metrics.jsonl (also in self.logger)
        self._config_changes: list[str] = []  # a resume's changes to config.yaml (rank 0)
        self.fingerprint = fingerprint(cfg, self.num_train)

        self.state = TrainState()  # where training stands; it goes into checkpoints
        self.last_setting: Setting | None = None
        self.startup_s = 0.0  # all processes' start-up, up to the first update
        # Throughput and time per batch realisation; on CUDA also its peak memory.
        self.phases = PhaseTracker(memory=cuda_peak_memory(self.device))
        self.progress: Progress | None = None  # rank 0's bar or periodic lines
        # Phases in the plan as the tracker counts them (a change of realisation); plateau
        # schedules cannot know theirs in advance.
        self.planned_phases = None if self.plan.ladder else _count_realisations(self.plan)
        self._last_checkpoint: tuple[tuple[int, int, int], Path] | None = None
        self.stop_signals = stop_signals or StopSignals()  # not installed: no stop by signal
        self.agreement = Agreement(backend, self.stop_signals, self.device)
        self.startup_marks = startup_marks if startup_marks is not None else {}
        self._asked_for_workers = 0  # elastic: the worker count resize.json last asked for
        self._start_time = time.perf_counter()
        self._epoch_start = self._saved_at = self._start_time
        self._meter = ThroughputMeter()
        self._epoch_meter = ThroughputMeter()
        self._window_loss = 0.0
        self._window_samples = 0
        self.feed = self._open_feed()  # None: in memory, batched by indexing
        self.oom = OomFallback(  # out of CUDA memory: the same update at a smaller micro-batch
            fallback_wanted(
                cfg.run.oom_fallback,
                cfg.backend.name,
                self.world,
                self.device.type,
                self.feed is not None,
            ),
            self.model,
            self.optimizer,
            lambda: backend.zero_grad(self.optimizer),
            self.align,
            self._log_event,
            self._say,
        )
        if self.feed is not None and cfg.growth.measures_noise():
            raise TrainError(
                f"growth.mode={cfg.growth.mode} / growth.noise_cap decide the batch from the "
                "measured noise scale during the run, which the sample-by-sample loader "
                "(data.feed=loader) cannot read ahead for. Fix: set data.feed=memory, or "
                "growth.mode=grow_batch without growth.noise_cap."
            )
        # The gradient noise scale (noise.measure): None when off.
        self.noise = open_noise_meter(cfg, backend, self.train_model, self.model, self._say)
        if self.noise is not None and cfg.growth.mode == "adaptive":
            start = self.policy.limits.realise(cfg.growth.base_batch)  # checked by the policy
            refusal = self.noise.cannot_decide(start.accum_steps if start else 1)
            if refusal:
                raise TrainError(refusal)

    def _build_model(self) -> nn.Module:
        return build_run_model(self.cfg, self.data)

    def _open_feed(self) -> LoaderFeed | None:
        """A ``DataLoader`` over a training set read sample by sample (``data.feed``).

        Its batch sampler is the one for users' own loops, :class:`GrowthBatchSampler`, on
        this run's schedule: it reads ahead the micro-batches the schedule will hand out, so
        the workers can load them while the loop trains.
        """
        if not isinstance(self.data.train, LoaderDataset):
            return None
        d = self.cfg.data
        return LoaderFeed(
            self.data.train,
            GrowthBatchSampler(self.schedule),
            workers=d.loader_workers,
            pin_memory=self.device.type == "cuda" if d.pin_memory is None else d.pin_memory,
            prefetch_factor=d.prefetch_factor,
            device=self.device,
        )

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to ``run.epochs`` (resuming when asked); returns the exit status."""
        if not self.open_run():
            return EXIT_OK  # a finished run, resumed: nothing to train, nothing rewritten
        # What exists now (torch, the model, the data, W&B: hundreds of thousands of objects)
        # lives as long as the run: kept out of the cyclic collector's full passes, each of which
        # otherwise scans all of it (one pass in a 3-epoch Fashion-MNIST run: 156-185 ms, 17 ms
        # frozen). Unfrozen at the end, so a process that trains again can free it.
        gc.freeze()
        try:
            code = EXIT_OK
            while self.state.epoch < self.cfg.run.epochs and code == EXIT_OK:
                code = self.train_epoch()
                if code == EXIT_OK:
                    self.end_epoch()
            if code == EXIT_OK:
                self.finish()
            # Rank 0 may still be writing its files; nobody leaves before it is done.
            self.backend.barrier()
            return code
        finally:
            gc.unfreeze()
            if self.progress is not None:
                self.progress.close()
            self.logger.close()

    def train_epoch(self) -> int:
        """Consume the rest of the current epoch: the schedule's updates, one by one."""
        self.agreement.forget()  # validation ran since the last update: ask the ranks again
        if self.feed is not None:
            self.feed.start()  # its sampler reads ahead from where the schedule stands
        for update in self.schedule.updates():
            setting = self.begin_update(update.setting)
            signum = self.agreement.stop_signal()
            if signum:
                return self.stop_for_signal(signum)
            if setting.workers > self.world:
                return self.stop_for_workers(setting)
            indices = update.indices
            started, cpu_started = time.perf_counter(), time.process_time()
            loss, setting = self.oom.run(self.train_step, indices, setting)
            self.phases.record_update(
                int(indices.numel()),
                time.perf_counter() - started,
                time.process_time() - cpu_started,
            )
            if not math.isfinite(loss):
                return self.stop_nonfinite(loss, setting)
            self.after_update(int(indices.numel()), loss, setting)
            if self.checkpoint_due() and self.state.position < self.num_train:
                self.save("interval")  # (the epoch's end checkpoints anyway)
        return EXIT_OK

    def train_step(self, indices: torch.Tensor, setting: Setting) -> float:
        """One update from the global batch ``indices``; returns its mean loss over all ranks.

        The optimizer steps only when every rank's loss is finite (the ranks agree on the loss
        before the step, :mod:`distgrow.agreement`); otherwise the gradients are dropped and the
        NaN/inf is returned.
        """
        self._apply_hyperparameters(setting)
        update = self.schedule.make_update(
            self.state.epoch, self.state.position, self.state.step, setting, indices
        )
        self.backend.begin_update(setting.micro_batch, setting.accum_steps)
        run_update(
            update,
            self._loss_of,
            micro_step=self.backend.micro_step,
            backward=self.backend.backward,
            reseed=functools.partial(_reseed, device=self.device) if self._draws_random else None,
            hooks=self.hooks(),
        )
        mean_loss = self.agreement.mean_loss()  # every rank's loss finite, or none steps
        if math.isfinite(mean_loss):
            self.backend.step(self.optimizer, self.cfg.optim.grad_clip)
        else:
            self.backend.zero_grad(self.optimizer)
        return mean_loss

    def _loss_of(self, micro: MicroBatch) -> torch.Tensor:
        """The summed loss of a micro-batch of the current epoch (read, moved, forward)."""
        x, y = (self.feed or self.data.train).batch(micro.indices, self.state.epoch)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return self.objective.loss_sum(self.train_model(x), y)

    def hooks(self) -> list[UpdateHook]:
        """The update's optional features, in their order (:mod:`distgrow.engine.hooks`)."""
        hooks: list[UpdateHook] = []
        if self.bn_merger is not None:
            hooks.append(BatchNormMergeHook(self.bn_merger))
        if self.noise is not None:  # a measured update under DDP averages its gradients itself
            hooks.append(NoiseMeterHook(self.noise))
        # The update's agreement (the loss, the ranks told to stop, those whose checkpoint clock
        # ran out): carried by DDP's gradient all-reduce, or an all-reduce that starts with the
        # last backward.
        hooks.append(AgreementHook(self.agreement, self._checkpoint_clock_ran_out))
        return hooks

    def _apply_hyperparameters(self, setting: Setting) -> None:
        """The setting's LR, momentum, β₂ and weight decay into the optimizer's groups."""
        apply_setting(self.optimizer, setting)

    def next_setting(self) -> Setting:
        """Take the schedule's next update and begin it (:meth:`begin_update`)."""
        return self.begin_update(self.schedule.next_update().setting)

    def _fit_to_job(self, setting: Setting) -> Setting:
        """The schedule's ``fit``: log the policy's decisions; a plan wider than the job runs
        on the workers there are while elastic workers join (:meth:`elastic_interim`), else
        stays as it is (the loop stops for more workers)."""
        self._log_policy_events(setting, self.policy.take_events())
        if setting.workers > self.world:
            return self.elastic_interim(setting) or setting
        return setting

    def begin_update(self, setting: Setting) -> Setting:
        """Count the update's phase and log a change of split; returns ``setting``.

        A change of batch needs no checkpoint: the plan replays it on a resume. The world size
        changes only across processes, and every way out of one checkpoints (see
        :meth:`checkpoint_due` for the rest).
        """
        if setting.workers > self.world:
            return setting  # the caller stops for more workers
        new, old = setting.split, self.state.realisation
        self.state.realisation = new
        finished = None
        if self.phases.current is None or new != old:
            finished = self.phases.begin(
                split=new,
                lr=setting.lr,
                momentum=setting.momentum,
                start_epoch=self.state.epoch + self.state.position / self.num_train,
                start_step=self.state.step,
                world_size=self.world,
            )
        if old is None or new == old:
            return setting
        kind = "growth" if new.global_batch != old.global_batch else "resplit"
        self.state.growth_events += kind == "growth"
        self._log_event(
            kind,
            setting,
            previous=asdict(old),
            finished_phase=finished.to_dict() if finished is not None else None,
        )
        self._say(
            f"epoch {self.state.epoch + 1}: {kind}: batch {old.global_batch} → {new.global_batch} "
            f"= {new}, lr {setting.lr:.4g}, momentum {setting.momentum:g}"
        )
        return setting

    def checkpoint_due(self) -> bool:
        """After an update: ``run.checkpoint_every_steps`` updates, or ``run.checkpoint_every_s``
        seconds on any rank's clock, since the last checkpoint (the same answer on every rank).

        The other checkpoints: at each epoch's end, before a stop for more workers, at a stop
        signal, and so at the end of the run.
        """
        every = self.cfg.run.checkpoint_every_steps
        return bool(every and self.state.step % every == 0) or self.agreement.checkpoint_agreed

    def _checkpoint_clock_ran_out(self) -> bool:
        # A failed metrics write asks for a checkpoint too: save() then stops every rank.
        if self._jsonl is not None and self._jsonl.error is not None:
            return True
        every_s = self.cfg.run.checkpoint_every_s
        return every_s is not None and time.perf_counter() - self._saved_at >= every_s

    def after_update(self, samples: int, loss: float, setting: Setting) -> None:
        """Advance the counters; log a step record every ``logging.every_steps`` updates."""
        self.state.position += samples
        self.state.samples_seen += samples
        self.state.step += 1
        self.state.epoch_loss_sum += loss * samples
        self.state.epoch_samples += samples
        self._window_loss += loss * samples
        self._window_samples += samples
        self._meter.add(samples)
        self._epoch_meter.add(samples)
        self.last_setting = setting
        self._evaluate_noise(setting)
        if self.progress is not None:
            self.progress.update(
                ProgressState(
                    epoch=self.state.epoch + 1,
                    samples_seen=self.state.samples_seen,
                    step=self.state.step,
                    phase=len(self.phases.phases),
                    phases=self.planned_phases,
                    global_batch=setting.global_batch,
                    lr=setting.lr,
                )
            )
        if self.state.step % self.cfg.logging.every_steps:
            return
        train_loss = self._window_loss / self._window_samples
        self._window_loss, self._window_samples = 0.0, 0
        record = self._record("step", setting, train_loss=train_loss)
        record["samples_per_s"] = self._meter.rate()
        record["samples_per_s_per_worker"] = record["samples_per_s"] / setting.workers
        if self.noise is not None:
            record.update(self.noise.window_metrics())
        self.logger.log(record)
        self._say(
            f"epoch {self.state.epoch + 1}/{self.cfg.run.epochs}  step {self.state.step:,}  batch "
            f"{setting.global_batch} = {setting.split}  lr {setting.lr:.4g}  "
            f"loss {train_loss:.4f}  {record['samples_per_s']:,.0f} samples/s"
        )

    def _evaluate_noise(self, setting: Setting) -> None:
        """Every ``growth.adaptive.every`` updates: the growth policy's noise-scale decisions
        (adaptive, noise_cap), from the measured state the checkpoints hold, so a resume
        decides the same at the same update."""
        if self.noise is None or self.state.step % self.cfg.growth.adaptive.every:
            return
        events = self.schedule.observe_noise(self.noise.b_simple, self.noise.estimator.updates)
        self._log_policy_events(setting, events)

    def _log_policy_events(self, setting: Setting, events: list[tuple[str, Any]]) -> None:
        """Log the decisions the growth policy took from the noise scale (with the values)."""
        for name, values in events:
            self._log_event(name, setting, **values)
            self._say(
                f"epoch {self.state.epoch + 1}, update {self.state.step:,}: {name}: "
                + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in values.items()
                )
            )

    def end_epoch(self) -> None:
        """Validate, let the plateau rule decide (rank 0, broadcast), log and checkpoint."""
        train_rate = self._epoch_meter.rate()  # before validation: the training throughput
        val = self.validate()
        train_loss = self.state.epoch_loss_sum / max(1, self.state.epoch_samples)
        self.state.last_val, self.state.last_train_loss = val, train_loss
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
        setting = self.last_setting or self.policy.setting(self.state.epoch, self.state.position)
        self.state.epoch += 1
        self.state.position = 0
        record = self._record("epoch", setting, train_loss=train_loss, **val)
        record["samples_per_s"] = train_rate
        record["epoch_wall_s"] = epoch_wall
        self.state.epoch_loss_sum, self.state.epoch_samples = 0.0, 0
        self.logger.log(record)
        acc = "" if val["val_acc"] is None else f"  val_acc {val['val_acc']:.4f}"
        self._say(
            f"epoch {self.state.epoch}/{self.cfg.run.epochs} done: train_loss {train_loss:.4f}  "
            f"val_loss {val['val_loss']:.4f}{acc}  ({epoch_wall:.1f} s, {self.state.step:,} "
            "updates)"
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
        # Under the training precision, in pieces no larger than a training micro-batch may be
        # (the config's cap, or the OOM fallback's ceiling): what trains also validates. The
        # pieces do not depend on the world size, so neither do the sums.
        model = autocast_model(self.model, self.cfg.backend.precision, self.device)
        caps = [_VAL_CHUNK, self.policy.limits.max_micro_batch, self.oom.ceiling]
        piece = min(c for c in caps if c is not None)
        self.model.eval()
        try:
            for c in range(self.rank, chunks, self.world):
                for start in range(c * _VAL_CHUNK, min(n, (c + 1) * _VAL_CHUNK), piece):
                    idx = torch.arange(start, min(n, (c + 1) * _VAL_CHUNK, start + piece))
                    x, y = val.batch(idx, 0)
                    x, y = x.to(self.device), y.to(self.device)
                    out = model(x)
                    sums[c, 0] += self.objective.loss_sum(out, y).double()
                    if self.objective.metric_sum is not None:
                        sums[c, 1] += self.objective.metric_sum(out, y).double()
        finally:
            self.model.train()
        self.backend.all_reduce(sums, "sum")
        totals = sums.sum(0)
        metric = float(totals[1]) / n if self.objective.metric_sum is not None else None
        result: dict[str, float | None] = {"val_loss": float(totals[0]) / n, "val_acc": None}
        result[self.objective.metric_key] = metric  # val_acc, or a user metric's val_metric
        return result

    def finish(self) -> None:
        """Write ``summary.json`` (rank 0), with per-phase throughput and estimated savings."""
        self.phases.tick()
        wall, worker_s = self._clock()
        train_s = self.phases.train_seconds()
        st = self.state
        summary = Summary(
            status="completed",
            epochs=st.epoch,
            total_updates=st.step,
            samples_seen=st.samples_seen,
            train_loss=st.last_train_loss,
            val_loss=st.last_val["val_loss"],
            val_acc=st.last_val["val_acc"],
            wall_s=wall,
            worker_seconds=worker_s,
            world_size=self.world,
            growth_events=st.growth_events,
            final_setting=asdict(st.realisation) if st.realisation else None,
            growth_mode=self.cfg.growth.mode,
            planned_total_updates=self.plan.total_updates,
            baseline_total_updates=self.plan.baseline_total_updates,
            update_ratio_vs_baseline=(
                self.plan.baseline_total_updates / st.step
                if self.plan.baseline_total_updates and st.step
                else None
            ),
            distgrow_version=__version__,
            # Wall-clock above is training only; start-up is counted apart.
            startup_s=self.startup_s,
            train_s=train_s,
            train_cpu_s=self.phases.train_cpu_seconds(),
            samples_per_s=st.samples_seen / train_s if train_s > 0 else None,
            worker_hours=worker_s / 3600,
            gpu_hours=worker_s / 3600 if self.device.type == "cuda" else None,
            device=self.device.type,
            base_batch=self.cfg.growth.base_batch,
            dataset_size=self.num_train,
            phases=self.phases.to_list(),
        )
        # Measured savings need a baseline run: `distgrow compare` / `distgrow report`.
        summary.savings = {"estimated": try_estimated_savings(summary.to_dict())}
        # What the SLURM job(s) held so far (slurm_jobs.json); the report reads SLURM's records.
        summary.held = held_so_far(self.run_dir, summary.to_dict())
        if self.noise is not None:
            summary.extra["noise"] = self.noise.summary()
        failure = None
        if self.backend.is_main:
            failure = self._metrics_failure()  # a run with lost records is not complete
            if failure is None:
                try:
                    self.run_dir.write_summary(summary)
                except OSError as err:
                    failure = str(write_error(err, "summary", self.run_dir.summary))
        self._raise_if_failed(failure)
        self.logger.log({"kind": "event", "event": "end", **summary.to_dict()})
        acc = "" if summary.val_acc is None else f", val_acc {summary.val_acc:.4f}"
        self._say(
            f"done: {st.step:,} updates, {st.samples_seen:,} samples{acc}, {wall:.1f} s; "
            f"results in {self.run_dir}"
        )

    # -- stopping ------------------------------------------------------------------------------

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
            position=self.state.position,
            checkpoint=str(path),
        )
        if self.backend.is_main:
            st = self.state
            where = (
                f"after update {st.step:,} (epoch {st.epoch + 1}, {st.position:,} of "
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
                f"going on as {split} until they join"
                if exact and split is not None
                else f"the batch cannot be split over {self.world} worker(s) until they join"
            )
            self._say(
                f"epoch {self.state.epoch + 1}: the plan needs {setting.workers} workers for a "
                f"global batch of {setting.global_batch}; asked for them in {self.run_dir.resize}"
                + (f"; waiting up to {wait:g} s for them; " if wait > 0 else "; ")
                + f"{then} (launch.elastic)"
            )
            if self.agreement.wait_for_stop(wait):
                # The workers asked for joined (or the job is being stopped): no update runs
                # at this width, so no growth is logged for it; train_epoch stops next.
                return None
        if not exact or split is None:
            return None
        return replace(setting, split=split)

    def _ask_for_workers(self, setting: Setting, **extra: Any) -> None:
        """Write ``resize.json`` (rank 0) and log a ``need_workers`` event: where the run is,
        how many workers the plan needs for ``setting`` and how many it has, plus ``extra``."""
        request = ResizeRequest(
            need_workers=setting.workers,
            have_workers=self.world,
            epoch=self.state.epoch,
            position=self.state.position,
            step=self.state.step,
            samples_seen=self.state.samples_seen,
            global_batch=setting.global_batch,
            time=time.time(),
            **extra,
        )
        if self.backend.is_main:
            self.run_dir.write_resize(request)
        # The event names what this request says (no null keys), as before the typed record.
        said = {k: v for k, v in asdict(request).items() if v is not None and v is not False}
        said.pop("version")
        self._log_event("need_workers", setting, **said)

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
            f"epoch {self.state.epoch + 1}: the plan needs {setting.workers} workers for a global "
            f"batch of {setting.global_batch}, the job has {self.world}. Checkpoint {path}; wrote "
            f"{self.run_dir.resize}. Relaunch with {setting.workers} workers and --resume "
            f"(exit status {EXIT_NEED_WORKERS})."
        )
        return EXIT_NEED_WORKERS

    def stop_nonfinite(self, loss: float, setting: Setting) -> int:
        """Stop on a NaN/inf loss; the last good checkpoint stays as it is."""
        last = self._last_checkpoint[1] if self._last_checkpoint else None
        self._log_event("nonfinite", setting, loss=str(loss))
        if self.backend.is_main:
            print(
                f"distgrow: stopping: the training loss is {loss} at epoch {self.state.epoch + 1}, "
                f"update {self.state.step + 1} (global batch {setting.global_batch}, lr "
                f"{setting.lr:.4g}); the parameters were not updated with it. Last good "
                f"checkpoint: {last or 'none yet'}. Fix: lower optim.lr (now "
                f"{self.cfg.optim.lr:g}) or set optim.grad_clip (e.g. 1.0), then rerun with "
                "--resume.",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_NONFINITE

    # -- run directory, checkpoints, resume --------------------------------------------------

    def open_run(self) -> bool:
        """Refuse to overwrite a run; resume from its newest checkpoint when asked.

        Rank 0 looks at the run directory, loads the checkpoint and prepares the directory
        (``config.yaml``, ``metrics.jsonl``); the decision (or the error) is broadcast, so every
        rank resumes from the same state without a shared file system, and a directory that
        cannot be written stops every rank alike.

        Returns:
            False when the run is finished and a resume has nothing to train: nothing is
            written (``summary.json``, ``config.yaml`` and ``metrics.jsonl`` stay as they are).

        Raises:
            TrainError: the directory holds a run and ``run.resume`` is false, or its
                ``config.yaml`` is another run's.
            RunDirWriteError: the run directory cannot be written (one line: errno, path, fix).
            CheckpointError: the newest checkpoint is unreadable or from another run.
        """
        payload: tuple[str, Any] = ("fresh", None)
        replaced = 0
        if self.backend.is_main:
            payload = self._inspect_run_dir()
            if payload[0] in ("fresh", "resume"):
                try:
                    replaced = self._prepare_run_dir(payload[1] if payload[0] == "resume" else None)
                except OSError as err:
                    payload = (
                        "write_error",
                        str(write_error(err, "run directory", self.run_dir.path)),
                    )
        kind, value = self.backend.broadcast_object(payload)
        if kind == "refuse":
            raise TrainError(value)
        if kind == "write_error":
            raise RunDirWriteError(value)
        if kind == "checkpoint_error":
            raise CheckpointError(value)
        if kind == "finished":
            if self.backend.is_main:
                self.echo(f"distgrow: {value}")
            return False
        if self.backend.is_main:
            if self.cfg.logging.progress != "off":
                self.progress = Progress(
                    self.cfg.logging.progress,
                    total_samples=self.num_train * self.cfg.run.epochs,
                    total_epochs=self.cfg.run.epochs,
                )
            wandb = open_wandb_logger(
                self.cfg,
                self.run_dir.path,
                rank=self.rank,
                plan=self.plan.to_json(),
                echo=self._line,
            )
            assert self._jsonl is not None  # opened by _prepare_run_dir
            self.logger = MultiLogger([self._jsonl, wandb])
        if kind == "resume":
            path, state = value
            self.load_state(state)
            self._last_checkpoint = (
                (self.state.epoch, self.state.position, self.state.step),
                Path(path),
            )
            self._log_event(
                "resume",
                None,
                checkpoint=str(path),
                world_size=self.world,
                startup=self.startup_marks,
                # Records of the updates this resume runs again, taken out of metrics.jsonl.
                replaced_records=replaced,
                config_changes=self._config_changes,
            )
            self._say(
                f"resuming from {path}: epoch {self.state.epoch + 1}, {self.state.position:,} "
                f"samples in, {self.state.step:,} updates, on {self.world} worker(s)"
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
        self.startup_s = self.state.startup_s + time.perf_counter() - self._started_at
        self._start_time = self._epoch_start = self._saved_at = time.perf_counter()
        self.phases.start()
        self._meter, self._epoch_meter = ThroughputMeter(), ThroughputMeter()
        return True

    def _inspect_run_dir(self) -> tuple[str, Any]:
        """Rank 0: ('fresh' | 'resume' | 'finished' | 'refuse' | 'checkpoint_error', detail).

        Reads only: nothing in the directory changes here.
        """
        existing = self._existing_config()
        if isinstance(existing, str):
            return ("refuse", existing)
        if not self.cfg.run.resume:
            present = [p.name for p in self.run_dir.checkpoints()[-1:]] + [
                p.name for p in (self.run_dir.summary, self.run_dir.metrics) if p.exists()
            ]
            if present:
                return (
                    "refuse",
                    f"run directory {self.run_dir} already holds a run ({', '.join(present)}); "
                    "distgrow never overwrites a run's results. Fix: pass --resume "
                    "(run.resume=true) to continue it, or choose another run.output_dir "
                    "(or run.name).",
                )
        # A fresh run may not replace another run's config.yaml in any key; a resume may change
        # what the checkpoint allows (epochs, lr, schedule, growth), not what makes the run.
        if existing is not None:
            only = IDENTITY_KEYS if self.cfg.run.resume else None
            differ = config_differences(
                existing, self.cfg.to_dict(), only=only, ignore=PER_LAUNCH_KEYS
            )
            if differ:
                return ("refuse", self._config_refusal(differ))
            self._config_changes = config_differences(
                existing, self.cfg.to_dict(), ignore=PER_LAUNCH_KEYS
            )
        if not self.cfg.run.resume:
            return ("fresh", None)
        try:
            found = load_latest(self.run_dir.path, self.fingerprint)
        except CheckpointError as err:
            return ("checkpoint_error", str(err))
        if found is None:
            return ("fresh", None)
        path, state = found
        done = int(state["epoch"]) >= self.cfg.run.epochs and int(state["position"]) == 0
        if done and self.run_dir.summary.is_file():
            return (
                "finished",
                f"the run in {self.run_dir} is finished ({state['epoch']} epochs, "
                f"{state['step']:,} updates; run.epochs={self.cfg.run.epochs}): nothing to "
                f"resume; its {self.run_dir.summary.name}, config and metrics were left as "
                "they are. To train on, raise run.epochs.",
            )
        return ("resume", (str(path), state))

    def _existing_config(self) -> dict[str, Any] | str | None:
        """The run directory's ``config.yaml`` as a tree; None when there is none; a refusal
        (str) when it cannot be read as a config."""
        path = self.run_dir.config
        if not path.exists():
            return None
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            tree = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if isinstance(tree, dict):
            return tree
        what = tree if isinstance(tree, str) else f"a {type(tree).__name__}, not a mapping"
        return (
            f"{path} is not a distgrow config ({what}); distgrow never overwrites it. Fix: "
            "move it away, or choose another run.output_dir (or run.name)."
        )

    def _config_refusal(self, differ: list[str]) -> str:
        what = "the run" if self.cfg.run.resume else "this fresh run"
        return (
            f"{self.run_dir.config} is another run's config than {what} ({'; '.join(differ)}); "
            "distgrow never overwrites it. Fix: run with the config in that file (distgrow "
            f"train {self.run_dir.config} --resume), or choose another run.output_dir (or "
            "run.name)."
        )

    def _prepare_run_dir(self, resume: tuple[str, dict[str, Any]] | None) -> int:
        """Rank 0: create the run directory, write ``config.yaml``, take the records a resume
        replays out of ``metrics.jsonl`` and open it for appending.

        Returns:
            How many records were taken out of ``metrics.jsonl``.

        Raises:
            OSError: a write failed (the caller turns it into one line for every rank).
        """
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.run_dir.clear_resize()  # it described the last exit
        self.run_dir.remove_temporaries()  # a checkpoint a kill cut mid-write
        replaced = 0
        if resume is not None:
            state = resume[1]
            offset = state.get("metrics_bytes")
            replaced = drop_replayed_records(
                self.run_dir.metrics,
                offset if isinstance(offset, int) else None,
                int(state["step"]),
            )
        if not self.run_dir.config.exists() or self._config_changes:
            # Written when absent, or when a resume changed what it may change (the changes are
            # in the resume event); equal up to per-launch keys: the file stays as it is.
            atomic_write_bytes(self.run_dir.config, dump_config(self.cfg).encode("utf-8"))
            self.run_dir.config.chmod(0o644)  # as before the atomic write (mkstemp's is 0600)
        self._jsonl = JsonlLogger(self.run_dir.metrics)
        return replaced

    def state_dict(self, reason: str) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain types (``weights_only`` loads it)."""
        wall, worker_s = self._clock()
        counters = replace(
            self.state, wall_s=wall, worker_seconds=worker_s, startup_s=self.startup_s
        )
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "reason": reason,
            "distgrow_version": __version__,
            "world_size": self.world,
            "model": self.backend.model_state_dict(),
            "optimizer": self.backend.optimizer_state_dict(self.optimizer),
            "plan_state": self.policy.state_dict(),
            "noise": self.noise.state_dict() if self.noise is not None else None,
            "phases": self.phases.state_dict(),
            "oom": self.oom.state_dict(),  # the micro-batch ceiling an OOM set
            "rng": torch.get_rng_state(),
            # Rank 0's metrics.jsonl up to this checkpoint: a resume drops what follows.
            "metrics_bytes": self._jsonl.size if self._jsonl is not None else None,
            # The counters at the top level: the checkpoint keys of format version 1.
            **counters.state_dict(),
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
                    f"{self.world} workers; continuing with {split.global_batch} = {split}"
                )
            plan_state["current"] = asdict(split)
        self.policy.load_state_dict(plan_state)
        self.state.load_state_dict(state)
        st = self.state
        self.schedule.seek(st.epoch, st.position, st.step, st.samples_seen)
        torch.set_rng_state(state["rng"])
        self.phases.load_state_dict(state.get("phases") or {})
        self.oom.load_state_dict(state.get("oom") or {})
        if self.noise is not None and state.get("noise") is not None:
            self.noise.load_state_dict(state["noise"])

    def save(self, reason: str) -> Path:
        """Checkpoint now (rank 0 writes); a no-op returning the file if nothing moved since.

        Raises:
            RunDirWriteError: on every rank, when rank 0 could not write the checkpoint (or
                an earlier metrics record); the previous checkpoints are untouched.
        """
        key = (self.state.epoch, self.state.position, self.state.step)
        if self._last_checkpoint is not None and self._last_checkpoint[0] == key:
            return self._last_checkpoint[1]
        path = self.run_dir.checkpoint(self.state.step)
        # Every rank builds the state: engines that partition the optimizer (ZeRO) gather it.
        state = self.state_dict(reason)
        failure = None
        if self.backend.is_main:
            # A checkpoint past a lost record would make the loss permanent: stop before it.
            failure = self._metrics_failure()
            if failure is None:
                try:
                    path = save_checkpoint(self.run_dir.path, state, self.cfg.run.keep_checkpoints)
                except OSError as err:
                    failure = str(write_error(err, "checkpoint", path, self._after_failure()))
        self._raise_if_failed(failure)
        self._last_checkpoint = (key, path)
        self._saved_at = time.perf_counter()
        return path

    def _metrics_failure(self) -> str | None:
        """Rank 0: the line for a metrics record that could not be written, if one failed."""
        if self._jsonl is None or self._jsonl.error is None:
            return None
        err = self._jsonl.error
        return str(write_error(err, "metrics record", self._jsonl.path, self._after_failure()))

    def _after_failure(self) -> str:
        last = self._last_checkpoint[1] if self._last_checkpoint else None
        where = f"the last good checkpoint {last} is untouched" if last else "no checkpoint yet"
        return f"Nothing was overwritten ({where}); then rerun with --resume."

    def _raise_if_failed(self, failure: str | None) -> None:
        """Every rank raises rank 0's write failure (one broadcast: the others wrote nothing)."""
        failure = self.backend.broadcast_object(failure)
        if failure:
            raise RunDirWriteError(failure)

    # -- helpers -------------------------------------------------------------------------------

    def _clock(self) -> tuple[float, float]:
        """(wall seconds, worker seconds) of this run, over all its processes so far."""
        elapsed = time.perf_counter() - self._start_time
        return self.state.wall_s + elapsed, self.state.worker_seconds + elapsed * self.world

    def _record(self, kind: str, setting: Setting, **metrics: float | None) -> dict[str, Any]:
        wall, _ = self._clock()
        record: dict[str, Any] = {
            "kind": kind,
            "epoch": self.state.epoch + (0 if kind == "epoch" else 1),
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            **asdict(setting.split),  # flat, as the records always had it
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
            record.update(
                epoch=self.state.epoch + 1,
                step=self.state.step,
                samples_seen=self.state.samples_seen,
            )
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
    splits = [p.split for p in plan.phases]
    return sum(1 for i, split in enumerate(splits) if i == 0 or split != splits[i - 1])


# Modules of torch.nn that draw random numbers in training mode; every other torch.nn module
# is deterministic, and so are these of distgrow's own models.
_RANDOM_TORCH_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)
_DETERMINISTIC_OWN_MODULES = frozenset({"GhostBatchNorm", "_SmallCNN", "_WideBlock", "_WideResNet"})


def draws_random(model: nn.Module) -> bool:
    """Whether ``model`` may draw random numbers in a training forward (or backward).

    True unless every submodule is a torch.nn layer that draws none (not dropout, not RReLU)
    or one of distgrow's own deterministic modules: a user's module, whose ``forward`` could
    call ``torch.rand``, counts as random, as does a dropout layer of any rate.
    """
    for module in model.modules():
        kind = type(module)
        if isinstance(module, _RANDOM_TORCH_MODULES):
            return True
        if isinstance(module, nn.MultiheadAttention | nn.RNNBase) and module.dropout > 0:
            return True  # functional dropout inside (attention weights, between RNN layers)
        if kind.__module__.startswith("torch.nn.modules."):
            continue
        if kind.__module__ == "distgrow.models" and kind.__name__ in _DETERMINISTIC_OWN_MODULES:
            continue
        if kind.__module__.startswith("torchvision.models.") and kind.__name__ in (
            "BasicBlock",
            "Bottleneck",
            "ResNet",
        ):
            continue  # distgrow's torchvision ResNets: convolutions, batch norm, ReLU, pooling
        return True
    return False


def _reseed(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a micro-batch draws from (dropout).

    ``torch.manual_seed`` also queues a seed for every CUDA device, and while CUDA is not
    initialised (every CPU run) it records a Python traceback each time: 0.2-1 ms per call,
    about a tenth of a batch-128 MLP update on the CPU (docs/speed.md). The CPU generator and
    this device's are the same draws.
    """
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device's generator (set by the backend)


def _print_flush(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# Entry point of `distgrow train`
