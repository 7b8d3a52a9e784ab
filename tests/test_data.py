"""Tests for distgrow.data: loaders on small files in the real formats, the real
Fashion-MNIST, the epoch order and the cutting of a global batch across ranks."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distgrow import data
from distgrow.config import DATA_NAMES, ConfigError, DataConfig
from distgrow.data import (
    DATASETS,
    ArrayDataset,
    DataBundle,
    DatasetFormatError,
    DatasetNotFoundError,
    LoaderDataset,
    UnsafePickleError,
    epoch_permutation,
    load_dataset,
    shard_global_batch,
    splits,
    transforms,
)
from distgrow.data.readers import idx
from distgrow.data.readers.safe_pickle import restricted_load

# ----------------------------------------------------------------------------- helpers


def in_memory(split: ArrayDataset | LoaderDataset) -> ArrayDataset:
    """A split that the named sets hold in memory (``x`` and ``y`` tensors)."""
    assert isinstance(split, ArrayDataset), f"expected an in-memory split, got {split!r}"
    return split


def load(name: str, *, seed: int = 0, **fields: Any) -> DataBundle:
    """``load_dataset`` of the data section ``data.name=name`` plus ``fields``."""
    return load_dataset(DataConfig(name=name, **fields), seed=seed)


_IDX_TYPE = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written by hand: 0, 0, type byte, ndim, big-endian dims, big-endian data."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _IDX_TYPE[big.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    payload = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_mnist(
    directory: Path, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0
) -> dict[str, np.ndarray]:
    """Four small IDX files with random pixels and known labels."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(directory / name, array, gz)
    return arrays


def write_cifar(
    directory: Path, per_batch: int = 4, n_test: int = 6, protocol: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """data_batch_1..5 and test_batch in the python-pickle format of the real release."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    train_data, train_labels = [], []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        content = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with (directory / name).open("wb") as handle:
            pickle.dump(content, handle, protocol=protocol)
        if name != "test_batch":
            train_data.append(rows)
            train_labels.extend(labels)
        else:
            test = (rows, np.asarray(labels))
    return np.concatenate(train_data), np.asarray(train_labels), test[0], test[1]


def covtype_table(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = np.column_stack(
        [
            rng.integers(1800, 3900, n),
            rng.normal(0, 50, (n, 9)).round(2),
            rng.integers(0, 2, (n, 44)),
        ]
    ).astype(np.float64)
    labels = (np.arange(n) % 7) + 1
    return features, labels


def write_covtype_csv(path: Path, header: bool = False) -> tuple[np.ndarray, np.ndarray]:
    features, labels = covtype_table()
    lines = [
        ",".join(f"{v:g}" for v in row) + f",{lab}"
        for row, lab in zip(features, labels, strict=True)
    ]
    if header:
        lines.insert(0, ",".join([f"f{i}" for i in range(54)] + ["Cover_Type"]))
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return features, labels


def expected_tabular(
    features: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a tabular bundle must hold: seeded split, standardised with train stats."""
    train_idx, val_idx = splits.seeded_split(len(features), val_fraction, seed)
    train = features[train_idx.numpy()]
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (
        torch.from_numpy(((train - mean) / std).astype(np.float32)),
        torch.from_numpy(labels[train_idx.numpy()]),
        torch.from_numpy(((features[val_idx.numpy()] - mean) / std).astype(np.float32)),
        torch.from_numpy(labels[val_idx.numpy()]),
    )


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.dtype(">i2"), np.dtype(">i4"), np.dtype(">f4"), ">f8"]
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_all_types(tmp_path: Path, dtype: Any, gz: bool) -> None:
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if np.dtype(dtype) == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = write_idx(tmp_path / "a-idx3", array, gz)
    out = idx.read_idx(path)
    assert out.shape == (2, 3, 4)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_is_big_endian(tmp_path: Path) -> None:
    # 0x0102 big-endian is 258; a little-endian reader would see 513.
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE]))
    np.testing.assert_array_equal(idx.read_idx(path), [258, -2])


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz)
    bundle = load("mnist", root=str(tmp_path))
    assert bundle.name == "mnist" and bundle.task == "classification"
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 28, 28)
    assert in_memory(bundle.train).x.dtype == torch.uint8 and in_memory(bundle.train).x.shape == (
        12,
        1,
        28,
        28,
    )
    assert in_memory(bundle.val).x.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(
        in_memory(bundle.train).x[:, 0].numpy(), arrays["train-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(
        in_memory(bundle.val).x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"]
    )
    assert bundle.train.y.dtype == torch.int64
    assert bundle.train.y.tolist() == [i % 10 for i in range(12)]
    assert bundle.val.y.tolist() == [0, 3, 6, 9, 2]

    # Normalisation uses the exact mean/std of the training pixels.
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    mean, std = pixels.mean(), pixels.std()
    x, y = bundle.val.batch(torch.tensor([4, 0]))
    assert x.dtype == torch.float32
    want = (arrays["t10k-images-idx3-ubyte"][[4, 0]] / 255 - mean) / std
    np.testing.assert_allclose(x[:, 0].numpy(), want, rtol=1e-5, atol=1e-5)
    assert y.tolist() == [2, 0]
    train_x, _ = bundle.train.batch(torch.arange(12))
    assert abs(float(train_x.mean())) < 1e-5 and abs(float(train_x.std(unbiased=False)) - 1) < 1e-4


def test_mnist_torchvision_layout_and_dot_names(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    arrays = write_mnist(raw, gz=False)
    (raw / "train-images-idx3-ubyte").rename(raw / "train-images.idx3-ubyte")
    bundle = load("mnist", root=str(tmp_path))
    np.testing.assert_array_equal(
        in_memory(bundle.train).x[:, 0].numpy(), arrays["train-images-idx3-ubyte"]
    )


def test_idx_truncated_raw(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetFormatError, match=r"9408 data bytes.*holds 9398.*truncated"):
        load("mnist", root=str(tmp_path))


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetFormatError, match="truncated gzip"):
        load("mnist", root=str(tmp_path))


def test_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetFormatError, match="bad IDX magic 01020801"):
        idx.read_idx(path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=False)
    with pytest.raises(DatasetFormatError, match=r"12 images.*11 labels"):
        load("mnist", root=str(tmp_path))


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 12], np.uint8), False)
    with pytest.raises(DatasetFormatError, match=r"labels must be 0\.\.9, found 0\.\.12"):
        load("mnist", root=str(tmp_path))


def test_mnist_missing_names_path_and_site(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load("mnist", root=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "MNIST site" in message and "data.root" in message
    assert isinstance(info.value, FileNotFoundError)


def test_mnist_incomplete_folder_is_not_found(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load("mnist", root=str(tmp_path))


def test_fashion_mnist_missing_names_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist") as info:
        load("fashion_mnist", root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(info.value)


def test_mnist_augment_shifts_without_flip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=False)
    bundle = load("mnist", root=str(tmp_path), augment=True, seed=5)
    transform = bundle.train.transform
    assert isinstance(transform, transforms.Compose)
    crop = transform.transforms[0]
    assert isinstance(crop, transforms.RandomCropFlip) and crop.padding == 2 and not crop.flip


# ----------------------------------------------------------------------------- real Fashion-MNIST

FASHION_ROOT = Path(data.FASHION_MNIST_DEFAULT_ROOT)


@pytest.mark.skipif(
    not FASHION_ROOT.is_dir(),
    reason=f"{FASHION_ROOT} absent: install the Debian package dataset-fashion-mnist",
)
def test_real_fashion_mnist() -> None:
    bundle = load("fashion_mnist")
    assert (len(bundle.train), len(bundle.val)) == (60000, 10000)
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 28, 28)
    assert in_memory(bundle.train).x.dtype == torch.uint8 and in_memory(bundle.train).x.shape == (
        60000,
        1,
        28,
        28,
    )
    assert in_memory(bundle.val).x.shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6000 per class in train, 1000 in test; first label is 9.
    assert torch.bincount(bundle.train.y).tolist() == [6000] * 10
    assert torch.bincount(bundle.val.y).tolist() == [1000] * 10
    assert int(bundle.train.y[0]) == 9
    normalize = bundle.val.transform
    assert isinstance(normalize, transforms.NormalizeImages)
    assert float(normalize.mean) == pytest.approx(0.2860, abs=1e-4)
    assert float(normalize.std) == pytest.approx(0.3530, abs=1e-4)
    x, y = bundle.train.batch(torch.arange(0, 60000, 7))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
    limited = load("fashion_mnist", limit_train=100, limit_val=50)
    assert (len(limited.train), len(limited.val)) == (100, 50)
    assert torch.equal(in_memory(limited.train).x, in_memory(bundle.train).x[:100])


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_loads_pickle_batches(tmp_path: Path, protocol: int) -> None:
    train_rows, train_labels, test_rows, test_labels = write_cifar(
        tmp_path / "cifar-10-batches-py", protocol=protocol
    )
    bundle = load("cifar10", root=str(tmp_path))
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    assert in_memory(bundle.train).x.dtype == torch.uint8 and in_memory(bundle.train).x.shape == (
        20,
        3,
        32,
        32,
    )
    assert in_memory(bundle.val).x.shape == (6, 3, 32, 32)
    assert bundle.train.y.tolist() == train_labels.tolist()
    assert bundle.val.y.tolist() == test_labels.tolist()
    # Row layout: 1024 red, 1024 green, 1024 blue, each row-major 32×32.
    i, c, h, w = 7, 2, 5, 31
    assert int(in_memory(bundle.train).x[i, c, h, w]) == int(train_rows[i, c * 1024 + h * 32 + w])
    for c in range(3):
        np.testing.assert_array_equal(
            in_memory(bundle.train).x[:, c].numpy(),
            train_rows[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32),
        )
    np.testing.assert_array_equal(in_memory(bundle.val).x.reshape(6, -1).numpy(), test_rows)


def test_cifar10_root_may_be_the_batches_folder(tmp_path: Path) -> None:
    _, train_labels, _, _ = write_cifar(tmp_path)
    bundle = load("cifar10", root=str(tmp_path))
    assert bundle.train.y.tolist() == train_labels.tolist()


def test_cifar10_missing(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python\.tar\.gz"):
        load("cifar10", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"data\.root is not set"):
        load("cifar10")


class _Evil:
    """Unpickling this runs a shell command (if the unpickler lets it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (eval, ("1 + 1",))


def test_cifar10_refuses_malicious_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker), b"labels": [0]}
    with (tmp_path / "data_batch_2").open("wb") as handle:
        pickle.dump(payload, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing.*(posix|os|nt)\.system"):
        load("cifar10", root=str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        _EvalEvil(),
        np.array([1, "a"], dtype=object),  # object arrays could carry arbitrary objects
    ],
)
def test_restricted_unpickler_refuses_other_globals(tmp_path: Path, payload: Any) -> None:
    path = tmp_path / "p"
    path.write_bytes(pickle.dumps({b"data": payload}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        restricted_load(path)


def test_restricted_unpickler_refuses_non_latin1_codec(tmp_path: Path) -> None:
    path = tmp_path / "p"
    # GLOBAL _codecs.encode, then ("x", "zlib_codec"), REDUCE, STOP.
    path.write_bytes(b"c_codecs\nencode\n(X\x01\x00\x00\x00xX\n\x00\x00\x00zlib_codectR.")
    with pytest.raises(pickle.UnpicklingError, match="zlib_codec"):
        restricted_load(path)


def test_cifar10_bad_shape(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    content = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DatasetFormatError, match=r"\(N, 3072\), got uint8 \(2, 100\)"):
        load("cifar10", root=str(tmp_path))


# Bad CIFAR-10 files: each is a DatasetFormatError naming the file, on one line, and nothing
# in the file runs. (mutate the written data_batch_2, expected message)
_ABSURD = 2**50  # bytes declared: far more than any machine can allocate


def _forbidden_global(path: Path) -> None:
    payload = {b"data": _Evil(path.parent / "pwned"), b"labels": [0]}
    path.write_bytes(pickle.dumps(payload, protocol=2))


def _object_dtype(path: Path) -> None:
    payload = {b"data": np.array([1, "a"], dtype=object), b"labels": [0]}
    path.write_bytes(pickle.dumps(payload, protocol=2))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _absurd_bytes(path: Path) -> None:
    # PROTO 4, BINBYTES8 of 2**50 bytes, then 3 bytes: the C unpickler would allocate first.
    path.write_bytes(b"\x80\x04\x8e" + _ABSURD.to_bytes(8, "little") + b"abc")


def _absurd_frame(path: Path) -> None:
    # PROTO 4, FRAME of 2**50 bytes, EMPTY_DICT, MEMOIZE, STOP.
    path.write_bytes(b"\x80\x04\x95" + _ABSURD.to_bytes(8, "little") + b"}\x94.")


def _absurd_array(path: Path) -> None:
    # numpy's _reconstruct(ndarray, (2**50,), b"b"): numpy would allocate the array at once.
    path.write_bytes(
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01"
        + b"\x8a\x07"
        + _ABSURD.to_bytes(7, "little")
        + b"\x85C\x01b\x87R."
    )


class _FlaggedDtype:
    """Pickles as uint8 whose state sets the object flags (numpy would crash using it)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 63))


def _dtype_flags(path: Path) -> None:
    payload = {b"data": _FlaggedDtype(), b"labels": [0]}
    path.write_bytes(pickle.dumps(payload, protocol=2))


def _label_bomb(path: Path) -> None:
    # 200 kB on disk; np.asarray would make it 10**8 numbers.
    payload = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [list(range(1000))] * 100_000}
    path.write_bytes(pickle.dumps(payload, protocol=2))


BAD_CIFAR = {
    "forbidden_global": (_forbidden_global, r"refusing to load global (posix|os|nt)\.system"),
    "object_dtype": (_object_dtype, r"refusing to unpickle an object-dtype array"),
    "dtype_flags": (
        _dtype_flags,
        r"refusing the dtype state \(3, '\|', None, None, None, -1, -1, 63\)",
    ),
    "truncated": (_truncated, r"truncated or corrupt pickle"),
    "absurd_bytes": (
        _absurd_bytes,
        rf"BINBYTES8 at byte 2 declares {_ABSURD} bytes but only 3 remain",
    ),
    "absurd_frame": (_absurd_frame, rf"declares a frame of {_ABSURD} bytes .* file has 14 bytes"),
    "absurd_array": (_absurd_array, rf"array of shape \({_ABSURD},\) .* whole file \(73 bytes\)"),
    "label_bomb": (_label_bomb, r"b'labels' must be a list of integers, found a list in it"),
}


@pytest.mark.parametrize("case", sorted(BAD_CIFAR))
def test_bad_cifar10_files_are_format_errors(tmp_path: Path, case: str) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_2"
    mutate, message = BAD_CIFAR[case]
    mutate(path)
    with pytest.raises(DatasetFormatError, match=message) as info:
        load("cifar10", root=str(tmp_path))
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()
    # What refuses a global or an object array is still an UnpicklingError as before.
    unsafe = case in ("forbidden_global", "object_dtype", "dtype_flags")
    assert isinstance(info.value, UnsafePickleError) == unsafe
    assert isinstance(info.value, pickle.UnpicklingError) == unsafe


def _small_batch(protocol: int) -> bytes:
    # Small rows (not 3072 wide): the truncation test cuts the file at every byte.
    rows = np.arange(2 * 24, dtype=np.uint8).reshape(2, 24)
    return pickle.dumps({b"data": rows, b"labels": [3, 7], b"name": "b"}, protocol=protocol)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_load_reads_every_protocol_and_refuses_every_truncation(
    tmp_path: Path, protocol: int
) -> None:
    raw = _small_batch(protocol)
    path = tmp_path / "batch"
    path.write_bytes(raw)
    content = restricted_load(path)
    assert content[b"labels"] == [3, 7] and content[b"data"].sum() == sum(range(48))
    for cut in range(len(raw)):
        path.write_bytes(raw[:cut])
        with pytest.raises(DatasetFormatError, match=f"^{re.escape(str(path))}: "):
            restricted_load(path)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2, 4, 5]), st.data())
def test_restricted_load_of_a_corrupt_file_loads_or_is_a_format_error(
    tmp_path_factory: pytest.TempPathFactory, protocol: int, draw: st.DataObject
) -> None:
    raw = bytearray(_small_batch(protocol))
    for _ in range(draw.draw(st.integers(1, 3))):
        raw[draw.draw(st.integers(0, len(raw) - 1))] = draw.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("corrupt") / "batch"
    path.write_bytes(bytes(raw))
    try:
        restricted_load(path)
    except DatasetFormatError as err:  # anything else fails the test
        assert str(err).startswith(f"{path}: ") and "\n" not in str(err)


@pytest.mark.parametrize("case", ["forbidden_global", "absurd_bytes", "truncated"])
@pytest.mark.integration
def test_cli_bad_cifar10_file_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    write_cifar(tmp_path / "cifar")
    path = tmp_path / "cifar" / "data_batch_2"
    mutate, message = BAD_CIFAR[case]
    mutate(path)
    config = str(Path(__file__).resolve().parent.parent / "configs" / "cifar10_wrn16_4.yaml")
    argv = [sys.executable, "-m", "distgrow", "train", config, f"data.root={path.parent}",
            f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(rf"distgrow: error: {re.escape(str(path))}: .*{message}", lines[0])
    assert not (path.parent / "pwned").exists() and not (tmp_path / "run").exists()


def test_covtype_npz_of_objects_or_a_broken_zip_is_a_format_error(tmp_path: Path) -> None:
    features, labels = covtype_table(n=4)
    np.savez(tmp_path / "objects.npz", X=features.astype(object), y=labels)
    with pytest.raises(DatasetFormatError, match=r"objects\.npz: array 'X' holds Python .*pickle"):
        load("covtype", root=str(tmp_path / "objects.npz"))
    np.savez(tmp_path / "broken.npz", X=features, y=labels)
    raw = (tmp_path / "broken.npz").read_bytes()
    (tmp_path / "broken.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetFormatError, match=r"broken\.npz: not a readable NPZ"):
        load("covtype", root=str(tmp_path / "broken.npz"))


def _reference_crop_flip(image: np.ndarray, dy: int, dx: int, flip: bool, pad: int) -> np.ndarray:
    """The textbook version: pad with zeros, crop, then mirror."""
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    height, width = image.shape[1:]
    crop = padded[:, dy : dy + height, dx : dx + width]
    return crop[:, :, ::-1] if flip else crop


def test_cifar10_augmentation(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    bundle = load("cifar10", root=str(tmp_path), augment=True, seed=3)
    plain = load("cifar10", root=str(tmp_path), augment=False, seed=3)
    ds = bundle.train
    everything = torch.arange(len(ds))

    # Same (seed, epoch, index) -> same result, however the batch is split.
    x_all, y_all = ds.batch(everything, epoch=2)
    again, _ = ds.batch(everything, epoch=2)
    assert torch.equal(x_all, again)
    i, j = 13, 4
    pair, pair_y = ds.batch(torch.tensor([i, j]), epoch=2)
    single_i, _ = ds.batch(torch.tensor([i]), epoch=2)
    single_j, _ = ds.batch(torch.tensor([j]), epoch=2)
    assert torch.equal(pair, torch.cat([single_i, single_j]))
    assert torch.equal(pair, x_all[[i, j]]) and pair_y.tolist() == [int(y_all[i]), int(y_all[j])]
    parts = [ds.batch(chunk, epoch=2)[0] for chunk in torch.tensor_split(everything.flip(0), 3)]
    assert torch.equal(torch.cat(parts), x_all.flip(0))

    # Another epoch or seed augments differently (20 random images: all equal by chance
    # has probability 162**-20).
    assert not torch.equal(ds.batch(everything, epoch=3)[0], x_all)
    other_seed = load("cifar10", root=str(tmp_path), augment=True, seed=4)
    assert not torch.equal(other_seed.train.batch(everything, epoch=2)[0], x_all)

    # Each image equals pad-4 / crop / flip of the stored pixels, then normalisation.
    dy, dx, flip = transforms.crop_flip_params(3, 2, everything, 4)
    normalize = plain.train.transform
    assert normalize is not None
    for k in range(len(ds)):
        ref = _reference_crop_flip(
            in_memory(plain.train).x[k].numpy(), int(dy[k]), int(dx[k]), bool(flip[k]), 4
        )
        want = normalize(torch.from_numpy(ref.copy())[None], everything[k : k + 1], 2)
        assert torch.equal(x_all[k : k + 1], want), k

    # Validation is never augmented.
    assert torch.equal(bundle.val.batch(torch.arange(6))[0], plain.val.batch(torch.arange(6))[0])
    # An empty micro-batch (partial global batch) still works.
    empty_x, empty_y = ds.batch(torch.empty(0, dtype=torch.long), epoch=2)
    assert empty_x.shape == (0, 3, 32, 32) and empty_y.shape == (0,)


def test_crop_flip_params_cover_range() -> None:
    dy, dx, flip = transforms.crop_flip_params(0, 0, torch.arange(20000), 4)
    assert sorted(set(dy.tolist())) == list(range(9))
    assert sorted(set(dx.tolist())) == list(range(9))
    assert 0.47 < float(flip.float().mean()) < 0.53
    # dy and dx come from different bits: not the same draw.
    assert float((dy == dx).float().mean()) < 0.2


# ----------------------------------------------------------------------------- covtype


@pytest.mark.parametrize(
    ("filename", "header"),
    [("covtype.csv", False), ("covtype.csv", True), ("covtype.data.gz", False), ("c.data", True)],
)
def test_covtype_csv(tmp_path: Path, filename: str, header: bool) -> None:
    path = tmp_path / filename
    features, labels = write_covtype_csv(path, header=header)
    bundle = load("covtype", root=str(path), seed=7, val_fraction=0.25)
    assert bundle.num_classes == 7 and bundle.input_shape == (54,)
    assert (len(bundle.train), len(bundle.val)) == (30, 10)
    tx, ty, vx, vy = expected_tabular(features, labels - 1, 0.25, 7)
    assert in_memory(bundle.train).x.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    torch.testing.assert_close(in_memory(bundle.train).x, tx)
    torch.testing.assert_close(in_memory(bundle.val).x, vx)
    assert torch.equal(bundle.train.y, ty) and torch.equal(bundle.val.y, vy)
    assert sorted(torch.cat([bundle.train.y, bundle.val.y]).tolist()) == sorted(
        (labels - 1).tolist()
    )
    assert in_memory(bundle.train).x.mean(0).abs().max() < 1e-5


def test_covtype_npz_and_directory(tmp_path: Path) -> None:
    features, labels = covtype_table(n=21, seed=3)
    np.savez(tmp_path / "covtype.npz", X=features, y=labels.astype(np.int32))
    from_file = load("covtype", root=str(tmp_path / "covtype.npz"), seed=1)
    from_dir = load("covtype", root=str(tmp_path), seed=1)
    tx, ty, vx, vy = expected_tabular(features, labels - 1, 0.2, 1)
    for bundle in (from_file, from_dir):
        torch.testing.assert_close(in_memory(bundle.train).x, tx)
        torch.testing.assert_close(in_memory(bundle.val).x, vx)
        assert torch.equal(bundle.train.y, ty) and torch.equal(bundle.val.y, vy)


def test_covtype_bad_files(tmp_path: Path) -> None:
    features, labels = covtype_table(n=10)
    np.savez(tmp_path / "zero.npz", X=features, y=labels - 1)
    with pytest.raises(DatasetFormatError, match=r"1\.\.7.*found 0\.\.6.*add 1"):
        load("covtype", root=str(tmp_path / "zero.npz"))
    np.savez(tmp_path / "keys.npz", features=features, y=labels)
    with pytest.raises(DatasetFormatError, match=r"missing \['X'\]"):
        load("covtype", root=str(tmp_path / "keys.npz"))
    (tmp_path / "short.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DatasetFormatError, match="3 columns per line, expected 55"):
        load("covtype", root=str(tmp_path / "short.csv"))
    (tmp_path / "covtype.txt").write_text("x")
    with pytest.raises(ValueError, match="not one of"):
        load("covtype", root=str(tmp_path / "covtype.txt"))


def test_covtype_missing_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty data_home and download=False: scikit-learn stops before any network access.
    with pytest.raises(DatasetNotFoundError, match=r"data\.download=true") as info:
        load("covtype", root=str(tmp_path))
    assert "covertype" in str(info.value) and "data.root" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load("covtype", root=str(tmp_path / "missing.csv"))
    # Default root: scikit-learn's cache (pointed at tmp so nothing is created in $HOME).
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sk"))
    with pytest.raises(DatasetNotFoundError, match=r"data\.download"):
        load("covtype")


def test_covtype_download_flag_and_network_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sklearn.datasets

    seen: dict[str, Any] = {}

    def no_network(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sklearn.datasets, "fetch_covtype", no_network)
    with pytest.raises(DatasetNotFoundError, match="no network"):
        load("covtype", root=str(tmp_path), download=True)
    assert seen["download_if_missing"] is True and seen["data_home"] == str(tmp_path)

    features, labels = covtype_table(n=15)

    def cached(**kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        return features, labels.astype(np.int32)

    monkeypatch.setattr(sklearn.datasets, "fetch_covtype", cached)
    bundle = load("covtype", root=str(tmp_path))
    assert len(bundle.train) + len(bundle.val) == 15
    assert sorted(torch.cat([bundle.train.y, bundle.val.y]).tolist()) == sorted(
        (labels - 1).tolist()
    )


# ----------------------------------------------------------------------------- ionosphere


def write_ionosphere(path: Path, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    features = rng.uniform(-1, 1, (n, 34)).round(5)
    features[:, 1] = 0.0  # the real file has a constant column
    labels = np.array([1 if i % 3 else 0 for i in range(n)])
    lines = [
        ",".join(f"{v:g}" for v in row) + ("," + ("g" if lab else "b"))
        for row, lab in zip(features, labels, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n\n")
    return features, labels


def test_ionosphere(tmp_path: Path) -> None:
    features, labels = write_ionosphere(tmp_path / "ionosphere.data")
    for root in (tmp_path, tmp_path / "ionosphere.data"):
        bundle = load("ionosphere", root=str(root), val_fraction=0.25, seed=2)
        assert bundle.num_classes == 2 and bundle.input_shape == (34,)
        assert (len(bundle.train), len(bundle.val)) == (9, 3)
        tx, ty, vx, vy = expected_tabular(features, labels, 0.25, 2)
        torch.testing.assert_close(in_memory(bundle.train).x, tx)
        torch.testing.assert_close(in_memory(bundle.val).x, vx)
        assert torch.equal(bundle.train.y, ty) and torch.equal(bundle.val.y, vy)
        assert torch.all(in_memory(bundle.train).x[:, 1] == 0)  # constant column: centred, not NaN


def test_ionosphere_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"ionosphere\.data"):
        load("ionosphere", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"data\.root is not set"):
        load("ionosphere")
    (tmp_path / "ionosphere.data").write_text(",".join(["0"] * 34) + ",x\n")
    with pytest.raises(DatasetFormatError, match=r"line 1: label 'x'"):
        load("ionosphere", root=str(tmp_path))


# ----------------------------------------------------------------------------- sklearn sets


@pytest.mark.parametrize(
    ("name", "total", "features", "classes"),
    [
        ("digits", 1797, 64, 10),
        ("breast_cancer", 569, 30, 2),
        ("wine", 178, 13, 3),
        ("iris", 150, 4, 3),
    ],
)
def test_sklearn_sets(name: str, total: int, features: int, classes: int) -> None:
    bundle = load(name, seed=1)
    assert len(bundle.train) + len(bundle.val) == total
    assert len(bundle.val) == round(total * 0.2)
    assert bundle.input_shape == (features,) and bundle.num_classes == classes
    assert in_memory(bundle.train).x.dtype == torch.float32 and bundle.train.y.dtype == torch.int64
    all_labels = torch.cat([bundle.train.y, bundle.val.y])
    assert sorted(set(all_labels.tolist())) == list(range(classes))
    std = in_memory(bundle.train).x.std(0, unbiased=False)
    assert in_memory(bundle.train).x.mean(0).abs().max() < 1e-4
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))
    assert not torch.equal(load(name, seed=2).train.y, bundle.train.y)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_classification() -> None:
    bundle = load("synthetic_classification", synthetic_samples=1000, synthetic_features=8, seed=3)
    assert (
        bundle.num_classes == 10 and bundle.input_shape == (8,) and bundle.task == "classification"
    )
    assert (len(bundle.train), len(bundle.val)) == (800, 200)
    labels = torch.cat([bundle.train.y, bundle.val.y])
    assert torch.bincount(labels).tolist() == [100] * 10
    same = load("synthetic_classification", synthetic_samples=1000, synthetic_features=8, seed=3)
    assert torch.equal(in_memory(same.train).x, in_memory(bundle.train).x) and torch.equal(
        same.val.y, bundle.val.y
    )
    other = load("synthetic_classification", synthetic_samples=1000, synthetic_features=8, seed=4)
    assert not torch.equal(in_memory(other.train).x, in_memory(bundle.train).x)
    # Learnable: nearest class mean of the training split classifies validation well.
    means = torch.stack([in_memory(bundle.train).x[bundle.train.y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(in_memory(bundle.val).x, means).argmin(1)
    assert float((predicted == bundle.val.y).float().mean()) > 0.6


def test_synthetic_regression() -> None:
    bundle = load("synthetic_regression", synthetic_samples=600, synthetic_features=5)
    assert bundle.num_classes == 0 and bundle.task == "regression"
    assert bundle.train.y.dtype == torch.float32 and bundle.train.y.shape == (480,)
    # A linear teacher plus noise of std 0.1: least squares explains nearly all variance.
    design = torch.cat([in_memory(bundle.train).x, torch.ones(480, 1)], 1).double()
    solution = torch.linalg.lstsq(design, bundle.train.y.double()[:, None]).solution
    residual = bundle.train.y.double() - (design @ solution)[:, 0]
    r2 = 1 - residual.var() / bundle.train.y.double().var()
    assert float(r2) > 0.95


# ----------------------------------------------------------------------------- load_dataset


def test_limits_keep_first_samples_after_split() -> None:
    full = load("digits", seed=5)
    small = load("digits", seed=5, limit_train=10, limit_val=3)
    assert (len(small.train), len(small.val)) == (10, 3)
    assert torch.equal(in_memory(small.train).x, in_memory(full.train).x[:10])
    assert torch.equal(small.val.y, full.val.y[:3])
    assert len(load("iris", limit_train=10_000).train) == 120


def test_split_is_disjoint_and_seeded() -> None:
    train, val = splits.seeded_split(100, 0.3, seed=9)
    assert len(val) == 30 and sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again = splits.seeded_split(100, 0.3, seed=9)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, splits.seeded_split(100, 0.3, seed=10)[1])


def test_load_dataset_argument_errors() -> None:
    # An unknown name is refused as the data section is built, before anything loads.
    with pytest.raises(ConfigError, match=r"'imagenet': unknown data set\. .*fashion_mnist.*iris"):
        load("imagenet")
    with pytest.raises(ConfigError, match=r"'cifar': unknown data set\. Fix: did you mean cifar10"):
        load("cifar")
    with pytest.raises(ValueError, match="no augmentation is defined for 'iris'"):
        load("iris", augment=True)
    assert load("Breast-Cancer").name == "breast_cancer"
    assert set(DATASETS) >= {"fashion_mnist", "covtype", "synthetic_regression"}


def test_ranges_are_checked_once_by_the_config() -> None:
    # load_dataset takes the data section whole and validated; the ranges live in DataConfig.
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match=r"data\.val_fraction = .* must be in \(0, 1\)"):
            DataConfig(name="iris", val_fraction=bad).validate()
    with pytest.raises(ConfigError, match=r"data\.limit_train = 0: must be positive"):
        DataConfig(name="iris", limit_train=0).validate()


def test_config_knows_the_same_names_as_the_readers() -> None:
    assert DATA_NAMES == DATASETS
    for name in DATASETS:
        DataConfig(name=name).validate()
    DataConfig(name="Fashion-MNIST").validate()  # spelt as load_dataset reads it


def test_plan_names_a_misspelled_data_set(capsys: pytest.CaptureFixture[str]) -> None:
    from distgrow import cli

    config = str(Path(__file__).resolve().parent.parent / "configs" / "cifar10_wrn16_4.yaml")
    for extra in ([], ["data.size=1000"]):  # a given size does not hide the misspelling
        code = cli.main(["plan", config, "data.name=cifar", *extra])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", out
        assert err == (
            "distgrow: config error: data.name = 'cifar': unknown data set. Fix: did you mean "
            f"cifar10? use one of {', '.join(DATASETS)}.\n"
        )


@pytest.mark.parametrize(
    ("name", "near"),
    [("cifar", "did you mean cifar10\\?"), ("fashion-mnst", "did you mean fashion_mnist"),
     ("svhn", "Fix: use one of fashion_mnist, mnist"),
     # ImageNet is read as an image folder now: the nearest name says so
     ("imagenet", "did you mean image_folder\\?")],
)  # fmt: skip
def test_a_misspelled_name_is_a_config_error(name: str, near: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.name = '{name}': unknown data set\. .*{near}"):
        DataConfig(name=name).validate()


def test_array_dataset() -> None:
    ds = ArrayDataset(torch.arange(10.0)[:, None], torch.arange(10))
    x, y = ds.batch(torch.tensor([3, 1]))
    assert x[:, 0].tolist() == [3.0, 1.0] and y.tolist() == [3, 1] and len(ds) == 10
    assert ds.batch(torch.tensor([2], dtype=torch.int32))[1].tolist() == [2]
    with pytest.raises(ValueError, match="x has 3 samples but y has 2"):
        ArrayDataset(torch.zeros(3, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        ds.batch(torch.tensor([1.0]))


# ----------------------------------------------------------------------------- epoch order


def test_epoch_permutation() -> None:
    perm = epoch_permutation(1000, seed=1, epoch=0)
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(1000))
    assert torch.equal(perm, epoch_permutation(1000, seed=1, epoch=0))
    assert not torch.equal(perm, epoch_permutation(1000, seed=1, epoch=1))
    assert not torch.equal(perm, epoch_permutation(1000, seed=2, epoch=0))
    # Documented seeding, so any process can reproduce it.
    generator = torch.Generator().manual_seed(1 * 1_000_003 + 0)
    assert torch.equal(perm, torch.randperm(1000, generator=generator))
    assert epoch_permutation(0, 0, 0).numel() == 0
    assert sorted(epoch_permutation(50, seed=-3, epoch=2).tolist()) == list(range(50))
    with pytest.raises(ValueError, match="n = -1"):
        epoch_permutation(-1, 0, 0)


# ----------------------------------------------------------------------------- sharding


def test_shard_full_batch_example() -> None:
    indices = torch.arange(100, 108)
    rank0 = shard_global_batch(indices, workers=2, micro_batch=2, accum_steps=2, rank=0)
    rank1 = shard_global_batch(indices, workers=2, micro_batch=2, accum_steps=2, rank=1)
    assert [m.tolist() for m in rank0] == [[100, 101], [104, 105]]
    assert [m.tolist() for m in rank1] == [[102, 103], [106, 107]]


def test_shard_partial_batch_example() -> None:
    indices = torch.arange(5)
    kw: dict[str, int] = {"workers": 2, "accum_steps": 2}
    got = [shard_global_batch(indices, micro_batch=4, rank=r, **kw) for r in (0, 1)]
    assert [[m.tolist() for m in ms] for ms in got] == [[[0, 1], [4]], [[2, 3], []]]
    got = [shard_global_batch(indices, micro_batch=4, rank=r, align=4, **kw) for r in (0, 1)]
    assert [[m.tolist() for m in ms] for ms in got] == [[[0, 1, 2, 3], []], [[4], []]]


def test_shard_errors() -> None:
    idx = torch.arange(9)
    with pytest.raises(ValueError, match=r"9 samples exceeds .* 2 × 2 × 2 = 8"):
        shard_global_batch(idx, workers=2, micro_batch=2, accum_steps=2, rank=0)
    with pytest.raises(ValueError, match="rank = 2 is out of range for workers = 2"):
        shard_global_batch(idx[:4], workers=2, micro_batch=2, accum_steps=2, rank=2)
    with pytest.raises(ValueError, match="rank = -1"):
        shard_global_batch(idx[:4], workers=2, micro_batch=2, accum_steps=2, rank=-1)
    with pytest.raises(ValueError, match="micro_batch = 6 is not a multiple of align = 4"):
        shard_global_batch(idx[:4], workers=1, micro_batch=6, accum_steps=1, rank=0, align=4)
    with pytest.raises(ValueError, match="empty global batch"):
        shard_global_batch(idx[:0], workers=1, micro_batch=2, accum_steps=1, rank=0)
    with pytest.raises(ValueError, match="accum_steps = 0 must be >= 1"):
        shard_global_batch(idx[:1], workers=1, micro_batch=2, accum_steps=0, rank=0)


@st.composite
def shard_cases(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    workers = draw(st.integers(1, 8))
    accum = draw(st.integers(1, 6))
    align = draw(st.sampled_from([1, 1, 2, 4, 8]))
    micro = align * draw(st.integers(1, 6))
    full = workers * accum * micro
    n = draw(st.one_of(st.just(full), st.integers(1, full)))
    return workers, accum, micro, align, n


@settings(max_examples=300, deadline=None)
@given(shard_cases(), st.integers(0, 10_000))
def test_shard_property(case: tuple[int, int, int, int, int], offset: int) -> None:
    workers, accum, micro, align, n = case
    indices = torch.randperm(n) + offset
    per_rank = [
        shard_global_batch(
            indices, workers=workers, micro_batch=micro, accum_steps=accum, rank=r, align=align
        )
        for r in range(workers)
    ]
    assert all(len(ms) == accum for ms in per_rank)
    # Micro-batch k = step k // workers of rank k % workers; in order they rebuild the batch.
    chunks = [per_rank[k % workers][k // workers] for k in range(workers * accum)]
    assert torch.equal(torch.cat(chunks), indices)
    size = micro if n == workers * accum * micro else None
    start = 0
    for chunk in chunks:
        assert len(chunk) <= micro
        if len(chunk):
            assert start % align == 0
        if size is not None:
            assert len(chunk) == size
        start += len(chunk)
    # Non-empty chunks all have the same size except the last non-empty one.
    lengths = [len(c) for c in chunks if len(c)]
    assert len(set(lengths[:-1])) <= 1 and lengths[-1] <= lengths[0]
    if n < workers * accum * micro:
        expected = math.ceil(math.ceil(n / (workers * accum)) / align) * align
        assert lengths[0] == min(expected, n)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 32), st.sampled_from([1, 2, 4]))
def test_shard_same_chunks_for_any_split_of_workers_and_accumulation(
    micro_units: int, partial: int, align: int
) -> None:
    # (w=1, a=4), (w=2, a=2) and (w=4, a=1) must see the same micro-batches.
    micro = micro_units * align
    full = 4 * micro
    for n in (full, min(partial, full)):
        indices = torch.arange(n) * 3
        seen = []
        for workers, accum in ((1, 4), (2, 2), (4, 1)):
            chunks: list[list[int]] = [[] for _ in range(4)]
            for rank in range(workers):
                shards = shard_global_batch(
                    indices,
                    workers=workers,
                    micro_batch=micro,
                    accum_steps=accum,
                    rank=rank,
                    align=align,
                )
                for step, shard in enumerate(shards):
                    chunks[step * workers + rank] = shard.tolist()
            seen.append(chunks)
        assert seen[0] == seen[1] == seen[2]


@pytest.mark.parametrize(
    ("name", "val_fraction"),
    [("digits", 0.2), ("breast_cancer", 0.33), ("wine", 0.25), ("iris", 0.1),
     ("synthetic_classification", 0.2), ("synthetic_regression", 0.5)],
)  # fmt: skip
def test_planner_size_table_matches_the_loader(name: str, val_fraction: float) -> None:
    """`distgrow plan` sizes N without loading: it must agree with what training loads."""
    bundle = load(name, val_fraction=val_fraction, synthetic_samples=999)
    cfg = DataConfig(name=name, val_fraction=val_fraction, synthetic_samples=999)
    assert cfg.expected_train_size() == len(bundle.train)


def test_a_pointwise_transform_is_applied_once_and_gives_the_same_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distgrow.data import containers
    from distgrow.data.transforms import Compose, NormalizeImages, RandomCropFlip

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=gen)
    y = torch.arange(50) % 10
    normalize = NormalizeImages([0.3], [0.35])
    idx = torch.tensor([49, 0, 7, -1, 7])
    by_batch = normalize(x[idx % 50], idx % 50, 0)  # what a per-batch transform gives
    kept = containers.ArrayDataset(x, y, normalize)
    got, labels = kept.batch(idx, epoch=2)
    copy = kept.transformed()
    assert copy is not None and copy.shape == (50, 1, 6, 6)
    assert torch.equal(got, by_batch)  # bit for bit, not close
    assert labels.tolist() == [9, 0, 7, 9, 7]
    # Over the budget: no copy, the same rows from the per-batch path.
    monkeypatch.setattr(containers, "TRANSFORMED_COPY_MAX_BYTES", 50 * 36 * 4 - 1)
    over = containers.ArrayDataset(x, y, normalize)
    assert torch.equal(over.batch(idx, epoch=2)[0], by_batch) and over.transformed() is None
    # Augmentation depends on the index and the epoch: never transformed ahead.
    augmented = containers.ArrayDataset(x, y, Compose(RandomCropFlip(0, 1, True), normalize))
    assert augmented.transformed() is None
    assert not augmented.batch(idx, epoch=1)[0].equal(augmented.batch(idx, epoch=2)[0])
