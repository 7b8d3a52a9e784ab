"""The one source of updates: the schedule, update by update, and a batch sampler.

``distgrow train`` takes its updates from :class:`GrowthSchedule`, and so does a loop of your
own. It says, when asked for the next parameter update, the global batch, its split (workers ×
micro-batch × accumulation steps), the learning rate and momentum (and Adam's β₂ / weight decay
when ``growth`` adjusts them: :meth:`Update.apply_to`), and which samples this rank reads in each
micro-batch. It decides each update when it is asked for it, so a decision taken after an
update (the measured noise scale, :meth:`GrowthSchedule.observe_noise`; a plateau's
:meth:`GrowthSchedule.end_epoch`) applies from the next one, inside an epoch too. It keeps
distgrow's guarantees, so a loop that follows it computes the same updates as ``distgrow train``:

* one permutation of the training set per epoch (:func:`~distgrow.data.epoch_order`),
  consumed in order, so the global batches do not depend on how they are realised (1 × 4,
  2 × 2 or 4 × 1 read the same samples in the same micro-batches);
* a growth changes the batch at an update boundary: no sample is dropped or repeated;
* :meth:`GrowthSchedule.state_dict` holds the exact position (epoch, sample, update), and
  :meth:`GrowthSchedule.load_state_dict` continues from it at any world size, with the samples
  that were left.

Two ways to read the data, one mechanism:

* in-memory tensors: index them with ``micro.indices`` of each :class:`MicroBatch`;
* any map-style ``Dataset``: ``DataLoader(dataset, batch_sampler=GrowthBatchSampler(schedule),
  collate_fn=MicroBatchCollate(dataset), num_workers=..., pin_memory=...)`` yields this rank's
  micro-batches of the rest of the epoch in the order the schedule hands out its updates,
  while worker processes prefetch them; each update is built when the loader reads it
  (:meth:`GrowthSchedule.read_ahead`), so a read costs what it reads, not the epoch.

The loop, with its own model, optimizer and DDP (see ``examples/own_loop/train_ddp.py``)::

    schedule = GrowthSchedule(cfg, len(dataset), rank, world_size)
    loader = DataLoader(dataset, batch_sampler=GrowthBatchSampler(schedule),
                        collate_fn=MicroBatchCollate(dataset), num_workers=2)
    for epoch in schedule.epochs():
        batches = iter(loader)                   # this rank's micro-batches, rest of the epoch
        for update in schedule.updates():        # the updates left in this epoch
            update.apply_to(optimizer)           # lr, momentum, β₂, weight decay
            for micro in update.micro_batches:
                x, y = next(batches)
                with nullcontext() if micro.sync else ddp.no_sync():
                    torch.manual_seed(micro.seed)   # dropout as distgrow draws it
                    loss = F.cross_entropy(ddp(x), y, reduction="sum") * update.loss_scale
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            # growth.mode=adaptive / noise_cap: report the measured noise scale
            # (distgrow.engine.DdpNoiseProbe), then make a new iter(loader) if it decided.
        schedule.end_epoch(val_loss)             # plateau schedules decide here

Exactness. The loss of a micro-batch is its *summed* per-sample loss × ``loss_scale``
(``world_size / samples``): DDP averages gradients over ranks and accumulation adds them, so
the gradient is exactly the global batch's mean, for the partial last batch of an epoch and its
empty micro-batches too. Batch-norm running statistics are not merged across ranks here (each
rank keeps its own, as plain DDP does); ``distgrow train`` merges them.

This module imports no ``torch.distributed``: the rank and world size are given.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.utils.data import Sampler
from torch.utils.data.dataloader import default_collate

from distgrow.config import Config
from distgrow.data import epoch_order, micro_batch_seed, shard_split
from distgrow.data.order import FeistelPermutation
from distgrow.planner import GrowthPolicy, Setting, Split, micro_batch_multiple

STATE_VERSION = 1

_PolicyState = tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]
"""A growth policy's state and its events not taken yet."""


class ScheduleError(ValueError):
    """The schedule cannot go on as asked; the message says why and how to fix it."""


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields, not records
class MicroBatch:
    """One micro-step of this rank within an update."""

    indices: torch.Tensor
    """Sample indices (int64, in global order); empty for the tail of a partial batch."""
    chunk: int
    """Its place in the global batch: ``accumulation step × workers + rank``."""
    sync: bool
    """The last micro-step of the update: gradients are all-reduced now (else ``no_sync``)."""
    seeded_by: tuple[int, int] = (0, 0)
    """``(run.seed, epoch)``: with the first sample, what :attr:`seed` is drawn from."""

    @functools.cached_property
    def seed(self) -> int | None:
        """Seed ``torch.manual_seed`` with this before the forward (dropout); None when empty.

        Read when asked for (it reads the first index): a model that draws nothing at random
        never needs it."""
        if not self.indices.numel():
            return None
        return micro_batch_seed(self.seeded_by[0], self.seeded_by[1], int(self.indices[0]))


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields, not records
class Update:
    """One parameter update: what to run and how, for this rank."""

    epoch: int
    """The epoch (0-based) this update belongs to."""
    position: int
    """Samples of the epoch consumed before this update."""
    step: int
    """Updates done before this one (0 for the first of the run)."""
    setting: Setting
    """The plan's setting: batch, split, LR, momentum (as realised on this job's workers)."""
    indices: torch.Tensor
    """The whole global batch, in order (every rank holds the same)."""
    micro_batches: tuple[MicroBatch, ...]
    """This rank's ``accum_steps`` micro-batches, in accumulation order."""
    loss_scale: float
    """``world_size / samples``: multiply each micro-batch's *summed* loss by it; DDP's
    average over ranks then gives the global batch's mean gradient."""
    last_in_epoch: bool

    @property
    def samples(self) -> int:
        """Samples in this global batch (``global_batch``, or fewer for an epoch's last)."""
        return int(self.indices.numel())

    @property
    def global_batch(self) -> int:
        return self.setting.global_batch

    @property
    def workers(self) -> int:
        return self.setting.workers

    @property
    def micro_batch(self) -> int:
        return self.setting.micro_batch

    @property
    def accum_steps(self) -> int:
        return self.setting.accum_steps

    @property
    def lr(self) -> float:
        return self.setting.lr

    @property
    def momentum(self) -> float:
        return self.setting.momentum

    def apply_to(self, optimizer: torch.optim.Optimizer) -> None:
        """Write this update's hyperparameters into ``optimizer``: see :func:`apply_setting`."""
        apply_setting(optimizer, self.setting)


def apply_setting(optimizer: torch.optim.Optimizer, setting: Setting) -> None:
    """The setting's LR, momentum, β₂ and weight decay into every parameter group.

    The LR always; momentum where the group has one (SGD, RMSprop); β₂ when
    ``growth.beta2_half_life`` sets it and weight decay when ``growth.weight_decay_timescale``
    does (Adam, AdamW). Compared before written: the values change a few times per run, and a
    write that changes nothing costs a dict store per group per update.
    """
    for group in optimizer.param_groups:
        if group["lr"] != setting.lr:
            group["lr"] = setting.lr
        if "momentum" in group and group["momentum"] != setting.momentum:
            group["momentum"] = setting.momentum
        if setting.beta2 is not None and group["betas"][1] != setting.beta2:
            group["betas"] = (group["betas"][0], setting.beta2)  # growth.beta2_half_life
        if setting.weight_decay is not None and group["weight_decay"] != setting.weight_decay:
            group["weight_decay"] = setting.weight_decay  # growth.weight_decay_timescale


class GrowthSchedule:
    """distgrow's growth plan, handed out update by update: the one source of updates.

    ``distgrow train`` and loops of your own both take their updates from here. Iterate
    :meth:`epochs`, and within each :meth:`updates`; report each epoch's monitored metric to
    :meth:`end_epoch` (plateau schedules need it) and, with ``growth.mode: adaptive`` or
    ``growth.noise_cap``, the measured noise scale to :meth:`observe_noise`. The policy is asked
    for each update when it is handed out, so a decision takes effect at the next update, in
    the middle of an epoch too. The sample order, the splits, the learning rate and momentum
    (and β₂ / weight decay: :meth:`Update.apply_to`), and the per-micro-batch dropout seeds are
    those of ``distgrow train`` on the same config and world size.

    Args:
        cfg: The validated config (``distgrow.load_config``): ``run.epochs``, ``run.seed``,
            ``optim``, ``schedule`` and ``growth`` are used.
        dataset_size: N, the number of training samples.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: The data-parallel workers of the job; the plan never uses fewer.
        policy: The growth policy to follow (default: a new one for ``cfg``); ``distgrow
            train`` passes its own, whose state its checkpoints hold.
        fit: What to do with a setting the policy gives, before it becomes an update (default:
            a setting wider than the job is split over this job's workers, more accumulation).
            ``distgrow train`` passes its own: it logs the decisions and asks for workers.

    Raises:
        ConfigError: The plan cannot be realised on ``world_size`` workers (the message names
            the values and a fix).
        ScheduleError: ``rank`` is out of range.
    """

    def __init__(
        self,
        cfg: Config,
        dataset_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        policy: GrowthPolicy | None = None,
        fit: Callable[[Setting], Setting] | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ScheduleError(
                f"rank {rank} of world_size {world_size}: the rank must be in 0 .. "
                f"world_size - 1 and world_size >= 1. Fix: pass the launcher's RANK and "
                "WORLD_SIZE."
            )
        self.cfg = cfg
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.align = micro_batch_multiple(cfg.model)
        self.policy = policy or GrowthPolicy(cfg, dataset_size, min_workers=world_size)
        self.fit = fit or self._on_this_job
        # Where training stands: counts the updates handed out (see state_dict).
        self.epoch = 0
        self.position = 0
        self.step = 0
        self.samples_seen = 0
        self._reported = 0  # epochs whose metric end_epoch received
        # (epoch, its permutation): computed on the fly for token data and huge sets.
        self._order: tuple[int, torch.Tensor | FeistelPermutation] | None = None
        # A sampler's read, not handed out yet: (epoch, sample) → its split and the policy's
        # state that decided it (None: read by remaining()).
        self._ahead: dict[tuple[int, int], tuple[Split, dict[str, Any] | None]] = {}
        self._reader = 0  # counts the reads: a new one ends the ones before it
        self._split_told = False  # the plan's split differs here: said once (rank 0)

    @property
    def done(self) -> bool:
        """True once ``run.epochs`` epochs are handed out."""
        return self.epoch >= self.cfg.run.epochs

    # -- iteration ------------------------------------------------------------------------------

    def epochs(self) -> Iterator[int]:
        """The epochs left (0-based); after a mid-epoch resume, the one in progress first.

        Raises:
            ScheduleError: the body of the loop did not finish the epoch's :meth:`updates`,
                or a plateau schedule went on to the next epoch without :meth:`end_epoch`
                reporting the finished one's metric.
        """
        while not self.done:
            self._check_reported()
            epoch = self.epoch
            yield epoch
            if self.epoch == epoch:
                raise ScheduleError(
                    f"epoch {epoch + 1} is not finished ({self.position} of "
                    f"{self.dataset_size} samples handed out): run all of schedule.updates() "
                    "in the body of the epoch loop, or leave the loop to stop early."
                )
        self._check_reported()

    def updates(self) -> Iterator[Update]:
        """The updates left in the current epoch, in order, each decided when asked for.

        Each is counted as done when it is handed out: :meth:`state_dict` taken after its
        optimizer step resumes with the next one.
        """
        if self.done:
            return
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_update()

    def next_update(self) -> Update:
        """Decide the next update now, hand it out and count it (what :meth:`updates` yields).

        Raises:
            ScheduleError: all epochs are handed out, or a sampler read this update ahead with
                another batch (a decision came after it read: make a new ``iter(loader)``).
        """
        if self.done:
            raise ScheduleError(
                f"all {self.cfg.run.epochs} epochs are handed out (run.epochs): no update left."
            )
        setting = self.fit(self.policy.setting(self.epoch, self.position))
        update = self._update(self.epoch, self.position, self.step, setting)
        read, _ = self._ahead.pop((update.epoch, update.position), (None, None))
        fits = update.workers <= self.world_size  # else the caller stops (distgrow train)
        if read is not None and fits and read != update.setting.split:
            self._ahead.clear()
            raise ScheduleError(
                f"the sampler read update {update.step + 1} ahead as {read}, but the "
                f"schedule decided {update.setting.split} when it came (observe_noise or "
                "end_epoch moved the plan after the loader read ahead). Fix: make a new "
                "iter(loader) after a decision, before the next update."
            )
        self.position += update.samples
        self.samples_seen += update.samples
        self.step += 1
        if self.position >= self.dataset_size:
            self.epoch += 1
            self.position = 0
        return update

    def __iter__(self) -> Iterator[Update]:
        """Every update left, over all epochs: ``for update in schedule``.

        For in-memory data (a ``DataLoader`` is made once per epoch: use :meth:`epochs`). A
        plateau schedule still needs :meth:`end_epoch` when ``update.last_in_epoch``.
        """
        for _ in self.epochs():
            yield from self.updates()

    def observe_noise(self, b_simple: float | None, measured: int) -> list[tuple[str, Any]]:
        """Report the measured gradient noise scale (``growth.mode: adaptive``, ``noise_cap``).

        Call it every ``growth.adaptive.every`` updates, after the optimizer step, with the
        smoothed ``B_simple`` (None while it cannot be formed) and the number of updates
        measured so far (:class:`distgrow.noise.NoiseScaleEstimator`). A growth it decides
        applies from the next update, within the epoch. Ignored by the other modes.

        Returns:
            The decisions taken (name, values), as ``distgrow train`` logs them.
        """
        self.policy.observe_noise(b_simple, measured)
        return self.policy.take_events()

    def end_epoch(self, metric: float | None = None) -> bool:
        """Report the finished epoch's monitored metric (``schedule.monitor``).

        Needed by plateau schedules (they grow here); ignored by the others.

        Returns:
            True when a plateau cut fired: the next epoch has a larger batch or a lower LR.

        Raises:
            ScheduleError: a plateau schedule and no metric, or no epoch finished yet.
        """
        if self.policy.trigger is None:
            self._reported = self.epoch
            return False
        if metric is None:
            raise ScheduleError(
                f"schedule.type is plateau: end_epoch needs the epoch's "
                f"{self.cfg.schedule.monitor}. Fix: call schedule.end_epoch(metric)."
            )
        if self._reported >= self.epoch or self.position:
            raise ScheduleError(
                f"end_epoch was called at epoch {self.epoch + 1}, {self.position} samples in, "
                f"with {self._reported} epoch(s) already reported: call it once, after the "
                "last update of each epoch."
            )
        fired = self.policy.end_epoch(float(metric))
        self._reported = self.epoch
        return fired

    def _check_reported(self) -> None:
        if self.policy.trigger is not None and self.epoch > self._reported:
            raise ScheduleError(
                f"epoch {self.epoch} ended without a metric: a plateau schedule decides on it. "
                "Fix: call schedule.end_epoch(metric) after each epoch's last update."
            )

    # -- the updates ----------------------------------------------------------------------------

    def remaining(self) -> list[Update]:
        """The updates left in the current epoch as decided now, without handing any out.

        All of them, each with its index arrays: O(updates in the epoch). A sampler reads
        :meth:`read_ahead` instead, which builds them one at a time. A decision taken later
        (:meth:`observe_noise`, an elastic resize) can change what follows; :meth:`next_update`
        then says so.
        """
        if self.done:
            return []
        planned: list[Update] = []
        position, step = self.position, self.step
        with self._policy_put_back():
            for setting, end in self._walk(self.epoch, position):
                planned.append(self._update(self.epoch, position, step, setting))
                position, step = end, step + 1
        self._ahead = {(u.epoch, u.position): (u.setting.split, None) for u in planned}
        return planned

    def micro_steps_left(self) -> int:
        """This rank's micro-steps left in the current epoch as decided now (a sampler's
        ``len``): from the settings alone, no index arrays built."""
        if self.done:
            return 0
        with self._policy_put_back():
            return sum(setting.accum_steps for setting, _ in self._walk(self.epoch, self.position))

    def read_ahead(self) -> Iterator[Update]:
        """The updates left in the current epoch, each built when it is read (a sampler's read).

        Starts where the schedule stands now and costs what is read, not the epoch: the policy
        is asked as :meth:`updates` will ask it, and its state is put back. An update read after
        a decision (:meth:`observe_noise`) follows the decision; one read before it may not:
        :meth:`read_ahead_holds` says so, and :meth:`next_update` refuses it. A new read ends
        the ones before it (a new ``iter(loader)`` drops the old iterator).
        """
        self._reader += 1
        self._ahead = {}
        if self.done:
            return iter(())
        state = (self.policy.state_dict(), list(self.policy.events))
        return self._reading(self._reader, self.epoch, self.position, self.step, state)

    def _reading(
        self, reader: int, epoch: int, position: int, step: int, chain: _PolicyState
    ) -> Iterator[Update]:
        while position < self.dataset_size and self._reader == reader:
            with self._policy_put_back():
                before = self._follow(epoch, position, chain)
                setting = self._decide_ahead(epoch, position)
                chain = (self.policy.state_dict(), list(self.policy.events))
            if setting is None:
                return  # the loop cannot go past it on this job
            update = self._update(epoch, position, step, setting)
            self._ahead[(epoch, position)] = (update.setting.split, before)
            yield update
            position, step = position + update.samples, step + 1

    def _follow(self, epoch: int, position: int, chain: _PolicyState) -> dict[str, Any]:
        """Put the policy where it decides the update at ``position`` of this read; its state.

        The read's own continuation (``chain``) while the policy has not moved since the read
        decided the update the schedule stands at; else the policy as it stands, walked over
        the updates read ahead and not handed out yet (a decision came: O(those updates)).
        """
        live = self.policy.state_dict()
        if self.epoch == epoch and self.position <= position:
            read = self._ahead.get((epoch, self.position))
            if self.position == position:
                return live
            if read is None or read[1] != live:
                at = self.position
                for _, at in self._walk(epoch, self.position):
                    if at >= position:
                        break
                if at == position:
                    return self.policy.state_dict()
        self.policy.load_state_dict(chain[0])
        self.policy.events = list(chain[1])
        return chain[0]

    def _walk(self, epoch: int, position: int) -> Iterator[tuple[Setting, int]]:
        """The policy's settings from ``position`` to the epoch's end, each with the position
        after its update, deciding as it goes (the policy moves: put it back if need be); ends
        early where this job cannot split a setting."""
        while position < self.dataset_size:
            setting = self._decide_ahead(epoch, position)
            if setting is None:
                return  # the loop cannot go past it on this job
            position += min(setting.global_batch, self.dataset_size - position)
            yield setting, position

    def _decide_ahead(self, epoch: int, position: int) -> Setting | None:
        """The policy's setting at ``position``, split over this job; None if it cannot be."""
        setting = self.policy.setting(epoch, position)
        if setting.workers > self.world_size:
            return self._split_here(setting)
        return setting

    @contextlib.contextmanager
    def _policy_put_back(self) -> Iterator[None]:
        state, events = self.policy.state_dict(), list(self.policy.events)
        try:
            yield
        finally:
            self.policy.load_state_dict(state)
            self.policy.events = events

    def read_ahead_holds(self) -> bool:
        """Whether the updates a sampler read ahead so far (:meth:`read_ahead`) are still those
        the schedule will hand out; after a decision (:meth:`observe_noise`) they may not be:
        make a new ``iter(loader)`` then. Costs the updates read ahead, not the epoch."""
        if self.done:
            return True
        at = self.position
        with self._policy_put_back():
            for setting, end in self._walk(self.epoch, at):
                read = self._ahead.get((self.epoch, at))
                if read is None:
                    break
                if read[0] != setting.split:
                    return False
                at = end
        return True

    def _permutation(self, epoch: int) -> torch.Tensor | FeistelPermutation:
        if self._order is None or self._order[0] != epoch:
            tokens = self.cfg.data.name.strip().lower() == "tokens"
            order = epoch_order(self.dataset_size, self.cfg.run.seed, epoch, on_the_fly=tokens)
            self._order = (epoch, order)
        return self._order[1]

    def _update(self, epoch: int, position: int, step: int, setting: Setting) -> Update:
        indices = self._permutation(epoch)[position : position + setting.global_batch]
        return self.make_update(epoch, position, step, setting, indices)

    def make_update(
        self, epoch: int, position: int, step: int, setting: Setting, indices: torch.Tensor
    ) -> Update:
        """The update of the global batch ``indices`` realised as ``setting`` on this rank,
        without handing anything out (an OOM retry runs one again at a smaller split)."""
        return Update(
            epoch=epoch,
            position=position,
            step=step,
            setting=setting,
            indices=indices,
            micro_batches=self._micro_batches(indices, setting, epoch),
            loss_scale=self.world_size / int(indices.numel()),
            last_in_epoch=position + int(indices.numel()) >= self.dataset_size,
        )

    def _split_here(self, setting: Setting) -> Setting | None:
        """A setting wider than this job split exactly over its workers; None if it cannot."""
        here = replace(self.policy.limits, max_workers=self.world_size)
        split = here.realise(setting.global_batch, self.world_size)
        if split is None or split.global_batch != setting.global_batch:
            return None
        return replace(setting, split=split)

    def _on_this_job(self, setting: Setting) -> Setting:
        """The setting split over this job's workers when the plan wants more of them.

        The global batch, LR and momentum stay; the split takes more accumulation (what
        ``distgrow train`` does while elastic workers join): the same updates, more slowly.
        """
        if setting.workers <= self.world_size:
            return setting
        fitted = self._split_here(setting)
        if fitted is None:
            raise ScheduleError(
                f"the plan wants {setting.workers} workers for a global batch of "
                f"{setting.global_batch}, which cannot be split exactly over this job's "
                f"{self.world_size} within growth.max_micro_batch and growth.max_accum_steps. "
                f"Fix: launch {setting.workers} workers and load_state_dict(), or raise "
                "growth.max_accum_steps."
            )
        if not self._split_told and self.rank == 0:
            self._split_told = True
            plan, job, most = setting.split, fitted.split, self.policy.limits.max_workers
            processes = f"{self.world_size} process" + "es" * (self.world_size > 1)
            warnings.warn(
                f"this job has {processes} but the plan (growth.max_workers={most}) splits the "
                f"global batch of {setting.global_batch} over {plan.workers} workers "
                f"(micro-batch {plan.micro_batch} × {plan.accum_steps} accumulation steps); "
                f"here it is {job.workers} × micro-batch {job.micro_batch} × {job.accum_steps} "
                "steps: the same updates, LR and sample order on fewer workers. Launch "
                f"{most} processes to run the plan's split (`distgrow plan CONFIG "
                f"growth.max_workers={self.world_size}` shows this job's).",
                stacklevel=3,
            )
        return fitted

    def _micro_batches(
        self, indices: torch.Tensor, setting: Setting, epoch: int
    ) -> tuple[MicroBatch, ...]:
        shards = shard_split(indices, setting, rank=self.rank, align=self.align)
        last = len(shards) - 1
        return tuple(
            MicroBatch(
                indices=shard,
                chunk=k * setting.workers + self.rank,
                sync=k == last,
                seeded_by=(self.cfg.run.seed, epoch),
            )
            for k, shard in enumerate(shards)
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def seek(self, epoch: int, position: int, step: int, samples_seen: int) -> None:
        """Continue from this point, the policy's state being loaded already (``distgrow
        train`` keeps the two apart in its checkpoints); the next update starts at ``position``
        of ``epoch``."""
        self.epoch, self.position, self.step = epoch, position, step
        self.samples_seen = samples_seen
        self._reported = epoch
        self._ahead.clear()

    def state_dict(self) -> dict[str, Any]:
        """Where training stands after the last update handed out (plain types only).

        Take it after that update's optimizer step (and, at the end of an epoch, after
        :meth:`end_epoch`); it is the same on every rank.
        """
        return {
            "version": STATE_VERSION,
            "dataset_size": self.dataset_size,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "reported": self._reported,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`, taken at this or any other world size.

        The next update is the one that followed in the saved run: same epoch, same first
        sample, same global batch, split anew over this job's workers.

        Raises:
            ScheduleError: another data-set size, or a global batch this job cannot split.
        """
        if int(state["dataset_size"]) != self.dataset_size:
            raise ScheduleError(
                f"the state is of a data set of {state['dataset_size']} samples, this "
                f"schedule's has {self.dataset_size}: a resume needs the same training set."
            )
        policy, note = resplit_policy_state(
            state["policy"], int(state["world_size"]), self.world_size, self.policy, self.align
        )
        if note is not None:
            warnings.warn(note, stacklevel=2)
        self.policy.load_state_dict(policy)
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self._reported = int(state["reported"])
        self._ahead.clear()


def resplit_policy_state(
    policy_state: dict[str, Any], saved_world: int, world: int, policy: GrowthPolicy, align: int
) -> tuple[dict[str, Any], str | None]:
    """A policy's saved state with its current global batch split anew for ``world`` workers.

    The one rule for a resume at another world size (``distgrow train`` and own loops alike):
    the sample order depends only on the global batch, so the same batches continue in another
    split. Returns the state and, when the saved batch is not realisable here, a warning that
    names the batch the run continues with.

    Raises:
        ScheduleError: the saved global batch cannot be split over ``world`` workers.
    """
    state = dict(policy_state)
    if saved_world == world:
        return state, None
    batch = int(state["current"]["global_batch"])
    split = policy.limits.realise(batch)
    if split is None:
        raise ScheduleError(
            f"the saved global batch ({batch}) cannot be split over {world} workers in "
            f"micro-batches that are multiples of {align}. Fix: resume on {saved_world} "
            f"workers, or on a number of workers that divides {batch // align}."
        )
    state["current"] = asdict(split)
    if split.global_batch == batch:
        return state, None
    return state, (
        f"the saved global batch {batch} cannot be realised on {world} workers; "
        f"continuing with {split.global_batch} = {split}"
    )


class GrowthBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches for ``DataLoader(dataset, batch_sampler=...)``.

    Each ``iter()`` yields, as lists of indices, the micro-batches of the updates the schedule
    has not handed out yet in the current epoch, in the order :meth:`GrowthSchedule.updates`
    hands them out (``accum_steps`` lists per update, some empty at the end of an epoch: use
    :class:`MicroBatchCollate`). Make the iterator once per epoch, before the epoch's first
    update: the loader's workers then prefetch while the loop trains, and a growth inside the
    epoch changes the size of the lists without dropping or repeating a sample.

    Args:
        schedule: The schedule the loop follows (the same object).
    """

    def __init__(self, schedule: GrowthSchedule) -> None:
        self.schedule = schedule

    def __iter__(self) -> Iterator[list[int]]:
        # Start now, not at the first next(): a single-process loader asks for its first batch
        # only after the loop has taken the epoch's first update from the schedule. The first
        # update is built now (an error shows at iter()), the others as the loader reads.
        updates = self.schedule.read_ahead()
        first = next(updates, None)
        if first is None:
            return iter(())
        return (
            micro.indices.tolist()
            for update in itertools.chain((first,), updates)
            for micro in update.micro_batches
        )

    def __len__(self) -> int:
        """The micro-batches left in the epoch, from the settings alone (no index arrays)."""
        return self.schedule.micro_steps_left()


class MicroBatchCollate:
    """``collate_fn`` that also turns an empty micro-batch into empty tensors.

    The last, partial batch of an epoch can leave a rank a micro-step with no sample; it still
    runs forward and backward (zero gradients) so that it joins the gradient all-reduce.
    ``default_collate`` cannot collate nothing, so an empty list is collated from the first
    sample of the data set and cut to length 0 (same dtypes and sample shapes).

    Args:
        dataset: The map-style data set the loader reads.
        collate: The collate function for non-empty micro-batches.
    """

    def __init__(self, dataset: Any, collate: Callable[[list[Any]], Any] = default_collate) -> None:
        self.dataset = dataset
        self.collate = collate

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            return self.collate(samples)
        return _empty_like(self.collate([self.dataset[0]]))


def _empty_like(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return {key: _empty_like(value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_empty_like(value) for value in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return type(batch)(_empty_like(value) for value in batch)  # type: ignore[call-arg]
    return batch


__all__ = [
    "GrowthBatchSampler",
    "GrowthSchedule",
    "MicroBatch",
    "MicroBatchCollate",
    "ScheduleError",
    "Update",
    "apply_setting",
    "micro_batch_seed",
]
