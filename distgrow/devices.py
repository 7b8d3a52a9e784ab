"""Which device a worker trains on: the CPU, or one CUDA device picked by one rule for every
launcher and backend.

``run.device``:

* ``cpu``: the CPU, whatever the machine holds.
* ``cuda``: a CUDA device; an error when torch cannot use one (and says why).
* ``auto``: CUDA when torch can use it. When the machine has NVIDIA GPUs (``/dev/nvidiaN``, or
  GPUs that SLURM gave the job) that torch cannot use (a CPU build of torch, a driver older
  than torch's CUDA, a device that fails to initialise), it is an error that says why
  (:class:`DeviceError`, exit 2), never a silent CPU run: ``launch`` starts one worker per
  GPU, and those workers would all train on the CPU over gloo. ``CUDA_VISIBLE_DEVICES`` set
  to nothing (``""`` or ``-1``) hides the GPUs on purpose: the CPU, as asked.

Rank -> device (:func:`cuda_index`), the same for torchrun, the deepspeed launcher, mpirun,
srun and horovodrun, for the torch, DeepSpeed and Horovod backends. torch numbers the devices
this process sees (``CUDA_VISIBLE_DEVICES`` already applied) ``0..visible-1``.

* Every rank on the node sees the same devices (torchrun, deepspeed, mpirun, srun without GPU
  binding): local rank ``r`` takes device ``r``. More ranks on the node than visible devices
  is an error (two ranks on one GPU: NCCL's "Duplicate GPU"), naming both numbers.
* SLURM binds GPUs to tasks (``srun --gpus-per-task``, ``--gpu-bind``; seen as
  ``SLURM_GPUS_PER_TASK``, ``SLURM_GPU_BIND``, or fewer visible devices than the step's
  ``SLURM_STEP_GPUS``): each task sees only its own, and takes device
  ``local rank mod visible`` (device 0 when it sees one).

DeepSpeed's engine picks ``cuda:LOCAL_RANK`` itself (and ZeRO reads ``LOCAL_RANK`` again):
:mod:`distgrow.backends.deepspeed_backend` points ``LOCAL_RANK`` at the chosen device (logged).
Once the ranks have joined, they compare the GPUs they hold (:func:`check_distinct_gpus`, by
host and GPU UUID), so a binding the rule cannot see still ends with one line, not NCCL's
"Duplicate GPU". The decisions are pure functions of plain numbers and a mapping, tested on
the CPU.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from distgrow.backends.base import BackendError


class DeviceError(BackendError):
    """No usable device for ``run.device``, or ranks that would share a GPU; one line."""


def visible_device_ids(env: Mapping[str, str]) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES``'s entries: None when unset, ``[]`` when it hides every GPU."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items or items[0] in ("-1", "NoDevFiles"):
        return []
    return items


def _gpu_list_len(text: str | None) -> int | None:
    """Entries of a SLURM GPU list (``0,1,2``, ``0-3``, ``0-1,4``); None when unset or odd."""
    if not text or not text.strip():
        return None
    total = 0
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if match is None:
            return None
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        total += max(0, hi - lo + 1)
    return total


def slurm_binds_gpus(env: Mapping[str, str], visible: int, local_world: int) -> bool:
    """True when SLURM gave each task its own GPUs (it sees a subset of the step's).

    Where SLURM names neither the binding nor the step's GPUs, a task under srun that sees
    fewer GPUs than there are tasks on its node is taken as bound (a cgroup shows each task
    only its own); ranks that do share a GPU then stop at :func:`check_distinct_gpus`.

    Args:
        env: The worker's environment.
        visible: Devices this process sees (``torch.cuda.device_count()``).
        local_world: Tasks on this node.
    """
    if not env.get("SLURM_PROCID"):
        return False
    if env.get("SLURM_GPUS_PER_TASK", "").strip():
        return True
    bind = env.get("SLURM_GPU_BIND", "").replace("verbose", "").strip(", ")
    if bind and bind != "none":
        return True
    step = _gpu_list_len(env.get("SLURM_STEP_GPUS"))
    if step is None:
        return visible < local_world
    return visible < step


def cuda_index(local_rank: int, local_world: int, visible: int, env: Mapping[str, str]) -> int:
    """The CUDA device (as torch numbers the visible ones) of local rank ``local_rank``.

    Args:
        local_rank: This worker's rank on its node.
        local_world: Workers on this node.
        visible: CUDA devices this process sees (``torch.cuda.device_count()``), at least 1.
        env: The worker's environment (``CUDA_VISIBLE_DEVICES``, SLURM's GPU variables).

    Returns:
        The device index, ``0 <= index < visible``.

    Raises:
        DeviceError: more ranks on this node than visible devices, without per-task binding.
    """
    if visible < 1:
        raise DeviceError(f"no visible CUDA device to give local rank {local_rank}.")
    if slurm_binds_gpus(env, visible, local_world):
        return local_rank % visible
    if local_world > visible or local_rank >= visible:
        ids = visible_device_ids(env)
        seen = f"CUDA_VISIBLE_DEVICES={','.join(ids)}" if ids is not None else "all of them"
        raise DeviceError(
            f"{max(local_world, local_rank + 1)} ranks on this node but {visible} visible "
            f"GPU(s) ({seen}): two ranks would share a GPU (NCCL: 'Duplicate GPU'). Fix: start "
            f"at most {visible} worker(s) per node (growth.max_workers, srun --ntasks-per-node), "
            "or bind one GPU per task (srun --gpus-per-task=1)."
        )
    return local_rank


def gpus_present(env: Mapping[str, str], dev: Path = Path("/dev")) -> int:
    """NVIDIA GPUs this machine (or the SLURM job) has, whether or not torch can use them.

    ``/dev/nvidiaN`` files, else the GPUs SLURM gave the job on this node.
    """
    files = sum(1 for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))
    if files:
        return files
    slurm = _gpu_list_len(env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"))
    if slurm:
        return slurm
    match = re.search(r"(\d+)\s*$", env.get("SLURM_GPUS_ON_NODE", ""))
    return int(match.group(1)) if match else 0


CUDA_SETUP = (
    "set up with the CUDA build (DISTGROW_TORCH_SPEC=torch==2.13.0 bash scripts/bootstrap.sh; "
    "docs/launch.md, 'On a GPU node')"
)


def cuda_unusable_reason() -> tuple[str, str] | None:
    """Why torch cannot use CUDA here and what to do, or None when it can.

    A CPU build of torch; otherwise torch's own warning from initialising CUDA (an old driver:
    "The NVIDIA driver on your system is too old"), or that it found no device.
    """
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)", CUDA_SETUP
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    said = next((str(w.message).strip() for w in caught if str(w.message).strip()), "")
    said = " ".join(said.split())  # one line
    detail = f": {said}" if said else " (is the NVIDIA driver loaded? nvidia-smi says)"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use CUDA{detail}",
        "update the NVIDIA driver to one for CUDA "
        f"{torch.version.cuda}, or install the torch build for the driver's CUDA",
    )


def select_device(
    requested: str,
    local_rank: int = 0,
    local_world: int = 1,
    env: Mapping[str, str] | None = None,
    dev: Path = Path("/dev"),
) -> torch.device:
    """The device for ``run.device`` (``auto``, ``cpu``, ``cuda``) on this local rank.

    Args:
        requested: ``run.device``.
        local_rank: This worker's rank on its node.
        local_world: Workers on this node.
        env: The environment (default ``os.environ``).
        dev: Where the ``nvidiaN`` device files are (tests pass a folder of their own).

    Raises:
        DeviceError: ``cuda`` that torch cannot use; ``auto`` with GPUs present that torch
            cannot use; more ranks on the node than visible GPUs.
    """
    env = os.environ if env is None else env
    if requested == "cpu":
        return torch.device("cpu")
    hidden = visible_device_ids(env) == []
    unusable = cuda_unusable_reason()
    if unusable is not None:
        reason, fix = unusable
        if requested == "auto" and (hidden or not gpus_present(env, dev)):
            return torch.device("cpu")  # no GPU here, or hidden on purpose: the CPU
        where = (
            "CUDA_VISIBLE_DEVICES hides every GPU"
            if hidden
            else f"{gpus_present(env, dev)} GPU(s) on this machine"
        )
        if requested == "auto":
            raise DeviceError(
                f"run.device = 'auto' found {where}, but {reason}. Fix: {fix}, or set "
                "run.device=cpu to train on the CPU."
            )
        raise DeviceError(
            f"run.device = 'cuda' ({where}), but {reason}. Fix: {fix}, or set run.device=cpu."
        )
    return torch.device("cuda", cuda_index(local_rank, local_world, torch.cuda.device_count(), env))


def gpu_identity(device: torch.device) -> str:
    """``host/GPU-UUID`` of a CUDA device: the same for two ranks only on the same GPU."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"{socket.gethostname()}/{uuid if uuid is not None else device}"


def check_distinct_gpus(identities: Sequence[str]) -> None:
    """Refuse a job in which two ranks train on one GPU (NCCL fails later: "Duplicate GPU").

    The rule of :func:`cuda_index` cannot see every binding (a wrapper that sets each rank's
    ``CUDA_VISIBLE_DEVICES``, SLURM's ``--gpu-bind=closest`` with a cyclic task layout): the
    ranks compare the GPUs they actually hold, once, at start-up.

    Args:
        identities: :func:`gpu_identity` of every rank, in rank order (all-gathered).

    Raises:
        DeviceError: naming the first two ranks that share a GPU.
    """
    first: dict[str, int] = {}
    for rank, identity in enumerate(identities):
        if identity in first:
            raise DeviceError(
                f"ranks {first[identity]} and {rank} both train on GPU {identity}: two ranks on "
                "one GPU (NCCL: 'Duplicate GPU'). Fix: start at most one worker per GPU, and "
                "give each rank its own (CUDA_VISIBLE_DEVICES, srun --gpus-per-task=1)."
            )
        first[identity] = rank
