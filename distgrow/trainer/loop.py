"""The training loop: ``for update in schedule.updates()``, each run by ``run_update``."""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from distgrow.agreement import Agreement
from distgrow.backends import Backend
from distgrow.backends.torch_ddp import autocast_model
from distgrow.bn_merge import RunningStatsMerger
from distgrow.checkpoint import (
    fingerprint,
)
from distgrow.config import Config
from distgrow.data import (
    DataBundle,
    LoaderDataset,
)
from distgrow.data.checks import check_class_labels
from distgrow.data.feed import LoaderFeed
from distgrow.engine.hooks import AgreementHook, BatchNormMergeHook, NoiseMeterHook, UpdateHook
from distgrow.engine.step import run_update
from distgrow.entrypoints import is_entry_point
from distgrow.exits import EXIT_OK
from distgrow.gpu import cuda_peak_memory, prepare_model
from distgrow.loop import GrowthBatchSampler, GrowthSchedule, MicroBatch, apply_setting
from distgrow.losses import Objective, build_objective
from distgrow.metrics import (
    NullLogger,
    ThroughputMeter,
)
from distgrow.models import output_width, uses_batch_norm
from distgrow.noise_meter import open_noise_meter
from distgrow.oom import OomFallback, fallback_wanted
from distgrow.planner import GrowthPolicy, Setting, make_plan, micro_batch_multiple
from distgrow.progress import ProgressState
from distgrow.rundir import RunDir
from distgrow.savings import PhaseTracker
from distgrow.signals import StopSignals
from distgrow.state import TrainError, TrainState
from distgrow.trainer.pieces import (
    _count_realisations,
    _print_flush,
    _reseed,
    build_optimizer,
    build_run_model,
    draws_random,
    val_pieces,
)
from distgrow.trainer.resize import Resize
from distgrow.trainer.telemetry import Clock

# Validation runs in fixed chunks, each on one rank, summed in chunk order: the metrics are
# bit-identical for any world size (given the same parameters).
_VAL_CHUNK = 500


class Trainer(Resize):
    """One run of a growth plan on one backend.

    Args:
        cfg: The validated config.
        backend: A started backend (its rank and world size are this job's).
        data: The loaded data set.
        echo: Where rank 0 prints progress lines (``print`` by default).
        started_at: ``time.perf_counter()`` when this process began working on the run (its
            start, for ``distgrow train``); start-up lasts from there to the first update.
            Default: now. (A reading of ``clock``'s source, when a clock is given.)
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
        clock: The run's one clock (:class:`~distgrow.trainer.telemetry.Clock`); default:
            one on ``time.perf_counter`` started at ``started_at``.

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
        clock: Clock | None = None,
    ) -> None:
        # Every time the run records is read on this one clock (telemetry.Clock).
        self.clock = clock or Clock(started_at)
        self.cfg = cfg
        self.backend = backend
        self.data = data
        self.world = backend.world_size
        self.rank = backend.rank
        self.device = backend.device
        self.echo = echo or _print_flush
        self.num_train = len(data.train)
        self.run_dir = RunDir(cfg.run.resolved_output_dir)
        self.align = micro_batch_multiple(cfg.model)

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
        self.objective = self._checked_objective()
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.train_model = backend.setup(self.model, self.optimizer)
        # What validation runs: the model itself, unless the backend's forward must go through
        # a root of its own (FSDP's carrier root, which gathers the parameters).
        evaluated = getattr(backend, "eval_module", None)
        self.eval_model: nn.Module = self.model if evaluated is None else evaluated()
        # Reseeding per micro-batch (so dropout masks do not depend on the split) is skipped
        # only for models that provably draw nothing at random in training.
        self._draws_random = draws_random(self.model)
        self.bn_merger = (
            RunningStatsMerger(self.model, backend)
            if self.world > 1 and uses_batch_norm(self.model)
            else None
        )
        self.logger = NullLogger()
        self._jsonl = None  # rank 0's metrics.jsonl (also in self.logger)
        self._config_changes = []  # a resume's changes to config.yaml (rank 0)
        self.fingerprint = fingerprint(cfg, self.num_train)

        self.state = TrainState()  # where training stands; it goes into checkpoints
        self.last_setting = None
        self.startup_s = 0.0  # all processes' start-up, up to the first update
        # Throughput and time per batch realisation; on CUDA also its peak memory.
        self.phases = PhaseTracker(self.clock.now, memory=cuda_peak_memory(self.device))
        self.progress = None  # rank 0's bar or periodic lines
        # Phases in the plan as the tracker counts them (a change of realisation); plateau
        # schedules cannot know theirs in advance.
        self.planned_phases = None if self.plan.ladder else _count_realisations(self.plan)
        self._last_checkpoint = None
        self.stop_signals = stop_signals or StopSignals()  # not installed: no stop by signal
        self.agreement = Agreement(backend, self.stop_signals, self.device)
        self.startup_marks = startup_marks if startup_marks is not None else {}
        self._asked_for_workers = 0  # elastic: the worker count resize.json last asked for
        self._meter = ThroughputMeter(self.clock.now)
        self._epoch_meter = ThroughputMeter(self.clock.now)
        self._window_loss = 0.0
        self._window_samples = 0
        self._open_optional()

    def _checked_objective(self) -> Objective:
        """The loss, its contract checked on a few samples before anything is written."""
        cfg, data = self.cfg, self.data
        try:
            objective = build_objective(cfg.loss, data.num_classes)
            x, y = data.train.batch(torch.arange(min(8, self.num_train)))
            if is_entry_point(cfg.model.name):  # a built-in head is sized from the labels
                where = cfg.data.path or cfg.data.name
                width = functools.partial(output_width, self.model, x.to(self.device))
                check_class_labels(data, cfg.loss.name, width, where)
            objective.check(self.model, x.to(self.device), y.to(self.device), cfg.model.name)
        except ValueError as err:
            raise TrainError(str(err)) from err
        return objective

    def _open_optional(self) -> None:
        """The loader feed, the OOM fallback and the noise meter, as the config asks."""
        cfg, backend = self.cfg, self.backend
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
            started = self.clock.reading()
            loss, setting = self.oom.run(self.train_step, indices, setting)
            took = self.clock.since(started)
            self.phases.record_update(int(indices.numel()), took.seconds, took.cpu_seconds)
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
        return every_s is not None and self.clock.peek("checkpoint") >= every_s

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
        if self.feed is not None and not self.schedule.read_ahead_holds():
            self.feed.start()  # the loader reads the rest of the epoch as now decided

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
        epoch_wall = self.clock.lap("epoch")
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
        model = autocast_model(self.eval_model, self.cfg.backend.precision, self.device)
        caps = [_VAL_CHUNK, self.policy.limits.max_micro_batch, self.oom.ceiling]
        piece = min(c for c in caps if c is not None)
        pieces = val_pieces(n, _VAL_CHUNK, piece, self.world)
        self.eval_model.eval()
        try:
            for c, start, end in pieces[self.rank]:
                x, y = val.batch(torch.arange(start, end), 0)
                x, y = x.to(self.device), y.to(self.device)
                out = model(x)
                sums[c, 0] += self.objective.loss_sum(out, y).double()
                if self.objective.metric_sum is not None:
                    sums[c, 1] += self.objective.metric_sum(out, y).double()
            # Every rank runs as many forwards as the busiest: where the forward is itself a
            # collective (ZeRO-3 gathers each module's weights), a rank with fewer pieces would
            # leave the others waiting. The extra forwards cost no wall-clock (the rank would
            # wait for the busiest at the all-reduce below) and are not counted.
            for _ in range(max(map(len, pieces)) - len(pieces[self.rank])):
                _, start, end = pieces[0][0]
                model(val.batch(torch.arange(start, end), 0)[0].to(self.device))
        finally:
            self.eval_model.train()
        self.backend.all_reduce(sums, "sum")
        totals = sums.sum(0)
        metric = float(totals[1]) / n if self.objective.metric_sum is not None else None
        result: dict[str, float | None] = {"val_loss": float(totals[0]) / n, "val_acc": None}
        result[self.objective.metric_key] = metric  # val_acc, or a user metric's val_metric
        return result
