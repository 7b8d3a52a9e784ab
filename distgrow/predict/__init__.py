"""Savings predicted before the run (``distgrow estimate``).

* :mod:`~distgrow.predict.profile` — the timing probe's record and the throughput model fitted
  to it (pure);
* :mod:`~distgrow.predict.estimate` — a plan's predicted wall-clock, worker-hours and SLURM
  node-hours (pure);
* :mod:`~distgrow.predict.measure` — the timing probe itself (torch, a process group);
* :mod:`~distgrow.predict.verb` — the command.
"""

from distgrow.predict.estimate import RunPrediction, predict_phase_times, predict_plan
from distgrow.predict.profile import Throughput, TimingProfile, WorldRow, read_profile

__all__ = [
    "RunPrediction",
    "Throughput",
    "TimingProfile",
    "WorldRow",
    "predict_phase_times",
    "predict_plan",
    "read_profile",
]
