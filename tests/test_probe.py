"""`distgrow probe`: the doubling sequence, the saturation rule on given and measured tables,
the memory-budget stop, the per-device cache and `growth.max_micro_batch: auto` in the plan."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import distgrow_job_argv
from test_trainer import SINGLE, syn_config

from distgrow import probe
from distgrow.backends.torch_ddp import TorchBackend
from distgrow.cli import main
from distgrow.config import load_config
from distgrow.exits import EXIT_OK, EXIT_USAGE
from distgrow.planner import make_plan
from distgrow.probe import (
    ProbeError,
    ProbeRow,
    doubling_sequence,
    parse_budget,
    predicted_peak,
    saturation_point,
)
from distgrow.startup import load_data
from distgrow.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own probe cache (never the user's ~/.cache)."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "distgrow" / "probe"


# -- the pure rules ---------------------------------------------------------------------------


def test_the_micro_batches_double_from_the_start_up_to_the_limit() -> None:
    assert doubling_sequence(32, 1023) == [32, 64, 128, 256, 512]
    assert doubling_sequence(32, 1024) == [32, 64, 128, 256, 512, 1024]
    assert doubling_sequence(48, 47) == [48]
    assert doubling_sequence(1, 8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="at least 1"):
        doubling_sequence(0, 8)


@pytest.mark.parametrize(
    ("table", "tolerance", "want"),
    [
        # Saturating: 512 reaches 96 % of the best (1024's): within 5 %.
        ([(128, 40_000.0), (256, 52_000.0), (512, 57_600.0), (1024, 60_000.0)], 0.05, 512),
        # The same table with a 1 % tolerance needs the best itself.
        ([(128, 40_000.0), (256, 52_000.0), (512, 57_600.0), (1024, 60_000.0)], 0.01, 1024),
        # Throughput falls past a peak: the smallest near the peak, not the largest.
        ([(64, 9_000.0), (128, 10_000.0), (256, 9_700.0), (512, 7_000.0)], 0.05, 128),
        # Rows in any order; exactly at the 5 % boundary counts.
        ([(256, 95.0), (64, 50.0), (128, 100.0)], 0.05, 128),
        ([(256, 100.0), (128, 95.0)], 0.05, 128),
        ([(16, 1.0)], 0.05, 16),
    ],
)
def test_the_saturation_point_is_the_smallest_micro_batch_near_the_best(
    table: list[tuple[int, float]], tolerance: float, want: int
) -> None:
    assert saturation_point(table, tolerance) == want


def test_the_saturation_point_of_no_table_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        saturation_point([])


def test_the_next_peak_is_extrapolated_from_the_last_two() -> None:
    assert predicted_peak([], 64) is None
    assert predicted_peak([(32, 100)], 64) == 200
    assert predicted_peak([(32, 100), (64, 150)], 128) == 250  # 50 more per 32 samples
    assert predicted_peak([(16, 10), (32, 100), (64, 300)], 128) == 700


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0.8", ("fraction", 0.8)),
        ("80%", ("fraction", 0.8)),
        ("1", ("fraction", 1.0)),
        ("12", ("bytes", 12 * 2**30)),
        ("1.5GiB", ("bytes", 1.5 * 2**30)),
    ],
)
def test_memory_budgets(text: str, want: tuple[str, float]) -> None:
    kind, value = parse_budget(text)
    assert kind == want[0] and value == pytest.approx(want[1])


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "lots", "150%", ""])
def test_bad_memory_budgets_are_refused(text: str) -> None:
    with pytest.raises(ProbeError, match=r"--memory-budget = .*Fix: e.g. --memory-budget 0.8"):
        parse_budget(text)


# -- measuring on this CPU --------------------------------------------------------------------


def tiny(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    """The synthetic job with micro-batches from 32: the probe's limit is N = 1033."""
    return syn_config(
        tmp_path / "run", "growth.micro_batch=null", "growth.max_micro_batch=null", *overrides
    )


def test_a_real_probe_on_the_cpu_measures_the_doubling_sequence(
    tmp_path: Path, cache_home: Path
) -> None:
    cfg = tiny(tmp_path)
    data = load_data(cfg)
    lines: list[str] = []
    result = probe.run_probe(cfg, data, memory_budget="4", steps=2, warmup=1, echo=lines.append)
    micro = [r.micro_batch for r in result.rows]
    assert micro == [32, 64, 128, 256, 512, 1024]  # up to N = 1033 training samples
    assert all(r.status == "ok" and r.samples_per_s and r.samples_per_s > 0 for r in result.rows)
    assert all(r.peak_bytes is not None and r.peak_bytes >= 0 for r in result.rows)
    assert result.budget_bytes == 4 * 2**30 and result.memory_kind == "cpu_peak_rss_growth"
    table = [(r.micro_batch, r.samples_per_s) for r in result.rows if r.samples_per_s]
    assert result.preferred_micro_batch == saturation_point(table)  # the rule, on this table
    assert result.max_micro_batch == 1024
    assert result.stopped.startswith("reached the largest global batch")
    text = "\n".join(lines)
    assert f"growth.micro_batch={result.preferred_micro_batch}" in text
    assert "growth.max_micro_batch=1024" in text
    # Cached, and read back as it was written.
    files = list(cache_home.glob("*.json"))
    assert [f.stem for f in files] == [result.key]
    assert probe.read_cache(result.key) == result
    stored = json.loads(files[0].read_text())
    assert stored["identity"]["input_shape"] == [16]
    assert stored["identity"]["precision"] == "fp32"
    # A second probe reads the cache; --refresh measures again.
    again = probe.run_probe(cfg, data, steps=2, warmup=1, echo=lines.append)
    assert again == result and "--refresh measures again" in lines[-1]
    fresh = probe.run_probe(cfg, data, refresh=True, steps=2, warmup=1, echo=lines.append)
    assert fresh.measured_at > result.measured_at


def test_the_cache_key_follows_the_model_precision_and_shape(tmp_path: Path) -> None:
    cfg = tiny(tmp_path)
    base = probe.probe_identity(cfg, (16,), "cpu: x")
    keys = {
        probe.cache_key(base),
        probe.cache_key(probe.probe_identity(tiny(tmp_path, "model.hidden=[64]"), (16,), "cpu: x")),
        probe.cache_key(
            probe.probe_identity(tiny(tmp_path, "backend.precision=bf16"), (16,), "cpu: x")
        ),
        probe.cache_key(probe.probe_identity(cfg, (17,), "cpu: x")),
        probe.cache_key(probe.probe_identity(cfg, (16,), "cuda: NVIDIA H200")),
    }
    assert len(keys) == 5
    # The schedule or the LR do not change the model's memory: the same key.
    other = tiny(tmp_path, "optim.lr=0.5", "schedule.gamma=0.1")
    assert probe.cache_key(probe.probe_identity(other, (16,), "cpu: x")) == probe.cache_key(base)


def _fake_rows(peaks: dict[int, int | None], oom: int | None = None):  # type: ignore[no-untyped-def]
    """A stand-in for one measurement: a fixed peak per micro-batch, 100 samples/s each."""

    def measure_one(stepper, micro_batch, steps, warmup, base):  # type: ignore[no-untyped-def]
        del stepper, steps, warmup, base
        if micro_batch == oom:
            return ProbeRow(micro_batch, "out_of_memory")
        return ProbeRow(micro_batch, "ok", 100.0 * micro_batch, peaks.get(micro_batch))

    return measure_one


def test_the_probe_stops_before_a_micro_batch_predicted_over_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(tmp_path)
    monkeypatch.setattr(probe, "_measure_one", _fake_rows({32: 100, 64: 200, 128: 400}))
    result = probe.measure(cfg, load_data(cfg), torch.device("cpu"), budget=700)
    # 256 would need about 800 (the line through 200 and 400): it is not run.
    assert [r.micro_batch for r in result.rows] == [32, 64, 128]
    assert result.max_micro_batch == 128
    assert "micro-batch 256 would need about" in result.stopped


def test_the_probe_stops_at_a_measured_peak_over_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(tmp_path)
    # 128 jumps above the line through 32 and 64 (predicted 300), and above the budget.
    monkeypatch.setattr(probe, "_measure_one", _fake_rows({32: 100, 64: 200, 128: 900}))
    result = probe.measure(cfg, load_data(cfg), torch.device("cpu"), budget=500)
    assert [(r.micro_batch, r.status) for r in result.rows] == [
        (32, "ok"),
        (64, "ok"),
        (128, "over_budget"),
    ]
    assert result.max_micro_batch == 64
    assert result.preferred_micro_batch == 64  # 6,400 samples/s: the best that fits


@pytest.mark.parametrize(
    ("overrides", "sizes"),
    [
        # The config's own memory limits are what the probe measures: they bound nothing.
        (("growth.max_micro_batch=8", "growth.max_accum_steps=2"), [32, 64, 128, 256, 512, 1024]),
        (("growth.max_global_batch=200",), [32, 64, 128]),
        (("growth.max_dataset_fraction=0.1",), [32, 64]),  # ⌊0.1 · 1033⌋ = 103
    ],
)
def test_the_largest_global_batch_bounds_the_micro_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: tuple[str, ...], sizes: list[int]
) -> None:
    cfg = syn_config(tmp_path / "run", "growth.micro_batch=null", *overrides)
    monkeypatch.setattr(probe, "_measure_one", _fake_rows({}))
    result = probe.measure(cfg, load_data(cfg), torch.device("cpu"), budget=None)
    assert [r.micro_batch for r in result.rows] == sizes


def test_the_probe_stops_at_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(tmp_path)
    monkeypatch.setattr(probe, "_measure_one", _fake_rows({}, oom=256))
    result = probe.measure(cfg, load_data(cfg), torch.device("cpu"), budget=None)
    assert [r.status for r in result.rows] == ["ok", "ok", "ok", "out_of_memory"]
    assert result.max_micro_batch == 128 and result.stopped == "micro-batch 256 ran out of memory"


def test_a_base_batch_that_does_not_fit_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(tmp_path)
    monkeypatch.setattr(probe, "_measure_one", _fake_rows({}, oom=32))
    with pytest.raises(ProbeError, match=r"growth.base_batch = 32 does not fit .*Fix: lower"):
        probe.measure(cfg, load_data(cfg), torch.device("cpu"), budget=None)


# -- growth.max_micro_batch: auto -------------------------------------------------------------


def _cache_answer(cfg, limit: int, world_size: int = 1) -> probe.ProbeResult:  # type: ignore[no-untyped-def]
    """A cached probe for ``cfg`` on this CPU and ``world_size`` workers saying ``limit``."""
    data = load_data(cfg)
    cpu = probe.device_name(torch.device("cpu"))
    identity = probe.probe_identity(cfg, data.input_shape, cpu, "host", world_size)
    result = probe.ProbeResult(
        key=probe.cache_key(identity),
        device=identity["device"],
        memory_kind="cpu_peak_rss_growth",
        budget_bytes=None,
        rows=[ProbeRow(m, "ok", float(m), 0) for m in (32, 64, 128)],
        preferred_micro_batch=limit,
        max_micro_batch=limit,
        stopped="test",
        identity=identity,
    )
    probe.write_cache(result)
    return result


def test_auto_reads_the_cache_and_the_planner_uses_it(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "growth.max_micro_batch=auto", "growth.max_accum_steps=null")
    assert cfg.growth.max_micro_batch == "auto"
    unresolved = make_plan(cfg, 1033)
    assert any("max_micro_batch=auto is not resolved" in n for n in unresolved.notes)
    assert max(p.micro_batch for p in unresolved.phases) == 64  # 32 → 64, no limit
    _cache_answer(cfg, 16)
    backend = TorchBackend(cfg.backend, SINGLE, device="cpu")
    said: list[str] = []
    resolved = probe.resolve_auto(cfg, load_data(cfg), backend, said.append)
    assert resolved.growth.max_micro_batch == 16 and cfg.growth.max_micro_batch == "auto"
    assert "growth.max_micro_batch=auto → 16 (probe cache" in said[0]
    plan = make_plan(resolved, 1033)
    assert [(p.global_batch, p.micro_batch, p.accum_steps) for p in plan.phases] == [
        (32, 16, 2),
        (64, 16, 4),
    ]
    assert not any("auto" in n for n in plan.notes)


def test_a_training_with_auto_plans_with_the_cached_limit_and_keeps_auto_in_its_config(
    tmp_path: Path,
) -> None:
    cfg = tiny(tmp_path, "growth.max_micro_batch=auto", "run.epochs=1")
    _cache_answer(cfg, 16)
    backend = TorchBackend(cfg.backend, SINGLE, device="cpu")
    data = load_data(cfg)
    plan_cfg = probe.resolve_auto(cfg, data, backend, lambda _: None)
    trainer = Trainer(cfg, backend, data, plan_cfg=plan_cfg)
    assert trainer.train() == EXIT_OK
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_setting"]["micro_batch"] == 16
    assert summary["phases"][0]["micro_batch"] == 16 and summary["phases"][0]["accum_steps"] == 2
    assert "max_micro_batch: auto" in (tmp_path / "run" / "config.yaml").read_text()


def test_auto_without_a_cache_probes_once_and_caches(tmp_path: Path, cache_home: Path) -> None:
    cfg = tiny(tmp_path, "growth.max_micro_batch=auto")
    backend = TorchBackend(cfg.backend, SINGLE, device="cpu")
    said: list[str] = []
    resolved = probe.resolve_auto(cfg, load_data(cfg), backend, said.append)
    (file,) = cache_home.glob("*.json")
    cached = probe.ProbeResult.from_json(json.loads(file.read_text()))
    assert resolved.growth.max_micro_batch == cached.max_micro_batch
    assert [r.micro_batch for r in cached.rows] == doubling_sequence(32, 1033)[: len(cached.rows)]
    assert "probing" in said[0] and "probed now, cached in" in said[1]


# -- the command ------------------------------------------------------------------------------


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        "data: {name: synthetic_classification, synthetic_samples: 300, synthetic_features: 8}\n"
        "model: {name: mlp, hidden: [16]}\n"
        "growth: {base_batch: 32, max_dataset_fraction: null}\n"
        "schedule: {type: multistep, milestones: [1], gamma: 0.5}\n"
        f"run: {{epochs: 2, threads: 1, output_dir: {tmp_path / 'out'}}}\n"
    )
    return path


def test_the_probe_command_prints_the_table_and_the_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path)
    argv = ["probe", str(config), "--memory-budget", "2", "--steps", "1", "--warmup", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [32, 64, 128]  # N = 240 training samples
    assert "throughput saturates at micro-batch" in out
    assert "growth.max_micro_batch=128" in out
    # distgrow plan with auto now reads the cache.
    assert main(["plan", str(config), "growth.max_micro_batch=auto"]) == 0
    captured = capsys.readouterr()
    assert "growth.max_micro_batch=auto → 128 (probe cache" in captured.err
    assert "not resolved" not in captured.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory-budget", "lots"], "--memory-budget = 'lots'"),
        (["--steps", "0"], "--steps = 0"),
        (["model.name=nope"], "model.name = 'nope' cannot be built"),
        (["growth.base_batch=0"], "config error: growth.base_batch"),
        (["data.name=cifar10", "data.root=/nonexistent"], "distgrow: error:"),
    ],
)
def test_bad_probe_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["probe", str(_config_file(tmp_path)), *argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_unreadable_cache_is_measured_again(tmp_path: Path, cache_home: Path) -> None:
    cfg = tiny(tmp_path)
    result = _cache_answer(cfg, 64)
    probe.cache_path(result.key).write_text("{not json")
    assert probe.read_cache(result.key) is None
    probe.cache_path(result.key).write_text(json.dumps({**result.to_json(), "version": 0}))
    assert probe.read_cache(result.key) is None
    probe.write_cache(replace(result, max_micro_batch=32))
    cached = probe.read_cache(result.key)
    assert cached is not None and cached.max_micro_batch == 32


@pytest.mark.integration
def test_two_ranks_plan_with_rank_0s_cached_answer(tmp_path: Path) -> None:
    """Rank 0 reads the cache and broadcasts; both ranks split batch 32 as 2 × 8 × 2 (the
    cached limit 8) instead of 2 × 16 × 1, and config.yaml keeps auto."""
    config = _config_file(tmp_path)
    cfg = load_config(str(config), ["growth.max_micro_batch=auto"])
    _cache_answer(cfg, 8, world_size=2)  # (a probe of one worker is another key)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    argv = distgrow_job_argv(
        2, [str(config), "growth.max_micro_batch=auto", "run.epochs=1", "logging.progress=lines"]
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("growth.max_micro_batch=auto → 8 (probe cache") == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    first = summary["phases"][0]
    assert (first["workers"], first["micro_batch"], first["accum_steps"]) == (2, 8, 2)
    assert "max_micro_batch: auto" in (tmp_path / "out" / "config.yaml").read_text()


# -- what training holds, and budgets ------------------------------------------------------------


def test_the_cache_key_follows_placement_world_size_backend_noise_and_compile(
    tmp_path: Path,
) -> None:
    cfg = tiny(tmp_path)
    base = probe.cache_key(probe.probe_identity(cfg, (16,), "cuda: x", "device", 1))
    others = {
        probe.cache_key(probe.probe_identity(cfg, (16,), "cuda: x", "pinned", 1)),
        probe.cache_key(probe.probe_identity(cfg, (16,), "cuda: x", "device", 8)),
        *(
            probe.cache_key(probe.probe_identity(tiny(tmp_path, o), (16,), "cuda: x", "device", 1))
            for o in ("run.compile=true", "noise.measure=on", "run.channels_last=true")
        ),
    }
    assert base not in others and len(others) == 5


def test_training_overhead_counts_ddp_buckets_and_the_noise_meters_copy(tmp_path: Path) -> None:
    model = torch.nn.Linear(10, 10)  # 110 float32 parameters: 440 bytes of gradients
    assert probe.training_overhead_bytes(tiny(tmp_path), model, 1) == 0
    assert probe.training_overhead_bytes(tiny(tmp_path), model, 4) == 440
    noisy = tiny(tmp_path, "noise.measure=on")
    assert probe.training_overhead_bytes(noisy, model, 4) == 440 + 110 * 8


@pytest.mark.parametrize("text", ["1e30", "2000000"])
def test_an_impossible_budget_in_gib_is_refused(text: str) -> None:
    with pytest.raises(ProbeError, match=r"--memory-budget = .*at most 1,048,576"):
        parse_budget(text)


def test_a_budget_above_the_machines_memory_is_refused() -> None:
    with pytest.raises(ProbeError, match=r"--memory-budget = '100000': .* is more than the .*Fix"):
        probe.budget_bytes("100000", torch.device("cpu"))  # 98 TiB: no CI machine has that


def test_a_cached_probe_is_measured_again_under_a_new_budget(
    tmp_path: Path, cache_home: Path
) -> None:
    cfg = tiny(tmp_path)
    data = load_data(cfg)
    lines: list[str] = []
    first = probe.run_probe(cfg, data, memory_budget="4", steps=1, warmup=0, echo=lines.append)
    assert first.budget_spec == "4"
    same = probe.run_probe(cfg, data, memory_budget="4.0", steps=1, warmup=0, echo=lines.append)
    assert same == first  # the same budget: from the cache
    other = probe.run_probe(cfg, data, memory_budget="2", steps=1, warmup=0, echo=lines.append)
    assert other.measured_at > first.measured_at and other.budget_bytes == 2 * 2**30
    assert any("measured under --memory-budget 4; measuring again under 2" in x for x in lines)
    plain = probe.run_probe(cfg, data, steps=1, warmup=0, echo=lines.append)
    assert plain == other  # no budget asked: the cache answers, its budget printed


def test_the_placement_in_the_key_is_where_training_puts_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(tmp_path)
    data = load_data(cfg)  # 1291 × 16 float32 features and labels: 93 KiB
    assert probe.data_placement_of(cfg, data, torch.device("cpu")) == "host"
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**20, 80 * 2**30))
    assert probe.data_placement_of(cfg, data, cuda) == "device"  # within half of 10 MiB free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**16, 80 * 2**30))
    assert probe.data_placement_of(cfg, data, cuda) == "pinned"


def test_a_probe_adds_what_training_holds_beyond_one_process(
    tmp_path: Path, cache_home: Path
) -> None:
    cfg = tiny(tmp_path, "noise.measure=on", "growth.max_global_batch=64")
    data = load_data(cfg)
    result = probe.measure(cfg, data, torch.device("cpu"), budget=None, steps=1, warmup=0)
    params = 16 * 32 + 32 + 32 * 10 + 10  # the synthetic job's MLP
    assert result.overhead_bytes == params * 8  # the noise meter's float64 gradient copy
    assert all(r.peak_bytes is not None and r.peak_bytes >= params * 8 for r in result.rows)
