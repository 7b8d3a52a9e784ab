"""The typed config tree: one pydantic dataclass per section, a documented field per setting.

Every setting lives here once, with its default and its documentation (the field's
``description``, which also lands in the JSON Schema of ``distgrow config --schema``). The
sections are pydantic dataclasses, so attribute access, ``dataclasses.replace`` and
``dataclasses.asdict`` work as on plain dataclasses, and constructing one checks its types:

* scalars are strict (``"3"`` is not an int, ``1`` is not a bool), except that an integral
  float is an int (``10.0``) and a numeric string is a float (YAML 1.1 reads ``6e-4`` as one);
* every float is finite: ``nan``, ``inf`` and ``-inf`` are refused wherever they are written;
* a choice (``Literal``) written as a YAML 1.1 boolean (``off``) maps back to the word typed.

Ranges and cross-field rules live in each section's ``validate`` (run by the loader, see
:mod:`distgrow.config.loader`, which also turns pydantic's errors into one line naming the key,
the value and the fix). This module imports neither torch nor anything distributed.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import posixpath
import zipfile
from pathlib import PureWindowsPath
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AliasChoices,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass

from distgrow.config.datasets import DATA_NAMES, FILE_FORMATS, OFFICIAL_TRAIN, SPLIT_TOTAL, held_out
from distgrow.config.filesizes import file_train_size
from distgrow.config.grammar import control_characters, is_host, is_slurm_names, is_slurm_time
from distgrow.entrypoints import EntryPointError, is_entry_point, parse_entry_point


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message says how to fix it."""


def _integral_float(value: Any) -> Any:
    # YAML writes 1e3 and 10.0 as floats; a whole number is what the user meant for a count.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _numeric_string(value: Any) -> Any:
    # YAML 1.1 reads 6e-4 (no dot) as a string; a number is what the user meant.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Every int fits in 64 bits (torch's int64): 10**21 is refused as a type error, not met mid-run.
# (The validator comes last: it runs first, and the bounds stay in the JSON Schema.)
Int = Annotated[int, Strict(), Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(_integral_float)]
Float = Annotated[float, Strict(), BeforeValidator(_numeric_string)]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]

# extra="forbid": an unknown key is an error; allow_inf_nan=False: every float is finite, and
# validate_assignment keeps it so after construction (no NaN slips past a later `x < 0`).
# defer_build: the validators are built at the first load, not at import.
_STRICT = ConfigDict(
    extra="forbid", allow_inf_nan=False, validate_assignment=True, defer_build=True
)

# Counts that drive loops (the plan simulates every epoch; the realisation tries every worker
# count): a bound far above any real run keeps a typo like 1e21 from hanging `distgrow plan`.
MAX_EPOCHS = 100_000
MAX_WORKERS = 100_000
MIN_STEP_SIZE = 1e-6
MAX_LR_SCALE = 1_000
# Synthetic data is generated in memory: beyond this it would not fit (samples × features).
MAX_SYNTHETIC_VALUES = 2_000_000_000


def _f(default: Any, doc: str, names: tuple[str, ...] = ()) -> Any:
    """A field with a default and its documentation (lists and dicts get a fresh copy);
    ``names``: the field's name and the other names the key may also be written as."""
    if isinstance(default, list | dict):
        return Field(default_factory=lambda: type(default)(default), description=doc)
    if names:
        return Field(default, description=doc, validation_alias=AliasChoices(*names))
    return Field(default, description=doc)


def _section(cls: Any, doc: str) -> Any:
    """A nested section field, built from its own defaults."""
    return Field(default_factory=cls, description=doc)


def _fail(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: {problem}. Fix: {fix}.")


def _check_entry_point(key: str, value: str) -> None:
    """The form of an entry point (nothing is imported here: that happens at training)."""
    try:
        parse_entry_point(key, value)
    except EntryPointError as err:
        raise ConfigError(str(err)) from None


def _is_plain_name(name: str) -> bool:
    """A name that is one folder inside another: not blank, ``.``, ``..`` or a path."""
    return (
        name.strip() not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and not PureWindowsPath(name).drive  # C:run would leave the folder on Windows
    )


@dataclass(config=_STRICT)
class _Section:
    """What every section shares: YAML 1.1 booleans map back to the words of a choice."""

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_words(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, bool) or info.field_name is None:
            return value
        tp = cls.__pydantic_fields__[info.field_name].annotation  # type: ignore[attr-defined]
        if get_origin(tp) is not Literal:
            return value
        # YAML 1.1 reads off/on/no/yes as booleans: map back to the choice the user typed.
        words = ("off", "no", "false") if value is False else ("on", "yes", "true")
        return next((w for w in words if w in get_args(tp)), value)


ScheduleType = Literal[
    "constant",
    "step",
    "multistep",
    "exponential",
    "time_based",
    "cosine",
    "linear",
    "inverse_sqrt",
    "wsd",
    "plateau",
]
GrowthMode = Literal["decay_lr", "grow_batch", "grow_batch_lr", "grow_momentum", "adaptive"]
GrowthRule = Literal["auto", "linear", "sqrt"]
# Schedules whose decay may reach zero: B* = B0/r(t) is then unbounded and the cap takes over.
FLOORED = ("cosine", "linear", "wsd")
OptimName = Literal["sgd", "adam", "adamw", "rmsprop"]

# Schedules that are not decays: named so that the error can say why they are refused.
NOT_DECAYS = {
    "cyclic": "a cyclic LR rises again, and a batch cannot shrink back without breaking the plan",
    "cycliclr": "a cyclic LR rises again, and a batch cannot shrink back without breaking the plan",
    "onecycle": "one-cycle warms the LR up before decaying it; a batch cannot start large",
    "one_cycle": "one-cycle warms the LR up before decaying it; a batch cannot start large",
    "warmup": "a warm-up is not a schedule of its own: set schedule.warmup (in units of t) "
    "before the decay, and it stays an LR warm-up at the base batch",
    "linear_warmup": "a warm-up is not a schedule of its own: set schedule.warmup (in units of t) "
    "before the decay, and it stays an LR warm-up at the base batch",
    "cosine_warm_restarts": "warm restarts raise the LR again; only monotone decays convert",
}


@dataclass(config=_STRICT)
class RunConfig(_Section):
    """What to run and where its results go."""

    name: Str = _f("run", "Run name; used for the W&B run and as the default output folder.")
    epochs: Int = _f(10, "Training epochs (full passes over the training set).")
    seed: Int = _f(0, "Seed for weights, data order (one permutation per epoch) and dropout.")
    output_dir: Str = _f(
        "runs/{name}", "Run directory for checkpoints and metrics; '{name}' expands to run.name."
    )
    resume: Bool = _f(False, "Continue from the newest checkpoint in output_dir.")
    device: Literal["auto", "cpu", "cuda"] = _f(
        "auto",
        "Where to train: 'auto' uses CUDA when torch can, the CPU on a machine without GPUs; "
        "GPUs that torch cannot use (a CPU build, an old driver) are an error: 'cpu' trains on "
        "the CPU anyway.",
    )
    keep_checkpoints: Int = _f(3, "How many checkpoints to keep (the newest ones).")
    checkpoint_every_steps: Int | None = _f(
        None,
        "Also checkpoint every this many updates (null: only at epoch ends, when the job must "
        "change its world size, at stop signals and at the end). A change of batch needs none.",
    )
    checkpoint_every_s: Float | None = _f(
        None, "Also checkpoint when this many seconds passed since the last one (null: never)."
    )
    channels_last: Literal["auto"] | Bool = _f(
        "auto",
        "Convolution models in the channels_last memory format (weights and 4-D inputs); auto: "
        "on for models with 2-D convolutions on CUDA, off elsewhere.",
    )
    compile: Bool = _f(
        False, "torch.compile the model (its first updates at each new batch shape compile)."
    )
    tf32: Bool = _f(
        True,
        "On CUDA GPUs that have TF32 (Ampere and newer), fp32 matmuls and convolutions use it "
        "(torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32): several times faster, "
        "10-bit mantissa products. false: full fp32 (IEEE). No effect on the CPU or bf16/fp16 "
        "(docs/speed.md says what bit-exactness holds on CUDA).",
    )
    oom_fallback: Bool | None = _f(
        None,
        "On a CUDA out-of-memory error in an update, drop its gradients and run it again at "
        "half the micro-batch and twice the accumulation (the same samples per update), and "
        "keep that micro-batch from then on; logged as an oom_fallback event. null: on for the "
        "torch backend on one worker with in-memory data (see docs/speed.md).",
    )
    threads: Int | None = _f(
        None,
        "Intra-op CPU threads per worker (null: the node's cores / its workers). The float "
        "results of some kernels depend on it: pin it to compare runs bit for bit.",
    )
    flush_denormal: Bool = _f(
        True,
        "Treat float values below 1.2e-38 (denormals) as 0 in CPU arithmetic "
        "(torch.set_flush_denormal), set at start-up before any CPU thread starts. SGD's "
        "momentum of units whose gradient stays 0 decays into denormals after a few hundred "
        "updates, and x86 CPUs compute on them many times slower: without it the Fashion-MNIST "
        "MLP's optimizer step took 1.7× as long, relative to its forward, by the third epoch "
        "(docs/speed.md). false: "
        "IEEE gradual underflow, as torch's default. No effect on CUDA arithmetic.",
    )

    def validate(self) -> None:
        if self.epochs < 1:
            raise _fail("run.epochs", self.epochs, "must be at least 1", "set run.epochs=1 or more")
        if self.epochs > MAX_EPOCHS:
            raise _fail(
                "run.epochs",
                self.epochs,
                f"must be at most {MAX_EPOCHS:,} (the plan simulates every epoch)",
                f"set run.epochs={MAX_EPOCHS} or fewer",
            )
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
        if self.threads is not None and not 1 <= self.threads <= 65_536:
            raise _fail(
                "run.threads", self.threads, "must be between 1 and 65,536", "e.g. 1, or null"
            )
        # torch.manual_seed takes a 64-bit value; beyond that it would raise mid-run.
        if not -(2**63) <= self.seed < 2**63:
            raise _fail("run.seed", self.seed, "must fit in 64 bits", "e.g. 0")
        if not _is_plain_name(self.name):
            raise _fail(
                "run.name",
                self.name,
                "must be a plain folder name (not empty, '.', '..', a path or with '/' or '\\')",
                "e.g. run.name=cifar",
            )
        # The run directory is the run's own: never the folder the user works in, or above it.
        if posixpath.normpath(self.resolved_output_dir.strip() or ".") in (".", "..", "/"):
            raise _fail(
                "run.output_dir",
                self.output_dir,
                "is the current directory: a run would mix its checkpoints with your files",
                "use runs/{name}, or a folder of its own",
            )

    @property
    def resolved_output_dir(self) -> str:
        """``output_dir`` with ``{name}`` expanded."""
        return self.output_dir.replace("{name}", self.name)


# data.path is also read as data.root (its name before the file formats): one setting, two
# spellings, so populate_by_name lets code write DataConfig(path=...) too.
_DATA_CONFIG = ConfigDict(**_STRICT, populate_by_name=True)


VAL_PATH_NAMES = (*FILE_FORMATS, "text", "tokens")
"""The data sets that read ``data.val_path``."""


@dataclass(config=_DATA_CONFIG)
class DataConfig(_Section):
    """The training data (loaders in ``distgrow.data``)."""

    name: Str = _f(
        "synthetic_classification",
        "Data set or file format: fashion_mnist, mnist, cifar10, covtype, ionosphere, digits, "
        "breast_cancer, wine, iris, synthetic_classification, synthetic_regression, "
        "python_stdlib (byte-level text for language models, needs seq_len); or npz, "
        "csv, tsv, image_folder, text (your own files at data.path; text: byte-level text for "
        "language models, needs seq_len); or your own function returning "
        "(train, val) torch Datasets: 'package.module:function' or 'path/to/file.py:function' "
        "(see docs/own_code.md).",
    )
    kwargs: dict[Str, Any] = _f({}, "Keyword arguments of a data.name entry point.")
    path: Str | None = _f(
        None,
        "Where the files are (data.root is the same setting): the file or folder of "
        "npz/csv/tsv/image_folder; for the named sets null uses their default place.",
        names=("path", "root"),
    )
    val_path: Str | None = _f(
        None,
        "npz/csv/tsv/image_folder/text: a separate validation file or folder (null: split "
        "data.path with val_fraction; an image folder holding train/ and val/ uses those); "
        "refused for the other data sets, which bring their own.",
    )
    x_key: Str = _f("X", "npz: the name of the features array.")
    y_key: Str = _f("y", "npz: the name of the labels array.")
    label_column: Int | Str = _f(
        -1, "csv/tsv: the label column, by header name or by index (-1: the last column)."
    )
    header: Bool | None = _f(
        None, "csv/tsv: the first row names the columns (null: yes if it is not all numbers)."
    )
    delimiter: Str | None = _f(
        None, "csv/tsv: the field separator (null: ',' for csv, tab for tsv)."
    )
    task: Literal["auto", "classification", "regression"] = _f(
        "auto",
        "npz/csv/tsv: what the labels are (auto: whole numbers or words are classes, other "
        "numbers regression targets).",
    )
    image_size: list[Int] | None = _f(
        None, "image_folder: resize every image to [height, width] (null: keep; all must agree)."
    )
    crop: list[Int] | None = _f(
        None, "image_folder: centre-crop to [height, width] after the resize (null: no crop)."
    )
    image_mode: Literal["RGB", "L"] = _f(
        "RGB", "image_folder: decode to RGB (3 channels) or L (grey, 1 channel)."
    )
    max_image_pixels: Int = _f(
        178_956_970,
        "image_folder: refuse an image of more pixels (width × height) than this, as a "
        "possible decompression bomb (default: Pillow's own limit); raise it for huge images.",
    )
    normalize: Bool = _f(
        True,
        "image_folder: standardise each channel with the training split's mean and std (off: "
        "pixel / 255).",
    )
    feed: Literal["auto", "memory", "loader"] = _f(
        "auto",
        "How training reads samples: memory (whole set as tensors, batched by indexing), loader "
        "(torch DataLoader with worker processes, decoding per sample), auto (image_folder: "
        "loader; everything else: memory).",
    )
    loader_workers: Int = _f(
        2, "feed=loader: DataLoader worker processes per rank (0: in-process)."
    )
    pin_memory: Bool | None = _f(
        None, "feed=loader: pin batches in page-locked memory (null: when training on CUDA)."
    )
    prefetch_factor: Int = _f(2, "feed=loader: micro-batches each worker reads ahead.")
    device_fraction: Float = _f(
        0.5,
        "feed=memory on CUDA: keep the training and validation tensors on the device, so "
        "batches are gathered there, when they take at most this fraction of its free memory "
        "(0: never; otherwise batches are gathered in pinned memory and copied without "
        "blocking).",
    )
    val_fraction: Float = _f(0.2, "Held-out fraction for data sets without an official test split.")
    download: Bool = _f(False, "Allow downloading (covtype through scikit-learn); off offline.")
    augment: Bool = _f(False, "Random crop and flip for image data (deterministic per sample).")
    limit_train: Int | None = _f(None, "Use only the first k training samples (quick runs).")
    limit_val: Int | None = _f(None, "Use only the first k validation samples.")
    synthetic_samples: Int = _f(2048, "Samples in the synthetic data sets (train + val).")
    synthetic_features: Int = _f(20, "Features in the synthetic data sets.")
    size: Int | None = _f(
        None,
        "Training-set size N for `distgrow plan` when the data set is not at hand; training "
        "always uses the real size.",
    )
    seq_len: Int | None = _f(
        None,
        "Tokens per sample for sequence data of a fixed length (null: not sequence data); "
        "schedule.interval=tokens counts t in tokens = samples seen × seq_len.",
    )

    def expected_train_size(self) -> int:
        """N for planning without loading: ``size`` if set, else the data set's known size.

        Must agree with ``distgrow.data`` (a test loads each set and compares).
        """
        if self.size is not None:
            return self.size
        if self.name in FILE_FORMATS:
            # Counted from the files (headers, lines, file names), nothing decoded.
            try:
                counted = file_train_size(self)
            except (OSError, ValueError, zipfile.BadZipFile) as err:
                raise ConfigError(
                    f"data.path = {self.path!r}: cannot count its samples: {err} Fix: point "
                    "data.path at your data, or set data.size=N."
                ) from err
            return min(counted, self.limit_train) if self.limit_train else counted
        total = OFFICIAL_TRAIN.get(self.name)
        if total is None:
            n_all = SPLIT_TOTAL.get(self.name)
            if n_all is None and self.name.startswith("synthetic"):
                n_all = self.synthetic_samples
            if n_all is None:
                raise ConfigError(
                    f"data.name = {self.name!r}: its size is not known without loading it. "
                    "Fix: set data.size=N (the number of training samples)."
                )
            total = n_all - held_out(n_all, self.val_fraction)
        return min(total, self.limit_train) if self.limit_train else total

    def _check_val_path(self) -> None:
        """``val_path`` is read by the formats of your own files only: refused elsewhere."""
        canonical = self.name.strip().lower().replace("-", "_")
        if self.val_path is None or canonical in VAL_PATH_NAMES:
            return
        where = (
            "your function returns the validation set itself"
            if is_entry_point(self.name)
            else "it brings its own validation set or splits with data.val_fraction"
        )
        raise _fail(
            "data.val_path",
            self.val_path,
            f"is not read for data.name={self.name!r} ({where}); only "
            f"{', '.join(VAL_PATH_NAMES)} take a separate validation file",
            "remove it, or use one of those formats",
        )

    def validate(self) -> None:
        if is_entry_point(self.name):
            _check_entry_point("data.name", self.name)
            if self.augment:
                raise _fail(
                    "data.augment",
                    self.augment,
                    "applies only to the built-in image sets, not a data.name entry point",
                    "set data.augment=false and augment inside your Dataset",
                )
        elif self.kwargs:
            raise _fail(
                "data.kwargs",
                self.kwargs,
                f"applies only to an entry point, not the built-in {self.name!r}",
                "remove it, or set data.name='module:function'",
            )
        elif self.name.strip().lower().replace("-", "_") not in DATA_NAMES:
            near = difflib.get_close_matches(self.name.lower(), DATA_NAMES, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise _fail(
                "data.name",
                self.name,
                "unknown data set",
                f"{hint}use one of {', '.join(DATA_NAMES)}",
            )
        self._check_val_path()
        if not 0.0 < self.val_fraction < 1.0:
            raise _fail("data.val_fraction", self.val_fraction, "must be in (0, 1)", "e.g. 0.2")
        for key in ("limit_train", "limit_val", "size", "seq_len"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise _fail(f"data.{key}", value, "must be positive or null", "remove it or use 1+")
        for key in ("image_size", "crop"):
            shape = getattr(self, key)
            if shape is not None and (len(shape) != 2 or min(shape) < 1):
                raise _fail(f"data.{key}", shape, "must be [height, width], both >= 1", "[32, 32]")
        if self.loader_workers < 0:
            raise _fail("data.loader_workers", self.loader_workers, "must be >= 0", "e.g. 2")
        if self.max_image_pixels < 1:
            raise _fail("data.max_image_pixels", self.max_image_pixels, "must be >= 1", "e.g. 2e8")
        if self.prefetch_factor < 1:
            raise _fail("data.prefetch_factor", self.prefetch_factor, "must be >= 1", "e.g. 2")
        if not 0.0 <= self.device_fraction <= 1.0:
            raise _fail(
                "data.device_fraction", self.device_fraction, "must be in [0, 1]", "e.g. 0.5, or 0"
            )
        if self.synthetic_samples < 2:
            raise _fail(
                "data.synthetic_samples", self.synthetic_samples, "too small", "use 2 or more"
            )
        if self.synthetic_features < 1:
            raise _fail(
                "data.synthetic_features", self.synthetic_features, "too small", "use 1 or more"
            )
        values = self.synthetic_samples * self.synthetic_features
        if values > MAX_SYNTHETIC_VALUES:
            raise _fail(
                "data.synthetic_samples",
                self.synthetic_samples,
                f"× data.synthetic_features ({self.synthetic_features}) = {values:,} values "
                f"would not fit in memory (at most {MAX_SYNTHETIC_VALUES:,})",
                "use fewer samples or features",
            )

    @property
    def root(self) -> str | None:
        """``path`` by its older name (the named sets' readers say ``data.root``)."""
        return self.path


@dataclass(config=_STRICT)
class ModelConfig(_Section):
    """The network (``distgrow.models``)."""

    name: Str = _f(
        "mlp",
        "Model: mlp, bottleneck_mlp, cnn, wrn, resnet18, resnet34, resnet50, transformer (a small "
        "decoder-only language model: depth blocks of width channels); or your own function "
        "returning an nn.Module: 'package.module:function' or 'path/to/file.py:function', "
        "called with model.kwargs (e.g. 'torchvision.models:resnet50'; see docs/own_code.md).",
    )
    kwargs: dict[Str, Any] = _f(
        {}, "Keyword arguments of a model.name entry point (the built-in models take none)."
    )
    hidden: list[Int] = _f([512, 512], "Hidden layer sizes of the plain mlp.")
    dropout: Float = _f(0.0, "Dropout probability (0 = none).")
    depth: Int = _f(16, "Wide ResNet depth (6n+4); transformer: the number of blocks.")
    width: Int = _f(4, "Wide ResNet widening factor; transformer: the model width (32 per head).")
    ghost_batch: Int | None = _f(
        None,
        "Ghost batch norm size: BN statistics per fixed-size chunk, so they do not depend on how "
        "the global batch is split. Micro-batches are kept multiples of it.",
    )

    def validate(self) -> None:
        if is_entry_point(self.name):
            _check_entry_point("model.name", self.name)
        elif self.kwargs:
            raise _fail(
                "model.kwargs",
                self.kwargs,
                f"applies only to an entry point, not the built-in {self.name!r}",
                "remove it, or set model.name='module:function'",
            )
        if any(h < 1 for h in self.hidden):
            raise _fail("model.hidden", self.hidden, "sizes must be positive", "e.g. [512, 512]")
        if not 0.0 <= self.dropout < 1.0:
            raise _fail("model.dropout", self.dropout, "must be in [0, 1)", "e.g. 0.25")
        if self.ghost_batch is not None and self.ghost_batch < 1:
            raise _fail("model.ghost_batch", self.ghost_batch, "must be positive", "e.g. 128")


LOSS_NAMES = ("auto", "cross_entropy", "mse", "l1", "smooth_l1", "bce_with_logits", "nll")
METRIC_NAMES = ("auto", "accuracy", "loss")


@dataclass(config=_STRICT)
class LossConfig(_Section):
    """The training loss and the validation metric (``distgrow.losses``)."""

    name: Str = _f(
        "auto",
        "auto (cross_entropy for classes, mse otherwise), cross_entropy, mse, l1, smooth_l1, "
        "bce_with_logits, nll; or your own 'module:function' / 'file.py:function' (or a class "
        "such as 'torch.nn:HuberLoss', built with loss.kwargs) returning per-sample losses "
        "(shape [n]) or their sum, never a batch mean (see docs/own_code.md).",
    )
    kwargs: dict[Str, Any] = _f(
        {}, "Keyword arguments: passed to the loss function at each call, or to its class once."
    )
    metric: Str = _f(
        "auto",
        "Validation metric: auto (accuracy for classification, none beyond the loss otherwise), "
        "accuracy, loss; or 'module:function' returning per-sample scores (shape [n]) or their "
        "sum, logged as val_metric (the mean over the validation set).",
    )

    def validate(self) -> None:
        if is_entry_point(self.name):
            _check_entry_point("loss.name", self.name)
        elif self.name not in LOSS_NAMES:
            raise _fail(
                "loss.name",
                self.name,
                "unknown loss",
                f"use one of {', '.join(LOSS_NAMES)}, or 'module:function'",
            )
        if is_entry_point(self.metric):
            _check_entry_point("loss.metric", self.metric)
        elif self.metric not in METRIC_NAMES:
            raise _fail(
                "loss.metric",
                self.metric,
                "unknown metric",
                f"use one of {', '.join(METRIC_NAMES)}, or 'module:function'",
            )


@dataclass(config=_STRICT)
class OptimConfig(_Section):
    """The optimizer. ``lr`` and ``momentum`` are the values at the start of training."""

    name: OptimName = _f("sgd", "Optimizer: sgd, adam, adamw, rmsprop.")
    lr: Float = _f(0.1, "Initial learning rate ε (lr0).")
    momentum: Float = _f(0.0, "Momentum m for sgd and rmsprop; enters the noise scale as 1/(1-m).")
    nesterov: Bool = _f(False, "Nesterov momentum (sgd; needs momentum > 0).")
    weight_decay: Float = _f(0.0, "Weight decay (L2 for sgd/adam/rmsprop, decoupled for adamw).")
    betas: list[Float] = _f([0.9, 0.999], "Adam/AdamW betas.")
    eps: Float = _f(1e-8, "Adam/AdamW/RMSprop epsilon.")
    grad_clip: Float | None = _f(None, "Clip the global gradient norm to this value (null: off).")

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
        if not self.eps > 0:
            raise _fail("optim.eps", self.eps, "must be positive", "e.g. 1e-8")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _fail("optim.betas", self.betas, "must be two numbers in [0, 1)", "[0.9, 0.999]")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise _fail("optim.grad_clip", self.grad_clip, "must be positive", "e.g. 1.0 or null")


@dataclass(config=_STRICT)
class ScheduleConfig(_Section):
    """The learning-rate schedule the user would run; distgrow converts it (see planner)."""

    type: ScheduleType = _f(
        "constant",
        "constant (nothing to convert), step, multistep, exponential, time_based "
        "(lr0/(1+decay·t)), cosine, linear (linear decay to eta_min), inverse_sqrt "
        "(1/sqrt(1+t/timescale)), wsd (warmup-stable-decay), plateau. Cyclic and one-cycle "
        "schedules are refused: they raise the LR again.",
    )
    interval: Literal["epoch", "step", "samples", "tokens"] = _f(
        "epoch",
        "Time unit t of the schedule: 'epoch'; 'step' = the baseline's updates at base_batch "
        "(samples seen / growth.base_batch); 'samples' = samples seen; 'tokens' = samples "
        "seen × data.seq_len. Counted in data, t follows the same path however the batch grows.",
    )
    warmup: Float = _f(
        0.0,
        "LR warm-up length in units of t, before any schedule type (0: none). It stays an LR "
        "warm-up at the base batch; the schedule's own clock starts when it ends.",
    )
    warmup_shape: Literal["linear", "exponential"] = _f(
        "linear", "Warm-up shape: linear from warmup_start·lr0, or exponential (geometric)."
    )
    warmup_start: Float = _f(
        0.0, "LR at the start of the warm-up, as a fraction of lr0 (exponential needs > 0)."
    )
    step_size: Float = _f(30, "step: decay every step_size units of t.")
    milestones: list[Float] = _f([], "multistep: the values of t where the LR is cut.")
    gamma: Float = _f(0.1, "step/multistep/exponential: the multiplier per decay (< 1).")
    decay: Float = _f(0.0, "time_based: lr = lr0 / (1 + decay·t) (Keras' SGD decay).")
    t_max: Float | None = _f(
        None,
        "cosine/linear/wsd: length of the schedule after the warm-up, in units of t (null: to "
        "the end of training); flat at eta_min after it.",
    )
    eta_min: Float = _f(0.0, "cosine/linear/wsd: the final learning rate (0 allowed).")
    timescale: Float | None = _f(
        None, "inverse_sqrt: r = 1/sqrt(1 + t/timescale) (null: the warm-up length, else 1)."
    )
    decay_length: Float | None = _f(
        None, "wsd: length of the final decay phase in units of t (it ends at t_max)."
    )
    decay_shape: Literal["linear", "cosine", "sqrt"] = _f(
        "linear", "wsd: shape of the decay phase; sqrt is 1 − sqrt(progress)."
    )
    factor: Float = _f(0.1, "plateau: multiplier at each plateau (ReduceLROnPlateau factor).")
    patience: Int = _f(10, "plateau: epochs without improvement before a cut.")
    threshold: Float = _f(1e-4, "plateau: minimum change that counts as an improvement.")
    threshold_mode: Literal["rel", "abs"] = _f("rel", "plateau: threshold relative or absolute.")
    cooldown: Int = _f(0, "plateau: epochs to wait after a cut before counting again.")
    min_lr: Float = _f(0.0, "plateau: the LR never goes below this.")
    plateau_eps: Float = _f(1e-8, "plateau: cuts smaller than this are ignored (torch's eps).")
    mode: Literal["min", "max"] = _f("min", "plateau: whether the monitored metric should fall.")
    monitor: Literal["val_loss", "val_acc", "train_loss"] = _f(
        "val_loss", "plateau: the metric watched at each epoch end."
    )

    def validate(self, run: RunConfig) -> None:
        if self.type == "step" and self.step_size <= 0:
            raise _fail("schedule.step_size", self.step_size, "must be positive", "e.g. 30")
        if self.type == "step" and self.step_size < MIN_STEP_SIZE:
            # t / step_size counts the decays: it must stay a number the schedule can floor.
            raise _fail(
                "schedule.step_size",
                self.step_size,
                f"must be at least {MIN_STEP_SIZE:g} (a decay every step_size units of t)",
                "e.g. 30",
            )
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
        if self.type in FLOORED:
            if self.t_max is not None and self.t_max <= 0:
                raise _fail("schedule.t_max", self.t_max, "must be positive", "or null for all")
            if self.eta_min < 0:
                raise _fail("schedule.eta_min", self.eta_min, "must be >= 0", "e.g. 0")
        if self.type == "inverse_sqrt" and self.timescale is not None and self.timescale <= 0:
            raise _fail("schedule.timescale", self.timescale, "must be positive", "e.g. 1000")
        if self.type == "wsd":
            if self.decay_length is None or self.decay_length <= 0:
                raise _fail(
                    "schedule.decay_length",
                    self.decay_length,
                    "wsd needs a positive length for its decay phase (units of t)",
                    "e.g. a fifth of the run",
                )
            if self.t_max is not None and self.decay_length > self.t_max:
                raise _fail(
                    "schedule.decay_length",
                    self.decay_length,
                    f"is longer than schedule.t_max ({self.t_max})",
                    f"use at most {self.t_max}",
                )
        if self.warmup < 0:
            raise _fail("schedule.warmup", self.warmup, "must be >= 0", "e.g. 5, or 0 for none")
        if not 0.0 <= self.warmup_start < 1.0:
            raise _fail("schedule.warmup_start", self.warmup_start, "must be in [0, 1)", "e.g. 0")
        if self.warmup and self.warmup_shape == "exponential" and self.warmup_start == 0:
            raise _fail(
                "schedule.warmup_start",
                self.warmup_start,
                "an exponential warm-up cannot start from 0",
                "e.g. schedule.warmup_start=0.01",
            )
        if self.interval == "epoch" and self.warmup >= run.epochs:
            raise _fail(
                "schedule.warmup",
                self.warmup,
                f"leaves no epoch of the {run.epochs} after the warm-up",
                f"use fewer than {run.epochs} epochs of warm-up",
            )
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


@dataclass(config=_STRICT)
class AdaptiveConfig(_Section):
    """When the measured noise scale lets the batch grow (``growth.mode=adaptive``, and the
    evaluations of ``growth.noise_cap``); see docs/noise.md."""

    ratio: Float = _f(
        1.0,
        "adaptive: grow when the smoothed B_simple exceeds ratio × the current global batch "
        "(1.0: McCandlish et al.'s critical batch, where a step costs as much in samples as in "
        "updates).",
    )
    patience: Int = _f(
        3, "adaptive: consecutive evaluations above the ratio before the batch grows."
    )
    every: Int = _f(
        50, "Updates between two evaluations of the measured noise scale (adaptive and noise_cap)."
    )
    min_updates: Int = _f(
        20, "Measured updates before the first evaluation counts (the moving average settles)."
    )

    def validate(self) -> None:
        if not self.ratio > 0:
            raise _fail("growth.adaptive.ratio", self.ratio, "must be positive", "e.g. 1.0")
        for key, example in (("patience", 3), ("every", 50)):
            if getattr(self, key) < 1:
                raise _fail(
                    f"growth.adaptive.{key}", getattr(self, key), "must be >= 1", f"e.g. {example}"
                )
        if self.min_updates < 0:
            raise _fail("growth.adaptive.min_updates", self.min_updates, "must be >= 0", "e.g. 20")


@dataclass(config=_STRICT)
class GrowthConfig(_Section):
    """How the LR schedule becomes a batch schedule, and the limits that stop the batch."""

    mode: GrowthMode = _f(
        "grow_batch",
        "decay_lr: the plain baseline (fixed batch, LR decays); grow_batch: the batch grows "
        "instead, LR takes the rest at the caps (hybrid); grow_batch_lr: also start with LR and "
        "batch × lr_scale; grow_momentum: also raise momentum to growth.momentum; adaptive: "
        "the batch grows × growth.factor when the measured noise scale says so (growth.adaptive), "
        "the LR follows the schedule, never above it (docs/noise.md).",
    )
    base_batch: Int = _f(128, "B0: the global batch of the baseline run.")
    max_global_batch: Int | None = _f(None, "Hard cap on the global batch (null: none).")
    max_dataset_fraction: Float | None = _f(
        0.1, "Cap the batch at this fraction of N (the paper's N/10 rule; null: off)."
    )
    max_workers: Int | None = _f(
        None,
        "Most data-parallel workers the job may use (null: the job's world size under "
        "`distgrow train`/torchrun, the allocation under `distgrow launch`).",
    )
    micro_batch: Int | None = _f(
        None, "Per-device batch that keeps one device busy (null: base_batch)."
    )
    max_micro_batch: Int | Literal["auto"] | None = _f(
        None,
        "Largest per-device batch that fits in memory (null: no limit; auto: what `distgrow "
        "probe` measured on the training device, cached per model and device, probed at the "
        "start of training when not cached yet).",
    )
    max_accum_steps: Int | None = _f(
        None, "Most gradient-accumulation steps per update (null: no limit)."
    )
    lr_scale: Float = _f(5.0, "grow_batch_lr / grow_momentum: initial LR and batch × this.")
    momentum: Float = _f(0.98, "grow_momentum: the raised momentum.")
    rule: GrowthRule = _f(
        "auto",
        "How a decay becomes batch growth. linear (Smith et al. 2018): LR kept, batch × 1/α, "
        "so ε/B follows the schedule; sqrt (Malladi et al. 2022, Seesaw 2025): LR × √α, "
        "batch × 1/α, so ε/√B follows it (adaptive updates); auto: linear for sgd, sqrt for "
        "adam, adamw and rmsprop.",
    )
    beta2_half_life: Bool = _f(
        False,
        "adam/adamw: keep β₂'s half-life constant in samples as the batch grows, β₂ = "
        "β₂0^(B/B0) (Busbridge et al. 2023; Malladi et al. 2022 to first order). Off: β₂ fixed.",
    )
    weight_decay_timescale: Bool = _f(
        False,
        "adamw: keep the decoupled weight decay's timescale B/(ε·λ) in samples equal to the "
        "baseline's at every t (Wang & Aitchison 2024). Off: λ fixed.",
    )
    rampup_start_batch: Int | None = _f(
        None,
        "Batch warm-up: start at this global batch and ramp to base_batch (Megatron's "
        "--rampup-batch-size; null: no ramp). The LR meanwhile is the one at base_batch.",
    )
    rampup_increment: Int | None = _f(
        None, "Batch warm-up: the batch grows by this much at a time (null: in one step)."
    )
    rampup_samples: Int = _f(0, "Batch warm-up: samples over which the batch reaches base_batch.")
    factor: Float = _f(2.0, "adaptive: the global batch × this at each growth.")
    noise_cap: Float | None = _f(
        None,
        "grow_batch: stop growing once the batch would exceed this × the measured noise scale "
        "B_simple (past the critical batch extra samples buy little progress); the LR takes the "
        "rest of the decay, as in the hybrid (null: off).",
    )
    adaptive: AdaptiveConfig = _section(AdaptiveConfig, "Noise-scale decisions.")

    def resolved_rule(self, optim_name: str) -> str:
        """``linear`` or ``sqrt``: ``auto`` picks linear for sgd, sqrt for adaptive updates."""
        if self.rule != "auto":
            return self.rule
        return "linear" if optim_name == "sgd" else "sqrt"

    def rampup_sizes(self) -> list[int]:
        """The batches of the batch warm-up, smallest first, base_batch excluded ([] if none)."""
        if self.rampup_start_batch is None:
            return []
        step = self.rampup_increment or self.base_batch - self.rampup_start_batch
        return list(range(self.rampup_start_batch, self.base_batch, step))

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
        if self.max_workers is not None and self.max_workers < 1:
            raise _fail(
                "growth.max_workers", self.max_workers, "must be at least 1 or null", "e.g. 8"
            )
        if self.max_workers is not None and self.max_workers > MAX_WORKERS:
            raise _fail(
                "growth.max_workers", self.max_workers, f"must be at most {MAX_WORKERS:,}", "e.g. 8"
            )
        for key in ("micro_batch", "max_micro_batch", "max_accum_steps"):
            value = getattr(self, key)
            if value is not None and value != "auto" and value < 1:
                raise _fail(f"growth.{key}", value, "must be positive or null", "e.g. 64 or null")
        if (
            self.micro_batch is not None
            and isinstance(self.max_micro_batch, int)
            and self.micro_batch > self.max_micro_batch
        ):
            raise _fail(
                "growth.micro_batch",
                self.micro_batch,
                f"exceeds growth.max_micro_batch ({self.max_micro_batch})",
                f"use at most {self.max_micro_batch}",
            )
        if not self.lr_scale > 0:
            raise _fail("growth.lr_scale", self.lr_scale, "must be positive", "e.g. 5")
        if self.lr_scale > MAX_LR_SCALE:
            # It multiplies the LR and the batch: beyond this neither is a number to train with.
            raise _fail(
                "growth.lr_scale", self.lr_scale, f"must be at most {MAX_LR_SCALE:,}", "e.g. 5"
            )
        if self.mode in ("grow_batch_lr", "grow_momentum") and self.lr_scale < 1.0:
            raise _fail("growth.lr_scale", self.lr_scale, "must be >= 1", "e.g. 5")
        if self.beta2_half_life and optim.name not in ("adam", "adamw"):
            raise _fail(
                "growth.beta2_half_life",
                self.beta2_half_life,
                f"needs an optimizer with betas, not {optim.name}",
                "set optim.name=adam or adamw, or growth.beta2_half_life=false",
            )
        if self.weight_decay_timescale and optim.name != "adamw":
            raise _fail(
                "growth.weight_decay_timescale",
                self.weight_decay_timescale,
                f"needs decoupled weight decay (adamw), not {optim.name}",
                "set optim.name=adamw, or growth.weight_decay_timescale=false",
            )
        self._validate_rampup()
        self._validate_noise()
        if self.mode == "grow_momentum" and self.resolved_rule(optim.name) == "sqrt":
            raise _fail(
                "growth.mode",
                self.mode,
                "the momentum variant is the paper's SGD rule: it has no square-root form",
                "set growth.rule=linear, or another growth.mode",
            )
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

    def _validate_noise(self) -> None:
        self.adaptive.validate()
        if not self.factor > 1.0 or self.factor > MAX_LR_SCALE:
            raise _fail("growth.factor", self.factor, f"must be in (1, {MAX_LR_SCALE:,}]", "e.g. 2")
        if self.noise_cap is not None:
            if not self.noise_cap > 0:
                raise _fail("growth.noise_cap", self.noise_cap, "must be positive", "e.g. 2.0")
            if self.mode not in ("grow_batch", "adaptive"):
                raise _fail(
                    "growth.noise_cap",
                    self.noise_cap,
                    f"caps grow_batch (and adaptive), not growth.mode={self.mode}",
                    "set growth.mode=grow_batch, or growth.noise_cap=null",
                )

    def measures_noise(self) -> bool:
        """Whether growth decisions need the measured noise scale."""
        return self.mode == "adaptive" or self.noise_cap is not None

    def _validate_rampup(self) -> None:
        start, inc = self.rampup_start_batch, self.rampup_increment
        if start is None:
            if inc is not None or self.rampup_samples:
                raise _fail(
                    "growth.rampup_start_batch",
                    start,
                    "the batch warm-up needs a start batch",
                    f"e.g. growth.rampup_start_batch={max(1, self.base_batch // 4)}",
                )
            return
        if not 1 <= start < self.base_batch:
            raise _fail(
                "growth.rampup_start_batch",
                start,
                f"must be between 1 and growth.base_batch ({self.base_batch}) exclusive",
                f"e.g. {max(1, self.base_batch // 4)}",
            )
        if self.mode in ("grow_batch_lr", "grow_momentum"):
            raise _fail(
                "growth.rampup_start_batch",
                start,
                f"growth.mode={self.mode} already starts with a larger batch",
                "use growth.mode=grow_batch or decay_lr with a batch warm-up",
            )
        if inc is not None and (inc < 1 or (self.base_batch - start) % inc):
            raise _fail(
                "growth.rampup_increment",
                inc,
                f"must divide base_batch − rampup_start_batch ({self.base_batch - start})",
                "use a divisor of it, or null for one step",
            )
        if self.rampup_samples < 1:
            raise _fail(
                "growth.rampup_samples",
                self.rampup_samples,
                "the batch warm-up needs a positive number of samples",
                "e.g. 10 × growth.base_batch",
            )


@dataclass(config=_STRICT)
class BackendConfig(_Section):
    """The data-parallel engine the trainer talks to (``distgrow.backends``)."""

    name: Literal["torch", "deepspeed", "horovod"] = _f("torch", "torch, deepspeed or horovod.")
    dist_backend: Literal["auto", "gloo", "nccl"] = _f(
        "auto", "torch.distributed process-group backend: auto = NCCL on CUDA, gloo on CPU."
    )
    zero_stage: Int = _f(0, "DeepSpeed ZeRO stage (0, 1 or 2).")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "Training precision.")
    deepspeed_config: Str | None = _f(None, "A DeepSpeed JSON to merge in (conflicts reported).")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2):
            raise _fail("backend.zero_stage", self.zero_stage, "supported: 0, 1, 2", "use 0-2")


@dataclass(config=_STRICT)
class ChainConfig(_Section):
    """``launch.slurm=chain``: the shape of each span's SLURM job (see slurm/README.md).

    A span of W workers asks for ``ceil(W / tasks_per_node)`` nodes, W tasks, and on GPUs
    ``min(W, gpus_per_node)`` GPUs per node."""

    tasks_per_node: Int | None = _f(
        None, "Most workers (tasks) per node; unset: the GPUs per node, else all on one node."
    )
    gpus_per_node: Int = _f(0, "GPUs per node a span asks for (one per worker); 0: CPU workers.")
    cpus_per_task: Int | None = _f(
        None, "CPUs per worker (sbatch --cpus-per-task); unset: SLURM's."
    )
    partition: Str | None = _f(None, "Partition of every span (sbatch --partition).")
    account: Str | None = _f(None, "Account charged (sbatch --account).")
    time: Str = _f("01:00:00", "Time limit of each span (sbatch --time), e.g. 04:00:00.")
    sbatch_args: list[Str] = _f([], "More sbatch options for every span, e.g. ['--mem=0'].")

    def validate(self) -> None:
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise _fail(
                "launch.chain.tasks_per_node", self.tasks_per_node, "must be at least 1", "e.g. 4"
            )
        if self.gpus_per_node < 0:
            raise _fail("launch.chain.gpus_per_node", self.gpus_per_node, "must be >= 0", "e.g. 4")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise _fail(
                "launch.chain.cpus_per_task", self.cpus_per_task, "must be at least 1", "e.g. 8"
            )
        # Each value becomes an #SBATCH line of a generated batch script: SLURM's own grammar,
        # so that none can end its line and start a command (distgrow.config.grammar).
        if not is_slurm_time(self.time):
            raise _fail(
                "launch.chain.time",
                self.time,
                "is not a SLURM time (minutes, [days-]hours:minutes:seconds, days-hours)",
                "e.g. 04:00:00 or 2-00:00:00",
            )
        for key, name in (("partition", self.partition), ("account", self.account)):
            if name is not None and not is_slurm_names(name):
                raise _fail(
                    f"launch.chain.{key}",
                    name,
                    "is not a SLURM name (letters, digits, '_', '.', '-'; a list by commas)",
                    f"the {key}'s name as sinfo/sacctmgr shows it, e.g. gpu",
                )
        for arg in self.sbatch_args:
            bad = control_characters(arg)
            if bad or not arg.startswith("-"):
                raise _fail(
                    "launch.chain.sbatch_args",
                    arg,
                    f"holds control characters ({', '.join(bad)})"
                    if bad
                    else "is not an sbatch option (one option per item, starting with '-')",
                    "one sbatch option per item, e.g. ['--mem=0', '--constraint=a100']",
                )


@dataclass(config=_STRICT)
class LaunchConfig(_Section):
    """How `distgrow launch` starts workers."""

    launcher: Literal["auto", "none", "torchrun", "deepspeed", "horovodrun", "mpirun", "srun"] = _f(
        "auto", "Launcher; 'auto' picks from the environment (SLURM, MPI, torchrun)."
    )
    elastic: Bool = _f(
        False,
        "Grow without relaunching the launcher: torchrun agents join one rendezvous on this "
        "machine (all workers restart at the new size); meanwhile the batch runs on the "
        "workers there are. See docs/launch.md.",
    )
    elastic_wait_s: Float = _f(
        0.0,
        "Elastic: seconds the workers wait at a growth point for the new workers to join "
        "before going on with the same batch on fewer workers (0: never wait).",
    )
    max_restarts: Int = _f(3, "Relaunches after a crashed worker before giving up.")
    preload: Bool = _f(
        True,
        "torchrun on one node: start the workers by forking them from a process that has "
        "imported torch once, kept ready while the previous span trains, instead of torchrun "
        "(the same worker environment; a resize then skips the launcher's start and the "
        "imports). false: plain torchrun. See docs/launch.md.",
    )
    nodes: Int = _f(1, "Nodes to spread workers over.")
    node_rank: Int = _f(
        0,
        "This machine's rank among launch.nodes, for torchrun on several machines without "
        "SLURM: run `distgrow launch` on each; node 0 (at launch.master_addr) decides every "
        "launch and the others follow it (from SLURM_NODEID inside SLURM). See docs/launch.md.",
    )
    rdzv: Literal["static", "c10d"] = _f(
        "static",
        "torchrun's rendezvous on several nodes: static (--node_rank, rank 0 on node 0) or "
        "c10d (a store at launch.master_addr:master_port; torchrun orders the nodes).",
    )
    hostfile: Str | None = _f(None, "Hostfile for deepspeed / horovodrun / mpirun.")
    master_addr: Str = _f("127.0.0.1", "Rendezvous address (derived from SLURM when there).")
    master_port: Int = _f(
        29500, "Rendezvous port (several nodes under torchrun also use the port above it)."
    )
    slurm: Literal["allocation", "chain"] = _f(
        "allocation",
        "On SLURM: 'allocation' holds the widest phase's nodes for the whole run and starts "
        "narrower job steps inside; 'chain' makes each span of the plan its own job, sized to "
        "its workers (launch.chain), the next submitted with afterok on it.",
    )
    chain: ChainConfig = _section(ChainConfig, "The shape of each span's job (launch.slurm=chain).")

    def validate(self) -> None:
        self.chain.validate()
        if self.max_restarts < 0:
            raise _fail("launch.max_restarts", self.max_restarts, "must be >= 0", "e.g. 3")
        if self.elastic_wait_s < 0:
            raise _fail("launch.elastic_wait_s", self.elastic_wait_s, "must be >= 0", "e.g. 0")
        if self.nodes < 1:
            raise _fail("launch.nodes", self.nodes, "must be at least 1", "e.g. 1")
        if self.nodes > MAX_WORKERS:
            raise _fail("launch.nodes", self.nodes, f"must be at most {MAX_WORKERS:,}", "e.g. 1")
        if not 0 < self.master_port < 65536:
            raise _fail("launch.master_port", self.master_port, "not a port", "e.g. 29500")
        # DeepSpeed's pdsh runner pastes it unquoted into every node's remote shell line.
        if not is_host(self.master_addr):
            raise _fail(
                "launch.master_addr",
                self.master_addr,
                "is not a host name or an IP address",
                "rank 0's machine, e.g. 10.0.0.1 or node001",
            )
        if not 0 <= self.node_rank < self.nodes:
            raise _fail(
                "launch.node_rank",
                self.node_rank,
                f"must be in [0, launch.nodes={self.nodes})",
                "0 on the machine at launch.master_addr, 1.. on the others",
            )


@dataclass(config=_STRICT)
class WandbConfig(_Section):
    """Weights & Biases logging (rank 0 only)."""

    mode: Literal["offline", "online", "disabled"] = _f(
        "offline", "offline writes a run to sync later with `wandb sync`; disabled logs nothing."
    )
    project: Str = _f("distgrow", "W&B project.")
    entity: Str | None = _f(None, "W&B entity (team or user).")
    tags: list[Str] = _f([], "W&B tags.")


@dataclass(config=_STRICT)
class NoiseConfig(_Section):
    """Measuring the gradient noise scale B_simple = tr(Σ)/|G|² during training
    (McCandlish et al. 2018; ``distgrow.noise``, docs/noise.md)."""

    measure: Literal["auto", "on", "off"] = _f(
        "auto",
        "auto: on when growth.mode=adaptive or growth.noise_cap is set, off otherwise; on: "
        "always (logged as noise/* in metrics.jsonl and W&B); off: never (adaptive and "
        "noise_cap need it).",
    )
    ema_decay: Float = _f(
        0.95, "Weight of the past in the moving averages of |G|² and tr(Σ), in [0, 1)."
    )
    every: Int = _f(1, "Measure every this many updates (1: each; the rest cost nothing).")

    def validate(self, growth: GrowthConfig) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise _fail("noise.ema_decay", self.ema_decay, "must be in [0, 1)", "e.g. 0.95")
        if self.every < 1:
            raise _fail("noise.every", self.every, "must be >= 1", "e.g. 1")
        if self.measure == "off" and growth.measures_noise():
            what = "growth.mode=adaptive" if growth.mode == "adaptive" else "growth.noise_cap"
            raise _fail(
                "noise.measure",
                self.measure,
                f"{what} decides from the measured noise scale",
                "set noise.measure=auto",
            )

    def enabled(self, growth: GrowthConfig) -> bool:
        """Whether the run measures the noise scale."""
        return self.measure == "on" or (self.measure == "auto" and growth.measures_noise())


@dataclass(config=_STRICT)
class LoggingConfig(_Section):
    """Metrics, progress and W&B."""

    every_steps: Int = _f(50, "Log a metrics line every this many parameter updates.")
    progress: Literal["auto", "bar", "lines", "off"] = _f(
        "auto", "Progress display: a bar on a terminal, plain lines otherwise (auto)."
    )
    wandb: WandbConfig = _section(WandbConfig, "Weights & Biases settings.")

    def validate(self) -> None:
        if self.every_steps < 1:
            raise _fail("logging.every_steps", self.every_steps, "must be positive", "e.g. 50")


@dataclass(config=_STRICT)
class Config(_Section):
    """The whole run: one section per concern."""

    run: RunConfig = _section(RunConfig, "Run settings.")
    data: DataConfig = _section(DataConfig, "Data settings.")
    model: ModelConfig = _section(ModelConfig, "Model settings.")
    loss: LossConfig = _section(LossConfig, "Loss and validation metric.")
    optim: OptimConfig = _section(OptimConfig, "Optimizer.")
    schedule: ScheduleConfig = _section(ScheduleConfig, "The LR schedule to convert.")
    growth: GrowthConfig = _section(GrowthConfig, "Batch growth and its limits.")
    noise: NoiseConfig = _section(NoiseConfig, "Measuring the gradient noise scale.")
    backend: BackendConfig = _section(BackendConfig, "Engine.")
    launch: LaunchConfig = _section(LaunchConfig, "Launching.")
    logging: LoggingConfig = _section(LoggingConfig, "Logging.")

    def validate(self) -> None:
        """Check every section and the rules that span sections."""
        self.run.validate()
        self.data.validate()
        self.model.validate()
        self.loss.validate()
        self.optim.validate()
        self.schedule.validate(self.run)
        self.growth.validate(self.optim)
        self.noise.validate(self.growth)
        self.backend.validate()
        self.launch.validate()
        self.logging.validate()
        if self.schedule.type in FLOORED and self.schedule.eta_min > self.optim.lr:
            raise _fail(
                "schedule.eta_min",
                self.schedule.eta_min,
                f"is above optim.lr ({self.optim.lr}): a {self.schedule.type} from lr0 to "
                "eta_min must decay",
                "set schedule.eta_min below optim.lr",
            )
        if self.schedule.interval == "tokens" and self.data.seq_len is None:
            raise _fail(
                "schedule.interval",
                self.schedule.interval,
                "counting t in tokens needs the tokens per sample",
                "set data.seq_len (the fixed sequence length), or use interval=samples",
            )
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
