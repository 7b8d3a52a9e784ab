"""The controller: launch, read how the launch ended, decide, launch again.

After each launch :func:`decide` (pure: exit statuses, the resize request and the counts in, a
:class:`Decision` out) says whether the run is done, is relaunched with n workers, or stops
with a status and a reason; :func:`run_controller` does the I/O around it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from distgrow.config import Config, ConfigError, load_config
from distgrow.exits import EXIT_FAILURE, EXIT_NEED_WORKERS, EXIT_NONFINITE, EXIT_OK, EXIT_USAGE
from distgrow.launch import slurm_chain
from distgrow.launch.builders import LaunchError, build_command
from distgrow.launch.elastic import run_elastic_group, write_discovery_script
from distgrow.launch.environment import in_slurm_allocation, local_gpu_count, log_command
from distgrow.launch.error_file import ERROR_FILE_VAR
from distgrow.launch.executor import (
    Executor,
    Outcome,
    address_in_use,
    is_spawn,
    log_tail,
    run_subprocess,
    torchrun_status,
    worker_error,
)
from distgrow.launch.job import Job, prepare
from distgrow.launch.nodes import follow, is_follower, leader_for
from distgrow.planner import Plan
from distgrow.rundir import (
    RESIZE_FILE,
    WRITE_FAILURE,
    ResizeRequest,
    RunDir,
    SlurmJob,
    is_disk_error,
    write_failure,
)
from distgrow.signals import exit_status, signal_from_status, signal_name


@dataclass(frozen=True)
class Span:
    """A stretch of the plan with one worker count: one launch."""

    workers: int
    start_epoch: float
    end_epoch: float
    first_phase: int


def plan_spans(plan: Plan) -> list[Span]:
    """Consecutive phases with the same worker count, merged; each span is one launch."""
    spans: list[Span] = []
    for index, phase in enumerate(plan.phases):
        if spans and spans[-1].workers == phase.workers:
            spans[-1] = replace(spans[-1], end_epoch=phase.end_epoch)
        else:
            spans.append(Span(phase.workers, phase.start_epoch, phase.end_epoch, index))
    return spans


@dataclass
class Attempt:
    """One launch and how it ended (the controller's history, for its report)."""

    number: int
    workers: int
    returncode: int
    worker_code: int
    log: Path
    seconds: float


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptEnd:
    """Everything the decision after a launch reads.

    Attributes:
        number: The launch's number (1 for the first).
        workers: Workers it ran.
        code: The workers' exit status (torchrun's root cause behind its 1).
        signal: A signal the controller forwarded during the launch, if any.
        resize: The resize request rank 0 wrote, if any.
        recorded_stop: The signal of a clean stop rank 0 recorded during the launch, if any.
        restarts: Restarts after crashes so far in the run.
        log: The launch's log.
        resize_path: Where ``resize.json`` is read (for the messages).
        error: The last error a worker printed (``distgrow: error: ...``), if any.
        port_in_use: The rendezvous port, when the log says it was already in use.
        log_error: The line for a launch log that could not be written (a full or read-only
            disk), if it could not.
    """

    number: int
    workers: int
    code: int
    signal: int | None = None
    resize: ResizeRequest | None = None
    recorded_stop: int | None = None
    restarts: int = 0
    log: Path = Path("attempt.log")
    resize_path: Path = Path(RESIZE_FILE)
    error: str | None = None
    port_in_use: int | None = None
    log_error: str | None = None


@dataclass(frozen=True)
class Decision:
    """What the controller does next.

    Attributes:
        action: ``done``; ``relaunch`` with ``workers`` from the newest checkpoint; ``stop``
            with ``status``.
        status: The exit status of ``distgrow launch`` (done: 0).
        workers: Relaunch: the workers to start.
        restart: Relaunch: after a crash (one of ``launch.max_restarts``).
        message: The line to log (with ``fix``: the headline of a report of every attempt).
        fix: Stop: what the user should do (the report lists the attempts before it).
    """

    action: Literal["done", "relaunch", "stop"]
    status: int = EXIT_OK
    workers: int = 0
    restart: bool = False
    message: str = ""
    fix: str = ""


def decide(end: AttemptEnd, limit: int, limit_reason: str, max_restarts: int) -> Decision:
    """The decision after one launch, by the workers' exit status.

    * 0: done (also after a signal: the workers had finished when it came); a launch log a
      full disk cut is named in the same line.
    * a signal the controller forwarded, or a stop the workers report (128 + N, or recorded by
      rank 0): stop with 128 + N, no relaunch; a resume continues.
    * a launch log that could not be written, or workers that could not write the run
      directory (exit 2, ``cannot write the ...``): stop with 2 in one line, never relaunched
      (a full or read-only disk stays so until the user acts).
    * 75 (or any failure after rank 0 wrote ``resize.json``, except 2 and 65): relaunch with
      ``need_workers``; stop if that is above ``limit`` (75) or not above ``workers``.
    * 2 or 65: stop at once (a config problem or a non-finite loss; a retry cannot help).
    * anything else: a crash; relaunch as wide, at most ``max_restarts`` times in the run.

    Args:
        end: How the launch ended.
        limit: The most workers the job may start.
        limit_reason: Where ``limit`` comes from (for the messages).
        max_restarts: ``launch.max_restarts``.
    """
    code = end.code
    if code == EXIT_OK:
        # The workers finished: no retry, but the user must hear that the log lacks output.
        lost = f"; but its log is incomplete: {end.log_error}" if end.log_error else ""
        return Decision(
            "done",
            message=f"done: {end.number} launch(es), {end.restarts} restart(s) after crashes{lost}",
        )
    stop = _stopped(end)
    if stop is not None:
        return stop
    resize = end.resize
    if code == EXIT_NEED_WORKERS or (
        resize is not None and code not in (EXIT_USAGE, EXIT_NONFINITE)
    ):
        return _grow(end, limit, limit_reason)
    return _failed(end, max_restarts)


def _stopped(end: AttemptEnd) -> Decision | None:
    """The stop after a signal, or after a write that failed (no relaunch); None otherwise."""
    code, log = end.code, end.log
    if end.signal is not None:
        return Decision(
            "stop",
            exit_status(end.signal),
            message=f"stopped by {signal_name(end.signal)}: forwarded to the workers, which "
            f"checkpoint and exit; not relaunching. Resume with run.resume=true. Logs: {log}",
        )
    stopped_by = signal_from_status(code) or end.recorded_stop
    if stopped_by is not None:
        # A signal that reached the workers (or their launcher) without passing through the
        # controller, e.g. SLURM signalling every process of the job: a request to stop, not a
        # crash. The workers checkpointed (exit 128 + N) unless it killed them first (-N);
        # either way the newest checkpoint is where a resume continues.
        return Decision(
            "stop",
            exit_status(stopped_by),
            message=f"the workers were stopped by {signal_name(stopped_by)} (exit {code}), not "
            f"a crash: not relaunching. Resume with run.resume=true. Logs: {log}",
        )
    if end.log_error is not None or (
        code == EXIT_USAGE and end.error is not None and end.error.startswith(WRITE_FAILURE)
    ):
        # The trainer's line says how to resume `distgrow train`; launch resumes by the config.
        said = (end.log_error or end.error or "").replace(
            "then rerun with --resume.", "then launch again with run.resume=true."
        )
        return Decision(
            "stop",
            EXIT_USAGE,
            message=f"not relaunching (exit {code}; a retry would fail the same way): {said}",
        )
    return None


def _failed(end: AttemptEnd, max_restarts: int) -> Decision:
    """The decision after a failure that is neither a stop nor a request for more workers."""
    code, log = end.code, end.log
    if end.port_in_use is not None:
        port = end.port_in_use
        return Decision(
            "stop",
            EXIT_USAGE,
            message=f"the rendezvous port {port} is already in use (exit {code}): another job, "
            "or a run still ending, holds it; a retry would fail the same way",
            fix=f"set launch.master_port to a free port (e.g. launch.master_port={port + 1}; "
            "in SLURM the job id mod 1000 is added to it), or wait for the other job to end",
        )
    if code == EXIT_USAGE:
        # A config, data, run-directory or checkpoint problem: the worker's own line says which.
        said = f": {end.error}" if end.error else ""
        return Decision(
            "stop",
            code,
            message=f"the workers stopped with exit {code} (a config, data, run-directory or "
            f"checkpoint problem; a retry would fail the same way){said}",
            fix=f"do what the workers' error says (log {log}), then run again",
        )
    if code == EXIT_NONFINITE:
        return Decision(
            "stop",
            code,
            message=f"the workers stopped with exit {code} (a non-finite loss); a retry would "
            "fail the same way",
            fix="lower optim.lr or set optim.grad_clip, then resume with run.resume=true",
        )
    if end.restarts + 1 > max_restarts:
        return Decision(
            "stop",
            code if 0 < code < 256 else EXIT_FAILURE,
            message=f"the workers crashed (exit {code}) and launch.max_restarts={max_restarts} "
            "restart(s) are used up",
            fix="read the logs listed; resume with run.resume=true, or raise launch.max_restarts",
        )
    return Decision(
        "relaunch",
        workers=end.workers,
        restart=True,
        message=f"the workers crashed (exit {code}); restart {end.restarts + 1} of "
        f"{max_restarts} from the newest checkpoint",
    )


def _grow(end: AttemptEnd, limit: int, limit_reason: str) -> Decision:
    """The decision when the workers asked for more of them."""
    resize = end.resize
    if resize is None:
        return Decision(
            "stop",
            EXIT_FAILURE,
            message=f"the workers exited {EXIT_NEED_WORKERS} (need more workers) but wrote no "
            f"readable {end.resize_path}",
            fix="check the workers' log above; resume with run.resume=true",
        )
    need = resize.need_workers
    if need > limit:
        return Decision(
            "stop",
            EXIT_NEED_WORKERS,
            message=f"the plan needs {need} workers from epoch {resize.epoch} (step "
            f"{resize.step}), above the limit of {limit} ({limit_reason})",
            fix=f"give the job {need} workers (e.g. sbatch --ntasks={need}, or "
            f"growth.max_workers={need}), or set growth.max_workers={limit} so the batch grows "
            "by accumulation instead; then resume with run.resume=true",
        )
    if need <= end.workers:
        return Decision(
            "stop",
            EXIT_FAILURE,
            message=f"resize.json asks for {need} workers while {end.workers} ran: a relaunch "
            "would not change anything",
            fix="check the workers' log; this is a bug if the config did not change",
        )
    return Decision(
        "relaunch",
        workers=need,
        message=f"the plan needs {need} workers from epoch {resize.epoch}: relaunching wider "
        f"from {resize.checkpoint}",
    )


# --------------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------------


def recorded_stop_signal(run_dir: Path, since: float) -> int | None:
    """The signal of a clean stop that rank 0 recorded (``stopped`` event) after ``since``.

    The newest record of the run must be that event, written at or after ``since`` (a Unix
    time: the launch's start), so an older stop is never taken for this launch's.
    """
    record = RunDir(run_dir).last_record("kind")
    if record is None or record.get("event") != "stopped":
        return None
    if float(record.get("time", 0.0)) < since:
        return None
    return signal_from_status(int(record.get("exit_code", 0)))


def last_width(run_dir: Path) -> int | None:
    """The worker count of the run's newest metrics record (``workers``), if any."""
    record = RunDir(run_dir).last_record("workers")
    return int(record["workers"]) if record and isinstance(record["workers"], int) else None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _report(job: Job, history: list[Attempt], headline: str, fix: str) -> None:
    job.log(headline)
    for a in history:
        job.log(
            f"  attempt {a.number}: {a.workers} worker(s), exit {a.returncode}"
            + (f" (worker exit {a.worker_code})" if a.worker_code != a.returncode else "")
            + f", {a.seconds:.1f} s, log {a.log}"
        )
    job.log(f"  fix: {fix}")


def _dry_run(job: Job, plan: Plan, env: Mapping[str, str]) -> int:
    spans = plan_spans(plan)
    job.log(
        f"dry run: launcher {job.launcher}, worker limit {job.limit} ({job.limit_reason}), "
        f"{1 if job.elastic_agents else len(spans)} launch(es); run dir {job.run_dir}"
    )
    if job.elastic_agents:
        argv, additions = build_command("torchrun", job.agent_spec(job.rdzv_id(1)))
        counts = " -> ".join(str(span.workers) for span in spans)
        job.log(
            f"elastic: one torchrun agent (1 worker) per worker, {counts} agent(s); an agent is "
            "added when the workers ask for more (resize.json), and torchrun restarts all workers "
            "at the new size. Each agent runs:"
        )
        log_command(job.log, argv, additions, env)
        return EXIT_OK
    for number, span in enumerate(spans, start=1):
        where = (
            f"rung {plan.phases[span.first_phase].rung}+ (when the plateaus come)"
            if plan.ladder
            else f"epochs {span.start_epoch:g}-{span.end_epoch:g}"
        )
        resume = number > 1 or job.cfg.run.resume
        argv, additions = build_command(job.launcher, job.spec(span.workers, resume))
        job.log(f"launch {number}: {span.workers} worker(s), {where}")
        log_command(job.log, argv, additions, env)
    return EXIT_OK


def _launch(
    job: Job, workers: int, resume: bool, number: int, executor: Executor, env: Mapping[str, str]
) -> tuple[Outcome, int, int, Path]:
    """One launch: ``(outcome, workers it ended with, the workers' status, its log)``.

    Raises:
        LaunchWriteError: the launch's log cannot be created (nothing was started).
    """
    if job.elastic_agents:
        try:
            outcome, workers, log_path = run_elastic_group(job, workers, number, env)
        except OSError as err:
            raise _log_write_error(err, job.run.launch_dir) from None
        return outcome, workers, outcome.returncode, log_path
    spec = job.spec(workers, resume, job.rdzv_id(number))
    argv, additions = build_command(job.launcher, spec)
    if spec.host_discovery_script:
        write_discovery_script(Path(spec.host_discovery_script), spec)
    log_path = job.run.attempt_log(number, workers)
    error_file = None
    if job.launcher == "torchrun" and not is_spawn(argv):
        # torchrun's @record writes the first failed worker's error and status here.
        error_file = RunDir.error_file(log_path)
        error_file.unlink(missing_ok=True)  # a file of an earlier run is not this launch's
        additions = {**additions, ERROR_FILE_VAR: str(error_file)}
    job.log(f"launch {number}: {workers} worker(s){' (resume)' if resume else ''}; log {log_path}")
    log_command(job.log, argv, additions, env)
    try:
        outcome = executor(argv, additions, log_path)
    except OSError as err:
        raise _log_write_error(err, log_path) from None
    code = outcome.returncode
    if job.launcher == "torchrun":
        code = torchrun_status(code, log_path, outcome.tail, error_file)[0]
    return outcome, workers, code, log_path


class LaunchWriteError(LaunchError):
    """The controller cannot write its logs in the run directory (one line: errno, path, fix)."""


def _log_write_error(err: OSError, log_path: Path) -> Exception:
    if not is_disk_error(err):
        return err
    return LaunchWriteError(write_failure(err, "launch log", log_path))


def run_controller(
    cfg_path: str,
    overrides: list[str],
    cfg: Config,
    *,
    dry_run: bool = False,
    executor: Executor = run_subprocess,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    python: str = sys.executable,
    gpus_on_node: int | None = None,
) -> int:
    """Run a config's growth plan to the end, relaunching wider whenever the workers ask.

    After each launch :func:`decide` says what follows. A SIGTERM/SIGINT/SIGUSR1 during a
    launch is forwarded to the workers (they checkpoint and exit); no relaunch, and the
    controller exits 128 + the signal's number.

    Args:
        cfg_path: The config file (passed on to every worker).
        overrides: The command line's overrides (passed on to every worker).
        cfg: The loaded config (``load_config(cfg_path, overrides)``).
        dry_run: Print each span's command and environment instead of launching.
        executor: Runs one launch (:func:`run_subprocess`; tests pass a fake).
        env: The environment to read (``os.environ`` by default).
        log: Receives the controller's lines (default: stderr, prefixed ``distgrow launch:``;
            a dry run prints to stdout).
        python: The workers' interpreter.
        gpus_on_node: GPUs on this machine (default: counted from ``/dev/nvidia*``).

    Returns:
        The exit status for the ``distgrow launch`` command.

    Raises:
        LaunchError: a launcher that cannot run this job (the message says how to fix it).
        ConfigError: a change the controller made does not validate (a bug if it happens).
    """
    env = os.environ if env is None else env
    # A dry run's commands are its output (stdout); a real run's lines are diagnostics (stderr).
    log = log or (print if dry_run else _log_stderr)
    if gpus_on_node is None:
        gpus_on_node = local_gpu_count()
    chain = cfg.launch.slurm == "chain"
    if chain:
        slurm_chain.check_chain(cfg)  # before prepare() could set growth.max_workers
    job, plan = prepare(cfg_path, overrides, cfg, env, log, python, gpus_on_node)
    first = plan.phases[0].workers if plan.phases else 1
    if chain and not in_slurm_allocation(env):  # the login node: submit the first span
        return slurm_chain.submit_first_span(job, first, overrides, env, dry_run, log)
    if is_follower(job):
        # Nodes 1.. of a multi-node torchrun job: node 0's controller decides every launch.
        return follow(job, env, log, dry_run)
    if dry_run:
        return _dry_run(job, plan, env)
    start = _starting_point(job, first, env, log)
    if job.elastic_agents and not start.resume and job.run.holds_a_run():
        raise LaunchError(
            f"run directory {job.run_dir} already holds a run, and elastic workers always resume "
            "(torchrun restarts them at each membership change). Fix: pass run.resume=true to "
            "continue it, or choose another run.output_dir (or run.name)."
        )
    stale = job.run.set_aside_resize(RunDir.resize_set_aside(now=time.time()))
    if stale:
        log(f"moved an old {RESIZE_FILE} (from an earlier launch) to {stale}")
    log(
        f"launcher {job.launcher}, worker limit {job.limit} ({job.limit_reason}), "
        f"{1 if job.elastic_agents else len(plan_spans(plan))} planned launch(es)"
        f"{' (elastic)' if job.elastic_agents else ''}, run dir {job.run_dir}"
    )
    return _control(job, start, executor, env, log, overrides)


@dataclass
class _Start:
    """Where the first launch of this controller starts (and the SLURM job it runs in)."""

    workers: int
    resume: bool
    slurm_job: SlurmJob | None = None


def _starting_point(
    job: Job, first: int, env: Mapping[str, str], log: Callable[[str], None]
) -> _Start:
    """The first launch's width and resume flag; inside SLURM, the job's record is started."""
    chain = job.cfg.launch.slurm == "chain"
    start = _Start(min(first, job.limit), job.cfg.run.resume)
    if in_slurm_allocation(env):
        # What this job holds, for the held hours (distgrow.held); a span of a chain finds
        # the record its submitter wrote.
        name = slurm_chain.chain_name(job.cfg, job.run_dir)
        if not chain:
            name = env.get("SLURM_JOB_NAME", name)
        slurm_job = slurm_chain.record_start(job.run, job.cfg.launch.slurm, name, env, time.time())
        start.slurm_job = slurm_job
        if chain and (slurm_job.restarts > 0 or slurm_job.index > 1):
            start.resume = True  # a later or requeued span continues the run
        if chain and start.resume:
            start.workers = min(slurm_job.workers, job.limit)  # the width the span was sized for
    last = last_width(job.run_dir) if start.resume else None
    if last is not None and min(last, job.limit) > start.workers:
        # A stopped (or requeued) run continues as wide as it was, not from the plan's start
        # (which would only exit 75 at once and cost a launch).
        start.workers = min(last, job.limit)
        log(f"resuming a run that last trained on {last} worker(s): starting with {start.workers}")
    return start


def _control(
    job: Job,
    start: _Start,
    executor: Executor,
    env: Mapping[str, str],
    log: Callable[[str], None],
    overrides: list[str],
) -> int:
    """Launch, read how the launch ended, decide; again until a decision is not a relaunch."""
    workers, resume, restarts = start.workers, start.resume, 0
    leader = leader_for(job, log)
    history: list[Attempt] = []
    while True:
        number = len(history) + 1
        if leader is not None:
            leader.launch(number, workers, resume, job.rdzv_id(number))
        started, started_wall = time.monotonic(), time.time()
        outcome, workers, code, log_path = _launch(job, workers, resume, number, executor, env)
        history.append(
            Attempt(number, workers, outcome.returncode, code, log_path, time.monotonic() - started)
        )
        end = _read_end(job, history[-1], outcome, started_wall, restarts)
        decision = decide(end, job.limit, job.limit_reason, job.cfg.launch.max_restarts)
        if decision.action != "relaunch":
            break
        log(decision.message)
        workers, resume = decision.workers, True
        restarts += decision.restart
    slurm_job, resize = start.slurm_job, end.resize
    chain = job.cfg.launch.slurm == "chain"
    if chain and slurm_job is not None and decision.status == EXIT_NEED_WORKERS:
        # The workers outgrew this span: the next, wider span is submitted (or the chain was
        # cancelled); end_of_job says which.
        need = resize.need_workers if resize else "more"
        log(f"the plan needs {need} workers; this span's job has {job.limit}")
        return slurm_chain.end_of_job(job, slurm_job, decision, resize, overrides, env, log)
    if decision.fix:
        _report(job, history, decision.message, decision.fix)
    else:
        log(decision.message)
    if leader is not None:
        leader.end(number + 1, decision.status)
    if slurm_job is not None:
        return slurm_chain.end_of_job(job, slurm_job, decision, resize, overrides, env, log)
    return decision.status


def _read_end(
    job: Job, attempt: Attempt, outcome: Outcome, started_wall: float, restarts: int
) -> AttemptEnd:
    """What the decision after ``attempt`` reads: the status, the resize request (set aside
    under ``launch/``), a stop rank 0 recorded, the worker's error line, a taken port."""
    number, code, log_path = attempt.number, attempt.worker_code, attempt.log
    resize = job.run.read_resize()
    if resize is not None or job.run.resize.exists():
        job.run.set_aside_resize(RunDir.resize_set_aside(number))
    # mpirun, srun and others exit 1 (or their own status) after their workers stopped
    # cleanly on a signal; rank 0's last record says so.
    recorded = None if job.elastic_agents else recorded_stop_signal(job.run_dir, started_wall)
    tail = log_tail(log_path) if outcome.tail is None else outcome.tail
    log_error = None
    if outcome.log_error is not None and is_disk_error(outcome.log_error):
        log_error = write_failure(
            outcome.log_error, "launch log", log_path, after=_what_the_log_kept(log_path)
        )
    return AttemptEnd(
        number,
        attempt.workers,
        code,
        outcome.signal,
        resize,
        recorded,
        restarts,
        log_path,
        job.run.resize,
        worker_error(tail) if code == EXIT_USAGE else None,
        job.rendezvous.master_port if code != EXIT_OK and address_in_use(tail) else None,
        log_error,
    )


def _what_the_log_kept(log_path: Path) -> str:
    """A sentence on a launch log a write failure cut; an empty one is removed, so that no
    file named as a log holds nothing."""
    try:
        size = log_path.stat().st_size
        if size == 0:
            log_path.unlink()
            return "Nothing of its output could be written (the empty log was removed)."
    except OSError:
        return "Its output reached only the terminal."
    return f"The log stops at {size:,} bytes; the rest of its output reached only the terminal."


def _log_stderr(message: str) -> None:
    print(f"distgrow launch: {message}", file=sys.stderr, flush=True)


def main_launch(config: str, overrides: list[str], dry_run: bool) -> int:
    """``distgrow launch CONFIG [key=value ...] [--dry-run]``.

    Returns:
        0 when the plan ran to the end; 2 for a config or launch problem (before anything
        runs); otherwise the status :func:`run_controller` explains on stderr.
    """
    run_dir: Path | None = None
    try:
        cfg = load_config(config, overrides)
        run_dir = Path(cfg.run.resolved_output_dir)
        return run_controller(config, overrides, cfg, dry_run=dry_run)
    except LaunchWriteError as err:
        print(f"distgrow launch: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, LaunchError) as err:
        kind = "config" if isinstance(err, ConfigError) else "launch"
        print(f"distgrow launch: {kind} error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        # The controller's own files live in the run directory (resize.json set aside,
        # slurm_jobs.json): a full or read-only one is the user's to fix, not retried.
        if not is_disk_error(err):
            raise
        line = write_failure(err, "run directory", run_dir or Path(config).parent)
        print(f"distgrow launch: error: {line}", file=sys.stderr)
        return EXIT_USAGE
