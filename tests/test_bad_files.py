"""Bad files give one line, whatever reads them (issue #22, item 3).

An image folder read by loader workers, an image that declares a billion pixels, an npz whose
header lies about its size or holds no rows or Python objects, labels far beyond the classes,
a YAML "billion laughs": each is refused with one line naming the file (exit 2 from the CLI),
before anything is allocated for it and before a run directory is written.
"""

from __future__ import annotations

import io
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_hostile_inputs import SYNTHETIC
from torch import nn

from distgrow import cli
from distgrow.config import ConfigError, DataConfig, load_config
from distgrow.config.filesizes import npz_header, read_npy_header
from distgrow.config.loader import MAX_YAML_VALUES
from distgrow.data import ArrayDataset, DataBundle, DatasetFormatError, load_dataset
from distgrow.data.checks import check_class_labels
from distgrow.data.readers.image_folder import decode
from distgrow.data.readers.labels import MAX_CLASSES
from distgrow.data.readers.tokens import TokenFile
from distgrow.models import MAX_OUTPUTS, build_model, output_width

# -- helpers ---------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of ``distgrow ARGV`` run in this process."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # `train` ends its process through the backend
        code = int(stop.code or 0)
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str) -> str:
    """The one line of a refusal (exit 2, no traceback), without its prefix."""
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def job(tmp: Path, **sections: dict[str, Any]) -> str:
    """``tmp/job.yaml``: the hostile-input table's small synthetic job with ``sections``
    replacing its sections."""
    tree = {k: dict(v) for k, v in SYNTHETIC.items()}
    tree["logging"]["wandb"] = {"mode": "disabled"}
    tree.update(sections)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def png_declaring(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width`` × ``height`` RGB pixels (and holds none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def image_folder(root: Path, bad: str | None) -> None:
    """``root/train`` and ``root/val``, two classes of 6×5 images; ``bad`` adds one bad file
    to the training folder, listed last: ``empty`` (0 bytes), ``truncated`` (half a PNG),
    ``text`` (not an image) or ``bomb`` (declares 30000 × 30000 pixels)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("a", "b"):
            for i in range(count):
                png(root / split / name / f"{i}.png", rng.integers(0, 256, (6, 5, 3), np.uint8))
    target = root / "train" / "b" / "z.png"
    if bad == "empty":
        target.write_bytes(b"")
    elif bad == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, "PNG")
        target.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif bad == "text":
        target.write_text("not an image\n")
    elif bad == "bomb":
        png_declaring(target, 30000, 30000)


def image_job(tmp: Path, **data: Any) -> str:
    return job(
        tmp,
        data={"name": "image_folder", "path": str(tmp / "img"), **data},
        model={"name": "mlp", "hidden": [8]},
        growth={"base_batch": 4, "micro_batch": 4, "max_dataset_fraction": None},
    )


# -- image folders read by loader workers -------------------------------------------------------


@pytest.mark.integration  # DataLoader worker processes
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("empty", r"z\.png: not an image Pillow can read \(cannot identify image file"),
        ("truncated", r"z\.png: not an image Pillow can read \(.*truncated"),
        ("text", r"z\.png: not an image Pillow can read \(cannot identify image file"),
    ],
    ids=["empty", "truncated", "text"],
)
def test_a_bad_image_read_by_workers_is_the_line_of_zero_workers(
    bad: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_folder(tmp_path / "img", bad)
    lines = []
    for workers in (0, 1):
        run = tmp_path / f"run{workers}"
        argv = ["train", image_job(tmp_path, loader_workers=workers), f"run.output_dir={run}"]
        line = assert_one_line(*run_cli(argv, capsys))
        assert not run.exists()  # refused while reading the data, before the run starts
        lines.append(line)
    assert lines[0] == lines[1]  # the worker's error, word for word
    assert lines[1].startswith(f"distgrow: error: {tmp_path / 'img' / 'train' / 'b' / 'z.png'}")
    assert re.search(says, lines[1]), lines[1]


@pytest.mark.integration  # DataLoader worker processes
def test_a_bad_image_met_in_training_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # normalize=false: nothing reads the images before training; the loader's worker meets it.
    image_folder(tmp_path / "img", "empty")
    argv = [
        "train",
        image_job(tmp_path, loader_workers=1, normalize=False),
        f"run.output_dir={tmp_path / 'run'}",
    ]
    line = assert_one_line(*run_cli(argv, capsys))
    assert line == (
        f"distgrow: error: {tmp_path / 'img' / 'train' / 'b' / 'z.png'}: not an image Pillow "
        f"can read (cannot identify image file '{tmp_path / 'img' / 'train' / 'b' / 'z.png'}')."
    )


# -- decompression bombs ----------------------------------------------------------------------


def test_an_image_of_a_billion_pixels_is_refused_naming_the_file_and_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_folder(tmp_path / "img", "bomb")
    run = tmp_path / "run"
    argv = ["train", image_job(tmp_path, loader_workers=0), f"run.output_dir={run}"]
    line = assert_one_line(*run_cli(argv, capsys))
    assert line == (
        f"distgrow: error: {tmp_path / 'img' / 'train' / 'b' / 'z.png'}: 900,000,000 pixels, "
        "more than data.max_image_pixels = 178,956,970 (refused as a possible decompression "
        "bomb). Fix: if the image is genuine, set data.max_image_pixels=900000000 or more; "
        "else remove the file."
    )
    assert not run.exists()


def test_max_image_pixels_is_the_limit_and_pillow_keeps_its_own(tmp_path: Path) -> None:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "a.png"
    png(path, np.full((6, 5, 3), 7, np.uint8))  # 30 pixels
    assert decode(str(path), "RGB", None, None, max_pixels=30).shape == (3, 6, 5)
    with pytest.raises(DatasetFormatError, match=r"a\.png: 30 pixels, more than .* = 29 "):
        decode(str(path), "RGB", None, None, max_pixels=29)
    png_declaring(path, 30000, 30000)  # refused by Pillow itself at open: the same line
    with pytest.raises(DatasetFormatError, match=r"a\.png: 900,000,000 pixels, more than .*"):
        decode(str(path), "RGB", None, None, max_pixels=1000)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # restored
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels = 0: must be >= 1"):
        load_config(None, ["data.max_image_pixels=0"])


# -- npz: sizes from the header, checked before anything is allocated -------------------------


def forged_npz(path: Path, rows: int, written: int = 10) -> None:
    """An npz whose ``X`` header declares ``rows`` × 8 float64 and holds ``written`` rows."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (rows, 8)}
    )
    labels = io.BytesIO()
    np.save(labels, np.arange(written) % 2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.npy", header.getvalue() + np.zeros((written, 8)).tobytes())
        archive.writestr("y.npy", labels.getvalue())


@pytest.fixture
def no_array_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if numpy is asked to load an array (the refusal must come first)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("numpy.load was called")

    monkeypatch.setattr(np, "load", refuse)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda p: forged_npz(p, 10**11),
            r"array 'X' declares shape \(100000000000, 8\) of float64 \(5\.8 TiB\), but the "
            r"archive holds 640 bytes of it: the file is truncated or corrupt; write it again "
            r"with numpy\.savez\.",
        ),
        (
            lambda p: forged_npz(p, 11),
            r"array 'X' declares shape \(11, 8\) of float64 \(704 bytes\), but the archive "
            r"holds 640 bytes",
        ),
        (lambda p: forged_npz(p, 0, 0), r"array 'X' has no rows \(shape \(0, 8\)\)"),
        (
            lambda p: np.savez(p, X=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4)),
            r"array 'X' holds Python objects \(dtype object\), which only a pickle can load; "
            r"refused",
        ),
    ],
    ids=["1e11 rows", "one row short", "no rows", "objects"],
)
def test_npz_refusals_name_the_file_before_loading(
    make: Any,
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_array_loaded: None,
) -> None:
    path = tmp_path / "data.npz"
    make(path)
    with pytest.raises(DatasetFormatError, match=rf"^{path}: {says}"):
        load_dataset(DataConfig(name="npz", path=str(path)))
    # `plan` counts the samples from the same header: the same refusal, not N = 8e10.
    config = job(tmp_path, data={"name": "npz", "path": str(path)})
    line = assert_one_line(*run_cli(["plan", config], capsys))
    assert str(path) in line and re.search(says, line), line


def test_covtype_npz_headers_are_checked_too(tmp_path: Path, no_array_loaded: None) -> None:
    path = tmp_path / "covtype.npz"
    forged_npz(path, 10**11)
    with pytest.raises(DatasetFormatError, match=rf"^{path}: array 'X' declares shape \(1000"):
        load_dataset(DataConfig(name="covtype", path=str(path)))


def test_a_well_compressed_npz_is_not_mistaken_for_a_forged_one(tmp_path: Path) -> None:
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, X=np.zeros((50_000, 8)), y=np.arange(50_000) % 3)
    assert path.stat().st_size < 3_200_000 / 100  # compressed over 100-fold
    bundle = load_dataset(DataConfig(name="npz", path=str(path)))
    assert len(bundle.train) + len(bundle.val) == 50_000 and bundle.num_classes == 3


# -- npy format version 3.0: a UTF-8 header ----------------------------------------------------

STRUCTURED = np.dtype([("数", "<f4"), ("é", "<i8")])  # "数" is not latin-1: numpy writes v3.0


@pytest.mark.filterwarnings("ignore:Stored array in format 3.0")
def test_a_version_3_header_is_read_as_utf8_like_numpy_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "fields.npy"
    np.save(path, np.zeros(5, dtype=STRUCTURED))
    assert path.read_bytes()[6:8] == b"\x03\x00"  # numpy wrote version 3.0
    with path.open("rb") as handle:
        shape, fortran, dtype = read_npy_header(handle)
        offset = handle.tell()
    loaded = np.load(path)
    assert (shape, fortran, dtype) == (loaded.shape, False, loaded.dtype)
    assert dtype.names == ("数", "é")  # latin-1 would give ('æ\x95°', 'Ã©')
    assert path.stat().st_size - offset == loaded.nbytes
    # A plain array under a hand-written 3.0 header is read like its 1.0 twin.
    ids = tmp_path / "ids.npy"
    with ids.open("wb") as handle:
        np.lib.format.write_array(handle, np.arange(7, dtype=np.uint16), version=(3, 0))
    assert ids.read_bytes()[6:8] == b"\x03\x00"
    with ids.open("rb") as handle:
        assert read_npy_header(handle) == ((7,), False, np.dtype("<u2"))


@pytest.mark.filterwarnings("ignore:Stored array in format 3.0")
def test_a_structured_version_3_array_is_refused_naming_its_real_fields(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, X=np.zeros(4, dtype=STRUCTURED), y=np.arange(4) % 2)
    assert npz_header(path, "X") == ((4,), str(STRUCTURED))
    with pytest.raises(DatasetFormatError) as refused:
        load_dataset(DataConfig(name="npz", path=str(path)))
    said = str(refused.value)
    assert said.startswith(f"{path}: array 'X' has dtype {STRUCTURED} and shape (4,)"), said
    tokens = tmp_path / "train.npy"
    np.save(tokens, np.zeros(4, dtype=STRUCTURED))
    with pytest.raises(DatasetFormatError) as refused:
        TokenFile.open(str(tokens), "data.path")
    assert str(refused.value) == (
        f"tokens: {tokens} holds a {STRUCTURED} array of shape (4,); a token file is 1-D "
        "uint16 or uint32: save it as such."
    )
    ids = tmp_path / "ids.npy"
    with ids.open("wb") as handle:
        np.lib.format.write_array(handle, np.arange(7, dtype=np.uint16), version=(3, 0))
    opened = TokenFile.open(str(ids), "data.path")
    assert (opened.count, opened.dtype, opened.offset) == (7, np.dtype("<u2"), 128)


def test_a_broken_version_3_header_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.npy"
    header = b"{'descr': '<u2', 'fortran_order': False, 'shape': (7,), }\xff"
    path.write_bytes(b"\x93NUMPY\x03\x00" + struct.pack("<I", len(header)) + header)
    with pytest.raises(DatasetFormatError, match=rf"^tokens: {path} has no readable \.npy header"):
        TokenFile.open(str(path), "data.path")


# -- labels against the classes ---------------------------------------------------------------


def labelled_npz(path: Path, far: int) -> None:
    """40 samples of 8 features, labels 0..3 and one ``far`` label."""
    y = np.arange(40) % 4
    y[17] = far
    np.savez(path, X=np.random.default_rng(0).normal(size=(40, 8)), y=y)


def test_a_label_far_beyond_the_classes_names_its_file_and_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labelled_npz(tmp_path / "d.npz", 10**9)
    run = tmp_path / "run"
    config = job(tmp_path, data={"name": "npz", "path": str(tmp_path / "d.npz")})
    line = assert_one_line(*run_cli(["train", config, f"run.output_dir={run}"], capsys))
    assert line == (
        f"distgrow: error: {tmp_path / 'd.npz'}: the label of sample 17 is 1,000,000,000, which "
        "would make 1,000,000,001 classes (labels are class numbers 0..C-1, at most 1,048,576). "
        "Fix: number the classes 0..C-1, or set data.task=regression if they are values."
    )
    assert not run.exists()
    assert MAX_CLASSES == MAX_OUTPUTS  # what the data allows, a built-in head takes


def test_a_built_in_head_refuses_an_absurd_class_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Your own Datasets: the classes are the largest label + 1, unchecked by a file reader.
    (tmp_path / "sets.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n\n"
        "def sets():\n"
        "    y = torch.arange(40) % 4\n"
        "    y[17] = 10**9\n"
        "    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))\n"
        "    return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])\n"
    )
    run = tmp_path / "run"
    config = job(tmp_path, data={"name": f"{tmp_path / 'sets.py'}:sets"})
    line = assert_one_line(*run_cli(["train", config, f"run.output_dir={run}"], capsys))
    assert "num_outputs (1,000,000,001) is more than 1,048,576" in line
    assert line.endswith("The classes are the largest label + 1: number them 0..C-1.")
    assert not run.exists()
    with pytest.raises(ValueError, match="num_outputs"):
        build_model("mlp", input_shape=(4,), num_outputs=MAX_OUTPUTS + 1, hidden=[2])
    assert build_model("mlp", input_shape=(4,), num_outputs=MAX_OUTPUTS, hidden=[1]) is not None


def test_labels_beyond_an_own_models_outputs_are_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labelled_npz(tmp_path / "d.npz", 1000)
    (tmp_path / "net.py").write_text(
        "import torch\n\ndef net(classes):\n    return torch.nn.Linear(8, classes)\n"
    )
    run = tmp_path / "run"
    config = job(
        tmp_path,
        data={"name": "npz", "path": str(tmp_path / "d.npz")},
        model={"name": f"{tmp_path / 'net.py'}:net", "kwargs": {"classes": 4}},
    )
    line = assert_one_line(*run_cli(["train", config, f"run.output_dir={run}"], capsys))
    assert line == (
        f"distgrow: error: {tmp_path / 'd.npz'}: class label 1,000 (in the training "
        "split) is beyond the model's 4 outputs (classes 0..3). Fix: number the classes 0..C-1 "
        "with C <= 4, or give the model one output per class."
    )
    assert not run.exists()
    labelled_npz(tmp_path / "d.npz", 3)  # labels within the outputs: it trains
    code, err = run_cli(["train", config, f"run.output_dir={run}"], capsys)
    assert code == 0, err


def bundle(train_labels: list[int], val_labels: list[int], task: str = "classification") -> Any:
    def split(labels: list[int]) -> ArrayDataset:
        return ArrayDataset(torch.zeros(len(labels), 8), torch.tensor(labels))

    return DataBundle("npz", split(train_labels), split(val_labels), (8,), 0, task)


def test_labels_are_checked_in_both_splits_and_only_for_class_index_losses() -> None:
    def never() -> int:
        raise AssertionError("the model was run for nothing")

    with pytest.raises(ValueError, match=r"^d\.npz: class label 7 \(in the validation split\) "):
        check_class_labels(bundle([0, 1], [1, 7]), "auto", lambda: 5, "d.npz")
    check_class_labels(bundle([0, 4], [4]), "nll", lambda: 5, "d.npz")  # 0..4 fit 5 outputs
    check_class_labels(bundle([0, 9], [9]), "auto", lambda: None, "d.npz")  # width unknown
    check_class_labels(bundle([0, 9], [9], "regression"), "auto", never, "d.npz")
    check_class_labels(bundle([0, 9], [9]), "my.py:loss", never, "d.npz")


def test_output_width_leaves_the_model_and_the_rng_as_they_were() -> None:
    x = torch.randn(3, 8)
    model = nn.Sequential(nn.Linear(8, 5), nn.Dropout(0.5)).train()
    rng = torch.get_rng_state()
    assert output_width(model, x) == 5
    assert model.training and torch.equal(torch.get_rng_state(), rng)

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no")

    assert output_width(Broken(), x) is None  # the loss check reports the failing call
    assert output_width(nn.Flatten(0), x) is None  # one value per sample: not class scores


# -- YAML ---------------------------------------------------------------------------------------

LAUGHS = "\n".join(
    ["    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
)


def test_a_billion_laughs_is_refused_at_load_without_printing_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(f"model:\n  name: mlp\n  kwargs:\n{LAUGHS}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    said = str(refused.value)
    assert said == (
        f"{path} is refused: its aliases expand the value at line 10 to 5,380,840 values (more "
        f"than {MAX_YAML_VALUES:,}: a 'billion laughs'). Fix: write the values out, or use "
        "fewer nested aliases."
    )
    line = assert_one_line(*run_cli(["train", str(path)], capsys))
    assert "lol" not in line and len(line) < 300
    # on the command line too
    # 11 values, 1,000 aliases of them, 100 aliases of those: 1,100,101 values
    a, b = "&a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]", f"&b [{', '.join(['*a'] * 1000)}]"
    value = f"[{a}, {b}, [{', '.join(['*b'] * 100)}]]"
    with pytest.raises(ConfigError, match=r"^override 'model.kwargs.x' is refused: .*line 1 "):
        load_config(None, [f"model.kwargs.x={value}"])


def test_an_alias_inside_itself_or_a_bottomless_nest_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("model:\n  name: mlp\n  kwargs:\n    x: &x [1, *x]\n")
    with pytest.raises(ConfigError, match=r"line 4 contains an alias of itself .*Fix: "):
        load_config(path)
    path.write_text(f"model:\n  kwargs:\n    x: {'[' * 5000}{']' * 5000}\n")
    line = assert_one_line(*run_cli(["plan", str(path)], capsys))
    assert line.endswith(
        f"is refused: its values nest deeper than the {sys.getrecursionlimit()} levels it can "
        "read. Fix: nest lists and mappings less deeply."
    ), line


def test_ordinary_anchors_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "growth: {base_batch: &b 32, micro_batch: *b}\n"
        "model: {name: mlp, hidden: &h [24, 16]}\n"
        "data: {name: synthetic_classification, synthetic_features: *b}\n"
    )
    cfg = load_config(path)
    assert cfg.growth.micro_batch == cfg.growth.base_batch == cfg.data.synthetic_features == 32
    assert cfg.model.hidden == [24, 16]
