"""What distgrow refuses, and how: one table of hostile inputs (issue #12).

Each row is a hostile input (a file, a directory, a disk, a value), the command that meets it
(run in this process through :func:`distgrow.cli.main`), the exit status it must end with and
a fragment of the one line it must print; ``never`` lists what that line must not say, and
``untouched`` rows check that no file under the test's directory changed (nothing
overwritten, nothing executed). Remote shells (item 1) are tested with the launch package.

The full and read-only disks are real tmpfs mounts (``chmod`` does not stop root; the tests
and CI run as root).
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tmpfs
from test_data import _Evil, write_cifar

from distgrow import cli
from distgrow.config import dump_config, load_config
from distgrow.metrics import read_jsonl

SYNTHETIC: dict[str, dict[str, Any]] = {
    "data": {"name": "synthetic_classification", "synthetic_samples": 400, "synthetic_features": 8},
    "model": {"name": "mlp", "hidden": [16]},
    "optim": {"lr": 0.05, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1], "gamma": 0.5},
    "growth": {"base_batch": 32, "micro_batch": 16, "max_dataset_fraction": None},
    "run": {"epochs": 1, "threads": 1},
    "logging": {"every_steps": 1, "progress": "off"},
}


def config_file(tmp: Path) -> str:
    tree = {k: dict(v) for k, v in SYNTHETIC.items()}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def train(tmp: Path, *extra: str, run_dir: Path | None = None) -> list[str]:
    """``train job.yaml run.output_dir=RUN ...`` (RUN: ``tmp/run`` unless given)."""
    return ["train", config_file(tmp), f"run.output_dir={run_dir or tmp / 'run'}", *extra]


def finished_run(tmp: Path) -> Path:
    """A run trained to its end in ``tmp/run``."""
    with pytest.raises(SystemExit) as done:
        cli.main(train(tmp))
    assert done.value.code == 0
    return tmp / "run"


# -- the inputs -----------------------------------------------------------------------------


def nan_lr(tmp: Path) -> list[str]:
    return train(tmp, "optim.lr=nan")


def inf_scale(tmp: Path) -> list[str]:
    return ["plan", config_file(tmp), "growth.lr_scale=-inf"]


def run_name_up(tmp: Path) -> list[str]:
    return train(tmp, "run.name=..")


def output_dir_here(tmp: Path) -> list[str]:
    return ["train", config_file(tmp), "run.output_dir=."]


def another_runs_config(tmp: Path) -> list[str]:
    finished_run(tmp)
    return train(tmp, "model.hidden=[8]", "--resume")


def unreadable_config_yaml(tmp: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_bytes(b"\xff\xfe not yaml")
    return train(tmp)


def read_only_dir(tmp: Path) -> list[str]:
    ro = tmp_mounts(tmp, "ro", "64k", "ro")
    return train(tmp, run_dir=ro / "run")


def tiny_disk(tmp: Path) -> list[str]:
    disk = tmp_mounts(tmp, "disk", "48k")
    return train(tmp, "run.epochs=40", run_dir=disk / "run")


def file_in_the_way(tmp: Path) -> list[str]:
    (tmp / "out").write_text("a file, not a folder")
    return train(tmp, run_dir=tmp / "out" / "run")


def evil_cifar(tmp: Path) -> list[str]:
    root = tmp / "cifar"
    write_cifar(root)
    with (root / "data_batch_2").open("wb") as handle:
        pickle.dump({b"data": _Evil(tmp / "pwned"), b"labels": [0]}, handle, protocol=2)
    return train(tmp, "data.name=cifar10", f"data.root={root}", "model.name=cnn")


def empty_config(tmp: Path) -> list[str]:
    (tmp / "empty.yaml").write_text("# nothing set\n")
    return ["train", str(tmp / "empty.yaml")]


def latin1_config(tmp: Path) -> list[str]:
    (tmp / "latin1.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    return ["train", str(tmp / "latin1.yaml")]


def compare_other_config(tmp: Path) -> list[str]:
    config = config_file(tmp)
    run_dir = tmp / "cmp" / "runs" / "decay_lr"
    trained = load_config(config, ["optim.lr=0.1", f"run.output_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(trained))
    (run_dir / "metrics.jsonl").write_text('{"kind": "event", "event": "start"}\n')
    variants = ["--variants", "decay_lr,grow_batch"]
    return ["compare", config, "optim.lr=0.05", "--out", str(tmp / "cmp"), *variants]


def resume_finished(tmp: Path) -> list[str]:
    finished_run(tmp)
    return train(tmp, "--resume")


def unsplittable_base_batch(tmp: Path) -> list[str]:
    limits = ["growth.max_micro_batch=64", "growth.max_accum_steps=4", "growth.max_workers=1"]
    return ["plan", config_file(tmp), "growth.base_batch=512", "growth.micro_batch=64", *limits]


class _Payload:
    """A class torch's weights_only loader refuses (and would advise allow-listing)."""


def pickled_checkpoint(tmp: Path) -> list[str]:
    run_dir = tmp / "run"
    run_dir.mkdir()
    torch.save({"model": _Payload()}, run_dir / "ckpt-000000009.pt")
    return train(tmp, "--resume")


def crash_leftovers(tmp: Path) -> list[str]:
    """A run that crashed after its checkpoint at update 10 (epoch 1's end): the records of
    epoch 2 and a cut line follow it in metrics.jsonl."""
    run_dir = finished_run(tmp)  # 10 updates of 32
    with pytest.raises(SystemExit):
        cli.main(train(tmp, "run.epochs=2", "--resume"))
    (run_dir / "summary.json").unlink()
    for path in run_dir.glob("ckpt-*.pt"):
        if path.name != "ckpt-000000010.pt":
            path.unlink()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "step": 1')  # the crash cut this line
    return train(tmp, "run.epochs=2", "logging.progress=lines", "--resume")


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One hostile input: what it is, the command, the exit and the line it must give."""

    item: int
    setup: Callable[[Path], list[str]]
    exit: int
    says: str
    never: tuple[str, ...] = ()
    untouched: bool = True
    after: Callable[[Path], None] | None = None


def no_shell_ran(tmp: Path) -> None:
    assert not (tmp / "pwned").exists()


def each_update_once(tmp: Path) -> None:
    steps = [r["step"] for r in read_jsonl(tmp / "run" / "metrics.jsonl") if r["kind"] == "step"]
    total = read_jsonl(tmp / "run" / "metrics.jsonl")[-1]["total_updates"]
    assert total > 10 and steps == list(range(1, total + 1))


def nothing_written_on_the_disk(tmp: Path) -> None:
    # The newest checkpoint on the full disk still loads (its write was not half-done).
    run_dir = tmp / "disk" / "run"
    assert [p for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []


TABLE = {
    "non-finite lr": Hostile(2, nan_lr, 2, r"optim.lr = nan .*must be a finite number"),
    "non-finite scale (plan)": Hostile(2, inf_scale, 2, r"growth.lr_scale = -inf .*finite"),
    "run.name climbs out": Hostile(3, run_name_up, 2, r"run.name = '..': must be a plain folder"),
    "output_dir is the cwd": Hostile(3, output_dir_here, 2, r"run.output_dir = '.': is the curr"),
    "another run's config.yaml": Hostile(
        3,
        another_runs_config,
        2,
        r"config.yaml is another run's config .*model.hidden: \[16\] "
        r"in config.yaml, \[8\] now.*never overwrites it",
    ),
    "config.yaml not a config": Hostile(
        3, unreadable_config_yaml, 2, r"config.yaml is not a distgrow config .*never overwrites"
    ),
    "read-only output dir": Hostile(
        4, read_only_dir, 2, r"\[Errno 30 EROFS\] Read-only file system\. Fix: make .* writable"
    ),
    "full disk (48k tmpfs)": Hostile(
        4,
        tiny_disk,
        2,
        r"\[Errno 28 ENOSPC\] No space left on device\. Fix: free space on "
        r"the file system .*Nothing was overwritten .*--resume",
        untouched=False,
        after=nothing_written_on_the_disk,
    ),
    "file in the way": Hostile(
        4,
        file_in_the_way,
        2,
        r"\[Errno 20 ENOTDIR\] Not a directory\. Fix: move .*/out out of "
        r"the way",
    ),
    "malicious CIFAR pickle": Hostile(
        5, evil_cifar, 2, r"refusing.*(posix|os)\.system", after=no_shell_ran
    ),
    "empty config file": Hostile(5, empty_config, 2, r"holds no settings"),
    "non-UTF-8 config file": Hostile(5, latin1_config, 2, r"is not UTF-8 text.*Fix: save"),
    "compare --out of another config": Hostile(
        6,
        compare_other_config,
        2,
        r"trained with another config.*optim.lr \(0.1 there, 0.05 "
        r"now\).*--force",
    ),
    "resume of a finished run": Hostile(
        6,
        resume_finished,
        0,
        r"is finished \(1 epochs, 10 updates; run.epochs=1\): nothing to "
        r"resume; its summary.json, config and metrics were left as they are",
    ),
    "unsplittable base_batch": Hostile(
        7,
        unsplittable_base_batch,
        2,
        # main's planner (65b4414) says only "raise the limits" when the failing value is
        # the nearest multiple; a search of sizes that do split would offer 256.
        r"growth.base_batch \(512\) cannot be split exactly.*Fix: "
        r"(use growth.base_batch=256, or )?raise the limits\.",
        never=("=512", "512 or"),
    ),
    "checkpoint with pickled objects": Hostile(
        7,
        pickled_checkpoint,
        2,
        r"ckpt-000000009.pt holds objects other than tensors.*"
        r"Unsupported global: GLOBAL test_hostile_inputs._Payload\. Fix:",
        never=("weights_only=False", "weights_only` set to `False", "safe_globals", "trust"),
    ),
    "metrics after a crash": Hostile(
        7,
        crash_leftovers,
        0,
        r"resuming from .*ckpt-000000010.pt",
        untouched=False,
        after=each_update_once,
    ),
}


def tmp_mounts(tmp: Path, name: str, size: str, *options: str) -> Path:
    """A tmpfs mounted under ``tmp`` for the current test (unmounted by :func:`mounts`)."""
    return _MOUNTS.enter_context(tmpfs(tmp / name, size, *options))


_MOUNTS = contextlib.ExitStack()


@pytest.fixture
def mounts() -> Iterator[None]:
    with _MOUNTS:
        yield


def snapshot(tmp: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(tmp)): p.read_bytes()
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != "filler"
    }


@pytest.mark.parametrize("case", list(TABLE.values()), ids=list(TABLE))
def test_hostile_input(
    case: Hostile, tmp_path: Path, capsys: pytest.CaptureFixture[str], mounts: None
) -> None:
    argv = case.setup(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # `train` ends its process through the backend
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    assert code == case.exit, f"exit {code}, not {case.exit}: {err or out}"
    said = err if case.exit else out + err
    assert "Traceback" not in said
    if case.exit:
        assert err.count("\n") == 1, f"not one line: {err!r}"
    assert re.search(case.says, said), said
    for phrase in case.never:
        assert phrase not in said, f"{phrase!r} in {said!r}"
    if case.untouched:
        assert snapshot(tmp_path) == before
    if case.after is not None:
        case.after(tmp_path)


# -- a run directory's own config.yaml, broken by hand ------------------------------------------

LAUGHS = "\n".join(
    ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
)
BROKEN_CONFIG_YAML = {
    "invalid YAML": (lambda text: text + "model: {hidden: [16\n", r"not valid YAML: .* at line"),
    # cut mid-key (a cut at a line's end is a valid mapping whose missing keys the resume compares)
    "truncated": (
        lambda text: text[: text.index("warmup_shape") + 6],
        r"not valid YAML: .* at line",
    ),
    "emptied": (lambda text: "", r"is empty"),
    "alias bomb": (lambda text: LAUGHS + "\n", r"refused: its aliases expand .*billion laughs"),
}


@pytest.mark.parametrize("case", list(BROKEN_CONFIG_YAML), ids=list(BROKEN_CONFIG_YAML))
def test_a_broken_config_yaml_of_a_run_is_one_line_on_resume_and_in_report(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hand-edited into invalid YAML, cut short, emptied or an alias bomb: ``train --resume``
    and ``report`` each say so in one line naming the file and the fix, and the checkpoints,
    metrics and summary stay as they were."""
    run_dir = finished_run(tmp_path)
    config = run_dir / "config.yaml"
    edit, says = BROKEN_CONFIG_YAML[case]
    config.write_text(edit(config.read_text()))
    before = snapshot(tmp_path)
    assert any(name.startswith("run/ckpt-") for name in before)
    capsys.readouterr()
    for argv, fix in (
        (train(tmp_path, "run.epochs=2", "--resume"), r"Fix: restore it from the job's YAML"),
        (["report", str(run_dir), "--out", str(tmp_path / "rep")], r"Fix: restore it from"),
    ):
        try:
            code = cli.main(argv)
        except SystemExit as stop:
            code = int(stop.code or 0)
        err = capsys.readouterr().err
        assert code == 2, f"{argv[0]}: exit {code}: {err}"
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert str(config) in err and re.search(says, err) and re.search(fix, err), err
        assert "lol" not in err
        assert snapshot(tmp_path) == before  # nothing overwritten, nothing lost
