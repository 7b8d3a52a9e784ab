"""A real one-node SLURM cluster (slurm/local_cluster.sh): sbatch, srun, the sbatch template.

The cluster starts once per session in a temporary directory and is stopped at the end. When
SLURM is not installed and cannot be (not root, or no apt-get), the tests skip, naming the
Debian packages; as root with apt-get (CI) the script installs them and the tests run.

The template tests run the real controller (``python -m distgrow launch``) inside the job with
the stand-in worker of ``launch_fakes``, so they check SLURM's side (srun job steps, signals,
requeue) without training.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SLURM_SCRIPT, write_config
from launch_fakes import make_fake_distgrow, read_calls

pytestmark = pytest.mark.integration

SCRIPT = SLURM_SCRIPT
TEMPLATE = REPO_ROOT / "slurm" / "distgrow.sbatch"


def sbatch(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sbatch", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_local_cluster_status_reports_running_daemons(slurm: dict[str, str]) -> None:
    env = {**slurm, "DISTGROW_SLURM_DIR": str(Path(slurm["SLURM_CONF"]).parent)}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for daemon in ("munged", "slurmctld", "slurmd"):
        assert f"{daemon}: running" in proc.stdout
    assert "localhost idle 4" in proc.stdout


def test_sbatch_wait_runs_an_srun_step_with_two_ranks(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    job = tmp_path / "ranks.sh"
    code = "import os; print('rank', os.environ['SLURM_PROCID'], 'of', os.environ['SLURM_NTASKS'])"
    job.write_text(f'#!/bin/bash\nsrun --ntasks=2 {sys.executable} -c "{code}"\n')
    out = tmp_path / "ranks.out"
    proc = sbatch(slurm, "--wait", "--ntasks=2", f"--output={out}", f"--chdir={tmp_path}", str(job))
    assert proc.returncode == 0, proc.stderr + (out.read_text() if out.exists() else "")
    assert sorted(out.read_text().split("\n")[:2]) == ["rank 0 of 2", "rank 1 of 2"]


def test_sbatch_wait_returns_the_jobs_exit_status(slurm: dict[str, str], tmp_path: Path) -> None:
    proc = sbatch(slurm, "--wait", f"--chdir={tmp_path}", "--wrap", "exit 3")
    assert proc.returncode == 3, proc.stderr


def test_template_passes_sbatch_test_only(slurm: dict[str, str], tmp_path: Path) -> None:
    config = REPO_ROOT / "configs" / "ionosphere_time_based.yaml"
    proc = sbatch(slurm, "--test-only", f"--chdir={tmp_path}", str(TEMPLATE), str(config))
    assert proc.returncode == 0, proc.stderr
    assert "to start at" in proc.stderr


def fake_job_env(slurm: dict[str, str], tmp_path: Path, worker: str) -> dict[str, str]:
    """The job's environment (sbatch exports it): the stand-in worker first on the path."""
    fake = make_fake_distgrow(tmp_path / "fake")
    env = {
        k: v
        for k, v in slurm.items()
        if not k.startswith(("SLURM_JOB", "SLURM_NTASKS", "OMPI_")) and k not in ("RANK",)
    }
    env.update(
        SLURM_CONF=slurm["SLURM_CONF"],
        PYTHONPATH=os.pathsep.join([str(fake), str(REPO_ROOT)]),
        DISTGROW_PYTHON=sys.executable,
        FAKE_WORKER=worker,
        GLOO_SOCKET_IFNAME="lo",
    )
    return env


def test_template_grows_the_job_inside_the_allocation(
    slurm: dict[str, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "grow.yaml",
        {"run": {"output_dir": str(run_dir)}, "growth": {"max_workers": 4}},
    )
    out = tmp_path / "job.out"
    env = fake_job_env(slurm, tmp_path, "grow:2")
    proc = sbatch(
        env, "--wait", f"--output={out}", f"--chdir={tmp_path}", str(TEMPLATE), str(config)
    )
    log = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stderr + log
    seen = sorted((c["world"], c["rank"], c["resume"], c["launcher"]) for c in read_calls(run_dir))
    assert seen == [(1, 0, False, "srun"), (2, 0, True, "srun"), (2, 1, True, "srun")], log
    # The allocation has 2 tasks (--ntasks-per-node=2): the controller plans within them.
    assert {c["max_workers"] for c in read_calls(run_dir)} == {2}
    assert "growth.max_workers 4 -> 2: SLURM_NTASKS=2" in log
    assert "srun --ntasks=2 --nodes=1 --kill-on-bad-exit=1" in log


def _job_state(env: dict[str, str], job_id: str) -> str:
    proc = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True
    )
    return proc.stdout.strip()


def test_template_requeues_on_preemption_and_resumes(slurm: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "sleep.yaml", {"run": {"output_dir": str(run_dir)}})
    out = tmp_path / "job.out"
    env = fake_job_env(slurm, tmp_path, "sleep:fresh")
    proc = sbatch(
        env, "--parsable", f"--output={out}", f"--chdir={tmp_path}", str(TEMPLATE), str(config)
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "started-0").exists():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)
        # What SLURM does 120 s before the time limit (--signal=B:USR1@120): USR1 to the script.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True)
        deadline = time.monotonic() + 120
        while len(read_calls(run_dir)) < 2 or _job_state(env, job_id) not in ("", "COMPLETED"):
            assert time.monotonic() < deadline, (
                f"no resumed launch; state {_job_state(env, job_id)!r}\n"
                + (out.read_text() if out.exists() else "")
            )
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True)
    log = out.read_text()
    assert (run_dir / "signal-0").read_text() == "SIGUSR1", log
    calls = read_calls(run_dir)
    assert [(c["resume"], c["launcher"]) for c in calls] == [(False, "srun"), (True, "srun")], log
    assert "requeueing job" in log
    assert calls[1]["args"][-1] == "run.resume=true"  # SLURM_RESTART_COUNT=1 in the template
