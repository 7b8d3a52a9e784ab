"""The user's own model, data, loss and metric named in the config ("module:function").

A module file written by each test stands in for the user's code: it trains end to end through
``distgrow train`` and resumes from its saved ``config.yaml``; ``distgrow compare`` runs on it;
each way of getting it wrong is one line on stderr, exit 2 and nothing in the run directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO_ROOT, distgrow_job_argv
from torch import nn

from distgrow.backends.torch_ddp import TorchBackend
from distgrow.checkpoint import load_latest
from distgrow.config import ConfigError, LossConfig, load_config
from distgrow.entrypoints import (
    EntryPointError,
    absolute_entry_point,
    parse_entry_point,
    resolve_entry_point,
)
from distgrow.losses import build_objective, loss_sum
from distgrow.runtime import Runtime
from distgrow.startup import load_data
from distgrow.state import TrainError
from distgrow.trainer import Trainer

SINGLE = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")

USER_CODE = '''
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def make_data(n_train=96, n_val=40, features=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_val, features, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


class Pairs(Dataset):
    """Items as (list, int): they need the collate function returned with them."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return [float(i), 1.0, -1.0], i % 3


def collate_pairs(items):
    x = torch.tensor([a for a, _ in items])
    y = torch.tensor([b for _, b in items])
    return x, y


def make_pairs(n_train):
    return Pairs(n_train), Pairs(10), collate_pairs


def make_model(features=6, hidden=8, classes=2):
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def per_sample_ce(outputs, targets, weight=1.0):
    return weight * nn.functional.cross_entropy(outputs, targets, reduction="none")


def sum_ce(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, reduction="sum")


def mean_ce(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets)


def matrix_loss(outputs, targets):
    return outputs


def predicts_one(outputs, targets):
    return (outputs.argmax(1) == 1).float()


def not_a_model(**kwargs):
    return 3


def not_datasets(**kwargs):
    return 5


class Words(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return "text", "label"


def words(**kwargs):
    return Words(), Words()


NOT_CALLABLE = 7
'''


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A folder with the user's module ``user.py`` and a config naming it by relative path."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "user.py").write_text(USER_CODE)
    config = {
        "run": {"name": "own", "epochs": 2, "seed": 3, "threads": 1},
        "data": {"name": "user.py:make_data", "kwargs": {"n_train": 96}, "size": 96},
        "model": {"name": "user.py:make_model", "kwargs": {"hidden": 8}},
        "loss": {"name": "user.py:per_sample_ce", "metric": "user.py:predicts_one"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": {"type": "multistep", "milestones": [1], "gamma": 0.5},
        "growth": {"base_batch": 16, "micro_batch": 8, "max_dataset_fraction": None},
        "logging": {"every_steps": 2, "progress": "lines"},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    argv = distgrow_job_argv(1, args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def make_trainer(*overrides: str, config: Path) -> Trainer:
    cfg = load_config(config, ["logging.progress=off", *overrides])
    return Trainer(cfg, TorchBackend(cfg.backend, SINGLE, device="cpu"), load_data(cfg))


# -------------------------------------------------------------------- end to end, with resume


@pytest.mark.integration
def test_own_code_trains_end_to_end_and_resumes_from_its_saved_config(
    user_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"  # not the config's folder: paths are the config's
    elsewhere.mkdir()
    proc = train_cli([str(user_dir / "config.yaml"), f"run.output_dir={run_dir}"], elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    module = str((user_dir / "user.py").resolve())
    assert saved["model"]["name"] == f"{module}:make_model"
    assert saved["data"]["name"] == f"{module}:make_data"
    assert saved["loss"] == {
        "name": f"{module}:per_sample_ce",
        "kwargs": {},
        "metric": f"{module}:predicts_one",
    }
    epochs = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "epoch"
    ]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert 0.0 <= e["val_metric"] <= 1.0 and e["val_acc"] is None
        assert e["val_loss"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset_size"] == 96 and summary["epochs"] == 2
    # 96 samples: batch 16 in epoch 1, 32 in epoch 2 (the multistep cut became a growth).
    assert summary["total_updates"] == 96 // 16 + 96 // 32

    # Resume from the saved config.yaml alone, from yet another folder, for one more epoch.
    proc = train_cli([str(run_dir / "config.yaml"), "run.epochs=3", "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["total_updates"] == 6 + 3 + 3


@pytest.mark.integration
def test_compare_runs_on_own_code(user_dir: Path, tmp_path: Path) -> None:
    from distgrow.report import compare

    out = tmp_path / "cmp"
    lines: list[str] = []
    compare(
        user_dir / "config.yaml",
        ["logging.progress=off"],
        variants=["decay_lr", "grow_batch"],
        out_dir=out,
        echo=lines.append,
    )
    rows = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["is_baseline"] for r in rows] == [True, False]  # decay_lr, then grow_batch
    updates = {}
    for variant in ("decay_lr", "grow_batch"):
        summary = json.loads((out / "runs" / variant / "summary.json").read_text())
        assert summary["dataset_size"] == 96
        updates[variant] = summary["total_updates"]
    # The baseline keeps batch 16 for both epochs; growth doubles it in the second.
    assert updates == {"decay_lr": 12, "grow_batch": 9}


# ------------------------------------------------------------------------ exactness of losses


def _old_loss_sum(outputs: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    # The trainer's loss before distgrow.losses existed, verbatim.
    if num_classes > 0:
        return F.cross_entropy(outputs, targets, reduction="sum")
    if outputs.numel() == targets.numel():
        outputs = outputs.reshape(targets.shape)
    squared = (outputs - targets) ** 2
    return squared.flatten(1).mean(1).sum() if squared.dim() > 1 else squared.sum()


@pytest.mark.parametrize(
    ("num_classes", "out_shape", "target_shape"),
    [(5, (13, 5), (13,)), (0, (13, 1), (13,)), (0, (13,), (13,)), (0, (13, 3), (13, 3))],
)
def test_builtin_losses_give_the_numbers_of_before_bit_for_bit(
    num_classes: int, out_shape: tuple[int, ...], target_shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(1)
    outputs = torch.randn(out_shape, generator=g, requires_grad=True)
    if num_classes:
        targets = torch.randint(0, num_classes, target_shape, generator=g)
    else:
        targets = torch.randn(target_shape, generator=g)
    before = _old_loss_sum(outputs, targets, num_classes)
    (grad_before,) = torch.autograd.grad(before, outputs)
    names = ["auto", "cross_entropy"] if num_classes else ["auto", "mse"]
    for name in names:
        now = build_objective(LossConfig(name=name), num_classes).loss_sum(outputs, targets)
        (grad_now,) = torch.autograd.grad(now, outputs)
        assert torch.equal(now, before) and torch.equal(grad_now, grad_before), name
    assert torch.equal(loss_sum(outputs, targets, num_classes), before)


def test_builtin_elementwise_losses_sum_per_sample_means() -> None:
    g = torch.Generator().manual_seed(2)
    outputs, targets = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    for name, fn in (("l1", F.l1_loss), ("smooth_l1", F.smooth_l1_loss)):
        got = build_objective(LossConfig(name=name), 0).loss_sum(outputs, targets)
        # A sum of per-sample means: 6 × the batch mean (the same when split in micro-batches).
        torch.testing.assert_close(got, 6 * fn(outputs, targets))
        halves = sum(
            build_objective(LossConfig(name=name), 0).loss_sum(outputs[s], targets[s])
            for s in (slice(0, 2), slice(2, 6))
        )
        torch.testing.assert_close(got, halves)
    labels = (targets > 0).float()
    got = build_objective(LossConfig(name="bce_with_logits"), 0).loss_sum(outputs, labels)
    torch.testing.assert_close(got, 6 * F.binary_cross_entropy_with_logits(outputs, labels))


def test_a_per_sample_user_loss_trains_like_the_builtin(user_dir: Path, tmp_path: Path) -> None:
    config = user_dir / "config.yaml"
    finals = []
    for name, loss in (
        ("builtin", "cross_entropy"),
        ("user", "user.py:per_sample_ce"),
        ("class", "torch.nn:CrossEntropyLoss"),
    ):
        extra = ["loss.kwargs={reduction: sum}"] if name == "class" else []
        trainer = make_trainer(
            f"run.output_dir={tmp_path / name}",
            # 100 = 6 × 16 + 4: the last update of epoch 1 has an empty micro-batch.
            "data.kwargs={n_train: 100}",
            f"loss.name={user_dir / loss if name == 'user' else loss}",
            *extra,
            "loss.metric=auto",
            config=config,
        )
        assert trainer.train() == 0
        assert trainer.state.step == 7 + 4  # batch 16 (6 + a partial), then 32 (3 + a partial)
        found = load_latest(tmp_path / name)
        assert found is not None
        finals.append(found[1]["model"])
    for other in finals[1:]:
        for key, value in finals[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(finals[0][k], v) for k, v in make_model_state().items())


def make_model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict()


def test_a_user_loss_returning_a_sum_is_accepted_and_a_mean_refused(user_dir: Path) -> None:
    config = user_dir / "config.yaml"
    make_trainer(f"loss.name={user_dir / 'user.py'}:sum_ce", config=config)
    with pytest.raises(TrainError, match=r"loss.name = .*mean_ce.*batch mean"):
        make_trainer(f"loss.name={user_dir / 'user.py'}:mean_ce", config=config)
    with pytest.raises(TrainError, match=r"loss.name = 'torch.nn:CrossEntropyLoss'.*batch mean"):
        make_trainer("loss.name=torch.nn:CrossEntropyLoss", config=config)
    with pytest.raises(TrainError, match=r"returned shape \[8, 2\] for a batch of 8"):
        make_trainer(f"loss.name={user_dir / 'user.py'}:matrix_loss", config=config)
    with pytest.raises(TrainError, match=r"loss.name = 'cross_entropy'.*failed"):
        make_trainer("loss.name=cross_entropy", "loss.kwargs={no_such: 1}", config=config)


def test_loss_kwargs_reach_a_user_loss(user_dir: Path) -> None:
    g = torch.Generator().manual_seed(4)
    outputs, targets = torch.randn(5, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    name = f"{(user_dir / 'user.py').resolve()}:per_sample_ce"
    one = build_objective(LossConfig(name=name), 3).loss_sum(outputs, targets)
    three = build_objective(LossConfig(name=name, kwargs={"weight": 3.0}), 3)
    torch.testing.assert_close(three.loss_sum(outputs, targets), 3 * one)
    torch.testing.assert_close(one, F.cross_entropy(outputs, targets, reduction="sum"))
    assert three.metric_key == "val_acc" and three.metric_sum is not None


def test_a_collate_function_returned_with_the_data_is_used(user_dir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(
        f"data.name={user_dir / 'user.py'}:make_pairs",
        "data.kwargs={n_train: 20}",
        "model.kwargs={features: 3, classes: 3}",
        "loss.metric=accuracy",
        f"run.output_dir={tmp_path / 'run'}",
        config=user_dir / "config.yaml",
    )
    assert trainer.data.num_classes == 3 and trainer.data.input_shape == (3,)
    assert torch.equal(trainer.data.train.y[:4], torch.tensor([0, 1, 2, 0]))
    assert trainer.train() == 0
    assert trainer.state.last_val["val_acc"] is not None


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.name=no_such_module:build", r"model.name = 'no_such_module:build': no module"),
        ("model.name=user.py:missing", r"model.name = .*user.py:missing.*has no attribute"),
        ("model.name=nowhere.py:f", r"model.name = .*nowhere.py:f.*does not exist"),
        ("model.name=user.py:not_a_model", r"returned builtins.int, expected a torch.nn.Module"),
        ("model.name=user.py:NOT_CALLABLE", r"found int .*expected a function"),
        ("model.kwargs={depth: 3}", r"model.name = .*make_model.*failed \(TypeError"),
        ("data.name=user.py:not_datasets", r"data.name = .*returned builtins.int, expected \("),
        ("data.name=user.py:words", r"data.name = .*collate into \(tuple, tuple\)"),
        ("loss.name=user.py:mean_ce", r"loss.name = .*mean_ce.*batch mean"),
        ("loss.metric=user.py:missing", r"loss.metric = .*has no attribute"),
        ("model.name=torchvision.models:resnet50", r"torchvision"),
    ],
)
def test_each_mistake_is_one_line_exit_2_and_writes_nothing(
    user_dir: Path,
    tmp_path: Path,
    override: str,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from distgrow.cli import main

    if "torchvision" in override and _torchvision_imports():
        pytest.skip("torchvision imports here: the entry point builds (see test_models)")
    run_dir = tmp_path / "run"
    # Overrides are relative to the working directory: run from the user's folder.
    monkeypatch.chdir(user_dir)
    argv = ["train", str(user_dir / "config.yaml"), override, f"run.output_dir={run_dir}"]
    code: int | str | None
    try:
        code = main(argv)
    except SystemExit as exit_:  # the backend's shutdown ends a started process this way
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("distgrow: error: ")
    assert re.search(expected, lines[0]), lines[0]
    if "torchvision" in override:
        assert "not importable" in lines[0] and "Fix: install the torchvision" in lines[0]
    assert not run_dir.exists()


@pytest.mark.integration
def test_a_mistake_in_a_real_process_is_one_line_and_exit_2(user_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train_cli(
        [str(user_dir / "config.yaml"), "loss.name=user.py:mean_ce", f"run.output_dir={run_dir}"],
        user_dir,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "batch mean" in lines[0], proc.stderr
    assert not run_dir.exists()


def _torchvision_imports() -> bool:
    code = "import torchvision.models"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_malformed_entry_point_is_a_config_error(user_dir: Path) -> None:
    config = user_dir / "config.yaml"
    with pytest.raises(ConfigError, match=r"model.name = 'a b:c'.*neither a dotted module"):
        load_config(config, ["model.name='a b:c'"])
    with pytest.raises(ConfigError, match=r"data.name = 'x.py:'.*expected 'module:function'"):
        load_config(config, ["data.name='x.py:'"])
    with pytest.raises(ConfigError, match=r"loss.name = 'huber'.*unknown loss"):
        load_config(config, ["loss.name=huber"])
    with pytest.raises(ConfigError, match=r"model.kwargs .*only to an entry point"):
        load_config(None, ["model.name=mlp", "model.kwargs={hidden: 3}"])
    with pytest.raises(ConfigError, match=r"data.augment"):
        load_config(config, ["data.augment=true"])


# ---------------------------------------------------------------------- the resolver itself


def test_relative_paths_are_the_config_files_or_the_command_lines(
    user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(user_dir / "config.yaml", ["loss.name=mine.py:f"])
    assert cfg.model.name == f"{(user_dir / 'user.py').resolve()}:make_model"
    assert cfg.loss.name == f"{(tmp_path / 'mine.py').resolve()}:f"  # from the command line
    assert cfg.model.kwargs == {"hidden": 8}
    # Module entry points and built-in names stay as written.
    assert absolute_entry_point("k", "pkg.mod:fn", tmp_path) == "pkg.mod:fn"
    assert absolute_entry_point("k", "mlp", tmp_path) == "mlp"
    assert absolute_entry_point("k", "/abs/x.py:fn", tmp_path) == "/abs/x.py:fn"


def test_resolve_walks_attributes_without_eval(tmp_path: Path) -> None:
    entry = parse_entry_point("model.name", "torch.nn.functional:relu")
    assert (entry.module, entry.attribute, entry.is_file) == ("torch.nn.functional", "relu", False)
    assert resolve_entry_point("k", "torch:nn.Linear") is nn.Linear
    with pytest.raises(EntryPointError, match="not a Python name"):
        parse_entry_point("k", "os:system('x')")
    # A file is imported once per path, as its own module.
    (tmp_path / "m.py").write_text("COUNT = []\nCOUNT.append(1)\ndef f():\n    return COUNT\n")
    first = resolve_entry_point("k", f"{tmp_path / 'm.py'}:f")
    second = resolve_entry_point("k", f"{tmp_path / 'm.py'}:f")
    assert first is second and first() == [1]
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(EntryPointError, match=r"running .*broken.py.* failed \(RuntimeError: boom"):
        resolve_entry_point("k", f"{tmp_path / 'broken.py'}:f")
