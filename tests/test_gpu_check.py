"""The GPU check (scripts/gpu_check.py, `make gpu-check`) as far as a CPU runs it, and the
normalisation that makes the `gpu` tier's CUDA-equals-CPU test right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from distgrow.data.transforms import NormalizeImages

REPO = Path(__file__).resolve().parent.parent


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


# -- the normalisation the gpu tier compares bit for bit ---------------------------------------


def test_cuda_style_division_differs_from_the_cpus_in_126_byte_values() -> None:
    """Why the table exists: ``x * (1/255)`` (CUDA's ``x / 255.0``) is one ulp off ``x / 255``
    for 126 of the 256 byte values, so the arithmetic alone cannot give the same bits."""
    v = torch.arange(256, dtype=torch.float32)
    differ = v / 255.0 != v * torch.tensor(1 / 255, dtype=torch.float32)
    assert int(differ.sum()) == 126


@pytest.mark.parametrize("channels", [1, 3])
def test_the_table_a_gpu_looks_up_equals_the_cpus_formula_for_every_byte(channels: int) -> None:
    mean, std = (0.2860, 0.49, 0.48)[:channels], (0.3530, 0.25, 0.26)[:channels]
    normalize = NormalizeImages(mean, std)
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, channels, 1, 1)
    x[1] = x[1].flip(-1)
    formula = normalize(x, torch.arange(2), 0)  # the CPU path: the formula as written
    assert torch.equal(normalize.lookup(x), formula)
    assert torch.equal(formula, (x.float() / 255.0 - normalize.mean) / normalize.std)


# -- the script ------------------------------------------------------------------------------------


def test_the_table_is_one_markdown_table_with_a_row_per_check() -> None:
    rows = [
        gpu_check.Row("sync count", "ok", 1.25, "64x1: [1, 1]"),
        gpu_check.Row("OOM fallback", "FAIL", 3.0, "a | b\nc"),
    ]
    text = gpu_check.format_table(rows, "NVIDIA H100 x1")
    lines = text.splitlines()
    assert lines[0] == "GPU check on NVIDIA H100 x1"
    assert lines[2:] == [
        "| check | result | seconds | detail |",
        "|---|---|---:|---|",
        "| sync count | ok | 1.2 | 64x1: [1, 1] |",
        "| OOM fallback | FAIL | 3.0 | a / b c |",
    ]


def test_a_check_is_ok_skip_or_fail_with_its_last_line() -> None:
    def skipped() -> str:
        raise gpu_check.SkipCheck("deepspeed is not installed")

    def broken() -> str:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert gpu_check.run_check("a", lambda: "fine").result == "ok"
    assert gpu_check.run_check("a", lambda: "fine").detail == "fine"
    row = gpu_check.run_check("b", skipped)
    assert (row.result, row.detail) == ("skip", "deepspeed is not installed")
    row = gpu_check.run_check("c", broken)
    assert row.result == "FAIL"
    assert row.detail == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_the_sync_counter_counts_reads_of_the_watched_device_only() -> None:
    host = torch.ones(3)
    original_item = torch.Tensor.item
    with gpu_check.SyncCounter("cuda") as on_cuda:
        with on_cuda.update():
            float(host.sum()), host.tolist(), host[0].item()  # host tensors: not counted
            with pytest.raises((RuntimeError, AssertionError)):  # no CUDA here; still counted
                torch.cuda.synchronize()
        assert on_cuda.total() == 1 and on_cuda.calls["synchronize"] == 1
    with gpu_check.SyncCounter("cpu") as on_cpu:
        with on_cpu.update():
            float(host.sum()), host.tolist(), host[0].item(), bool(host[1])
        host.tolist()  # outside update(): not counted
        assert dict(on_cpu.calls) == {"__float__": 1, "tolist": 1, "item": 1, "__bool__": 1}
        assert any("test_gpu_check.py" in where for where in on_cpu.where)
    assert torch.Tensor.item is original_item  # restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without")
def test_without_a_gpu_the_check_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "torch sees no CUDA device" in err and "Fix:" in err


def test_an_unknown_check_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--only", "sync,warp_drive"])
    assert exit_info.value.code == 2
    assert "unknown check(s) ['warp_drive']" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's skips; a GPU runs them")
def test_on_the_cpu_the_gpu_only_checks_are_skipped_naming_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rows.json"
    only = "tests,oom,ds_fp16,ds_bf16,compare"
    assert gpu_check.main(["--allow-cpu", "--only", only, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["check"] for r in rows] == [
        "gpu tests",
        "OOM fallback",
        "DeepSpeed ZeRO-2 fp16",
        "DeepSpeed ZeRO-2 bf16",
        "Fashion-MNIST compare",
    ]
    assert {r["result"] for r in rows} == {"skip"}
    assert all("needs a CUDA device" in r["detail"] for r in rows)
    table = capsys.readouterr().out
    assert "| Fashion-MNIST compare | skip |" in table


def test_make_gpu_check_runs_the_script_through_its_shell_wrapper() -> None:
    # Under `make test` the parent make's MAKELEVEL/MAKEFLAGS would make this one print
    # "make[1]: Leaving directory ..." last: run it as a user would, from a shell.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "gpu-check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env=env,
    ).stdout
    assert dry.splitlines()[-1] == "bash scripts/gpu_check.sh"
    wrapper = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert 'exec "$BIN/python" scripts/gpu_check.py "$@"' in wrapper
