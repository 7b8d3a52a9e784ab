"""The training loop: a growth plan, realised update by update on a data-parallel backend.

:class:`Trainer` reads top to bottom: ``train()`` runs epochs, ``train_epoch()`` cuts the
epoch's permutation into global batches, ``train_step()`` runs one update as ``accum_steps``
micro-batches on this rank. Before each update the :class:`~distgrow.planner.GrowthPolicy`
says which setting to use; when the batch or its split changes the trainer logs a growth event
(no checkpoint: a resume replays the plan); when the plan needs more workers than the job has,
it checkpoints and exits with :data:`EXIT_NEED_WORKERS`. Checkpoints: at each epoch's end, at
``run.checkpoint_every_steps`` / ``run.checkpoint_every_s``, at a stop (signal, more workers).

The rooms (modules of this package): :mod:`~distgrow.trainer.loop` (the loop: ``for update in
schedule.updates()``, each update run by :func:`distgrow.engine.run_update` with its hooks),
:mod:`~distgrow.trainer.lifecycle` (the run directory, resume, checkpoints, ``summary.json``),
:mod:`~distgrow.trainer.telemetry` (the clock, records, events, console) and
:mod:`~distgrow.trainer.resize` (more workers, elastic interim splits, the stops);
:mod:`~distgrow.trainer.pieces` builds the optimizer and model.

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

from distgrow.data import micro_batch_seed
from distgrow.losses import loss_sum
from distgrow.state import TrainError
from distgrow.trainer.loop import Trainer
from distgrow.trainer.pieces import build_optimizer, build_run_model, draws_random
from distgrow.trainer.resize import ELASTIC_JOIN_WAIT_S

__all__ = [
    "ELASTIC_JOIN_WAIT_S",
    "TrainError",
    "Trainer",
    "build_optimizer",
    "build_run_model",
    "draws_random",
    "loss_sum",
    "micro_batch_seed",
]
