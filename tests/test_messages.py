"""Messages that say what happened, and the frictions of the own-data path (issue #22, 4-6).

Each refusal goes through the real CLI (:func:`distgrow.cli.main` in this process): exit 2,
one line naming the problem, and no file changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distgrow import cli, extensions
from distgrow.config import ConfigError, DataConfig, load_config
from distgrow.data import load_dataset
from distgrow.data.containers import DatasetNotFoundError
from distgrow.data.readers import text
from distgrow.loop import GrowthSchedule

SMALL: dict[str, Any] = {
    "data": {"name": "synthetic_classification", "synthetic_samples": 4000},
    "model": {"name": "mlp", "hidden": [16]},
    "schedule": {"type": "multistep", "milestones": [2, 4], "gamma": 0.5},
    "growth": {"base_batch": 64, "micro_batch": 16, "max_dataset_fraction": None},
    "run": {"epochs": 6},
}


def config_file(tmp: Path, tree: dict[str, Any] | None = None) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(tree or SMALL))
    return path


def files_of(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], tmp: Path) -> str:
    """Run ``argv``: exit 2, nothing on stdout, one line on stderr (returned), no file changed."""
    before = files_of(tmp)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1, err
    assert files_of(tmp) == before
    return err


# -- item 4: the message names what happened ----------------------------------------------------


def test_plan_of_a_directory_says_it_is_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(capsys, ["plan", str(tmp_path)], tmp_path)
    assert "is a directory" in err and "does not exist" not in err


def test_chain_on_a_corrupt_record_says_not_valid_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "slurm_jobs.json").write_text('{"mode": "chain", "jobs": [')
    for action in ("status", "cancel"):
        code = cli.main(["chain", action, str(tmp_path)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "slurm_jobs.json is not valid JSON" in err and "does not exist" not in err
    assert (tmp_path / "slurm_jobs.json").read_text() == '{"mode": "chain", "jobs": ['
    (tmp_path / "slurm_jobs.json").unlink()
    code = cli.main(["chain", "status", str(tmp_path)])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "order",
    [
        ["{cfg}", "growth.base_batch=32", "--json", "--workers", "2"],
        ["{cfg}", "--json", "growth.base_batch=32", "--workers", "2"],
        ["--workers", "2", "{cfg}", "--json", "growth.base_batch=32"],
        ["{cfg}", "--workers=2", "growth.base_batch=32", "--json"],
    ],
)
def test_options_and_overrides_in_any_order(
    order: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(config_file(tmp_path))
    assert cli.main(["plan", *(a.format(cfg=cfg) for a in order)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["base_batch"] == 32  # the override was read
    assert plan["phases"][0]["workers"] == 2  # and so was --workers


def test_every_verb_takes_its_options_after_the_overrides() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["probe", "c.yaml", "run.x=1", "--memory-budget", "0.5", "run.y=2"])
    assert (args.config, args.overrides, args.memory_budget) == (
        "c.yaml",
        ["run.x=1", "run.y=2"],
        "0.5",
    )
    args = parser.parse_args(["train", "c.yaml", "--resume", "a=1", "b=2"])
    assert args.resume and args.overrides == ["a=1", "b=2"]
    args = parser.parse_args(["compare", "c.yaml", "--out", "o", "a=1", "--force", "b=2"])
    assert (args.out, args.force, args.overrides) == ("o", True, ["a=1", "b=2"])
    args = parser.parse_args(
        ["sweep", "c.yaml", "a=1", "--lrs", "0.1", "b=2", "--batch-sizes", "8"]
    )
    assert (args.lrs, args.batch_sizes, args.overrides) == ("0.1", "8", ["a=1", "b=2"])
    args = parser.parse_args(["report", "r1", "--out", "o", "r2", "--baseline", "r1"])
    assert (args.run_dirs, args.out, args.baseline) == (["r1", "r2"], "o", "r1")
    args = parser.parse_args(["launch", "c.yaml", "a=1", "--dry-run", "b=2"])
    assert args.dry_run and args.overrides == ["a=1", "b=2"]
    with pytest.raises(SystemExit) as usage:  # an unknown option is still a usage error
        parser.parse_args(["plan", "c.yaml", "a=1", "--jsn"])
    assert usage.value.code == 2


# -- item 5: model.name leaving the entry-point world ------------------------------------------


def entry_point_config(tmp: Path) -> Path:
    tree = {**SMALL, "model": {"name": "my_models:build", "kwargs": {"width": 8}}}
    return config_file(tmp, tree)


def test_a_built_in_model_by_override_drops_the_entry_points_kwargs(tmp_path: Path) -> None:
    path = entry_point_config(tmp_path)
    assert load_config(path).model.kwargs == {"width": 8}
    switched = load_config(path, ["model.name=mlp"])
    assert switched.model.name == "mlp" and switched.model.kwargs == {}
    # Another entry point keeps them (they may still apply), and merged kwargs merge.
    assert load_config(path, ["model.name=other:build"]).model.kwargs == {"width": 8}
    merged = load_config(path, ["model.kwargs={depth: 2}"]).model.kwargs
    assert merged == {"width": 8, "depth": 2}
    # Setting both, the kwargs given are checked against the built-in: refused, by name.
    with pytest.raises(ConfigError, match=r"model\.kwargs = \{'depth': 2\}: applies only"):
        load_config(path, ["model.name=mlp", "model.kwargs={depth: 2}"])


def test_kwargs_null_clears_them(tmp_path: Path) -> None:
    path = entry_point_config(tmp_path)
    cleared = load_config(path, ["model.kwargs=null"])
    assert cleared.model.name == "my_models:build" and cleared.model.kwargs == {}
    assert load_config(path, ["model.kwargs=null", "model.name=cnn"]).model.kwargs == {}
    assert load_config(None, ["loss.kwargs=null"]).loss.kwargs == {}


def test_plan_with_a_built_in_model_by_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(entry_point_config(tmp_path))
    assert cli.main(["plan", path, "model.name=mlp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base_batch"] == 64


# -- item 5: your own text ---------------------------------------------------------------------


def test_text_reads_data_path_whole_and_honours_val_path(tmp_path: Path) -> None:
    seq_len = 8
    train_bytes = bytes(range(256)) * 5000  # 1.28 MB: more than python_stdlib's 1 MiB
    val_bytes = b"held out text " * 40  # 560 bytes: 62 windows of 9
    (tmp_path / "train.txt").write_bytes(train_bytes)
    (tmp_path / "val.txt").write_bytes(val_bytes)
    cfg = load_config(
        None,
        [
            "data.name=text",
            f"data.path={tmp_path / 'train.txt'}",
            f"data.val_path={tmp_path / 'val.txt'}",
            f"data.seq_len={seq_len}",
        ],
    ).data
    bundle = load_dataset(cfg, seed=0)
    assert bundle.task == "language_model" and bundle.num_classes == 256
    assert len(bundle.train) == len(train_bytes) // (seq_len + 1) > text.CORPUS_BYTES // 9
    assert len(bundle.val) == len(val_bytes) // (seq_len + 1) == 62
    val_x, val_y = bundle.val.batch(torch.arange(2))
    assert (
        bytes(val_x[1].tolist()) == val_bytes[9:17] and bytes(val_y[1].tolist()) == val_bytes[10:18]
    )
    # Without val_path, blocks of the text are held out (as python_stdlib's).
    split = load_dataset(DataConfig(name="text", path=cfg.path, seq_len=seq_len), seed=0)
    assert len(split.train) + len(split.val) == len(bundle.train)
    assert 0 < len(split.val) < len(split.train)


def test_text_needs_data_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"^text: data\.path is null"):
        load_dataset(DataConfig(name="text", seq_len=8))
    with pytest.raises(DatasetNotFoundError, match=r"text: data\.val_path .*nowhere"):
        (tmp_path / "t.txt").write_bytes(b"x" * 400)
        load_dataset(
            DataConfig(
                name="text",
                path=str(tmp_path / "t.txt"),
                val_path=str(tmp_path / "nowhere"),
                seq_len=8,
            )
        )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("synthetic_classification", "splits with data.val_fraction"),
        ("mnist", "brings its own validation set"),
        ("python_stdlib", "splits with data.val_fraction"),
        ("my_data:make", "your function returns the validation set"),
    ],
)
def test_val_path_is_refused_where_nothing_reads_it(
    name: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(config_file(tmp_path))
    err = refused(
        capsys,
        ["plan", path, f"data.name={name}", "data.val_path=v.npz", "data.size=100"],
        tmp_path,
    )
    assert "data.val_path = 'v.npz': is not read for data.name=" in err and why in err


# -- item 5: the world size of a plan ------------------------------------------------------------


def test_plan_takes_the_world_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(config_file(tmp_path))
    assert cli.main(["plan", path, "--workers", "4"]) == 0
    table = capsys.readouterr().out
    assert "max_workers: unset → the job's world size (4 here)" in table
    assert cli.main(["plan", path, "--json", "--workers", "4"]) == 0
    phases = json.loads(capsys.readouterr().out)["phases"]
    # 64 over 4 workers of 16, then the micro-batch grows: 128 = 4 × 32, 256 = 4 × 64.
    assert [(p["global_batch"], p["workers"], p["micro_batch"]) for p in phases] == [
        (64, 4, 16),
        (128, 4, 32),
        (256, 4, 64),
    ]
    assert cli.main(["plan", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["phases"][0]["workers"] == 1
    err = refused(capsys, ["plan", path, "--workers", "0"], tmp_path)
    assert "--workers 0" in err
    err = refused(capsys, ["plan", path, "--workers", "4", "growth.max_workers=2"], tmp_path)
    assert "the job has 4 workers but growth.max_workers is 2" in err


def test_an_own_loop_on_fewer_processes_says_its_split_differs(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path), ["growth.max_workers=4"])
    with pytest.warns(UserWarning) as told:
        schedule = GrowthSchedule(cfg, 3200, rank=0, world_size=2)
        updates = [u for _ in schedule.epochs() for u in schedule.updates()]
    lines = [str(w.message) for w in told if "this job has" in str(w.message)]
    assert len(lines) == 1, lines  # said once, not per update
    assert lines[0].startswith(
        "this job has 2 processes but the plan (growth.max_workers=4) splits the global batch "
        "of 64 over 4 workers (micro-batch 16 × 1 accumulation steps); here it is 2 × "
        "micro-batch 32 × 1 steps"
    )
    assert updates[0].setting.workers == 2 and updates[0].setting.global_batch == 64
    with warnings.catch_warnings():  # the other ranks, and a job of the plan's size, say nothing
        warnings.simplefilter("error")
        other = GrowthSchedule(cfg, 3200, rank=1, world_size=2)
        full = GrowthSchedule(cfg, 3200, rank=0, world_size=4)
        for s in (other, full):
            for _ in s.epochs():
                for _ in s.updates():
                    pass


# -- item 6: DeepSpeed's JIT cache inside the environment, and its stale locks ----------------


def test_the_jit_cache_is_the_environments_unless_the_user_set_it() -> None:
    env: dict[str, str] = {}
    assert extensions.use_environment_cache(env, prefix="/opt/venv") == Path(
        "/opt/venv/torch_extensions"
    )
    assert env == {"TORCH_EXTENSIONS_DIR": "/opt/venv/torch_extensions"}
    mine = {"TORCH_EXTENSIONS_DIR": "/scratch/ext"}
    assert extensions.use_environment_cache(mine, prefix="/opt/venv") == Path("/scratch/ext")
    assert mine == {"TORCH_EXTENSIONS_DIR": "/scratch/ext"}
    assert extensions.default_dir() == Path(sys.prefix) / "torch_extensions"


def test_a_read_only_environment_leaves_torchs_own_cache(tmp_path: Path) -> None:
    (tmp_path / "not_a_folder").write_text("")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    where = extensions.use_environment_cache(env, prefix=str(tmp_path / "not_a_folder"))
    assert where == tmp_path / "cache" / "torch_extensions"
    assert "TORCH_EXTENSIONS_DIR" not in env


@pytest.mark.integration
def test_distgrow_processes_build_inside_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    probe = "import os; from distgrow import cli; cli.main(['config', '--schema']);"
    probe += " print(os.environ['TORCH_EXTENSIONS_DIR'])"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == str(Path(sys.prefix) / "torch_extensions")


def _lock(root: Path, name: str, age_s: float) -> Path:
    lock = root / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_lock_no_process_holds_is_named(tmp_path: Path) -> None:
    old = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    problem = extensions.check_locks(tmp_path)
    assert problem is not None and problem.count("\n") == 0
    assert problem.startswith(f"{old} is the lock of a JIT build of deepspeed_shm_comm")
    assert "60 min old" in problem and f"Fix: rm {old}" in problem
    old.unlink()
    # Younger: another machine sharing the file system might be building it: a warning.
    young = _lock(tmp_path / "py311_cpu", "deepspeed_shm_comm", 120)
    said: list[str] = []
    assert extensions.check_locks(tmp_path, warn=said.append) is None
    assert len(said) == 1 and str(young) in said[0] and "(120 s old)" in said[0]


def test_a_lock_held_open_is_a_build_in_progress(tmp_path: Path) -> None:
    lock = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc here: the holder of a lock cannot be seen")
    fd = os.open(lock, os.O_RDONLY)  # what torch's FileBaton keeps open while it builds
    try:
        assert extensions.orphaned_locks(tmp_path) == []
        assert extensions.check_locks(tmp_path, warn=pytest.fail) is None
    finally:
        os.close(fd)
    assert [p for p, _ in extensions.orphaned_locks(tmp_path)] == [lock]


def test_deepspeed_refuses_to_wait_on_a_stale_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distgrow.backends import BackendError
    from distgrow.backends.deepspeed_backend import _import_deepspeed

    lock = _lock(tmp_path, "deepspeed_shm_comm", 7200)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(BackendError, match=rf"^{lock} is the lock of a JIT build .*Fix: rm"):
        _import_deepspeed()


# -- item 5: a compare on a machine whose speed changed between the runs -----------------------


def _runs_at_two_speeds(tmp: Path, spread: float) -> list[Path]:
    """A baseline and a hybrid whose B0 phases ran at 1,000 and 7,500 samples/s (the machine
    changed), each with CPU-seconds recorded and update times of relative spread ``spread``."""
    from test_report import fake_run

    runs = [
        fake_run(tmp, "decay_lr", ["growth.mode=decay_lr"], wall_s=75.0, final_acc=0.90),
        fake_run(
            tmp,
            "hybrid",
            ["growth.mode=grow_batch", "growth.max_global_batch=250"],
            wall_s=10.0,
            final_acc=0.90,
        ),
    ]
    for run, cpu_s in zip(runs, (48.0, 21.0), strict=True):
        summary = json.loads((run / "summary.json").read_text())
        summary["train_cpu_s"] = cpu_s
        for p in summary["phases"]:
            mean = p["train_s"] / p["updates"]
            p["update_s_m2"] = (spread * mean) ** 2 * (p["updates"] - 1)
        (run / "summary.json").write_text(json.dumps(summary))
    return runs


def test_compare_says_when_the_measured_wall_clock_is_not_comparable(tmp_path: Path) -> None:
    from distgrow.report import report

    out = tmp_path / "report"
    report(_runs_at_two_speeds(tmp_path / "runs", spread=0.1), out_dir=out, echo=lambda _: None)
    row = next(
        r for r in json.loads((out / "summary.json").read_text())["runs"] if r["label"] == "hybrid"
    )
    assert row["wall_comparable"] is False
    assert row["train_cpu_s"] == {"run": 21.0, "baseline": 48.0}
    drift = row["throughput_drift"]
    assert drift.startswith(
        "at the same batch B0=50 it trained at 7,500 samples/s and the baseline at 1,000 "
        "samples/s (+650%), beyond either run's own spread (±10% per update): the machine was "
        "not equally loaded, so the measured wall-clock is not comparable. Trust the estimated "
        "wall-clock"
    )
    assert drift.endswith("21.0 s against the baseline's 48.0 s (2.29× less).")
    md = (out / "report.md").read_text()
    hybrid_row = next(line for line in md.splitlines() if line.startswith("| hybrid |"))
    assert "7.50× faster (not comparable)" in hybrid_row
    assert f"- **wall-clock not comparable**: {drift}" in md


def test_a_gap_within_the_runs_own_spread_is_no_warning(tmp_path: Path) -> None:
    from distgrow.report import report

    out = tmp_path / "report"
    # Update times that vary ±400% make a 7.5× gap in the mean throughput no evidence.
    report(_runs_at_two_speeds(tmp_path / "runs", spread=4.0), out_dir=out, echo=lambda _: None)
    row = next(
        r for r in json.loads((out / "summary.json").read_text())["runs"] if r["label"] == "hybrid"
    )
    assert "throughput_drift" not in row and "wall_comparable" not in row
    assert "not comparable" not in (out / "report.md").read_text()
