"""Data in your own files (npz, csv/tsv, image folders) and the DataLoader feed of the trainer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from distgrow.config import ConfigError, DataConfig, load_config
from distgrow.data import (
    ArrayDataset,
    DatasetFormatError,
    DatasetNotFoundError,
    LoaderDataset,
    TensorSamples,
    load_dataset,
)
from distgrow.data.feed import LoaderFeed
from distgrow.data.splits import seeded_split
from distgrow.data.transforms import image_stats
from distgrow.exits import EXIT_OK
from distgrow.report import compare

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import final_model, syn_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str, **fields: object) -> object:
    return load_dataset(DataConfig(name=name, **fields), seed=0)  # type: ignore[arg-type]


# -- config ------------------------------------------------------------------------------------


def test_root_is_another_name_for_path() -> None:
    assert load_config(None, ["data.root=/d"]).data.path == "/d"
    assert load_config(None, ["data.path=/d"]).data.root == "/d"
    assert DataConfig(root="/e").path == "/e"  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="root"):
        load_config(None, ["data.path=/d", "data.root=/e"])


def test_file_formats_need_a_path() -> None:
    cfg = load_config(None, ["data.name=npz"])  # valid: the files are looked for at load
    with pytest.raises(DatasetNotFoundError, match=r"data\.path is not set"):
        load_dataset(cfg.data)
    with pytest.raises(ConfigError, match=r"data\.path is not set.*set data\.size"):
        cfg.data.expected_train_size()
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_config(None, ["data.name=image_folder", "data.path=/x", "data.image_size=[8]"])


# -- npz -------------------------------------------------------------------------------------


def write_npz(path: Path, n: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) * [1, 10, 100, 0.1]
    np.savez(path, X=x, y=(x[:, 0] > 0).astype(np.int64))
    return x


def test_npz_reads_x_and_y_and_standardises_with_the_training_split(tmp_path: Path) -> None:
    x = write_npz(tmp_path / "d.npz", n=60)
    cfg = DataConfig(name="npz", path=str(tmp_path / "d.npz"), val_fraction=0.25)
    bundle = load_dataset(cfg, seed=5)
    train_idx, val_idx = seeded_split(60, 0.25, 5)
    assert len(bundle.train) == cfg.expected_train_size() == 45 and len(bundle.val) == 15
    assert bundle.num_classes == 2 and bundle.input_shape == (4,)
    train_x = x[train_idx.numpy()]
    mean, std = train_x.mean(0), train_x.std(0)
    assert isinstance(bundle.train, ArrayDataset)
    torch.testing.assert_close(bundle.train.x, torch.from_numpy((train_x - mean) / std).float())
    torch.testing.assert_close(
        bundle.val.batch(torch.arange(15))[0],
        torch.from_numpy((x[val_idx.numpy()] - mean) / std).float(),
    )
    assert torch.equal(bundle.train.y, torch.from_numpy((train_x[:, 0] > 0).astype(np.int64)))


def test_npz_array_names_val_file_and_word_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "t.npz", feats=rng.normal(size=(10, 3)), kind=np.array(list("bacbacbacb")))
    np.savez(tmp_path / "v.npz", feats=rng.normal(size=(4, 3)), kind=np.array(list("cabc")))
    cfg = DataConfig(
        name="npz",
        path=str(tmp_path / "t.npz"),
        val_path=str(tmp_path / "v.npz"),
        x_key="feats",
        y_key="kind",
    )
    bundle = load_dataset(cfg)
    assert cfg.expected_train_size() == len(bundle.train) == 10 and len(bundle.val) == 4
    assert bundle.num_classes == 3  # a, b, c in sorted order
    assert bundle.train.y.tolist() == [1, 0, 2, 1, 0, 2, 1, 0, 2, 1]
    assert bundle.val.y.tolist() == [2, 0, 1, 2]


def test_npz_errors_name_the_array_and_the_row(tmp_path: Path) -> None:
    write_npz(tmp_path / "d.npz")
    with pytest.raises(DatasetFormatError, match=r"no array named 'feats' \(it holds X, y\)"):
        load("npz", path=str(tmp_path / "d.npz"), x_key="feats")
    x = np.ones((5, 2))
    x[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=x, y=np.arange(5))
    with pytest.raises(DatasetFormatError, match=r"row 3 of 'X' has a missing"):
        load("npz", path=str(tmp_path / "nan.npz"))
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load("npz", path=str(tmp_path / "none.npz"))
    with pytest.raises(ConfigError, match="cannot count its samples"):
        DataConfig(name="npz", path=str(tmp_path / "none.npz")).expected_train_size()


def test_npz_float_labels_are_regression(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "r.npz", X=rng.normal(size=(20, 2)), y=rng.normal(size=20))
    bundle = load_dataset(DataConfig(name="npz", path=str(tmp_path / "r.npz")))
    assert bundle.task == "regression" and bundle.num_classes == 0
    assert bundle.train.y.dtype == torch.float32


# -- csv / tsv -------------------------------------------------------------------------------


def test_csv_label_by_name_and_word_classes(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    rows = ["a,species,b"] + [
        f"{i},{['setosa', 'virginica', 'versicolor'][i % 3]},{2 * i}" for i in range(30)
    ]
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(name="csv", path=str(path), label_column="species", val_fraction=0.2)
    bundle = load_dataset(cfg)
    assert cfg.expected_train_size() == len(bundle.train) == 24
    assert bundle.num_classes == 3 and bundle.input_shape == (2,)
    train_idx, _ = seeded_split(30, 0.2, 0)
    # sorted classes: setosa 0, versicolor 1, virginica 2
    want = [[0, 2, 1][i % 3] for i in train_idx.tolist()]
    assert bundle.train.y.tolist() == want


def test_tsv_without_header_label_by_index(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("".join(f"{i % 2}\t{i}\t{i * i}\n" for i in range(10)))
    cfg = DataConfig(name="tsv", path=str(path), label_column=0, val_fraction=0.2)
    bundle = load_dataset(cfg)
    assert len(bundle.train) == cfg.expected_train_size() == 8  # no header row dropped
    assert bundle.num_classes == 2 and bundle.input_shape == (2,)
    # the label column is not among the features: they are i and i*i, standardised
    assert isinstance(bundle.train, ArrayDataset)
    train_idx, _ = seeded_split(10, 0.2, 0)
    assert bundle.train.y.tolist() == [i % 2 for i in train_idx.tolist()]


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("a,b,y\n1,2,0\n3,,1\n", {}, r"line 3: missing value in 'b'"),
        ("a,b,y\n1,2,0\n3,NA,1\n", {}, r"line 3: missing value in 'b'"),
        ("a,b,y\n1,2,0\n3,4\n", {}, r"line 3: 2 fields, the first row has 3"),
        ("a,b,y\n1,2,0\n3,x,1\n", {}, r"line 3: 'b' = 'x' is not a number"),
        ("a,b,y\n1,2,0\n", {"label_column": "z"}, r"no column named 'z'; the header has a, b, y"),
        ("1,2,0\n3,4,1\n", {"label_column": 5}, r"label_column = 5 is out of range for 3"),
    ],
)
def test_csv_errors_name_the_line(
    tmp_path: Path, text: str, options: dict[str, object], message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetFormatError, match=message):
        load("csv", path=str(path), **options)


# -- image folders ---------------------------------------------------------------------------


def write_images(root: Path, per_class: int, size: tuple[int, int] = (6, 5), seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(["zebra", "ant", "cat"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            pixels[..., 0] = np.uint8(80 * k)  # the class shows in the red channel
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")


def test_image_folder_reads_on_demand_with_the_training_statistics(tmp_path: Path) -> None:
    write_images(tmp_path / "img", per_class=7)
    cfg = DataConfig(
        name="image_folder", path=str(tmp_path / "img"), val_fraction=0.25, loader_workers=0
    )
    files = load_dataset(cfg, seed=1)
    memory = load_dataset(DataConfig(**{**cfg.__dict__, "feed": "memory"}), seed=1)
    assert isinstance(files.train, LoaderDataset) and isinstance(memory.train, ArrayDataset)
    assert len(files.train) == cfg.expected_train_size() == 16 and len(files.val) == 5
    assert files.input_shape == (3, 6, 5) and files.num_classes == 3
    # classes in sorted order: ant 0 (red 80), cat 1 (160), zebra 2 (0): read from the pixels
    x, y = memory.train.x, memory.train.y
    assert torch.equal(x[:, 0, 0, 0].long() // 80, torch.tensor([1, 2, 0])[y])
    # the statistics are the training split's, streamed from the files = computed in memory
    mean, _ = image_stats(memory.train.x)
    assert files.train.transform is not None
    torch.testing.assert_close(files.train.transform.mean.flatten(), torch.tensor(mean))  # type: ignore[attr-defined]
    idx = torch.tensor([3, 0, 15, 7])
    for a, b in zip(files.train.batch(idx, 2), memory.train.batch(idx, 2), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        files.val.batch(torch.arange(5)), memory.val.batch(torch.arange(5)), strict=True
    ):
        assert torch.equal(a, b)


def test_image_folder_train_val_folders_resize_and_crop(tmp_path: Path) -> None:
    write_images(tmp_path / "img" / "train", per_class=3, size=(10, 12))
    write_images(tmp_path / "img" / "val", per_class=2, size=(7, 9), seed=1)
    cfg = DataConfig(
        name="image_folder",
        path=str(tmp_path / "img"),
        image_size=[8, 8],
        crop=[6, 4],
        image_mode="L",
        loader_workers=0,
    )
    bundle = load_dataset(cfg)
    assert len(bundle.train) == cfg.expected_train_size() == 9 and len(bundle.val) == 6
    assert bundle.input_shape == (1, 6, 4)
    assert bundle.val.batch(torch.arange(6))[0].shape == (6, 1, 6, 4)


def test_image_folder_errors(tmp_path: Path) -> None:
    write_images(tmp_path / "img", per_class=2)
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "img" / "ant" / "big.png")
    bundle = load_dataset(
        DataConfig(
            name="image_folder", path=str(tmp_path / "img"), loader_workers=0, normalize=False
        )
    )
    with pytest.raises(DatasetFormatError, match=r"big\.png: image of shape .* data\.image_size"):
        bundle.train.batch(torch.arange(len(bundle.train)))
    # read by a loader worker, the error is still the one line naming the file
    assert isinstance(bundle.train, LoaderDataset)
    feed = LoaderFeed(
        bundle.train,
        [list(range(len(bundle.train)))],
        workers=1,
        pin_memory=False,
        prefetch_factor=1,
    )
    feed.start()
    with pytest.raises(
        DatasetFormatError,
        match=r"^/.*big\.png: image of shape .* data\.image_size=\[H, W\] to resize them all\.$",
    ):
        feed.batch(torch.arange(len(bundle.train)), 0)
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"holds no image"):
        load("image_folder", path=str(tmp_path / "empty"))
    (tmp_path / "img" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match=r"broken\.png: not an image Pillow can read"):
        load("image_folder", path=str(tmp_path / "img"), loader_workers=0, image_size=[4, 4])


# -- the feed --------------------------------------------------------------------------------


def test_feed_reads_what_the_loop_asks_even_off_plan() -> None:
    x = torch.arange(40, dtype=torch.float32).view(20, 2)
    data = LoaderDataset(TensorSamples(x, torch.arange(20)), torch.arange(20))
    plan = [[3, 1], [], [5, 6, 7], [0]]
    feed = LoaderFeed(data, plan, workers=0, pin_memory=False, prefetch_factor=2)
    feed.start()
    for wanted in ([3, 1], [], [5, 6, 7]):
        got_x, got_y = feed.batch(torch.tensor(wanted, dtype=torch.long), 0)
        assert got_y.tolist() == wanted and torch.equal(got_x, x[wanted])
    assert feed.read_here == 0
    got_x, got_y = feed.batch(torch.tensor([9, 2]), 0)  # not what the sampler planned
    assert got_y.tolist() == [9, 2] and torch.equal(got_x, x[[9, 2]]) and feed.read_here == 1


def write_syn_npz(path: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1291, 16))
    w = rng.normal(size=(16, 4))
    np.savez(path, X=x, y=np.argmax(x @ w, axis=1))


def test_trainer_loader_feed_equals_in_memory_bit_for_bit(tmp_path: Path) -> None:
    """The same npz in memory and through a DataLoader with 2 workers: the same parameters
    (with a growth, a partial last batch with an empty micro-batch, and dropout)."""
    write_syn_npz(tmp_path / "d.npz")
    common = ["data.name=npz", f"data.path={tmp_path / 'd.npz'}", "model.dropout=0.1"]
    code_a, a = train(syn_config(tmp_path / "memory", *common))
    code_b, b = train(
        syn_config(tmp_path / "loader", *common, "data.feed=loader", "data.loader_workers=2")
    )
    assert code_a == code_b == EXIT_OK and a.feed is None and b.feed is not None
    assert b.feed.read_here == 0  # every micro-batch came from the loader's workers
    assert a.state.growth_events == b.state.growth_events == 1
    want, got = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_trainer_loader_feed_resumes_mid_epoch(tmp_path: Path) -> None:
    write_syn_npz(tmp_path / "d.npz")
    extra = [
        "data.name=npz",
        f"data.path={tmp_path / 'd.npz'}",
        "data.feed=loader",
        "data.loader_workers=1",
        "schedule.interval=step",
        "schedule.milestones=[40]",
        "run.keep_checkpoints=5",
        "run.checkpoint_every_steps=20",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(syn_config(straight, *extra))[0] == EXIT_OK
    resumed.mkdir()
    (resumed / "ckpt-000000040.pt").write_bytes((straight / "ckpt-000000040.pt").read_bytes())
    code, trainer = train(syn_config(resumed, *extra, "run.resume=true"))
    assert code == EXIT_OK and trainer.feed is not None and trainer.feed.read_here == 0
    want, got = final_model(straight), final_model(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_trainer_image_folder_from_files_equals_in_memory(tmp_path: Path) -> None:
    write_images(tmp_path / "img", per_class=12)
    common = [
        "data.name=image_folder",
        f"data.path={tmp_path / 'img'}",
        "data.loader_workers=0",
        "growth.base_batch=8",
        "growth.micro_batch=4",
        "growth.max_micro_batch=4",
        "model.hidden=[8]",
    ]
    code_a, a = train(syn_config(tmp_path / "memory", *common, "data.feed=memory"))
    code_b, b = train(syn_config(tmp_path / "files", *common))
    assert code_a == code_b == EXIT_OK and b.feed is not None and b.feed.read_here == 0
    want, got = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert a.validate() == b.validate()


# -- the example projects --------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example_module(project: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"{project}_{name}", EXAMPLES / project / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_rows(project: str, tmp_path: Path, *overrides: str) -> dict[str, dict[str, Any]]:
    out = compare(
        EXAMPLES / project / "config.yaml",
        ["run.threads=1", *overrides],
        variants=("decay_lr", "grow_batch"),
        out_dir=tmp_path / "cmp",
        echo=lambda line: None,
        python=sys.executable,
    )
    return {r["label"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}


@pytest.mark.integration
def test_tabular_example_grows_to_the_same_accuracy_with_fewer_updates(tmp_path: Path) -> None:
    example_module("tabular", "make_data").write(tmp_path / "data.csv", rows=6000)
    rows = compare_rows("tabular", tmp_path, f"data.path={tmp_path / 'data.csv'}")
    decay, grow = rows["decay_lr"], rows["grow_batch"]
    assert decay["status"] == grow["status"] == "completed"
    assert decay["total_updates"] == 12 * 141  # 4,500 training rows at batch 32
    assert grow["total_updates"] * 2 <= decay["total_updates"]
    assert grow["val_acc"] >= decay["val_acc"] - 0.005
    assert decay["val_acc"] > 0.9  # the task is learnt, not two equally bad runs
    model = example_module("tabular", "model").build()
    assert model(torch.zeros(5, 12)).shape == (5, 3)


@pytest.mark.integration
def test_image_folder_example_trains_from_the_files(tmp_path: Path) -> None:
    example_module("image_folder", "make_images").write(tmp_path / "images", per_class=20, size=16)
    rows = compare_rows(
        "image_folder",
        tmp_path,
        f"data.path={tmp_path / 'images'}",
        "data.loader_workers=1",
        "run.epochs=3",
        "schedule.milestones=[1, 2]",
    )
    decay, grow = rows["decay_lr"], rows["grow_batch"]
    assert decay["status"] == grow["status"] == "completed"
    assert decay["total_updates"] == 3 * 3  # 96 training images at batch 32
    assert grow["total_updates"] < decay["total_updates"]
    assert 0.0 <= grow["val_acc"] <= 1.0 and 0.0 <= decay["val_acc"] <= 1.0
    model = example_module("image_folder", "net").build(channels=3, classes=6)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 6)
