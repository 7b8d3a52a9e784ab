"""The sections of what is trained and where: ``run``, ``data``, ``model`` and ``loss``.

Each field carries its range (:mod:`distgrow.config.fields`); each section's ``@constraint`` methods
check what spans its fields (an entry point's form, a data set's name). Neither torch nor
anything distributed is imported here.
"""

from __future__ import annotations

import difflib
import posixpath
import zipfile
from pathlib import PureWindowsPath
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from distgrow.config.datasets import DATA_NAMES, FILE_FORMATS, OFFICIAL_TRAIN, SPLIT_TOTAL, held_out
from distgrow.config.fields import (
    MAX_EPOCHS,
    MAX_SYNTHETIC_VALUES,
    STRICT,
    Bool,
    ConfigError,
    Float,
    Int,
    Range,
    Section,
    Str,
    constraint,
    fail,
    raises_config_errors,
    setting,
)
from distgrow.config.filesizes import file_train_size, stream_train_size
from distgrow.entrypoints import EntryPointError, is_entry_point, parse_entry_point


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


@raises_config_errors
@dataclass(config=STRICT)
class RunConfig(Section):
    """What to run and where its results go."""

    KEY: ClassVar[str] = "run"

    name: Str = setting("run", "Run name; used for the W&B run and as the default output folder.")
    epochs: Int = setting(
        10,
        "Training epochs (full passes over the training set).",
        Range(ge=1, problem="must be at least 1", fix="set run.epochs=1 or more"),
        Range(
            le=MAX_EPOCHS,
            problem=f"must be at most {MAX_EPOCHS:,} (the plan simulates every epoch)",
            fix=f"set run.epochs={MAX_EPOCHS} or fewer",
        ),
    )
    seed: Int = setting(0, "Seed for weights, data order (one permutation per epoch) and dropout.")
    output_dir: Str = setting(
        "runs/{name}", "Run directory for checkpoints and metrics; '{name}' expands to run.name."
    )
    resume: Bool = setting(False, "Continue from the newest checkpoint in output_dir.")
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto",
        "Where to train: 'auto' uses CUDA when torch can, the CPU on a machine without GPUs; "
        "GPUs that torch cannot use (a CPU build, an old driver) are an error: 'cpu' trains on "
        "the CPU anyway.",
    )
    keep_checkpoints: Int = setting(
        3,
        "How many checkpoints to keep (the newest ones).",
        Range(
            ge=1,
            problem="must keep at least one checkpoint",
            fix="set run.keep_checkpoints=1 or more",
        ),
    )
    checkpoint_every_steps: Int | None = setting(
        None,
        "Also checkpoint every this many updates (null: only at epoch ends, when the job must "
        "change its world size, at stop signals and at the end). A change of batch needs none.",
        Range(ge=1, problem="must be at least 1", fix="e.g. 500, or null"),
    )
    checkpoint_every_s: Float | None = setting(
        None,
        "Also checkpoint when this many seconds passed since the last one (null: never).",
        Range(gt=0, problem="must be above 0", fix="e.g. 600, or null"),
    )
    channels_last: Literal["auto"] | Bool = setting(
        "auto",
        "Convolution models in the channels_last memory format (weights and 4-D inputs); auto: "
        "on for models with 2-D convolutions on CUDA, off elsewhere.",
    )
    compile: Bool = setting(
        False, "torch.compile the model (its first updates at each new batch shape compile)."
    )
    tf32: Bool = setting(
        True,
        "On CUDA GPUs that have TF32 (Ampere and newer), fp32 matmuls and convolutions use it "
        "(torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32): several times faster, "
        "10-bit mantissa products. false: full fp32 (IEEE). No effect on the CPU or bf16/fp16 "
        "(docs/speed.md says what bit-exactness holds on CUDA).",
    )
    oom_fallback: Bool | None = setting(
        None,
        "On a CUDA out-of-memory error in an update, drop its gradients and run it again at "
        "half the micro-batch and twice the accumulation (the same samples per update), and "
        "keep that micro-batch from then on; logged as an oom_fallback event. null: on for the "
        "torch backend on one worker with in-memory data (see docs/speed.md).",
    )
    threads: Int | None = setting(
        None,
        "Intra-op CPU threads per worker (null: the node's cores / its workers). The float "
        "results of some kernels depend on it: pin it to compare runs bit for bit.",
        Range(ge=1, le=65_536, problem="must be between 1 and 65,536", fix="e.g. 1, or null"),
    )
    flush_denormal: Bool = setting(
        True,
        "Treat float values below 1.2e-38 (denormals) as 0 in CPU arithmetic "
        "(torch.set_flush_denormal), set at start-up before any CPU thread starts. SGD's "
        "momentum of units whose gradient stays 0 decays into denormals after a few hundred "
        "updates, and x86 CPUs compute on them many times slower: without it the Fashion-MNIST "
        "MLP's optimizer step took 1.7× as long, relative to its forward, by the third epoch "
        "(docs/speed.md). false: "
        "IEEE gradual underflow, as torch's default. No effect on CUDA arithmetic.",
    )

    @constraint
    def _folders(self) -> None:
        """The run's name is a folder, and its directory is not the one the user works in."""
        if not _is_plain_name(self.name):
            raise fail(
                "run.name",
                self.name,
                "must be a plain folder name (not empty, '.', '..', a path or with '/' or '\\')",
                "e.g. run.name=cifar",
            )
        # The run directory is the run's own: never the folder the user works in, or above it.
        if posixpath.normpath(self.resolved_output_dir.strip() or ".") in (".", "..", "/"):
            raise fail(
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
_DATA_CONFIG = ConfigDict(**STRICT, populate_by_name=True)


_POSITIVE_OR_NULL = Range(ge=1, problem="must be positive or null", fix="remove it or use 1+")

VAL_PATH_NAMES = (*FILE_FORMATS, "text", "tokens")
"""The data sets that read ``data.val_path``."""
STREAM_FORMATS = ("tokens", "text")
"""Counted in windows of ``seq_len + 1`` from the files' sizes (:func:`stream_train_size`)."""
STREAM_FIX = {
    "tokens": "make the token file (bash scripts/lm_corpora.sh, or scripts/make_tokens.py) or "
    "point data.path at one",
    "text": "point data.path at your text (a file or a folder of .py / .txt files)",
}


@raises_config_errors
@dataclass(config=_DATA_CONFIG)
class DataConfig(Section):
    """The training data (loaders in ``distgrow.data``)."""

    KEY: ClassVar[str] = "data"

    name: Str = setting(
        "synthetic_classification",
        "Data set or file format: fashion_mnist, mnist, cifar10, covtype, ionosphere, digits, "
        "breast_cancer, wine, iris, synthetic_classification, synthetic_regression, "
        "python_stdlib (byte-level text for language models, needs seq_len); or npz, "
        "csv, tsv, image_folder, text (your own files at data.path; text: byte-level text for "
        "language models, needs seq_len); or your own function returning "
        "(train, val) torch Datasets: 'package.module:function' or 'path/to/file.py:function' "
        "(see docs/own_code.md).",
    )
    kwargs: dict[Str, Any] = setting({}, "Keyword arguments of a data.name entry point.")
    path: Str | None = setting(
        None,
        "Where the files are (data.root is the same setting): the file or folder of "
        "npz/csv/tsv/image_folder; for the named sets null uses their default place.",
        names=("path", "root"),
    )
    val_path: Str | None = setting(
        None,
        "npz/csv/tsv/image_folder/text: a separate validation file or folder (null: split "
        "data.path with val_fraction; an image folder holding train/ and val/ uses those); "
        "refused for the other data sets, which bring their own.",
    )
    x_key: Str = setting("X", "npz: the name of the features array.")
    y_key: Str = setting("y", "npz: the name of the labels array.")
    label_column: Int | Str = setting(
        -1, "csv/tsv: the label column, by header name or by index (-1: the last column)."
    )
    header: Bool | None = setting(
        None, "csv/tsv: the first row names the columns (null: yes if it is not all numbers)."
    )
    delimiter: Str | None = setting(
        None, "csv/tsv: the field separator (null: ',' for csv, tab for tsv)."
    )
    task: Literal["auto", "classification", "regression"] = setting(
        "auto",
        "npz/csv/tsv: what the labels are (auto: whole numbers or words are classes, other "
        "numbers regression targets).",
    )
    image_size: list[Int] | None = setting(
        None, "image_folder: resize every image to [height, width] (null: keep; all must agree)."
    )
    crop: list[Int] | None = setting(
        None, "image_folder: centre-crop to [height, width] after the resize (null: no crop)."
    )
    image_mode: Literal["RGB", "L"] = setting(
        "RGB", "image_folder: decode to RGB (3 channels) or L (grey, 1 channel)."
    )
    max_image_pixels: Int = setting(
        178_956_970,
        "image_folder: refuse an image of more pixels (width × height) than this, as a "
        "possible decompression bomb (default: Pillow's own limit); raise it for huge images.",
        Range(ge=1, fix="e.g. 2e8"),
    )
    normalize: Bool = setting(
        True,
        "image_folder: standardise each channel with the training split's mean and std (off: "
        "pixel / 255).",
    )
    feed: Literal["auto", "memory", "loader"] = setting(
        "auto",
        "How training reads samples: memory (whole set as tensors, batched by indexing), loader "
        "(torch DataLoader with worker processes, decoding per sample), auto (image_folder: "
        "loader; everything else: memory).",
    )
    loader_workers: Int = setting(
        2,
        "feed=loader: DataLoader worker processes per rank (0: in-process).",
        Range(ge=0, fix="e.g. 2"),
    )
    pin_memory: Bool | None = setting(
        None, "feed=loader: pin batches in page-locked memory (null: when training on CUDA)."
    )
    prefetch_factor: Int = setting(
        2, "feed=loader: micro-batches each worker reads ahead.", Range(ge=1, fix="e.g. 2")
    )
    device_fraction: Float = setting(
        0.5,
        "feed=memory on CUDA: keep the training and validation tensors on the device, so "
        "batches are gathered there, when they take at most this fraction of its free memory "
        "(0: never; otherwise batches are gathered in pinned memory and copied without "
        "blocking).",
        Range(ge=0, le=1, fix="e.g. 0.5, or 0"),
    )
    val_fraction: Float = setting(
        0.2,
        "Held-out fraction for data sets without an official test split.",
        Range(gt=0, lt=1, fix="e.g. 0.2"),
    )
    download: Bool = setting(
        False, "Allow downloading (covtype through scikit-learn); off offline."
    )
    augment: Bool = setting(
        False, "Random crop and flip for image data (deterministic per sample)."
    )
    limit_train: Int | None = setting(
        None, "Use only the first k training samples (quick runs).", _POSITIVE_OR_NULL
    )
    limit_val: Int | None = setting(
        None, "Use only the first k validation samples.", _POSITIVE_OR_NULL
    )
    synthetic_samples: Int = setting(
        2048,
        "Samples in the synthetic data sets (train + val).",
        Range(ge=2, problem="too small", fix="use 2 or more"),
    )
    synthetic_features: Int = setting(
        20,
        "Features in the synthetic data sets.",
        Range(ge=1, problem="too small", fix="use 1 or more"),
    )
    size: Int | None = setting(
        None,
        "Training-set size N for `distgrow plan` when the data set is not at hand; training "
        "always uses the real size. Files of npz, csv, tsv, image_folder, text and tokens are "
        "counted without it (text/tokens: windows from the file sizes and headers).",
        _POSITIVE_OR_NULL,
    )
    seq_len: Int | None = setting(
        None,
        "Tokens per sample for sequence data of a fixed length (null: not sequence data); "
        "schedule.interval=tokens counts t in tokens = samples seen × seq_len.",
        _POSITIVE_OR_NULL,
    )

    def expected_train_size(self, seed: int = 0) -> int:
        """N for planning without loading: ``size`` if set, else the data set's known size.

        Args:
            seed: ``run.seed``, which picks the blocks ``tokens`` and ``text`` hold out (the
                last block of a file may be short, so N can differ by a few windows).

        Must agree with ``distgrow.data`` (a test loads each set and compares).
        """
        if self.size is not None:
            return self.size
        if self.name in STREAM_FORMATS:
            # Counted from the file sizes and headers by the loader's own split, nothing read.
            try:
                return stream_train_size(self, seed)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"data.path = {self.path!r}: cannot count its windows: {err} "
                    f"Fix: {STREAM_FIX[self.name]}, or set data.size=N."
                ) from err
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
        raise fail(
            "data.val_path",
            self.val_path,
            f"is not read for data.name={self.name!r} ({where}); only "
            f"{', '.join(VAL_PATH_NAMES)} take a separate validation file",
            "remove it, or use one of those formats",
        )

    @constraint
    def _known_data(self) -> None:
        """A built-in data set's name or an entry point, with the settings that apply to it."""
        if is_entry_point(self.name):
            _check_entry_point("data.name", self.name)
            if self.augment:
                raise fail(
                    "data.augment",
                    self.augment,
                    "applies only to the built-in image sets, not a data.name entry point",
                    "set data.augment=false and augment inside your Dataset",
                )
        elif self.kwargs:
            raise fail(
                "data.kwargs",
                self.kwargs,
                f"applies only to an entry point, not the built-in {self.name!r}",
                "remove it, or set data.name='module:function'",
            )
        elif self.name.strip().lower().replace("-", "_") not in DATA_NAMES:
            near = difflib.get_close_matches(self.name.lower(), DATA_NAMES, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise fail(
                "data.name",
                self.name,
                "unknown data set",
                f"{hint}use one of {', '.join(DATA_NAMES)}",
            )
        self._check_val_path()

    @constraint
    def _shapes(self) -> None:
        """Image shapes are [height, width]; synthetic data fits in memory."""
        for key in ("image_size", "crop"):
            shape = getattr(self, key)
            if shape is not None and (len(shape) != 2 or min(shape) < 1):
                raise fail(f"data.{key}", shape, "must be [height, width], both >= 1", "[32, 32]")
        values = self.synthetic_samples * self.synthetic_features
        if values > MAX_SYNTHETIC_VALUES:
            raise fail(
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


@raises_config_errors
@dataclass(config=STRICT)
class ModelConfig(Section):
    """The network (``distgrow.models``)."""

    KEY: ClassVar[str] = "model"

    name: Str = setting(
        "mlp",
        "Model: mlp, bottleneck_mlp, cnn, wrn, resnet18, resnet34, resnet50, transformer (a small "
        "decoder-only language model: depth blocks of width channels); or your own function "
        "returning an nn.Module: 'package.module:function' or 'path/to/file.py:function', "
        "called with model.kwargs (e.g. 'torchvision.models:resnet50'; see docs/own_code.md).",
    )
    kwargs: dict[Str, Any] = setting(
        {}, "Keyword arguments of a model.name entry point (the built-in models take none)."
    )
    hidden: list[Int] = setting([512, 512], "Hidden layer sizes of the plain mlp.")
    dropout: Float = setting(
        0.0, "Dropout probability (0 = none).", Range(ge=0, lt=1, fix="e.g. 0.25")
    )
    depth: Int = setting(16, "Wide ResNet depth (6n+4); transformer: the number of blocks.")
    width: Int = setting(
        4, "Wide ResNet widening factor; transformer: the model width (32 per head)."
    )
    ghost_batch: Int | None = setting(
        None,
        "Ghost batch norm size: BN statistics per fixed-size chunk, so they do not depend on how "
        "the global batch is split. Micro-batches are kept multiples of it.",
        Range(ge=1, problem="must be positive", fix="e.g. 128"),
    )

    @constraint
    def _known_model(self) -> None:
        """An entry point's form; kwargs only for an entry point; positive layer sizes."""
        if is_entry_point(self.name):
            _check_entry_point("model.name", self.name)
        elif self.kwargs:
            raise fail(
                "model.kwargs",
                self.kwargs,
                f"applies only to an entry point, not the built-in {self.name!r}",
                "remove it, or set model.name='module:function'",
            )
        if any(h < 1 for h in self.hidden):
            raise fail("model.hidden", self.hidden, "sizes must be positive", "e.g. [512, 512]")


LOSS_NAMES = ("auto", "cross_entropy", "mse", "l1", "smooth_l1", "bce_with_logits", "nll")
METRIC_NAMES = ("auto", "accuracy", "loss")


@raises_config_errors
@dataclass(config=STRICT)
class LossConfig(Section):
    """The training loss and the validation metric (``distgrow.losses``)."""

    KEY: ClassVar[str] = "loss"

    name: Str = setting(
        "auto",
        "auto (cross_entropy for classes, mse otherwise), cross_entropy, mse, l1, smooth_l1, "
        "bce_with_logits, nll; or your own 'module:function' / 'file.py:function' (or a class "
        "such as 'torch.nn:HuberLoss', built with loss.kwargs) returning per-sample losses "
        "(shape [n]) or their sum, never a batch mean (see docs/own_code.md).",
    )
    kwargs: dict[Str, Any] = setting(
        {}, "Keyword arguments: passed to the loss function at each call, or to its class once."
    )
    metric: Str = setting(
        "auto",
        "Validation metric: auto (accuracy for classification, none beyond the loss otherwise), "
        "accuracy, loss; or 'module:function' returning per-sample scores (shape [n]) or their "
        "sum, logged as val_metric (the mean over the validation set).",
    )

    @constraint
    def _known_loss(self) -> None:
        """A built-in loss and metric by name, or entry points of the right form."""
        if is_entry_point(self.name):
            _check_entry_point("loss.name", self.name)
        elif self.name not in LOSS_NAMES:
            raise fail(
                "loss.name",
                self.name,
                "unknown loss",
                f"use one of {', '.join(LOSS_NAMES)}, or 'module:function'",
            )
        if is_entry_point(self.metric):
            _check_entry_point("loss.metric", self.metric)
        elif self.metric not in METRIC_NAMES:
            raise fail(
                "loss.metric",
                self.metric,
                "unknown metric",
                f"use one of {', '.join(METRIC_NAMES)}, or 'module:function'",
            )
