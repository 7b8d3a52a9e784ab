"""``launch.slurm=chain`` on a real one-node SLURM cluster (slurm/local_cluster.sh).

Each span of the plan is its own job, sized to its workers; the running span submits the next
one (``afterok``). Real training: a chain of 1 then 2 workers ends with the parameters of the
same plan trained in one process, and SLURM's own job records (jobcomp) show each span's size.
With the stand-in worker of ``launch_fakes``: a requeued span resumes and the chain goes on
(pre-emption by SLURM, and the USR1 of a time limit), ``distgrow chain cancel`` stops a running
span and keeps a pending one from starting, a failed span leaves the run directory saying so,
with nothing waiting, and allocation mode records one job holding the widest span's CPUs from
start to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO_ROOT,
    assert_same_model,
    clear_launcher_env,
    free_port,
    is_launcher_variable,
    write_config,
)
from launch_fakes import read_calls
from test_slurm import TEMPLATE, fake_job_env

from distgrow.checkpoint import load_latest
from distgrow.config import load_config
from distgrow.held import held_from_slurm
from distgrow.launch import run_controller
from distgrow.launch.slurm_chain import submit_span
from distgrow.rundir import RunDir, SlurmJobs, read_json, read_jsonl

pytestmark = pytest.mark.integration

SMALL: dict[str, Any] = {
    # One thread everywhere: 1 and 2 workers round the same way (see test_distributed.py).
    "run": {"name": "chain", "epochs": 2, "seed": 3, "device": "cpu", "threads": 1},
    "data": {"name": "synthetic_classification", "synthetic_samples": 1024},
    "model": {"name": "mlp", "hidden": [16]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1], "gamma": 0.5},
    "growth": {"base_batch": 32, "micro_batch": 32, "max_workers": 2},
    "logging": {"progress": "lines", "every_steps": 10},
}
RUN_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def slurm_conf(slurm: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """This process asks SLURM too (held_from_slurm runs scontrol): point it at the cluster."""
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])


def wait_for(check: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting: {what()}")
        time.sleep(0.5)


def jobs_of(run_dir: Path) -> SlurmJobs:
    jobs = RunDir(run_dir).read_slurm_jobs()
    return jobs if jobs is not None else SlurmJobs("?", "?")


def squeue_empty(env: dict[str, str], name: str) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], env=env, capture_output=True, text=True
    )
    return out.returncode == 0 and not out.stdout.strip()


def chain_env(slurm: dict[str, str]) -> dict[str, str]:
    """The environment of `distgrow launch` on the "login node": no launcher variables."""
    env = {k: v for k, v in slurm.items() if not is_launcher_variable(k)}
    env.update(
        SLURM_CONF=slurm["SLURM_CONF"],
        PYTHONPATH=str(REPO_ROOT),
        GLOO_SOCKET_IFNAME="lo",
        WANDB_MODE="disabled",
    )
    return env


def start_chain(
    env: dict[str, str], config: Path, cwd: Path, *overrides: str
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "distgrow", "launch", str(config), "launch.slurm=chain", *overrides],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted span 1: job" in proc.stderr
    return proc


def chain_verb(env: dict[str, str], verb: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    """``distgrow chain VERB RUN_DIR`` (status or cancel), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "distgrow", "chain", verb, str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def span_logs(run_dir: Path) -> str:
    return "\n".join(
        f"== {p.name}\n{p.read_text()}" for p in sorted((run_dir / "launch").glob("span-*.out"))
    )


def wait_chain_end(env: dict[str, str], run_dir: Path, spans: int) -> SlurmJobs:
    """Until ``spans`` jobs are recorded, the last has ended, and SLURM has let them all go."""

    def ended() -> bool:
        jobs = jobs_of(run_dir)
        return (
            len(jobs.jobs) >= spans
            and jobs.jobs[-1].state not in ("submitted", "running")
            and squeue_empty(env, jobs.name)
        )

    wait_for(
        ended, RUN_TIMEOUT_S, lambda: json.dumps(jobs_of(run_dir).to_dict()) + span_logs(run_dir)
    )
    return jobs_of(run_dir)


# --------------------------------------------------------------------------------------------
# Real training
# --------------------------------------------------------------------------------------------


def small_config(tmp_path: Path, name: str, **launch: Any) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    tree = {
        **SMALL,
        "run": {**SMALL["run"], "output_dir": str(run_dir)},
        "launch": {"master_port": free_port(), "max_restarts": 0, **launch},
    }
    return write_config(tmp_path / f"{name}.yaml", tree), run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same plan in one process (the batch grows by accumulation)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    config, run_dir = small_config(tmp_path, "ref", launcher="none")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        clear_launcher_env(monkeypatch)
        monkeypatch.setenv("WANDB_MODE", "disabled")
        code = run_controller(str(config), [], load_config(config), log=lines.append)
    assert code == 0, "\n".join(lines)
    return run_dir


def epoch_workers(run_dir: Path) -> list[tuple[int, int]]:
    return [
        (r["epoch"], r["workers"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "epoch"
    ]


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    assert epoch_workers(run_dir) == [(1, 1), (2, 2)]
    done, want = read_json(run_dir / "summary.json"), read_json(reference / "summary.json")
    assert done["status"] == "completed"
    assert done["total_updates"] == want["total_updates"]
    assert done["samples_seen"] == want["samples_seen"]
    found, expected = load_latest(run_dir), load_latest(reference)
    assert found is not None and expected is not None
    assert found[1]["step"] == expected[1]["step"]
    assert_same_model(found[1]["model"], expected[1]["model"])


def test_chain_of_two_spans_trains_like_one_process(
    slurm: dict[str, str], tmp_path: Path, reference: Path
) -> None:
    config, run_dir = small_config(tmp_path, "chain")
    env = chain_env(slurm)
    start_chain(env, config, tmp_path)
    jobs = wait_chain_end(env, run_dir, 2)
    logs = span_logs(run_dir)
    assert jobs.mode == "chain" and not jobs.cancel_requested
    assert [(j.index, j.workers, j.tasks, j.cpus, j.state) for j in jobs.jobs] == [
        (1, 1, 1, 1, "grown"),
        (2, 2, 2, 2, "completed"),
    ], logs
    assert jobs.jobs[0].next_job_id == jobs.jobs[1].job_id
    span2 = (run_dir / "launch" / "span-02.sbatch").read_text()
    assert "#SBATCH --ntasks=2\n" in span2 and "--kill-on-invalid-dep=yes" in span2
    assert_same_as_reference(run_dir, reference)

    # SLURM's own records (jobcomp/filetxt) show each span's size.
    summary = read_json(run_dir / "summary.json")
    held = held_from_slurm(RunDir(run_dir), summary)
    assert held["source"] == "jobcomp", held
    assert [(j["cpus"], j["nodes"], j["slurm_state"]) for j in held["jobs"]] == [
        (1, 1, "COMPLETED"),
        (2, 1, "COMPLETED"),
    ]
    assert all(j["held_s"] > 0 for j in held["jobs"])
    assert held["cpu_hours"] == pytest.approx(
        (held["jobs"][0]["held_s"] + 2 * held["jobs"][1]["held_s"]) / 3600
    )
    # The trainer's summary (and W&B) carry what was held up to the summary, computed.
    assert summary["held"]["mode"] == "chain" and summary["held"]["source"] == "computed"
    assert [j["cpus"] for j in summary["held"]["jobs"]] == [1, 2]

    status = chain_verb(env, "status", run_dir)
    assert status.returncode == 0, status.stderr
    assert "span 2: job" in status.stdout and "completed (SLURM: COMPLETED)" in status.stdout


# --------------------------------------------------------------------------------------------
# Requeue, cancel, failure (the stand-in worker)
# --------------------------------------------------------------------------------------------


def fake_chain(
    slurm: dict[str, str], tmp_path: Path, worker: str, **launch: Any
) -> tuple[dict[str, str], Path, Path]:
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "fake.yaml",
        {
            "run": {"name": "fake", "output_dir": str(run_dir)},
            "growth": {"max_workers": 2},
            "launch": {"max_restarts": 0, **launch},
        },
    )
    env = fake_job_env(slurm, tmp_path, worker)
    env.pop("SLURM_CONF", None)
    env = {k: v for k, v in env.items() if not is_launcher_variable(k)}
    env["SLURM_CONF"] = slurm["SLURM_CONF"]
    return env, config, run_dir


def calls(run_dir: Path) -> list[tuple[int, int, bool]]:
    return [(c["world"], c["rank"], c["resume"]) for c in read_calls(run_dir)]


@pytest.mark.parametrize("how", ["scontrol requeue", "USR1"])
def test_a_requeued_span_resumes_and_the_chain_goes_on(
    slurm: dict[str, str], tmp_path: Path, how: str
) -> None:
    env, config, run_dir = fake_chain(slurm, tmp_path, "sleep:grow:2")
    start_chain(env, config, tmp_path)
    wait_for(lambda: (run_dir / "started-0").exists(), 60, lambda: span_logs(run_dir))
    first = jobs_of(run_dir).jobs[0].job_id
    if how == "USR1":  # a time limit's warning (--signal=B:USR1@120): the span requeues itself
        argv = ["scancel", "--batch", "--signal=USR1", first]
    else:  # pre-emption with PreemptMode=REQUEUE: SLURM stops the job and queues it again
        argv = ["scontrol", "requeue", first]
    subprocess.run(argv, env=env, check=True, timeout=30)
    jobs = wait_chain_end(env, run_dir, 2)
    logs = span_logs(run_dir)
    signal_name = "SIGUSR1" if how == "USR1" else "SIGTERM"
    assert (run_dir / "signal-0").read_text() == signal_name, logs
    # Fresh on 1 (stopped), resumed on 1 after the requeue (asks for 2), then 2 workers.
    assert sorted(calls(run_dir)) == [(1, 0, False), (1, 0, True), (2, 0, True), (2, 1, True)]
    span1, span2 = jobs.jobs
    assert (span1.job_id, span1.restarts, len(span1.runs), span1.state) == (first, 1, 2, "grown")
    assert (span2.workers, span2.state) == (2, "completed"), logs
    if how == "USR1":
        assert f"requeued job {first}" in logs
    # SLURM recorded both runs of the requeued span: both count in what it held.
    held = held_from_slurm(RunDir(run_dir), {})
    assert held["jobs"][0]["source"] == "jobcomp"
    seen = [end - start for start, end in span1.runs if start is not None and end is not None]
    assert len(seen) == 2  # the controller saw both runs end
    # SLURM's times are whole seconds and begin before the controller starts.
    assert held["jobs"][0]["held_s"] >= sum(seen) - 2


def test_chain_cancel_stops_the_running_span(slurm: dict[str, str], tmp_path: Path) -> None:
    env, config, run_dir = fake_chain(slurm, tmp_path, "sleep:grow:2")
    start_chain(env, config, tmp_path)
    wait_for(lambda: (run_dir / "started-0").exists(), 60, lambda: span_logs(run_dir))
    proc = chain_verb(env, "cancel", run_dir)
    assert proc.returncode == 0, proc.stderr
    jobs = wait_chain_end(env, run_dir, 1)
    logs = span_logs(run_dir)
    assert (run_dir / "signal-0").read_text() == "SIGTERM", logs  # the workers checkpoint
    assert jobs.cancel_requested
    assert [(j.index, j.state, j.exit_code) for j in jobs.jobs] == [(1, "stopped", 143)], logs
    assert "resume:" in (jobs.jobs[0].fix or "")
    assert calls(run_dir) == [(1, 0, False)]


def test_chain_cancel_keeps_a_pending_span_from_starting(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    env, config, run_dir = fake_chain(slurm, tmp_path, "grow:2")
    # A busy queue: 3 of the node's 4 CPUs taken, so span 2 (2 tasks) waits for resources.
    blocker = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=3", f"--chdir={tmp_path}", "--wrap", "sleep 300"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        start_chain(env, config, tmp_path)
        wait_for(
            lambda: len(jobs_of(run_dir).jobs) == 2,
            RUN_TIMEOUT_S,
            lambda: span_logs(run_dir),
        )
        assert jobs_of(run_dir).jobs[1].state == "submitted"
        proc = chain_verb(env, "cancel", run_dir)
        assert proc.returncode == 0, proc.stderr
        jobs = wait_chain_end(env, run_dir, 2)
    finally:
        subprocess.run(["scancel", blocker], env=env, capture_output=True)
    assert [(j.workers, j.state) for j in jobs.jobs] == [(1, "grown"), (2, "cancelled")]
    assert calls(run_dir) == [(1, 0, False)]  # span 2 never ran
    held = held_from_slurm(RunDir(run_dir), {})
    pending = held["jobs"][1]
    assert (pending["slurm_state"], pending["held_s"]) == ("CANCELLED", 0.0)


def test_allocation_mode_holds_the_whole_allocation(slurm: dict[str, str], tmp_path: Path) -> None:
    """The template (allocation mode) grows 1 -> 2 workers inside one job of 2 tasks: the
    record holds that one job, 2 CPUs from start to end, labelled as such."""
    env, config, run_dir = fake_chain(slurm, tmp_path, "grow:2")
    out = tmp_path / "alloc.out"
    proc = subprocess.run(
        [
            *("sbatch", "--wait", "--ntasks=2", f"--output={out}", f"--chdir={tmp_path}"),
            *(str(TEMPLATE), str(config)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    log = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stderr + log
    assert sorted(calls(run_dir)) == [(1, 0, False), (2, 0, True), (2, 1, True)], log
    jobs = jobs_of(run_dir)
    assert jobs.mode == "allocation"
    assert [(j.workers, j.cpus, j.state, len(j.runs)) for j in jobs.jobs] == [
        (2, 2, "completed", 1)
    ]
    wait_for(lambda: squeue_empty(env, jobs.name), 60, lambda: "the job still queued")
    held = held_from_slurm(RunDir(run_dir), {})
    assert held["mode"] == "allocation" and held["source"] == "jobcomp"
    assert (held["jobs"][0]["cpus"], held["jobs"][0]["slurm_state"]) == (2, "COMPLETED")
    assert held["cpu_hours"] == pytest.approx(2 * held["jobs"][0]["held_s"] / 3600)
    assert "idle while the plan runs narrower" in held["method"]


def test_a_failed_span_says_so_and_nothing_waits(slurm: dict[str, str], tmp_path: Path) -> None:
    env, config, run_dir = fake_chain(slurm, tmp_path, "exit:3")
    start_chain(env, config, tmp_path)
    jobs = wait_chain_end(env, run_dir, 1)
    logs = span_logs(run_dir)
    (failed,) = jobs.jobs
    assert (failed.state, failed.exit_code) == ("failed", 3), logs
    assert "launch.max_restarts=0" in (failed.message or "")
    assert "launch.slurm=chain run.resume=true" in (failed.fix or "")
    status = chain_verb(env, "status", run_dir)
    assert status.returncode == 1
    assert "failed (SLURM: FAILED)" in status.stdout and "fix: " in status.stdout

    # A span submitted after a failed one (had it been submitted in the span's last moments)
    # never runs: --kill-on-invalid-dep makes SLURM cancel it instead of leaving it pending.
    cfg = load_config(config, ["launch.slurm=chain"])
    late = submit_span(
        cfg=cfg,
        run=RunDir(run_dir),
        workers=2,
        python=sys.executable,
        config_path=str(config),
        overrides=[],
        resume=True,
        after=failed.job_id,
        env={**os.environ, **env},
        chdir=tmp_path,
        log=lambda _: None,
    )
    assert late is not None
    wait_for(lambda: squeue_empty(env, jobs.name), 60, lambda: "the late span still queued")
    held = held_from_slurm(RunDir(run_dir), {})
    assert (held["jobs"][1]["slurm_state"], held["jobs"][1]["held_s"]) == ("CANCELLED", 0.0)
    assert calls(run_dir) == [(1, 0, False)]


def test_a_chain_under_a_percent_directory_logs_and_grows_there(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    """A run directory named with sbatch's own codes (``%j``, ``%x``, ``%%``): each span's log
    lands at the literal path (``--output`` has each ``%`` doubled) and the chain grows 1 -> 2."""
    base = tmp_path / "lr%5 %j %x %%"
    base.mkdir()
    env, config, run_dir = fake_chain(slurm, base, "grow:2")
    start_chain(env, config, base)
    jobs = wait_chain_end(env, run_dir, 2)
    logs = span_logs(run_dir)
    assert [(j.workers, j.state) for j in jobs.jobs] == [(1, "grown"), (2, "completed")], logs
    assert sorted(calls(run_dir)) == [(1, 0, False), (2, 0, True), (2, 1, True)], logs
    wanted = [f"span-{j.index:02d}-{j.job_id}.out" for j in jobs.jobs]
    assert sorted(p.name for p in (run_dir / "launch").glob("span-*.out")) == wanted
    # and nowhere else (not in a folder named after a job id or the job name)
    assert sorted(tmp_path.rglob("*.out")) == [run_dir / "launch" / name for name in wanted]
