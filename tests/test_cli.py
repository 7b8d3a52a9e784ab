"""`distgrow plan` and `distgrow config`, through main() and as a real subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import distgrow
from distgrow.cli import main

ROOT = Path(__file__).resolve().parent.parent
CIFAR = str(ROOT / "configs" / "cifar10_wrn16_4.yaml")


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plan", CIFAR, "growth.max_dataset_fraction=null", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["total_updates"] == 29_000
    assert data["baseline_total_updates"] == 78_200
    assert data["dataset_size"] == 50_000
    assert data["update_ratio"] == pytest.approx(78_200 / 29_000)
    keys = {"start_epoch", "end_epoch", "global_batch", "workers", "micro_batch", "accum_steps",
            "lr", "momentum", "updates"}  # fmt: skip
    assert all(keys <= set(p) for p in data["phases"])
    assert [p["global_batch"] for p in data["phases"]] == [128, 640, 3200, 16000]
    assert [p["start_epoch"] for p in data["phases"]] == [0, 60, 120, 160]


def test_plan_table_shows_phases_and_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plan", CIFAR, "growth.max_global_batch=640")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if "batch" in line and "workers" in line)
    for column in ("epochs", "micro", "accum", "lr", "momentum", "noise", "updates"):
        assert column in header
    rows = [line.split() for line in lines if re.match(r"\s*\d+–\d+\s", line)]
    assert [r[0] for r in rows] == ["0–60", "60–120", "120–160", "160–200"]
    assert [r[1] for r in rows] == ["128", "640", "640*", "640*"]
    assert [r[5] for r in rows] == ["0.1", "0.1", "0.02", "0.004"]
    assert "total updates: 34,520   decay_lr baseline: 78,200" in out
    assert "hybrid" in out


def test_plan_ladder_for_plateau(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "plan", str(ROOT / "configs" / "covtype_bottleneck.yaml"))
    assert code == 0
    assert "rung" in out and "updates/epoch" in out
    assert re.search(r"^\s*1\s+1280\s", out, re.M)
    code, out, _ = run_main(capsys, "plan", str(ROOT / "configs" / "covtype_bottleneck.yaml"),
                            "--json")  # fmt: skip
    data = json.loads(out)
    assert data["ladder"] is True and data["total_updates"] is None
    assert data["phases"][1]["global_batch"] == 1280


def test_config_errors_exit_2_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "plan", CIFAR, "growth.max_global_batch=64")
    assert code == 2 and out == ""
    assert "growth.max_global_batch = 64" in err and "Fix:" in err
    code, _, err = run_main(capsys, "plan", CIFAR, "optimizer.lr=1")
    assert code == 2 and "unknown key 'optimizer'" in err


def test_config_verb(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "config")
    assert code == 0 and "growth.max_dataset_fraction (float | null, default 0.1)" in out
    code, out, _ = run_main(capsys, "config", CIFAR, "optim.lr=0.2")
    assert code == 0 and "lr: 0.2" in out


def test_config_schema_is_json_for_editors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "config", "--schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "distgrow config"
    assert set(schema["properties"]) == {
        "run", "data", "model", "loss", "optim", "schedule", "growth", "noise", "backend",
        "launch", "logging",
    }  # fmt: skip
    optim = schema["$defs"]["OptimConfig"]["properties"]
    assert optim["lr"]["type"] == "number" and optim["lr"]["default"] == 0.1
    code, out, err = run_main(capsys, "config", CIFAR, "--schema")
    assert code == 2 and out == "" and "takes no CONFIG" in err


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("distgrow: config error: "), err
    assert re.search(expected, err), err
    assert "Traceback" not in err


BAD_NUMBERS = [
    (["optim.lr=nan"], r"optim.lr = nan in the command-line overrides: must be a finite number"),
    (["growth.lr_scale=-inf"], r"growth.lr_scale = -inf .*finite"),
    (["schedule.milestones=[60, inf]"], r"schedule.milestones\[1\] = inf .*finite"),
    (["run.epochs=1000000000000000000000"], r"run.epochs = 10{21} .*64 bits"),
    (["run.epochs=1000000"], r"run.epochs = 1000000: must be at most 100,000"),
    (["optim.eps=0"], r"optim.eps = 0.0: must be positive"),
    (["run.name=.."], r"run.name = '..': must be a plain folder name"),
    (["run.name=/tmp/x"], r"run.name = '/tmp/x': must be a plain folder name"),
    (["run.output_dir=."], r"run.output_dir = '.': is the current directory"),
]


@pytest.mark.parametrize("verb", ["plan", "config", "train"])
@pytest.mark.parametrize(("overrides", "expected"), BAD_NUMBERS)
def test_bad_values_exit_2_in_one_line_from_every_verb(
    capsys: pytest.CaptureFixture[str], verb: str, overrides: list[str], expected: str
) -> None:
    _one_line_exit_2(capsys, [verb, CIFAR, *overrides], expected)


@pytest.mark.parametrize("verb", ["plan", "config", "train"])
def test_empty_and_non_utf8_files_exit_2_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, verb: str
) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    _one_line_exit_2(capsys, [verb, str(empty)], r"holds no settings.*would train the defaults")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"run:\n  name: caf\xe9\n")
    _one_line_exit_2(capsys, [verb, str(latin)], r"is not UTF-8 text.*Fix: save the file as UTF-8")


@pytest.mark.integration
def test_python_dash_m_runs_the_same_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "distgrow", "plan", CIFAR, "growth.max_global_batch=640", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total_updates"] == 34_520


def test_public_api_convert_hybrid() -> None:
    policy = distgrow.convert(
        50_000,
        run={"epochs": 200},
        optim={"lr": 0.1, "momentum": 0.9},
        schedule={"type": "multistep", "milestones": [60, 120, 160], "gamma": 0.2},
        growth={"base_batch": 128, "max_global_batch": 640},
    )
    got = [(s.global_batch, round(s.lr, 6)) for s in map(policy.setting, (0, 59, 60, 130, 199))]
    assert got == [(128, 0.1), (128, 0.1), (640, 0.1), (640, 0.02), (640, 0.004)]
    with pytest.raises(distgrow.ConfigError, match="unknown key 'growth.max_batch'"):
        distgrow.convert(100, growth={"max_batch": 3})


def test_readme_python_example_runs() -> None:
    """The README's converter example is executed as written."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README must show the converter API in a ```python block"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # the doc's own asserts check the values


@pytest.mark.integration
def test_importing_distgrow_does_not_import_torch() -> None:
    code = "import sys, distgrow, distgrow.planner; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_launch_dry_run_prints_one_command_per_worker_span(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fm = str(ROOT / "configs" / "fashion_mnist_mlp.yaml")
    argv = ["launch", fm, "growth.max_workers=4", "launch.launcher=torchrun", "--dry-run"]
    code, out, _ = run_main(capsys, *argv)
    assert code == 0
    commands = [line for line in out.splitlines() if line.strip().startswith("$ ")]
    assert len(commands) == 2
    assert "--nproc_per_node=1" in commands[0] and "run.resume=true" not in commands[0]
    assert "--nproc_per_node=4" in commands[1] and "run.resume=true" in commands[1]


def test_plan_shows_the_rule_the_warmup_and_where_the_cap_takes_over(
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = ["optim.name=adam", "optim.momentum=0", "schedule.type=cosine",
                 "schedule.warmup=5", "growth.max_global_batch=1024",
                 "growth.beta2_half_life=true"]  # fmt: skip
    code, out, _ = run_main(capsys, "plan", CIFAR, *overrides)
    assert code == 0
    assert out.splitlines()[0].endswith("B0=128, rule=sqrt")
    assert re.search(r"^\s*0–5 w\s+128\s", out, re.M)  # the warm-up row, at B0
    assert "rule sqrt: ε/√B = lr0·r(t)/√B0 kept" in out
    assert "adjustment: beta2_half_life: β₂ = β₂0^(B/B0)" in out
    assert re.search(r"capped at 1024 from epoch \d+ \(hybrid\)", out)
    code, out, _ = run_main(capsys, "plan", CIFAR, "schedule.type=cosine", "--json")
    data = json.loads(out)
    assert data["rule"] == "linear" and data["adjustments"] == []
    assert data["phases"][0]["warmup"] is False and data["phases"][0]["rampup"] is False
