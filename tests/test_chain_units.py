"""``launch.slurm=chain`` and the held hours, without SLURM: the span shapes and scripts, the
controller's end of a job (with a fake ``sbatch``/``scontrol``), SLURM's record formats and the
held-hours arithmetic. The real cluster runs them in ``test_slurm_chain.py``."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from distgrow.config import ConfigError, load_config
from distgrow.held import (
    JobRecord,
    baseline_held,
    held_from_slurm,
    held_hours,
    parse_jobcomp,
    parse_sacct,
    parse_scontrol_job,
    parse_time,
    parse_tres,
    query_slurm,
)
from distgrow.launch.builders import LaunchError, build_command
from distgrow.launch.controller import Decision
from distgrow.launch.job import prepare
from distgrow.launch.slurm_chain import (
    CHAIN_SPAN_ENV,
    allocation_size,
    cancel_chain,
    chain_name,
    check_chain,
    end_of_job,
    record_start,
    sbatch_options,
    span_overrides,
    span_script,
    span_shape,
    submission_env,
)
from distgrow.report.render import render_markdown
from distgrow.rundir import ResizeRequest, RunDir, SlurmJob, SlurmJobs

# Two lines of a real jobcomp/filetxt file (slurm/local_cluster.sh, SLURM 22.05).
JOBCOMP = (
    "JobId=3 UserId=root(0) GroupId=root(0) Name=distgrow-c1 JobState=COMPLETED Partition=debug "
    "TimeLimit=60 StartTime=2026-11-29T03:44:25 EndTime=2026-11-29T03:44:30 NodeList=localhost "
    "NodeCnt=1 ProcCnt=1 WorkDir=/tmp ReservationName= Tres=cpu=1,mem=1M,node=1,billing=1 "
    "Account= QOS= WcKey= Cluster=unknown ExitCode=0:0\n"
    "JobId=4 UserId=root(0) GroupId=root(0) Name=distgrow-c1 JobState=COMPLETED Partition=debug "
    "TimeLimit=60 StartTime=2026-11-29T03:44:31 EndTime=2026-11-29T03:45:11 NodeList=node[1-2] "
    "NodeCnt=2 ProcCnt=8 WorkDir=/tmp ReservationName= "
    "Tres=cpu=8,mem=1M,node=2,billing=8,gres/gpu=8 Account= QOS= WcKey= ExitCode=0:0\n"
    # cancelled while pending: no nodes, held nothing
    "JobId=5 UserId=root(0) Name=distgrow-c1 JobState=CANCELLED StartTime=2026-11-29T03:45:18 "
    "EndTime=2026-11-29T03:45:18 NodeList=(null) NodeCnt=0 ProcCnt=0 Tres=cpu=1,node=1\n"
)


def chain_config(tmp_path: Path, *extra: str) -> Any:
    return load_config(
        None,
        [
            "data.name=synthetic_classification",
            "run.name=c1",
            f"run.output_dir={tmp_path / 'run'}",
            "growth.max_workers=4",
            "launch.slurm=chain",
            *extra,
        ],
    )


# -- shapes and scripts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "tasks_per_node", "gpus_per_node", "want"),
    [
        (1, None, 0, (1, 1, 0)),  # CPU workers, all on one node
        (4, None, 0, (1, 4, 0)),
        (2, None, 4, (1, 2, 2)),  # narrower than a node: only the GPUs it uses
        (8, None, 4, (2, 4, 4)),  # one task per GPU, 4 per node
        (6, 4, 4, (2, 4, 4)),  # the last node's spare GPUs are held too
        (3, 2, 0, (2, 2, 0)),
    ],
)
def test_span_shape_from_the_allocation_shape(
    tmp_path: Path,
    workers: int,
    tasks_per_node: int | None,
    gpus_per_node: int,
    want: tuple[int, int, int],
) -> None:
    cfg = chain_config(
        tmp_path,
        f"launch.chain.tasks_per_node={'null' if tasks_per_node is None else tasks_per_node}",
        f"launch.chain.gpus_per_node={gpus_per_node}",
    )
    shape = span_shape(workers, cfg.launch.chain)
    assert (shape.nodes, shape.tasks_per_node, shape.gpus_per_node) == want


def test_span_script_asks_for_the_span_and_execs_the_controller(tmp_path: Path) -> None:
    cfg = chain_config(
        tmp_path,
        "launch.chain.gpus_per_node=4",
        "launch.chain.partition=gpu",
        "launch.chain.time=02:00:00",
        "launch.chain.cpus_per_task=8",
        "launch.chain.sbatch_args=['--mem=0']",
    )
    shape = span_shape(8, cfg.launch.chain)
    opts = sbatch_options(shape, cfg.launch.chain, "dg-x", tmp_path / "o-%j.out", tmp_path)
    assert opts[:4] == ["--job-name=dg-x", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4"]
    for wanted in (
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--time=02:00:00",
        "--signal=B:USR1@120",
        "--requeue",
        "--kill-on-invalid-dep=yes",
        "--mem=0",
    ):
        assert wanted in opts
    text = span_script(2, opts, "/py", "/c.yaml", span_overrides(["a.b=1"], False))
    assert "#SBATCH --nodes=2\n" in text
    assert f"export {CHAIN_SPAN_ENV}=1\n" in text
    assert text.rstrip().endswith("exec /py -m distgrow launch /c.yaml a.b=1 launch.slurm=chain")
    assert "scancel --name=dg-x" in text


def test_span_overrides_set_chain_and_resume_once() -> None:
    given = ["run.resume=true", "x.y=2", "launch.slurm=allocation", "run.resume=false"]
    assert span_overrides(given, True) == ["x.y=2", "launch.slurm=chain", "run.resume=true"]
    assert span_overrides(given, False) == ["x.y=2", "launch.slurm=chain"]


def test_chain_name_is_stable_and_differs_by_directory(tmp_path: Path) -> None:
    cfg = chain_config(tmp_path, "run.name='my run:1'")
    a, b = chain_name(cfg, tmp_path / "a"), chain_name(cfg, tmp_path / "b")
    assert a == chain_name(cfg, tmp_path / "a") and a != b
    assert a.startswith("distgrow-my-run-1-")


def test_chain_refuses_an_unset_max_workers_and_elastic(tmp_path: Path) -> None:
    cfg = chain_config(tmp_path, "growth.max_workers=null")
    with pytest.raises(LaunchError, match="growth.max_workers is unset"):
        check_chain(cfg)
    with pytest.raises(LaunchError, match="launch.elastic=false"):
        check_chain(chain_config(tmp_path, "launch.elastic=true"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("launch.slurm=cluster", "launch.slurm"),
        ("launch.chain.gpus_per_node=-1", "launch.chain.gpus_per_node = -1: must be >= 0"),
        ("launch.chain.tasks_per_node=0", "launch.chain.tasks_per_node = 0: must be at least 1"),
        ("launch.chain.time=' '", "launch.chain.time = ' ': is not a SLURM time"),
    ],
)
def test_bad_chain_settings_are_config_errors(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        chain_config(tmp_path, override)


def test_chain_plans_the_whole_run_not_the_span(tmp_path: Path) -> None:
    """Inside a span of 1 task the plan keeps growth.max_workers=4 (the next span is another
    job), where allocation mode would plan within the allocation's tasks."""
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "localhost"}
    lines: list[str] = []
    job, _ = prepare("c.yaml", [], chain_config(tmp_path), env, lines.append, "py", 0)
    assert job.limit == 1 and job.cfg.growth.max_workers == 4
    assert not any("max_workers" in o for o in job.overrides)
    alloc = chain_config(tmp_path, "launch.slurm=allocation")
    job, _ = prepare("c.yaml", [], alloc, env, lines.append, "py", 0)
    assert job.cfg.growth.max_workers == 1


def test_allocation_size_reads_slurms_variables() -> None:
    env = {
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_NTASKS": "10",
        "SLURM_JOB_CPUS_PER_NODE": "4(x2),2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    assert allocation_size(env) == (3, 10, 10, 12)
    assert allocation_size({"SLURM_NTASKS": "2"}) == (1, 2, 2, 0)


def test_submission_env_drops_the_running_jobs_variables() -> None:
    env = {"SLURM_JOB_ID": "3", "SLURM_NTASKS": "1", "SLURM_CONF": "/c", "SBATCH_X": "1", "A": "b"}
    assert submission_env(env) == {"SLURM_CONF": "/c", "A": "b"}


# -- the controller's end of a job -----------------------------------------------------------


class FakeSlurm:
    """Records the commands; ``sbatch`` answers job ids 101, 102, ..."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str], env: Any = None) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        if argv[0] == "sbatch":
            if self.fail:
                return subprocess.CompletedProcess(argv, 1, "", "invalid partition")
            return subprocess.CompletedProcess(argv, 0, f"{100 + len(self.calls)}\n", "")
        return subprocess.CompletedProcess(argv, 0, "", "")


def span_job(tmp_path: Path, *extra: str, tasks: int = 1) -> tuple[Any, SlurmJob, dict[str, str]]:
    env = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": str(tasks), CHAIN_SPAN_ENV: "1"}
    job, _ = prepare("c.yaml", [], chain_config(tmp_path, *extra), env, lambda _: None, "py", 0)
    record = record_start(job.run, "chain", "dg", env, 1000.0)
    return job, record, env


def resize(need: int) -> ResizeRequest:
    return ResizeRequest(
        need_workers=need, have_workers=1, epoch=1, position=0, step=10, samples_seen=320,
        global_batch=64, time=0.0, checkpoint="ckpt", exit_code=75,
    )  # fmt: skip


def test_a_span_that_outgrows_its_job_submits_the_next_with_afterok(tmp_path: Path) -> None:
    job, record, env = span_job(tmp_path)
    slurm = FakeSlurm()
    grow = Decision("stop", 75, message="needs 2", fix="give more")
    status = end_of_job(job, record, grow, resize(2), ["x.y=1"], env, lambda _: None, slurm)
    assert status == 0  # SLURM's afterok needs the span to end well
    assert slurm.calls[0][:3] == ["sbatch", "--parsable", "--dependency=afterok:42"]
    jobs = job.run.read_slurm_jobs()
    assert [(j.job_id, j.workers, j.state) for j in jobs.jobs] == [
        ("42", 1, "grown"),
        ("101", 2, "submitted"),
    ]
    assert jobs.jobs[0].next_job_id == "101" and jobs.jobs[0].runs[0][0] == 1000.0
    script = (job.run.launch_dir / "span-02.sbatch").read_text()
    assert "#SBATCH --ntasks=2\n" in script and "x.y=1 launch.slurm=chain\n" in script


def test_a_cancelled_chain_submits_nothing(tmp_path: Path) -> None:
    job, record, env = span_job(tmp_path)
    slurm = FakeSlurm()
    assert cancel_chain(job.run_dir, slurm, lambda _: None) == 0
    assert slurm.calls == [
        ["scancel", "--state=PENDING", "--name=dg"],
        ["scancel", "--name=dg", "42"],
    ]
    grow = Decision("stop", 75, message="needs 2")
    assert end_of_job(job, record, grow, resize(2), [], env, lambda _: None, slurm) == 0
    assert len(slurm.calls) == 2  # no sbatch
    assert job.run.read_slurm_jobs().jobs[0].state == "stopped"


def test_a_failed_span_records_why_and_how_to_resume(tmp_path: Path) -> None:
    job, record, env = span_job(tmp_path)
    slurm = FakeSlurm()
    crash = Decision("stop", 3, message="the workers crashed (exit 3)", fix="read the logs")
    assert end_of_job(job, record, crash, None, ["x.y=1"], env, lambda _: None, slurm) == 3
    assert slurm.calls == []
    failed = job.run.read_slurm_jobs().jobs[0]
    assert failed.state == "failed" and failed.exit_code == 3
    assert failed.message == "the workers crashed (exit 3)"
    assert "read the logs; resume: py -m distgrow launch" in (failed.fix or "")
    assert "x.y=1 launch.slurm=chain run.resume=true" in (failed.fix or "")
    assert "nothing waits on this one" in (failed.fix or "")


def test_an_unsubmittable_next_span_fails_the_span(tmp_path: Path) -> None:
    job, record, env = span_job(tmp_path)
    grow = Decision("stop", 75, message="needs 2")
    status = end_of_job(job, record, grow, resize(2), [], env, lambda _: None, FakeSlurm(True))
    assert status == 2
    failed = job.run.read_slurm_jobs().jobs[0]
    assert failed.state == "failed" and "invalid partition" in (failed.message or "")


def test_usr1_requeues_the_span_itself(tmp_path: Path) -> None:
    job, record, env = span_job(tmp_path)
    slurm = FakeSlurm()
    stop = Decision("stop", 138, message="stopped by SIGUSR1")
    assert end_of_job(job, record, stop, None, [], env, lambda _: None, slurm) == 138
    assert slurm.calls == [["scontrol", "requeue", "42"]]
    assert job.run.read_slurm_jobs().jobs[0].state == "requeued"
    # A restart of the same job: a second run in the record, the restart counted.
    again = record_start(job.run, "chain", "dg", {**env, "SLURM_RESTART_COUNT": "1"}, 2000.0)
    assert again.restarts == 1 and [r[0] for r in again.runs] == [1000.0, 2000.0]


# -- SLURM's records -------------------------------------------------------------------------


def test_parse_tres_and_time() -> None:
    assert parse_tres("cpu=8,mem=1M,node=2,billing=8,gres/gpu=8") == {"cpu": 8, "node": 2, "gpu": 8}
    assert parse_tres("cpu=4,gres/gpu:a100=2,gres/gpu:v100=1") == {"cpu": 4, "gpu": 3}
    assert parse_time("Unknown") is None
    a, b = parse_time("2026-11-29T03:44:25"), parse_time("2026-11-29T03:44:30")
    assert a is not None and b is not None and b - a == 5


def test_parse_jobcomp_lines() -> None:
    found = parse_jobcomp(JOBCOMP, ["3", "4", "5"])
    (one,), (two,), (never,) = found["3"], found["4"], found["5"]
    assert (one.cpus, one.gpus, one.nodes, one.state) == (1, 0, 1, "COMPLETED")
    assert one.end is not None and one.start is not None and one.end - one.start == 5
    assert (two.cpus, two.gpus, two.nodes) == (8, 8, 2)
    assert never.start is None  # cancelled while pending
    assert "9" not in parse_jobcomp(JOBCOMP, ["9"])


def test_parse_scontrol_and_sacct() -> None:
    job = parse_scontrol_job(
        "JobId=9 JobName=x JobState=RUNNING Restarts=0 StartTime=2026-11-29T03:00:00 "
        "EndTime=Unknown NumNodes=1 NumCPUs=2 TRES=cpu=2,mem=1M,node=1,billing=2"
    )
    assert job is not None and (job.cpus, job.gpus, job.end) == (2, 0, None)
    pending = parse_scontrol_job("JobId=9 JobState=PENDING StartTime=2026-11-29T03:00:00")
    assert pending is not None and pending.start is None
    assert parse_scontrol_job("slurm_load_jobs error: Invalid job id specified") is None
    out = (
        "12|COMPLETED|2026-11-29T03:00:00|2026-11-29T03:01:00|1|2|billing=2,cpu=2,node=1\n"
        "12|REQUEUED|2026-11-29T02:00:00|2026-11-29T02:00:30|1|2|cpu=2,node=1,gres/gpu=2\n"
    )
    runs = parse_sacct(out)["12"]
    assert [(r.state, r.gpus) for r in runs] == [("COMPLETED", 0), ("REQUEUED", 2)]


def test_query_slurm_prefers_jobcomp_then_scontrol(tmp_path: Path) -> None:
    comp = tmp_path / "jobcomp.txt"
    comp.write_text(JOBCOMP)
    config = (
        "AccountingStorageType   = accounting_storage/none\n"
        f"JobCompLoc              = {comp}\nJobCompType             = jobcomp/filetxt\n"
    )

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        if argv[:3] == ["scontrol", "show", "config"]:
            return subprocess.CompletedProcess(argv, 0, config, "")
        if argv[:3] == ["scontrol", "show", "job"] and argv[-1] == "8":
            text = "JobId=8 JobState=RUNNING StartTime=2026-11-29T03:00:00 EndTime=Unknown "
            return subprocess.CompletedProcess(argv, 0, text + "NumCPUs=2 TRES=cpu=2", "")
        assert argv[0] != "sacct", "no accounting storage: sacct is not asked"
        return subprocess.CompletedProcess(argv, 1, "", "Invalid job id")

    found = query_slurm(["3", "8", "77"], run)
    assert {k: v[0].source for k, v in found.items()} == {"3": "jobcomp", "8": "scontrol"}

    def broken(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(argv[0])

    assert query_slurm(["3"], broken) == {}


# -- held hours ------------------------------------------------------------------------------


def two_spans() -> SlurmJobs:
    return SlurmJobs(
        mode="chain",
        name="dg",
        jobs=[
            SlurmJob(1, "3", 1, "grown", nodes=1, tasks=1, cpus=1, gpus=0, runs=[[0.0, 100.0]]),
            SlurmJob(2, "4", 2, "running", nodes=1, tasks=2, cpus=2, gpus=2, runs=[[110.0, None]]),
        ],
    )


def test_held_hours_computed_from_the_record() -> None:
    held = held_hours(two_spans(), {}, now=290.0)
    assert [round(j["held_s"]) for j in held["jobs"]] == [100, 180]
    assert held["cpu_hours"] == pytest.approx((100 * 1 + 180 * 2) / 3600)
    assert held["gpu_hours"] == pytest.approx(180 * 2 / 3600)
    assert held["task_hours"] == pytest.approx((100 + 360) / 3600)
    assert held["source"] == "computed" and "controller recorded" in held["method"]


def test_held_hours_from_slurms_records_sum_every_run() -> None:
    records = {
        "3": [
            JobRecord("3", "PENDING", 0.0, 50.0, 1, 1, 0, "jobcomp"),  # pre-empted, requeued
            JobRecord("3", "COMPLETED", 60.0, 160.0, 1, 1, 0, "jobcomp"),
        ]
    }
    held = held_hours(two_spans(), records, now=290.0)
    first, second = held["jobs"]
    assert first["held_s"] == 150.0 and first["source"] == "jobcomp"
    assert second["source"] == "computed" and held["source"] == "mixed"
    assert held["cpu_hours"] == pytest.approx((150 + 180 * 2) / 3600)


def test_allocation_mode_is_labelled() -> None:
    jobs = SlurmJobs(
        "allocation", "a", [SlurmJob(1, "9", 2, "completed", cpus=2, runs=[[0.0, 36.0]])]
    )
    held = held_hours(jobs, {}, now=100.0)
    assert held["cpu_hours"] == pytest.approx(0.02)
    assert "idle while the plan runs narrower" in held["method"]


def test_baseline_held_at_the_base_width() -> None:
    held = held_hours(two_spans(), {}, now=290.0)
    base = baseline_held(held, 720.0, 1, "estimated")
    assert base is not None
    assert (base["cpus"], base["gpus"]) == (1.0, 0.0)  # one worker of the first span
    assert base["cpu_hours"] == pytest.approx(0.2)
    assert base["cpu_hours_ratio"] == pytest.approx(0.2 / held["cpu_hours"])
    assert base["gpu_hours_ratio"] is None
    assert baseline_held(held, None, 1, "x") is None


def test_report_shows_what_the_jobs_held(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.write_slurm_jobs(two_spans())

    def no_slurm(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(argv[0])

    summary = {"savings": {"estimated": {"baseline_wall_s": 720.0}}, "phases": [{"workers": 1}]}
    held = held_from_slurm(run, summary, no_slurm, now=290.0)
    assert held["baseline"]["cpu_hours"] == pytest.approx(0.2)
    row = {
        "label": "chain", "growth_mode": "grow_batch", "is_baseline": False, "measured": None,
        "estimated": None, "total_updates": 1, "wall_s": 1.0, "startup_s": 1.0,
        "worker_seconds": 1.0, "worker_hours": 0.1, "phases": [], "held": held,
    }  # fmt: skip
    text = render_markdown(
        {"title": "t", "metric": "val_loss", "baseline": None, "runs": [row], "notes": []}
    )
    assert "## What the SLURM jobs held" in text
    assert "| chain | chain | 2 | 0.1000 | 0.1278 | 78% | 0.1278 | 0.1000 | 0.2000 |" in text
    assert "| 2 | 4 | 2 | 1 | 2 | 2 | running | 3 min 00 s | 0.1000 | 0.1000 |" in text


def test_wandb_summary_carries_what_was_held() -> None:
    from distgrow.wandb_logger import wandb_summary

    held = held_hours(two_spans(), {}, now=290.0)
    held["baseline"] = baseline_held(held, 720.0, 1, "estimated")
    out = wandb_summary({"held": held})
    assert out["held/cpu_hours"] == pytest.approx(held["cpu_hours"])
    assert out["held/source"] == "computed" and out["held/mode"] == "chain"
    assert out["held/jobs/2/cpus"] == 2 and out["held/jobs/1/held_s"] == 100.0
    assert out["held/baseline/cpu_hours"] == pytest.approx(0.2)
    assert not any(key.startswith("held") for key in wandb_summary({"held": {}}))


def test_baseline_held_counts_one_start_up() -> None:
    held = held_hours(two_spans(), {}, now=290.0)
    base = baseline_held(held, 720.0, 2, "measured", startup_s=180.0)
    assert base is not None and base["startup_s"] == 180.0
    assert base["cpu_hours"] == pytest.approx(2 * 900 / 3600)  # 2 workers × 1 CPU × 900 s
    assert "one start-up of 180.0 s" in base["method"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distgrow.cli import main

    assert main(["chain", "status", str(tmp_path)]) == 2
    assert main(["chain", "cancel", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.err.count("holds no SLURM run") == 2 and out.err.count("\n") == 2
    code = main(
        [
            "launch",
            "configs/ionosphere_time_based.yaml",
            "launch.slurm=chain",
            f"run.output_dir={tmp_path / 'r'}",
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("distgrow launch: launch error: launch.slurm=chain")
    assert "Fix: set growth.max_workers" in err and err.count("\n") == 1


def test_dry_run_shows_the_first_spans_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distgrow.cli import main

    code = main(
        [
            "launch",
            "configs/ionosphere_time_based.yaml",
            "launch.slurm=chain",
            "growth.max_workers=4",
            "launch.chain.gpus_per_node=4",
            f"run.output_dir={tmp_path / 'r'}",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --ntasks=1" in out and "#SBATCH --gpus-per-node=1" in out
    (submit,) = [line for line in out.splitlines() if "$ sbatch" in line]
    assert submit.endswith("/r/launch/span-01.sbatch") and "--dependency" not in submit
    assert not (tmp_path / "r").exists()  # nothing written, nothing submitted


def test_query_slurm_asks_nothing_more_when_slurm_does_not_answer() -> None:
    asked: list[list[str]] = []

    def down(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        asked.append(list(argv))
        return subprocess.CompletedProcess(argv, 1, "", "Unable to contact slurm controller")

    assert query_slurm(["3", "4", "5"], down) == {}
    assert asked == [["scontrol", "show", "config"]]


def test_a_chain_of_fsdp_spans_is_accepted_and_launched_as_srun_steps(tmp_path: Path) -> None:
    """``backend.name=fsdp`` in a chain: nothing refuses it; inside a span of two nodes the
    workers are one srun step across both (no ``--mpi``, which only Horovod needs), each
    resuming from the shards of the span before; the next span's script carries the backend."""
    check_chain(chain_config(tmp_path, "backend.name=fsdp"))
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        CHAIN_SPAN_ENV: "1",
    }
    cfg = chain_config(tmp_path, "backend.name=fsdp", "growth.max_workers=8")
    job, _ = prepare("c.yaml", ["backend.name=fsdp"], cfg, env, lambda _: None, "py", 0)
    assert job.launcher == "srun" and job.cfg.backend.name == "fsdp"
    argv, _ = build_command(job.launcher, job.spec(4, resume=True))
    assert argv[:4] == ["srun", "--ntasks=4", "--nodes=2", "--kill-on-bad-exit=1"]
    train = ["py", "-m", "distgrow", "train", job.config_path, "backend.name=fsdp"]
    assert argv[4:] == [*train, "run.resume=true"]
    record = record_start(job.run, "chain", "dg", env, 1000.0)
    grow = Decision("stop", 75, message="needs 8")
    slurm = FakeSlurm()
    overrides = ["backend.name=fsdp"]
    assert end_of_job(job, record, grow, resize(8), overrides, env, lambda _: None, slurm) == 0
    script = (job.run.launch_dir / "span-02.sbatch").read_text()
    assert "#SBATCH --ntasks=8\n" in script
    assert f"launch {job.config_path} backend.name=fsdp launch.slurm=chain\n" in script
