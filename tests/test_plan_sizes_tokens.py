"""`distgrow plan` counts ``data.name: tokens`` and ``text`` without ``data.size``.

The count (:meth:`DataConfig.expected_train_size`) comes from the files' headers and sizes
through the loader's own split, so it equals ``len(load_dataset(cfg, seed=s).train)`` for
token files of each layout (uint16 / uint32 ``.bin``, ``.npy``), for text, with and without
``data.val_path``, with ``data.limit_train`` and for several seeds (the held-out blocks follow
the seed, and the file's last block is short); a sparse 10^12-byte token file counts without a
byte of its ids read; a missing file is a one-line error naming the path and the fix.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distgrow.config import ConfigError, DataConfig
from distgrow.data import load_dataset
from distgrow.data.readers import tokens as tokens_reader


def _bin(path: Path, ids: np.ndarray, dtype: str) -> str:
    ids.astype(dtype).tofile(path)
    side = {"dtype": dtype, "vocab_size": 70_000} if dtype == "uint32" else {"vocab_size": 500}
    path.with_name(path.name + ".json").write_text(json.dumps(side))
    return str(path)


def _agree(cfg: DataConfig, seed: int) -> int:
    n = cfg.expected_train_size(seed)
    assert n == len(load_dataset(cfg, seed=seed).train)
    return n


# 83 windows of 8 + 1 ids: 6 blocks of 16, the last of 3; val_fraction 0.2 holds out one block.
SEQ_LEN = 8
WINDOWS = 83


@pytest.mark.parametrize("layout", ["uint16.bin", "uint32.bin", "uint32.npy"])
def test_token_count_is_what_the_loader_loads(tmp_path: Path, layout: str) -> None:
    dtype, suffix = layout.split(".")
    ids = np.arange(WINDOWS * (SEQ_LEN + 1) + 5) % 400 + (66_000 if dtype == "uint32" else 0)
    path = tmp_path / f"train.{suffix}"
    if suffix == "npy":
        np.save(path, ids.astype(dtype))
    else:
        _bin(path, ids, dtype)
    base: dict[str, Any] = {"name": "tokens", "path": str(path), "seq_len": SEQ_LEN}
    counts = {
        _agree(DataConfig(**base, val_fraction=0.2), seed) for seed in range(10)
    }  # the short last block held out (83 - 3) or a full one (83 - 16), as the seed says
    assert counts == {WINDOWS - 3, WINDOWS - 16}
    assert _agree(DataConfig(**base, val_fraction=0.2, limit_train=50), 3) == 50
    assert _agree(DataConfig(**base, val_fraction=0.2, limit_train=500), 3) in counts

    val = tmp_path / f"val.{suffix}"
    if suffix == "npy":
        np.save(val, ids[: 3 * (SEQ_LEN + 1)].astype(dtype))
    else:
        _bin(val, ids[: 3 * (SEQ_LEN + 1)], dtype)
    with_val = DataConfig(**base, val_path=str(val))
    assert _agree(with_val, 0) == _agree(with_val, 5) == WINDOWS  # all of data.path trains
    assert _agree(DataConfig(**base, val_path=str(val), limit_train=7), 0) == 7


def test_text_count_is_what_the_loader_loads(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    # 2 read files of 700 + 3 bytes and one the loader skips (.md): 703 // 9 = 78 windows,
    # 5 blocks of 16, the last of 14.
    (folder / "a.py").write_bytes(b"x = 1\n" * 100 + b"#" * 100)
    (folder / "b.txt").write_bytes(b"abc")
    (folder / "skip.md").write_bytes(b"y" * 5000)
    base: dict[str, Any] = {"name": "text", "path": str(folder), "seq_len": SEQ_LEN}
    counts = {_agree(DataConfig(**base, val_fraction=0.2), seed) for seed in range(12)}
    assert counts == {78 - 14, 78 - 16}
    assert _agree(DataConfig(**base, limit_train=20), 1) == 20
    val = tmp_path / "val.txt"
    val.write_bytes(b"v" * 30)
    assert _agree(DataConfig(**base, val_path=str(val)), 0) == 78
    assert _agree(DataConfig(**base, val_path=str(val), limit_train=40), 0) == 40
    one_file = DataConfig(name="text", path=str(folder / "a.py"), seq_len=SEQ_LEN)
    assert _agree(one_file, 2) in {700 // 9 - 16, 700 // 9 - 13}


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_a_sparse_terabyte_token_file_counts_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.bin"
    with path.open("wb") as f:
        os.truncate(f.fileno(), 10**12)  # sparse: no disk used
    path.with_name("huge.bin.json").write_text('{"vocab_size": 50304}')
    cfg = DataConfig(name="tokens", path=str(path), seq_len=1023, val_fraction=0.01)
    cfg.expected_train_size(0)  # warm: imports, the page of the header
    before, start = _bytes_read(), time.perf_counter()
    n = cfg.expected_train_size(7)
    took, read = time.perf_counter() - start, _bytes_read() - before
    windows = 10**12 // 2 // 1024
    block = -(-windows // tokens_reader.MAX_BLOCKS)
    held = round(-(-windows // block) * 0.01)
    assert windows - held * block <= n <= windows - (held - 1) * block
    assert read < 1 << 16, f"{read} bytes read to count"
    assert took < 0.5, f"counting took {took:.3f} s"
    assert n == len(load_dataset(cfg, seed=7).train)  # the windows, not their ids


def test_a_missing_file_says_where_and_how_to_make_it(tmp_path: Path) -> None:
    gone = tmp_path / "runs/tokens/code.bin"
    cfg = DataConfig(name="tokens", path=str(gone), seq_len=256)
    with pytest.raises(ConfigError) as err:
        cfg.expected_train_size()
    message = str(err.value)
    assert "\n" not in message and str(gone) in message
    assert "scripts/lm_corpora.sh" in message and "data.size=N" in message
    assert DataConfig(name="tokens", path=str(gone), seq_len=256, size=9).expected_train_size() == 9
    with pytest.raises(ConfigError, match=r"no such|neither a file nor a folder"):
        DataConfig(name="text", path=str(tmp_path / "none"), seq_len=8).expected_train_size()


LM_SMALL = str(Path(__file__).resolve().parent.parent / "configs" / "lm_small.yaml")


def test_plan_counts_the_token_file_of_the_run_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distgrow.cli import main

    path = _bin(tmp_path / "code.bin", np.arange(WINDOWS * (SEQ_LEN + 1)) % 400, "uint16")
    plan = ["plan", LM_SMALL, "data.size=null", "data.limit_train=null", f"data.path={path}"]
    sizes = {}
    for seed in (0, 8):  # seed 0 holds out a full block, seed 8 the short last one
        argv = [*plan, f"data.seq_len={SEQ_LEN}", "data.val_fraction=0.2", "schedule.warmup=0"]
        argv.append(f"run.seed={seed}")
        assert main([*argv, "--json"]) == 0
        sizes[seed] = json.loads(capsys.readouterr().out)["dataset_size"]
    assert sizes == {0: WINDOWS - 16, 8: WINDOWS - 3}

    assert main([*plan[:4], f"data.path={tmp_path / 'not_made.bin'}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "not_made.bin" in err and "scripts/lm_corpora.sh" in err and "data.size=N" in err
