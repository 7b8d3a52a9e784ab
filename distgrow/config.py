"""The typed config tree: YAML files in ``configs/`` plus dotted ``key=value`` overrides.

Every setting lives here once, with its default and a docstring (the ``doc`` metadata of its
field). Loading checks three things before anything runs, and each failure is a
:class:`ConfigError` naming the key, the value and the fix:

1. keys: an unknown key is an error naming the key, the file (or the command line) and the
   closest valid keys;
2. types: values are checked against the field's annotation (``int``, ``float``, ``bool``,
   ``str``, ``Literal[...]``, ``X | None``, ``list[...]``, nested sections);
3. values: ranges and cross-field rules in each section's ``validate``.

This module imports neither torch nor anything distributed: ``distgrow plan`` and the planner
work from it alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message says how to fix it."""


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a default and its documentation (lists get a fresh copy)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _fail(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: {problem}. Fix: {fix}.")


ScheduleType = Literal[
    "constant", "step", "multistep", "exponential", "time_based", "cosine", "plateau"
]
GrowthMode = Literal["decay_lr", "grow_batch", "grow_batch_lr", "grow_momentum"]
OptimName = Literal["sgd", "adam", "adamw", "rmsprop"]

# Schedules that are not decays: named so that the error can say why they are refused.
NOT_DECAYS = {
    "cyclic": "a cyclic LR rises again, and a batch cannot shrink back without breaking the plan",
    "cycliclr": "a cyclic LR rises again, and a batch cannot shrink back without breaking the plan",
    "onecycle": "one-cycle warms the LR up before decaying it; a batch cannot start large",
    "one_cycle": "one-cycle warms the LR up before decaying it; a batch cannot start large",
    "warmup": "a warm-up raises the LR; the batch-growth conversion only replaces decays",
    "linear_warmup": "a warm-up raises the LR; the batch-growth conversion only replaces decays",
    "cosine_warm_restarts": "warm restarts raise the LR again; only monotone decays convert",
}


@dataclass
class RunConfig:
    """What to run and where its results go."""

    name: str = _f("run", "Run name; used for the W&B run and as the default output folder.")
    epochs: int = _f(10, "Training epochs (full passes over the training set).")
    seed: int = _f(0, "Seed for weights, data order (one permutation per epoch) and dropout.")
    output_dir: str = _f(
        "runs/{name}", "Run directory for checkpoints and metrics; '{name}' expands to run.name."
    )
    resume: bool = _f(False, "Continue from the newest checkpoint in output_dir.")
    device: Literal["auto", "cpu", "cuda"] = _f(
        "auto", "Where to train: 'auto' uses CUDA when present, else the CPU."
    )
    keep_checkpoints: int = _f(3, "How many checkpoints to keep (the newest ones).")
    checkpoint_every_steps: int | None = _f(
        None,
        "Also checkpoint every this many updates (null: only at epoch ends, when the job must "
        "change its world size, at stop signals and at the end). A change of batch needs none.",
    )
    checkpoint_every_s: float | None = _f(
        None, "Also checkpoint when this many seconds passed since the last one (null: never)."
    )
    threads: int | None = _f(
        None,
        "Intra-op CPU threads per worker (null: the node's cores / its workers). The float "
        "results of some kernels depend on it: pin it to compare runs bit for bit.",
    )

    def validate(self) -> None:
        if self.epochs < 1:
            raise _fail("run.epochs", self.epochs, "must be at least 1", "set run.epochs=1 or more")
        if self.keep_checkpoints < 1:
            raise _fail(
                "run.keep_checkpoints",
                self.keep_checkpoints,
                "must keep at least one checkpoint",
                "set run.keep_checkpoints=1 or more",
            )
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise _fail(
                "run.checkpoint_every_steps",
                self.checkpoint_every_steps,
                "must be at least 1",
                "e.g. 500, or null",
            )
        if self.checkpoint_every_s is not None and not self.checkpoint_every_s > 0:
            raise _fail(
                "run.checkpoint_every_s",
                self.checkpoint_every_s,
                "must be above 0",
                "e.g. 600, or null",
            )
        if self.threads is not None and self.threads < 1:
            raise _fail("run.threads", self.threads, "must be at least 1", "e.g. 1, or null")
        if not self.name or "/" in self.name:
            raise _fail("run.name", self.name, "must be a non-empty name without '/'", "e.g. cifar")

    @property
    def resolved_output_dir(self) -> str:
        """``output_dir`` with ``{name}`` expanded."""
        return self.output_dir.replace("{name}", self.name)


# Training-set sizes of data sets with an official train/test split, and total sizes of those
# split here with val_fraction (see held_out). distgrow.data is checked against these in tests.
_OFFICIAL_TRAIN = {"fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000}
_SPLIT_TOTAL = {
    "covtype": 581_012,
    "ionosphere": 351,
    "digits": 1_797,
    "breast_cancer": 569,
    "wine": 178,
    "iris": 150,
}


def held_out(n_total: int, val_fraction: float) -> int:
    """Validation samples taken from ``n_total`` (at least 1, and at least 1 left to train)."""
    return min(max(1, round(n_total * val_fraction)), n_total - 1)


@dataclass
class DataConfig:
    """The training data (loaders in ``distgrow.data``)."""

    name: str = _f(
        "synthetic_classification",
        "Data set: fashion_mnist, mnist, cifar10, covtype, ionosphere, digits, breast_cancer, "
        "wine, iris, synthetic_classification, synthetic_regression.",
    )
    root: str | None = _f(None, "Where the files are; null uses the data set's default place.")
    val_fraction: float = _f(0.2, "Held-out fraction for data sets without an official test split.")
    download: bool = _f(False, "Allow downloading (covtype through scikit-learn); off offline.")
    augment: bool = _f(False, "Random crop and flip for image data (deterministic per sample).")
    limit_train: int | None = _f(None, "Use only the first k training samples (quick runs).")
    limit_val: int | None = _f(None, "Use only the first k validation samples.")
    synthetic_samples: int = _f(2048, "Samples in the synthetic data sets (train + val).")
    synthetic_features: int = _f(20, "Features in the synthetic data sets.")
    size: int | None = _f(
        None,
        "Training-set size N for `distgrow plan` when the data set is not at hand; training "
        "always uses the real size.",
    )

    def expected_train_size(self) -> int:
        """N for planning without loading: ``size`` if set, else the data set's known size.

        Must agree with ``distgrow.data`` (a test loads each set and compares).
        """
        if self.size is not None:
            return self.size
        total = _OFFICIAL_TRAIN.get(self.name)
        if total is None:
            n_all = _SPLIT_TOTAL.get(self.name)
            if n_all is None and self.name.startswith("synthetic"):
                n_all = self.synthetic_samples
            if n_all is None:
                raise ConfigError(
                    f"data.name = {self.name!r}: its size is not known without loading it. "
                    "Fix: set data.size=N (the number of training samples)."
                )
            total = n_all - held_out(n_all, self.val_fraction)
        return min(total, self.limit_train) if self.limit_train else total

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise _fail("data.val_fraction", self.val_fraction, "must be in (0, 1)", "e.g. 0.2")
        for key in ("limit_train", "limit_val", "size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise _fail(f"data.{key}", value, "must be positive or null", "remove it or use 1+")
        if self.synthetic_samples < 2:
            raise _fail(
                "data.synthetic_samples", self.synthetic_samples, "too small", "use 2 or more"
            )
        if self.synthetic_features < 1:
            raise _fail(
                "data.synthetic_features", self.synthetic_features, "too small", "use 1 or more"
            )


@dataclass
class ModelConfig:
    """The network (``distgrow.models``)."""

    name: str = _f("mlp", "Model: mlp, bottleneck_mlp, cnn, wrn, resnet18, resnet34, resnet50.")
    hidden: list[int] = _f([512, 512], "Hidden layer sizes of the plain mlp.")
    dropout: float = _f(0.0, "Dropout probability (0 = none).")
    depth: int = _f(16, "Wide ResNet depth (6n+4).")
    width: int = _f(4, "Wide ResNet widening factor.")
    ghost_batch: int | None = _f(
        None,
        "Ghost batch norm size: BN statistics per fixed-size chunk, so they do not depend on how "
        "the global batch is split. Micro-batches are kept multiples of it.",
    )

    def validate(self) -> None:
        if any(h < 1 for h in self.hidden):
            raise _fail("model.hidden", self.hidden, "sizes must be positive", "e.g. [512, 512]")
        if not 0.0 <= self.dropout < 1.0:
            raise _fail("model.dropout", self.dropout, "must be in [0, 1)", "e.g. 0.25")
        if self.ghost_batch is not None and self.ghost_batch < 1:
            raise _fail("model.ghost_batch", self.ghost_batch, "must be positive", "e.g. 128")


@dataclass
class OptimConfig:
    """The optimizer. ``lr`` and ``momentum`` are the values at the start of training."""

    name: OptimName = _f("sgd", "Optimizer: sgd, adam, adamw, rmsprop.")
    lr: float = _f(0.1, "Initial learning rate ε (lr0).")
    momentum: float = _f(0.0, "Momentum m for sgd and rmsprop; enters the noise scale as 1/(1-m).")
    nesterov: bool = _f(False, "Nesterov momentum (sgd; needs momentum > 0).")
    weight_decay: float = _f(0.0, "Weight decay (L2 for sgd/adam/rmsprop, decoupled for adamw).")
    betas: list[float] = _f([0.9, 0.999], "Adam/AdamW betas.")
    eps: float = _f(1e-8, "Adam/AdamW/RMSprop epsilon.")
    grad_clip: float | None = _f(None, "Clip the global gradient norm to this value (null: off).")

    def validate(self) -> None:
        if not self.lr > 0:
            raise _fail("optim.lr", self.lr, "must be positive", "e.g. optim.lr=0.1")
        if not 0.0 <= self.momentum < 1.0:
            raise _fail("optim.momentum", self.momentum, "must be in [0, 1)", "e.g. 0.9")
        if self.momentum and self.name in ("adam", "adamw"):
            raise _fail(
                "optim.momentum",
                self.momentum,
                f"{self.name} has no momentum setting (it uses betas)",
                "set optim.momentum=0 and use optim.betas",
            )
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise _fail(
                "optim.nesterov",
                self.nesterov,
                "Nesterov needs optim.name=sgd and optim.momentum > 0",
                "set optim.momentum=0.9 or optim.nesterov=false",
            )
        if self.weight_decay < 0:
            raise _fail("optim.weight_decay", self.weight_decay, "must be >= 0", "e.g. 5e-4")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _fail("optim.betas", self.betas, "must be two numbers in [0, 1)", "[0.9, 0.999]")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise _fail("optim.grad_clip", self.grad_clip, "must be positive", "e.g. 1.0 or null")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule the user would run; distgrow converts it (see planner)."""

    type: ScheduleType = _f(
        "constant",
        "constant (nothing to convert), step, multistep, exponential, time_based "
        "(lr0/(1+decay·t)), cosine, plateau.",
    )
    interval: Literal["epoch", "step"] = _f(
        "epoch",
        "Time unit t of the schedule: 'epoch', or 'step' = the baseline's updates at base_batch "
        "(samples seen / growth.base_batch), so growth runs follow the same path per sample.",
    )
    step_size: float = _f(30, "step: decay every step_size units of t.")
    milestones: list[float] = _f([], "multistep: the values of t where the LR is cut.")
    gamma: float = _f(0.1, "step/multistep/exponential: the multiplier per decay (< 1).")
    decay: float = _f(0.0, "time_based: lr = lr0 / (1 + decay·t) (Keras' SGD decay).")
    t_max: float | None = _f(None, "cosine: length of the half cosine in units of t (null: all).")
    eta_min: float = _f(0.0, "cosine: the final learning rate.")
    factor: float = _f(0.1, "plateau: multiplier at each plateau (ReduceLROnPlateau factor).")
    patience: int = _f(10, "plateau: epochs without improvement before a cut.")
    threshold: float = _f(1e-4, "plateau: minimum change that counts as an improvement.")
    threshold_mode: Literal["rel", "abs"] = _f("rel", "plateau: threshold relative or absolute.")
    cooldown: int = _f(0, "plateau: epochs to wait after a cut before counting again.")
    min_lr: float = _f(0.0, "plateau: the LR never goes below this.")
    plateau_eps: float = _f(1e-8, "plateau: cuts smaller than this are ignored (torch's eps).")
    mode: Literal["min", "max"] = _f("min", "plateau: whether the monitored metric should fall.")
    monitor: Literal["val_loss", "val_acc", "train_loss"] = _f(
        "val_loss", "plateau: the metric watched at each epoch end."
    )

    def validate(self, run: RunConfig) -> None:
        if self.type == "step" and self.step_size <= 0:
            raise _fail("schedule.step_size", self.step_size, "must be positive", "e.g. 30")
        if self.type in ("step", "multistep", "exponential") and not 0.0 < self.gamma < 1.0:
            raise _fail(
                "schedule.gamma",
                self.gamma,
                "must be in (0, 1): only decays convert into batch growth",
                "e.g. schedule.gamma=0.2 (a cut by 5)",
            )
        if self.type == "multistep":
            ms = self.milestones
            if not ms:
                raise _fail(
                    "schedule.milestones", ms, "multistep needs milestones", "e.g. [60, 120, 160]"
                )
            if any(b <= a for a, b in itertools.pairwise(ms)) or ms[0] <= 0:
                raise _fail(
                    "schedule.milestones",
                    ms,
                    "must be positive and strictly increasing",
                    "e.g. [60, 120, 160]",
                )
        if self.type == "time_based" and self.decay < 0:
            raise _fail("schedule.decay", self.decay, "must be >= 0", "e.g. lr0/epochs = 0.002")
        if self.type == "cosine":
            if self.t_max is not None and self.t_max <= 0:
                raise _fail("schedule.t_max", self.t_max, "must be positive", "or null for all")
            if self.eta_min < 0:
                raise _fail("schedule.eta_min", self.eta_min, "must be >= 0", "e.g. 0")
        if self.type == "plateau":
            if not 0.0 < self.factor < 1.0:
                raise _fail("schedule.factor", self.factor, "must be in (0, 1)", "e.g. 0.2")
            if self.patience < 0:
                raise _fail("schedule.patience", self.patience, "must be >= 0", "e.g. 3")
            if self.cooldown < 0:
                raise _fail("schedule.cooldown", self.cooldown, "must be >= 0", "e.g. 0")
            if self.min_lr < 0:
                raise _fail("schedule.min_lr", self.min_lr, "must be >= 0", "e.g. 0")
            if self.threshold < 0:
                raise _fail("schedule.threshold", self.threshold, "must be >= 0", "e.g. 1e-4")


@dataclass
class GrowthConfig:
    """How the LR schedule becomes a batch schedule, and the limits that stop the batch."""

    mode: GrowthMode = _f(
        "grow_batch",
        "decay_lr: the plain baseline (fixed batch, LR decays); grow_batch: the batch grows "
        "instead, LR takes the rest at the caps (hybrid); grow_batch_lr: also start with LR and "
        "batch × lr_scale; grow_momentum: also raise momentum to growth.momentum.",
    )
    base_batch: int = _f(128, "B0: the global batch of the baseline run.")
    max_global_batch: int | None = _f(None, "Hard cap on the global batch (null: none).")
    max_dataset_fraction: float | None = _f(
        0.1, "Cap the batch at this fraction of N (the paper's N/10 rule; null: off)."
    )
    max_workers: int = _f(1, "Most data-parallel workers the job may use.")
    micro_batch: int | None = _f(
        None, "Per-device batch that keeps one device busy (null: base_batch)."
    )
    max_micro_batch: int | None = _f(
        None, "Largest per-device batch that fits in memory (null: no limit)."
    )
    max_accum_steps: int | None = _f(
        None, "Most gradient-accumulation steps per update (null: no limit)."
    )
    lr_scale: float = _f(5.0, "grow_batch_lr / grow_momentum: initial LR and batch × this.")
    momentum: float = _f(0.98, "grow_momentum: the raised momentum.")

    def validate(self, optim: OptimConfig) -> None:
        b0 = self.base_batch
        if b0 < 1:
            raise _fail("growth.base_batch", b0, "must be positive", "e.g. 128")
        if self.max_global_batch is not None and self.max_global_batch < b0:
            raise _fail(
                "growth.max_global_batch",
                self.max_global_batch,
                f"is below growth.base_batch ({b0})",
                f"use {b0} or more, or null for no cap",
            )
        f = self.max_dataset_fraction
        if f is not None and not 0.0 < f <= 1.0:
            raise _fail("growth.max_dataset_fraction", f, "must be in (0, 1]", "0.1 or null")
        if self.max_workers < 1:
            raise _fail("growth.max_workers", self.max_workers, "must be at least 1", "e.g. 8")
        for key in ("micro_batch", "max_micro_batch", "max_accum_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise _fail(f"growth.{key}", value, "must be positive or null", "e.g. 64 or null")
        if (
            self.micro_batch is not None
            and self.max_micro_batch is not None
            and self.micro_batch > self.max_micro_batch
        ):
            raise _fail(
                "growth.micro_batch",
                self.micro_batch,
                f"exceeds growth.max_micro_batch ({self.max_micro_batch})",
                f"use at most {self.max_micro_batch}",
            )
        if self.mode in ("grow_batch_lr", "grow_momentum") and self.lr_scale < 1.0:
            raise _fail("growth.lr_scale", self.lr_scale, "must be >= 1", "e.g. 5")
        if self.mode == "grow_momentum":
            if optim.name not in ("sgd", "rmsprop") or optim.momentum == 0:
                raise _fail(
                    "growth.mode",
                    self.mode,
                    "the momentum variant needs an optimizer with momentum",
                    "set optim.name=sgd and optim.momentum=0.9, or another growth.mode",
                )
            if not optim.momentum < self.momentum < 1.0:
                raise _fail(
                    "growth.momentum",
                    self.momentum,
                    f"must lie between optim.momentum ({optim.momentum}) and 1",
                    "e.g. 0.98",
                )


@dataclass
class BackendConfig:
    """The data-parallel engine the trainer talks to (``distgrow.backends``)."""

    name: Literal["torch", "deepspeed", "horovod"] = _f("torch", "torch, deepspeed or horovod.")
    dist_backend: Literal["auto", "gloo", "nccl"] = _f(
        "auto", "torch.distributed process-group backend: auto = NCCL on CUDA, gloo on CPU."
    )
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage (0, 1 or 2).")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "Training precision.")
    deepspeed_config: str | None = _f(None, "A DeepSpeed JSON to merge in (conflicts reported).")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise _fail("backend.zero_stage", self.zero_stage, "supported: 0, 1, 2", "use 0-2")


@dataclass
class LaunchConfig:
    """How `distgrow launch` starts workers."""

    launcher: Literal["auto", "none", "torchrun", "deepspeed", "horovodrun", "mpirun", "srun"] = _f(
        "auto", "Launcher; 'auto' picks from the environment (SLURM, MPI, torchrun)."
    )
    elastic: bool = _f(
        False,
        "Grow without relaunching the launcher: torchrun agents join one rendezvous on this "
        "machine (all workers restart at the new size); meanwhile the batch runs on the "
        "workers there are. See docs/launch.md.",
    )
    elastic_wait_s: float = _f(
        0.0,
        "Elastic: seconds the workers wait at a growth point for the new workers to join "
        "before going on with the same batch on fewer workers (0: never wait).",
    )
    max_restarts: int = _f(3, "Relaunches after a crashed worker before giving up.")
    nodes: int = _f(1, "Nodes to spread workers over.")
    hostfile: str | None = _f(None, "Hostfile for deepspeed / horovodrun / mpirun.")
    master_addr: str = _f("127.0.0.1", "Rendezvous address (derived from SLURM when there).")
    master_port: int = _f(29500, "Rendezvous port.")

    def validate(self) -> None:
        if self.max_restarts < 0:
            raise _fail("launch.max_restarts", self.max_restarts, "must be >= 0", "e.g. 3")
        if self.elastic_wait_s < 0:
            raise _fail("launch.elastic_wait_s", self.elastic_wait_s, "must be >= 0", "e.g. 0")
        if self.nodes < 1:
            raise _fail("launch.nodes", self.nodes, "must be at least 1", "e.g. 1")
        if not 0 < self.master_port < 65536:
            raise _fail("launch.master_port", self.master_port, "not a port", "e.g. 29500")


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    mode: Literal["offline", "online", "disabled"] = _f(
        "offline", "offline writes a run to sync later with `wandb sync`; disabled logs nothing."
    )
    project: str = _f("distgrow", "W&B project.")
    entity: str | None = _f(None, "W&B entity (team or user).")
    tags: list[str] = _f([], "W&B tags.")


@dataclass
class LoggingConfig:
    """Metrics, progress and W&B."""

    every_steps: int = _f(50, "Log a metrics line every this many parameter updates.")
    progress: Literal["auto", "bar", "lines", "off"] = _f(
        "auto", "Progress display: a bar on a terminal, plain lines otherwise (auto)."
    )
    wandb: WandbConfig = field(
        default_factory=WandbConfig, metadata={"doc": "Weights & Biases settings."}
    )

    def validate(self) -> None:
        if self.every_steps < 1:
            raise _fail("logging.every_steps", self.every_steps, "must be positive", "e.g. 50")


@dataclass
class Config:
    """The whole run: one section per concern."""

    run: RunConfig = field(default_factory=RunConfig, metadata={"doc": "Run settings."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Data settings."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Model settings."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimizer."})
    schedule: ScheduleConfig = field(
        default_factory=ScheduleConfig, metadata={"doc": "The LR schedule to convert."}
    )
    growth: GrowthConfig = field(
        default_factory=GrowthConfig, metadata={"doc": "Batch growth and its limits."}
    )
    backend: BackendConfig = field(default_factory=BackendConfig, metadata={"doc": "Engine."})
    launch: LaunchConfig = field(default_factory=LaunchConfig, metadata={"doc": "Launching."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Logging."})

    def validate(self) -> None:
        """Check every section and the rules that span sections."""
        self.run.validate()
        self.data.validate()
        self.model.validate()
        self.optim.validate()
        self.schedule.validate(self.run)
        self.growth.validate(self.optim)
        self.backend.validate()
        self.launch.validate()
        self.logging.validate()
        g = self.model.ghost_batch
        if g is not None:
            micro = self.growth.micro_batch or self.growth.base_batch
            if micro % g:
                raise _fail(
                    "growth.micro_batch",
                    micro,
                    f"must be a multiple of model.ghost_batch ({g}) so every ghost batch is whole",
                    f"use {max(g, micro // g * g)} or {(micro // g + 1) * g}",
                )

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (what ``config.yaml`` in a run directory holds)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed tree
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)

    def wrong() -> ConfigError:
        return ConfigError(
            f"{key} = {value!r} in {source}: expected {_type_name(tp)}, got "
            f"{type(value).__name__}. Fix: give a value of type {_type_name(tp)}."
        )

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{key} in {source} must be a section (a mapping of keys), got {value!r}. "
                f"Fix: write it as '{key}: {{...}}' or use dotted keys like {key}.<name>=..."
            )
        return _build(typing.cast(type, tp), value, key, source)
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads off/on/no/yes as booleans: map back to the choice the user typed.
            words = ("off", "no", "false") if value is False else ("on", "yes", "true")
            value = next((w for w in words if w in get_args(tp)), value)
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            near = difflib.get_close_matches(
                str(value), [str(a) for a in get_args(tp)], n=1, cutoff=0.5
            )
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(
                f"{key} = {value!r} in {source} is not one of {choices}. "
                f"Fix: {hint}use one of them."
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise wrong()
    if origin is list:
        if not isinstance(value, list):
            raise wrong()
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise wrong()
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 6e-4 (no dot) as a string; a number is what the user meant.
            try:
                return float(value)
            except ValueError:
                raise wrong() from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")  # a bug, not input


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(cls: type, key: str, full: str, source: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    return ConfigError(
        f"unknown key '{full}' in {source}. Fix: {hint}valid keys here are {', '.join(names)}."
    )


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown_key(cls, str(key), full, source)
        kwargs[key] = _coerce(hints[key], value, full, source)
    return cls(**kwargs)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["growth.base_batch=256", "optim.lr=0.05"]`` into a nested dict.

    Values are parsed as YAML, so ``640`` is an int, ``null`` is None, ``[60, 120]`` a list and
    ``true`` a bool; quote a string that would parse otherwise (``run.name='"0.1"'``).
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} has no '='. Fix: write overrides as dotted.key=value, "
                "e.g. growth.max_global_batch=640."
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key. Fix: e.g. optim.lr=0.1.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err}).") from err
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r} conflicts with an earlier override of {part}."
                )
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def config_from_dict(
    data: Mapping[str, Any], overrides: Iterable[str] = (), source: str = "the config"
) -> Config:
    """Build and validate a :class:`Config` from a nested mapping plus dotted overrides."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source} must be a YAML mapping of sections, got {type(data).__name__}."
        )
    over = parse_overrides(overrides)
    merged = _merge(dict(data), over)
    sched = merged.get("schedule")
    kind = sched.get("type") if isinstance(sched, Mapping) else None
    if isinstance(kind, str) and kind.lower() in NOT_DECAYS:
        raise ConfigError(
            f"schedule.type = {kind!r} in {source} is not a decay and cannot be converted: "
            f"{NOT_DECAYS[kind.lower()]}. Fix: use a decaying schedule (step, multistep, "
            "exponential, time_based, cosine, plateau); run a warm-up or cycle with "
            "growth.mode=decay_lr outside distgrow."
        )
    # Check the overrides on their own first, so an error names the command line, not the file.
    if over:
        _build(Config, over, "", "the command-line overrides")
    cfg = _build(Config, merged, "", source)
    cfg.validate()
    return typing.cast(Config, cfg)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: a missing file, invalid YAML, an unknown key, a wrong type or an
            impossible value; the message names the key, the value and the fix.
    """
    if path is None:
        return config_from_dict({}, overrides, "the defaults")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist. Fix: see configs/ for examples.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from err
    return config_from_dict(data, overrides, str(p))


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every setting, for docs and ``distgrow config --help``."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = _field_types(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(typing.cast(type, tp), key))
        else:
            rows.append((key, _type_name(tp), getattr(instance, f.name), f.metadata.get("doc", "")))
    return rows


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (secrets never live in the config; keys come from env)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
