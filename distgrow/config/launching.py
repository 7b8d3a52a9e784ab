"""The sections of how a run is started and watched: ``backend``, ``launch`` (with the
``chain`` of SLURM jobs) and ``logging`` (with ``wandb``).

Each field carries its range (:mod:`distgrow.config.fields`); each section's ``@constraint`` methods
check what spans its fields, and that values pasted into SLURM scripts and remote shell lines
keep to their grammar (:mod:`distgrow.config.grammar`). Neither torch nor anything distributed
is imported here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic.dataclasses import dataclass

from distgrow.config.fields import (
    MAX_WORKERS,
    STRICT,
    Bool,
    Float,
    Int,
    Range,
    Section,
    Str,
    constraint,
    fail,
    raises_config_errors,
    section,
    setting,
)
from distgrow.config.grammar import control_characters, is_host, is_slurm_names, is_slurm_time


@raises_config_errors
@dataclass(config=STRICT)
class BackendConfig(Section):
    """The data-parallel engine the trainer talks to (``distgrow.backends``)."""

    KEY: ClassVar[str] = "backend"

    name: Literal["torch", "fsdp", "deepspeed", "horovod"] = setting(
        "torch",
        "torch (DDP), fsdp (FSDP2: the model and optimizer sharded over the ranks), deepspeed "
        "or horovod.",
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = setting(
        "auto", "torch.distributed process-group backend: auto = NCCL on CUDA, gloo on CPU."
    )
    zero_stage: Int = setting(
        0,
        "DeepSpeed ZeRO stage (0, 1, 2 or 3; 3 partitions the weights too).",
        Range(ge=0, le=3, problem="supported: 0, 1, 2, 3", fix="use 0-3"),
    )
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", "Training precision.")
    deepspeed_config: Str | None = setting(
        None, "A DeepSpeed JSON to merge in (conflicts reported)."
    )


@raises_config_errors
@dataclass(config=STRICT)
class ChainConfig(Section):
    """``launch.slurm=chain``: the shape of each span's SLURM job (see slurm/README.md).

    A span of W workers asks for ``ceil(W / tasks_per_node)`` nodes, W tasks, and on GPUs
    ``min(W, gpus_per_node)`` GPUs per node."""

    KEY: ClassVar[str] = "launch.chain"

    tasks_per_node: Int | None = setting(
        None,
        "Most workers (tasks) per node; unset: the GPUs per node, else all on one node.",
        Range(ge=1, problem="must be at least 1", fix="e.g. 4"),
    )
    gpus_per_node: Int = setting(
        0,
        "GPUs per node a span asks for (one per worker); 0: CPU workers.",
        Range(ge=0, fix="e.g. 4"),
    )
    cpus_per_task: Int | None = setting(
        None,
        "CPUs per worker (sbatch --cpus-per-task); unset: SLURM's.",
        Range(ge=1, problem="must be at least 1", fix="e.g. 8"),
    )
    partition: Str | None = setting(None, "Partition of every span (sbatch --partition).")
    account: Str | None = setting(None, "Account charged (sbatch --account).")
    time: Str = setting("01:00:00", "Time limit of each span (sbatch --time), e.g. 04:00:00.")
    sbatch_args: list[Str] = setting([], "More sbatch options for every span, e.g. ['--mem=0'].")

    @constraint
    def _slurm_grammar(self) -> None:
        """Every value keeps to SLURM's grammar."""
        # Each value becomes an #SBATCH line of a generated batch script: SLURM's own grammar,
        # so that none can end its line and start a command (distgrow.config.grammar).
        if not is_slurm_time(self.time):
            raise fail(
                "launch.chain.time",
                self.time,
                "is not a SLURM time (minutes, [days-]hours:minutes:seconds, days-hours)",
                "e.g. 04:00:00 or 2-00:00:00",
            )
        for key, name in (("partition", self.partition), ("account", self.account)):
            if name is not None and not is_slurm_names(name):
                raise fail(
                    f"launch.chain.{key}",
                    name,
                    "is not a SLURM name (letters, digits, '_', '.', '-'; a list by commas)",
                    f"the {key}'s name as sinfo/sacctmgr shows it, e.g. gpu",
                )
        for arg in self.sbatch_args:
            bad = control_characters(arg)
            if bad or not arg.startswith("-"):
                raise fail(
                    "launch.chain.sbatch_args",
                    arg,
                    f"holds control characters ({', '.join(bad)})"
                    if bad
                    else "is not an sbatch option (one option per item, starting with '-')",
                    "one sbatch option per item, e.g. ['--mem=0', '--constraint=a100']",
                )


@raises_config_errors
@dataclass(config=STRICT)
class LaunchConfig(Section):
    """How `distgrow launch` starts workers."""

    KEY: ClassVar[str] = "launch"

    launcher: Literal["auto", "none", "torchrun", "deepspeed", "horovodrun", "mpirun", "srun"] = (
        setting("auto", "Launcher; 'auto' picks from the environment (SLURM, MPI, torchrun).")
    )
    elastic: Bool = setting(
        False,
        "Grow without relaunching the launcher: torchrun agents join one rendezvous on this "
        "machine (all workers restart at the new size); meanwhile the batch runs on the "
        "workers there are. See docs/launch.md.",
    )
    elastic_wait_s: Float = setting(
        0.0,
        "Elastic: seconds the workers wait at a growth point for the new workers to join "
        "before going on with the same batch on fewer workers (0: never wait).",
        Range(ge=0, fix="e.g. 0"),
    )
    max_restarts: Int = setting(
        3, "Relaunches after a crashed worker before giving up.", Range(ge=0, fix="e.g. 3")
    )
    preload: Bool = setting(
        True,
        "torchrun on one node: start the workers by forking them from a process that has "
        "imported torch once, kept ready while the previous span trains, instead of torchrun "
        "(the same worker environment; a resize then skips the launcher's start and the "
        "imports). false: plain torchrun. See docs/launch.md.",
    )
    nodes: Int = setting(
        1,
        "Nodes to spread workers over.",
        Range(ge=1, problem="must be at least 1", fix="e.g. 1"),
        Range(le=MAX_WORKERS, problem=f"must be at most {MAX_WORKERS:,}", fix="e.g. 1"),
    )
    node_rank: Int = setting(
        0,
        "This machine's rank among launch.nodes, for torchrun on several machines without "
        "SLURM: run `distgrow launch` on each; node 0 (at launch.master_addr) decides every "
        "launch and the others follow it (from SLURM_NODEID inside SLURM). See docs/launch.md.",
    )
    rdzv: Literal["static", "c10d"] = setting(
        "static",
        "torchrun's rendezvous on several nodes: static (--node_rank, rank 0 on node 0) or "
        "c10d (a store at launch.master_addr:master_port; torchrun orders the nodes).",
    )
    hostfile: Str | None = setting(None, "Hostfile for deepspeed / horovodrun / mpirun.")
    master_addr: Str = setting("127.0.0.1", "Rendezvous address (derived from SLURM when there).")
    master_port: Int = setting(
        29500,
        "Rendezvous port (several nodes under torchrun also use the port above it).",
        Range(gt=0, lt=65536, problem="not a port", fix="e.g. 29500"),
    )
    slurm: Literal["allocation", "chain"] = setting(
        "allocation",
        "On SLURM: 'allocation' holds the widest phase's nodes for the whole run and starts "
        "narrower job steps inside; 'chain' makes each span of the plan its own job, sized to "
        "its workers (launch.chain), the next submitted with afterok on it.",
    )
    chain: ChainConfig = section(ChainConfig, "The shape of each span's job (launch.slurm=chain).")

    @constraint
    def _rendezvous(self) -> None:
        """Rank 0's address is a host; this node's rank is one of the nodes."""
        # DeepSpeed's pdsh runner pastes it unquoted into every node's remote shell line.
        if not is_host(self.master_addr):
            raise fail(
                "launch.master_addr",
                self.master_addr,
                "is not a host name or an IP address",
                "rank 0's machine, e.g. 10.0.0.1 or node001",
            )
        if not 0 <= self.node_rank < self.nodes:
            raise fail(
                "launch.node_rank",
                self.node_rank,
                f"must be in [0, launch.nodes={self.nodes})",
                "0 on the machine at launch.master_addr, 1.. on the others",
            )


@raises_config_errors
@dataclass(config=STRICT)
class WandbConfig(Section):
    """Weights & Biases logging (rank 0 only)."""

    KEY: ClassVar[str] = "logging.wandb"

    mode: Literal["offline", "online", "disabled"] = setting(
        "offline", "offline writes a run to sync later with `wandb sync`; disabled logs nothing."
    )
    project: Str = setting("distgrow", "W&B project.")
    entity: Str | None = setting(None, "W&B entity (team or user).")
    tags: list[Str] = setting([], "W&B tags.")
    group: Str | None = setting(
        None, "W&B group (compare: one per compare, its --out folder's name)."
    )
    job_type: Str | None = setting(None, "W&B job type (compare: the variant).")


@raises_config_errors
@dataclass(config=STRICT)
class LoggingConfig(Section):
    """Metrics, progress and W&B."""

    KEY: ClassVar[str] = "logging"

    every_steps: Int = setting(
        50,
        "Log a metrics line every this many parameter updates.",
        Range(ge=1, problem="must be positive", fix="e.g. 50"),
    )
    progress: Literal["auto", "bar", "lines", "off"] = setting(
        "auto", "Progress display: a bar on a terminal, plain lines otherwise (auto)."
    )
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases settings.")
