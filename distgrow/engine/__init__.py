"""One engine for ``distgrow train`` and your own loop.

* :class:`GrowthSchedule` (:mod:`distgrow.loop`): the one lazy source of updates; each
  :class:`Update` is decided when it is asked for, and :meth:`Update.apply_to` writes its
  hyperparameters (LR, momentum, β₂, weight decay) into an optimizer.
* :func:`run_update` (:mod:`distgrow.engine.step`): one update's micro-steps (forward, loss
  scaling, the sync on the last micro-step, seeds), what ``distgrow train`` runs; the optional
  features plug in as :class:`UpdateHook` (:mod:`distgrow.engine.hooks`, their order); the
  OOM retry (:class:`distgrow.oom.OomFallback`) is the one wrapper around a whole update.
* :class:`DdpNoiseProbe` (:mod:`distgrow.engine.noise`): the measured noise scale for
  :meth:`GrowthSchedule.observe_noise` in a DDP loop (``growth.mode: adaptive``), as a hook.
"""

from distgrow.engine.hooks import UpdateHook
from distgrow.engine.noise import DdpNoiseProbe
from distgrow.engine.step import run_update
from distgrow.loop import GrowthSchedule, MicroBatch, Update, apply_setting

__all__ = [
    "DdpNoiseProbe",
    "GrowthSchedule",
    "MicroBatch",
    "Update",
    "UpdateHook",
    "apply_setting",
    "run_update",
]
