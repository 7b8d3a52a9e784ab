"""Token files larger than memory (``data.name: tokens``) and the on-the-fly epoch order.

* :class:`FeistelPermutation` is a bijection of ``range(n)`` for every n, a pure function of
  ``(n, seed, epoch)``, and costs O(batch) per slice (10^9 windows);
* the reader cuts a ``.bin`` / ``.npy`` of uint16 / uint32 ids into the windows and targets a
  plain slice gives, holds out whole blocks (or reads ``data.val_path``), and says what is
  wrong with a bad file in one line;
* ``scripts/make_tokens.py`` writes byte-level ids, or a byte-level BPE trained on the files;
* training on a token file: mid-epoch resume ends where a straight run does, 1 × 4 and 2 × 2
  realise the same updates, and a file larger than the process may allocate trains with a
  flat resident set.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distgrow.config import DataConfig
from distgrow.data import epoch_order, epoch_permutation, load_dataset
from distgrow.data.containers import DatasetFormatError, DatasetNotFoundError
from distgrow.data.order import ON_THE_FLY_MIN_SAMPLES, FeistelPermutation
from distgrow.data.readers.tokens import MAX_BLOCKS, TokenWindows

REPO = Path(__file__).resolve().parent.parent


def _make_tokens() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tokens", REPO / "scripts/make_tokens.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the order ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(-(2**63), 2**64), epoch=st.integers(0, 10**6))
def test_feistel_is_a_bijection_of_range_n(n: int, seed: int, epoch: int) -> None:
    perm = FeistelPermutation(n, seed, epoch)
    whole = perm[0:n]
    assert whole.dtype == torch.int64 and len(perm) == n
    assert torch.equal(torch.sort(whole).values, torch.arange(n))
    # Any slice is the same entries as the whole, computed alone (what a rank asks for).
    a, b = n // 3, n // 3 + 7
    assert torch.equal(perm[a:b], whole[a:b])
    if n:
        assert perm[n - 1] == perm[-1] == int(whole[-1])


def test_feistel_is_a_pure_function_of_seed_and_epoch_and_shuffles() -> None:
    n = 100_000
    first = FeistelPermutation(n, 3, 0)[0:n]
    assert torch.equal(first, FeistelPermutation(n, 3, 0)[0:n])  # another "rank"
    assert not torch.equal(first, FeistelPermutation(n, 3, 1)[0:n])
    assert not torch.equal(first, FeistelPermutation(n, 4, 0)[0:n])
    # Shuffled, not a shifted identity: consecutive entries are far apart, and an entry is as
    # likely above as below its position.
    gaps = (first[1:] - first[:-1]).abs().double()
    assert gaps.median() > n / 5
    assert abs(float((first > torch.arange(n)).double().mean()) - 0.5) < 0.01
    # Positions' order is uncorrelated with the entries' (Spearman's rho near 0).
    rho = np.corrcoef(np.arange(n), first.numpy())[0, 1]
    assert abs(rho) < 0.02


def test_a_billion_windows_cost_a_batch_not_an_epoch() -> None:
    n = 10**9
    perm = FeistelPermutation(n, seed=0, epoch=0)
    batch = perm[123_456_789 : 123_456_789 + 4096]
    assert batch.shape == (4096,) and int(batch.min()) >= 0 and int(batch.max()) < n
    assert len(set(batch.tolist())) == 4096
    # The object is a handful of keys, not n entries.
    assert sys.getsizeof(perm.__dict__) < 10_000 and len(perm._keys) == 6


def test_epoch_order_is_randperm_below_the_threshold_and_feistel_above_or_when_asked() -> None:
    small = epoch_order(1000, 1, 2)
    assert isinstance(small, torch.Tensor) and torch.equal(small, epoch_permutation(1000, 1, 2))
    asked = epoch_order(1000, 1, 2, on_the_fly=True)
    assert isinstance(asked, FeistelPermutation)
    assert torch.equal(asked[0:1000], FeistelPermutation(1000, 1, 2)[0:1000])
    big = epoch_order(ON_THE_FLY_MIN_SAMPLES, 1, 2)
    assert isinstance(big, FeistelPermutation) and len(big) == ON_THE_FLY_MIN_SAMPLES


# -- the reader --------------------------------------------------------------------------------


def _ids(n: int, vocab: int = 251) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7 % vocab).astype(np.uint16)


@pytest.mark.parametrize("layout", ["bin", "npy16", "npy32", "bin32"])
def test_windows_and_targets_are_slices_of_the_file(tmp_path: Path, layout: str) -> None:
    # Id i at position i (+ 70 000 for uint32), so a window is known by its first id.
    base = 70_000 if layout == "bin32" else 0
    ids = np.arange(40_000, dtype=np.uint32) + base
    path = tmp_path / ("t.npy" if layout.startswith("npy") else "t.bin")
    if layout == "bin":
        ids.astype(np.uint16).tofile(path)
    elif layout == "bin32":
        ids.tofile(path)
        (tmp_path / "t.bin.json").write_text(json.dumps({"dtype": "uint32"}))
    else:
        np.save(path, ids.astype(np.uint16 if layout == "npy16" else np.uint32))
    seq = 15
    bundle = load_dataset(DataConfig(name="tokens", path=str(path), seq_len=seq), seed=5)
    train, val = bundle.train, bundle.val
    assert isinstance(train, TokenWindows) and isinstance(val, TokenWindows)
    assert bundle.num_classes == base + 40_000 and bundle.input_shape == (seq,)
    windows = 40_000 // (seq + 1)
    assert len(train) + len(val) == windows
    seen: list[int] = []
    for part in (train, val):
        x, y = part.batch(torch.arange(len(part)))
        assert x.dtype == y.dtype == torch.int64 and x.shape == (len(part), seq)
        first = x[:, :1] - base
        assert torch.equal(first % (seq + 1), torch.zeros_like(first))
        assert torch.equal(x, x[:, :1] + torch.arange(seq))
        assert torch.equal(y, x + 1)
        seen += (first[:, 0] // (seq + 1)).tolist()
    assert sorted(seen) == list(range(windows))  # every window once, in one split only
    # A batch is the rows of its indices, in their order (negative ones from the end).
    x, _ = train.batch(torch.tensor([3, 0, -1]))
    whole, _ = train.batch(torch.arange(len(train)))
    assert torch.equal(x, whole[[3, 0, len(train) - 1]])
    assert train.batch(torch.zeros(0, dtype=torch.long))[0].shape == (0, seq)


def test_held_out_blocks_are_whole_seeded_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(2_000_000, dtype=np.uint32).astype(np.uint16).tofile(path)  # ids 0..65535
    cfg = DataConfig(name="tokens", path=str(path), seq_len=7, val_fraction=0.1)
    a, b = load_dataset(cfg, seed=1), load_dataset(cfg, seed=2)
    assert isinstance(a.train, TokenWindows) and isinstance(a.val, TokenWindows)
    assert isinstance(b.val, TokenWindows)
    windows = 2_000_000 // 8
    block = math.ceil(windows / MAX_BLOCKS)
    assert len(a.train.starts) + len(a.val.starts) == math.ceil(windows / block) <= MAX_BLOCKS
    assert len(a.val) == pytest.approx(0.1 * windows, rel=0.01)
    assert set(a.val.starts.tolist()).isdisjoint(a.train.starts.tolist())
    assert not np.array_equal(a.val.starts, b.val.starts)  # the seed picks the blocks
    assert all(s % block == 0 for s in a.val.starts.tolist())
    # The placeholders hold no memory: one byte behind a (windows, seq_len) shape.
    assert a.train.x.shape == (len(a.train), 7) and a.train.x.untyped_storage().nbytes() == 1


def test_val_path_and_limits(tmp_path: Path) -> None:
    _ids(10_000).tofile(tmp_path / "train.bin")
    _ids(3_000, vocab=300).tofile(tmp_path / "val.bin")
    cfg = DataConfig(
        name="tokens",
        path=str(tmp_path / "train.bin"),
        val_path=str(tmp_path / "val.bin"),
        seq_len=9,
        limit_val=100,
    )
    bundle = load_dataset(cfg)
    assert (len(bundle.train), len(bundle.val)) == (1000, 100)
    assert bundle.num_classes == 300  # the largest id of either file + 1
    x, _ = bundle.val.batch(torch.tensor([1]))
    assert x.tolist() == [_ids(3_000, vocab=300)[10:19].astype(int).tolist()]
    (tmp_path / "train.bin.json").write_text(json.dumps({"vocab_size": 50_000}))
    assert load_dataset(cfg).num_classes == 50_000  # stated: trusted, no pass over the file


@pytest.mark.parametrize(
    ("setup", "options", "error", "message"),
    [
        (None, {}, DatasetNotFoundError, r"data\.path .*nothing\.bin is not a file"),
        ("odd", {}, DatasetFormatError, r"has 20001 bytes, not a whole number of uint16 ids"),
        ("npy2d", {}, DatasetFormatError, r"a token file is 1-D uint16 or uint32"),
        ("json", {}, DatasetFormatError, r"says dtype 'int8'; a token file holds uint16"),
        ("ok", {"seq_len": None}, ValueError, r"data\.seq_len is null"),
        ("ok", {"feed": "loader"}, ValueError, r"data\.feed = 'loader' .*set data\.feed=auto"),
        ("short", {}, DatasetFormatError, r"need 2 or more to hold one out"),
    ],
)
def test_bad_token_files_are_one_line(
    tmp_path: Path,
    setup: str | None,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    path = tmp_path / ("t.npy" if setup == "npy2d" else "t.bin")
    if setup == "odd":
        path.write_bytes(b"\0" * 20_001)
    elif setup == "npy2d":
        np.save(path, np.zeros((4, 4), dtype=np.uint16))
    elif setup == "json":
        _ids(100).tofile(path)
        (tmp_path / "t.bin.json").write_text('{"dtype": "int8"}')
    elif setup == "short":
        _ids(100).tofile(path)
    elif setup == "ok":
        _ids(10_000).tofile(path)
    where = path if setup else tmp_path / "nothing.bin"
    cfg = DataConfig(**{"name": "tokens", "path": str(where), "seq_len": 8, **options})
    with pytest.raises(error, match=message) as caught:
        load_dataset(cfg)
    assert "\n" not in str(caught.value)


# -- make_tokens -------------------------------------------------------------------------------


def test_make_tokens_bytes_writes_each_byte_as_its_id(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello \xff\n")
    (tmp_path / "b.py").write_text("print(1)\n")
    (tmp_path / "skip.md").write_text("not read")
    out = tmp_path / "out" / "t.bin"
    assert _make_tokens().main([str(tmp_path), "--out", str(out), "--tokenizer", "bytes"]) == 0
    assert np.fromfile(out, dtype=np.uint16).tolist() == list(b"hello \xff\nprint(1)\n")
    meta = json.loads((tmp_path / "out" / "t.bin.json").read_text())
    assert meta == {"dtype": "uint16", "vocab_size": 256, "tokens": 17, "tokenizer": "bytes",
                    "files": 2}  # fmt: skip


def test_make_tokens_bpe_trains_on_the_corpus_and_round_trips(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers (pip install '.[tokens]')")
    corpus = tmp_path / "corpus.txt"
    text = "".join(f"def function_{i}(value):\n    return value * {i}\n" for i in range(400))
    corpus.write_text(text + "naïve café\n")
    out = tmp_path / "t.bin"
    make = _make_tokens()
    assert (
        make.main([str(corpus), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "600"])
        == 0
    )
    ids = np.fromfile(out, dtype=np.uint16)
    tok = tokenizers.Tokenizer.from_file(str(out) + ".tokenizer.json")
    assert tok.get_vocab_size() == 600 and int(ids.max()) < 600
    assert ids[-1] == tok.token_to_id(make.END_OF_TEXT) == 0
    assert tok.decode(ids[:-1].tolist()) == corpus.read_text()  # byte-level: lossless
    assert len(ids) < len(corpus.read_bytes()) / 3  # merges learnt from this corpus
    # The same tokenizer file encodes another text (a validation file) to the same ids.
    again = tmp_path / "again.bin"
    make.main([str(corpus), "--out", str(again), "--tokenizer", str(out) + ".tokenizer.json"])
    assert np.array_equal(np.fromfile(again, dtype=np.uint16), ids)
    bundle = load_dataset(DataConfig(name="tokens", path=str(out), seq_len=16))
    assert bundle.num_classes == 600  # from t.bin.json


def test_make_tokens_without_tokenizers_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.txt").write_text("abc")
    make = _make_tokens()
    monkeypatch.setattr(make, "_tokenizers", lambda: None)
    with pytest.raises(SystemExit, match=r"pip install 'distgrow\[tokens\]', or use --tokenizer"):
        make.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "t.bin"), "--tokenizer", "bpe"])
    # auto falls back to bytes.
    make.main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "t.bin")])
    assert np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist() == [97, 98, 99]


# -- larger than memory ------------------------------------------------------------------------

# The training process may allocate this much (RLIMIT_DATA: `ulimit -d`, heap and anonymous
# mappings); the token file is twice as large. Not `ulimit -v` (RLIMIT_AS): that counts the
# address space of a file mapping too, so it would refuse the very map that avoids reading the
# file, and it also counts torch's reserved-but-untouched address space.
DATA_LIMIT = 640 << 20
BIG_FILE = 1280 << 20
BIG_BATCH = 256  # windows per update, ~1 MiB of distinct file pages each


def _limit_data() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_trains_from_a_file_larger_than_its_memory_limit_with_a_flat_rss(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    big = tmp_path / "big.bin"
    block = np.random.default_rng(0).integers(0, 256, size=2 << 20, dtype=np.uint16)  # 4 MiB
    with big.open("wb") as f:
        for _ in range(BIG_FILE // block.nbytes):
            f.write(block.tobytes())
    (tmp_path / "big.bin.json").write_text(json.dumps({"vocab_size": 256}))  # no pass over it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    # The limit bites: reading the file into memory fails in a process under it.
    control = subprocess.run(
        [sys.executable, "-c", f"import numpy; numpy.fromfile({str(big)!r}, numpy.uint16)"],
        preexec_fn=_limit_data,
        capture_output=True,
        text=True,
        env=env,
    )
    assert control.returncode != 0 and "MemoryError" in control.stderr, control.stderr
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "distgrow",
        "train",
        str(REPO / "configs/tokens_tiny.yaml"),
        f"data.path={big}",
        "data.limit_train=null",
        "data.size=null",
        "data.val_fraction=0.001",
        "data.limit_val=64",
        "model.depth=1",
        "model.width=32",
        "growth.mode=decay_lr",
        f"growth.base_batch={BIG_BATCH}",
        "schedule.type=constant",
        "schedule.warmup=0",
        "run.threads=1",
        "logging.every_steps=1",
        "logging.progress=lines",
        f"run.output_dir={run_dir}",
    ]
    log = tmp_path / "train.log"
    samples: list[tuple[int, int]] = []  # (updates done, RSS KiB)
    files: list[tuple[int | None, int | None]] = []
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_limit_data, cwd=REPO)  # fmt: skip
        try:
            deadline = time.monotonic() + 420
            step = 0
            while step < 160 and proc.poll() is None and time.monotonic() < deadline:
                rss = _status_kib(proc.pid, "VmRSS")
                metrics = run_dir / "metrics.jsonl"
                if metrics.exists():
                    step = sum(
                        '"kind": "step"' in line for line in metrics.read_text().splitlines()
                    )
                if rss is not None:
                    samples.append((step, rss))
                    files.append(
                        (_status_kib(proc.pid, "RssFile"), _status_kib(proc.pid, "RssAnon"))
                    )
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert step >= 160, f"only {step} updates in time:\n{log.read_text()[-2000:]}"
            proc.send_signal(signal.SIGTERM)  # stops after the update, with a checkpoint
            assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "N=10,314,356" in log.read_text()  # 1.25 GiB / 2 bytes / 65, less 1 block of 4096
    early = [rss for step, rss in samples if 20 <= step <= 50]
    late = [rss for step, rss in samples if step >= 130]
    assert len(early) > 10 and len(late) > 10
    grew = (max(late) - max(early)) / 1024, (np.median(late) - np.median(early)) / 1024
    peak = max(rss for _, rss in samples) / 1024
    # Updates 50 to 130 read 80 × 256 windows from all over the file (a cached file: the test
    # just wrote it): mapped, each window would bring in a folio around it (~400 MiB for one
    # batch, seen with np.memmap), and kept, hundreds of MiB more; the resident set instead
    # stays where it was, within one update's own ups and downs.
    print(f"RSS (MiB): updates 20-50 peak {max(early) / 1024:.0f} median "
          f"{np.median(early) / 1024:.0f}; updates 130-160 peak {max(late) / 1024:.0f} median "
          f"{np.median(late) / 1024:.0f}; whole run peak {peak:.0f}; file {BIG_FILE >> 20}, "
          f"data limit {DATA_LIMIT >> 20}")  # fmt: skip
    # The file's pages are not in the resident set at all: its file-backed part (the libraries)
    # does not move.
    file_kib = [
        kib for (step, _), (kib, _) in zip(samples, files, strict=True) if step >= 20 and kib
    ]
    print(f"RSS file-backed (MiB): {min(file_kib) / 1024:.0f} to {max(file_kib) / 1024:.0f}")
    assert max(file_kib) - min(file_kib) < 8 << 10
    assert grew[0] < 24 and grew[1] < 48, (grew, samples)
    assert peak < BIG_FILE >> 20


# -- training: the order, resume and world size --------------------------------------------------


def test_training_order_of_token_data_is_the_feistel_permutation() -> None:
    from distgrow.config import load_config
    from distgrow.loop import GrowthSchedule

    cfg = load_config(REPO / "configs/tokens_tiny.yaml")
    schedule = GrowthSchedule(cfg, 1000, 0, 1)
    order = schedule._permutation(3)
    assert isinstance(order, FeistelPermutation)
    assert torch.equal(order[0:1000], FeistelPermutation(1000, cfg.run.seed, 3)[0:1000])
    other = GrowthSchedule(load_config(REPO / "configs/lm_tiny.yaml"), 1000, 0, 1)
    assert torch.equal(other._permutation(3), epoch_permutation(1000, 0, 3))  # type: ignore[arg-type]


@pytest.mark.integration
def test_token_run_resumed_mid_epoch_on_two_ranks_ends_where_one_rank_does(tmp_path: Path) -> None:
    from conftest import assert_same_model, distgrow_job_run

    from distgrow.checkpoint import list_checkpoints, load_checkpoint, load_latest
    from distgrow.metrics import read_jsonl

    path = tmp_path / "t.bin"
    np.random.default_rng(1).integers(0, 64, size=24_000, dtype=np.uint16).tofile(path)
    common = [
        str(REPO / "configs/tokens_tiny.yaml"),
        f"data.path={path}",
        "data.seq_len=16",
        "data.limit_train=null",
        "data.size=null",
        "data.limit_val=128",
        "model.depth=1",
        "model.width=32",
        # The batch doubles at the second epoch (32 -> 64), in micro-batches of 8 on any world
        # size: 1 x 8 x 4 and 2 x 8 x 2 are the same micro-batches.
        "growth.base_batch=32",
        "growth.micro_batch=8",
        "growth.max_micro_batch=8",
        "schedule.type=multistep",
        "schedule.interval=epoch",
        "schedule.milestones=[1]",
        "schedule.gamma=0.5",
        "schedule.warmup=0",
        "run.threads=1",
        "run.checkpoint_every_steps=10",
        "run.keep_checkpoints=20",
        "logging.every_steps=1",
    ]
    straight = tmp_path / "straight"
    distgrow_job_run(1, [*common, f"run.output_dir={straight}", "growth.max_workers=1"])
    # The first checkpoint inside an epoch (update 10), taken by the one-process run.
    mid = sorted(
        (s["step"], p) for p in list_checkpoints(straight) if (s := load_checkpoint(p))["position"]
    )
    assert mid and mid[0][0] == 10, [p.name for p in list_checkpoints(straight)]
    mid_path = mid[0][1]
    finals = {}
    for nproc in (1, 2):
        resumed = tmp_path / f"resumed{nproc}"
        resumed.mkdir()
        (resumed / mid_path.name).write_bytes(mid_path.read_bytes())
        args = [*common, f"run.output_dir={resumed}", f"growth.max_workers={nproc}", "--resume"]
        distgrow_job_run(nproc, args)
        found = load_latest(resumed)
        assert found is not None
        finals[nproc] = found[1]
    want = load_latest(straight)
    assert want is not None
    for state in finals.values():
        assert (state["step"], state["samples_seen"]) == (want[1]["step"], want[1]["samples_seen"])
    steps = [r for r in read_jsonl(tmp_path / "resumed2/metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == want[1]["step"] - 10 and {r["workers"] for r in steps} == {2}
    # One rank resumed mid-epoch: the same updates bit for bit.
    assert_same_model(finals[1]["model"], want[1]["model"], exact=True)
    # Two ranks: the same samples in the same micro-batches, summed in another order (AdamW
    # then amplifies the last-bit differences a little over the remaining updates: 6e-6 seen).
    for name, tensor in want[1]["model"].items():
        torch.testing.assert_close(finals[2]["model"][name], tensor, rtol=1e-4, atol=3e-5)


def test_interval_tokens_counts_the_tokens_of_token_windows() -> None:
    from distgrow.config import load_config
    from distgrow.planner import GrowthPolicy

    cfg = load_config(REPO / "configs/tokens_tiny.yaml")  # seq_len 64, warm-up 8192 tokens
    policy = GrowthPolicy(cfg, 2048)
    assert policy.time(1, 100) == (2048 + 100) * 64
    # 8192 tokens are 128 windows: half-way through the warm-up at window 64.
    assert policy.warmup_factor(0, 64) == pytest.approx(0.5)
    assert policy.warmup_factor(0, 128) == 1.0
