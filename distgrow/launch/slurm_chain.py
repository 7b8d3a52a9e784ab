"""``launch.slurm=chain``: each span of the plan is its own SLURM job, sized to its workers.

A span is a run of phases with one worker count. The first span's job is submitted by
``distgrow launch CONFIG launch.slurm=chain`` (outside SLURM; or ``sbatch`` the template with
that override). Inside each span the launch controller runs as usual: it starts the span's
workers as an ``srun`` job step (relaunching wider inside the job while the job has the tasks).
When the workers ask for more than the job has (exit 75, ``resize.json``), the controller
submits the next span, sized to what they asked for, with ``--dependency=afterok:<this job>``
and ``--kill-on-invalid-dep=yes``, and exits 0: SLURM starts the next span once this one has
ended, and it resumes from the checkpoint the workers just wrote.

Why from inside the running span, rather than the whole chain up front: the width and the
moment of the next span come from the workers' own request, so a plateau schedule (whose
growth points are not known in advance) chains the same way; a span that fails, is cancelled
or is stopped never submits a next one, so nothing waits for a dependency that cannot be met
(and if one slips in during the last seconds, ``--kill-on-invalid-dep`` makes SLURM cancel it).
The cost: the next span enters the queue only when it is needed.

The jobs are recorded in the run directory's ``slurm_jobs.json`` (:class:`SlurmJobs`, also in
allocation mode, for the held hours of :mod:`distgrow.held`; :mod:`distgrow.launch.slurm_jobs`).
``distgrow chain status RUN_DIR`` shows them; ``distgrow chain cancel RUN_DIR`` stops the chain
(:mod:`distgrow.launch.chain_verbs`) (``scancel --name=NAME`` of the
chain's one job name does the same without the record).
"""

from __future__ import annotations

import hashlib
import math
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from distgrow.config import ChainConfig, Config
from distgrow.config.grammar import control_characters
from distgrow.exits import EXIT_NEED_WORKERS, EXIT_OK, EXIT_USAGE
from distgrow.launch.builders import LaunchError, format_command

# The chain verbs and SLURM records live beside this module; their names stay importable here.
from distgrow.launch.chain_verbs import cancel_chain as cancel_chain
from distgrow.launch.chain_verbs import chain_status as chain_status
from distgrow.launch.chain_verbs import main_chain as main_chain
from distgrow.launch.job import Job
from distgrow.launch.slurm_jobs import Runner as Runner
from distgrow.launch.slurm_jobs import allocation_size as allocation_size
from distgrow.launch.slurm_jobs import record_end as record_end
from distgrow.launch.slurm_jobs import record_start as record_start
from distgrow.launch.slurm_jobs import run_slurm_command as run_slurm_command
from distgrow.launch.slurm_jobs import updating as updating
from distgrow.rundir import ResizeRequest, RunDir, SlurmJob
from distgrow.signals import signal_from_status

if TYPE_CHECKING:
    from distgrow.launch.controller import Decision

CHAIN_SPAN_ENV = "DISTGROW_CHAIN_SPAN"
"""Set by a span's batch script: the controller requeues its own job after a USR1 stop (the
allocation template does that in bash)."""


@dataclass(frozen=True)
class SpanShape:
    """A span's job: ``workers`` tasks on ``nodes`` nodes, and what each node gets."""

    workers: int
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int | None


def span_shape(workers: int, chain: ChainConfig) -> SpanShape:
    """The job of a span of ``workers`` workers, from the allocation shape the user gave.

    Tasks per node: ``launch.chain.tasks_per_node``, else the GPUs per node, else all on one
    node. Nodes: as few as hold the workers. GPUs per node: one per worker, at most
    ``gpus_per_node`` (a span narrower than a node asks for that many GPUs only).
    """
    per_node = chain.tasks_per_node or chain.gpus_per_node or workers
    nodes = math.ceil(workers / per_node)
    on_a_node = min(workers, per_node)
    gpus = min(on_a_node, chain.gpus_per_node) if chain.gpus_per_node else 0
    return SpanShape(workers, nodes, on_a_node, gpus, chain.cpus_per_task)


def chain_name(cfg: Config, run_dir: Path) -> str:
    """The job name every span of the run shares (``scancel --name`` stops them all): the
    run's name and a digest of its directory, so two runs of one name do not collide."""
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:6]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", cfg.run.name)[:40]
    return f"distgrow-{name}-{digest}"


def sbatch_options(
    shape: SpanShape, chain: ChainConfig, name: str, output: Path, chdir: Path
) -> list[str]:
    """The ``#SBATCH`` options of a span's batch script (the dependency is added at submit).

    ``output``: a literal folder and a file name that may hold sbatch's ``%`` patterns."""
    opts = [
        f"--job-name={name}",
        f"--nodes={shape.nodes}",
        f"--ntasks={shape.workers}",
        f"--ntasks-per-node={shape.tasks_per_node}",
    ]
    if shape.gpus_per_node:
        opts.append(f"--gpus-per-node={shape.gpus_per_node}")
    if shape.cpus_per_task:
        opts.append(f"--cpus-per-task={shape.cpus_per_task}")
    if chain.partition:
        opts.append(f"--partition={chain.partition}")
    if chain.account:
        opts.append(f"--account={chain.account}")
    opts += [
        f"--time={chain.time}",
        # Pre-emption and the time limit: USR1 to the controller, which has the workers
        # checkpoint, then requeues this job; the requeued span resumes.
        "--signal=B:USR1@120",
        "--requeue",
        "--kill-on-invalid-dep=yes",
        "--open-mode=append",
        f"--output={sbatch_output_pattern(output)}",
        f"--chdir={chdir}",
        *chain.sbatch_args,
    ]
    return opts


def sbatch_output_pattern(output: Path) -> str:
    """``output`` for sbatch's ``--output``, which expands filename patterns (``%j`` the job id,
    ``%x`` its name, ``%%`` a literal ``%``...: "filename pattern" in ``man sbatch``): its folder
    with each ``%`` doubled, so that a run directory such as ``runs/lr%5`` or ``runs/%j`` gets
    the log at its own path, and its file name as given (``span-01-%j.out``: the job id).
    ``--chdir`` is not expanded (checked with SLURM 22.05) and is written as it is."""
    return str(output.parent).replace("%", "%%") + "/" + output.name


_SBATCH_SPECIAL = re.compile(r"""[\s\\"'#]""")
_SBATCH_ESCAPED = re.compile(r"""[\\"'#]""")


def sbatch_word(option: str) -> str:
    """``option`` written so that sbatch reads it back from an ``#SBATCH`` line as one word.

    sbatch splits an ``#SBATCH`` line at whitespace outside double quotes, takes the character
    after a backslash as it is, and ends the line at an unescaped ``#`` (``_get_argument`` in
    SLURM's ``src/sbatch/opt.c``; older releases end it there even inside quotes, newer ones
    also group with single quotes). So an option holding any of these is written in double
    quotes with a backslash before each backslash, quote and ``#``, which both forms read
    back as it was (checked with SLURM 22.05's sbatch). bash sees the whole line as a comment.
    """
    if not _SBATCH_SPECIAL.search(option):
        return option
    return '"' + _SBATCH_ESCAPED.sub(lambda match: "\\" + match.group(), option) + '"'


def span_script(
    index: int, options: Sequence[str], python: str, config: str, overrides: Sequence[str]
) -> str:
    """A span's batch script: its options, then ``exec python -m distgrow launch ...``.

    ``exec``: the controller is the batch shell, so ``--signal=B:USR1`` reaches it directly.
    Every option is escaped for sbatch (:func:`sbatch_word`) and every word of the command
    quoted for bash (:func:`shlex.quote`), so that each receives it as one word; none may hold
    a control character, which could end its line.

    Raises:
        LaunchError: an option or a word that holds a control character.
    """
    words = [python, "-m", "distgrow", "launch", config, *overrides]
    for value in [*options, *words]:
        bad = control_characters(value)
        if bad:
            raise LaunchError(
                f"{value!r} holds control characters ({', '.join(bad)}), and would be written "
                f"into span {index}'s batch script, where one could end its line and start a "
                "command. Fix: remove them from the config value, override or directory it "
                "comes from."
            )
    command = format_command(words)
    name = next(o.split("=", 1)[1] for o in options if o.startswith("--job-name="))
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# distgrow chain span {index} (launch.slurm=chain), written by `distgrow launch`.",
            "# The launch controller runs the span's workers as srun job steps; when the plan",
            "# needs more workers than this job has, it submits the next span with",
            "# --dependency=afterok:$SLURM_JOB_ID and exits 0.",
            f"# Stop the chain: distgrow chain cancel RUN_DIR  (or: scancel --name={name})",
            *(f"#SBATCH {sbatch_word(o)}" for o in options),
            f"export {CHAIN_SPAN_ENV}=1",
            f"exec {command}",
            "",
        ]
    )


def span_overrides(overrides: Sequence[str], resume: bool) -> list[str]:
    """The command line's overrides for a span: ``launch.slurm=chain`` and, with ``resume``,
    ``run.resume=true`` (each once). A later span resumes without it: its controller knows
    from ``slurm_jobs.json`` that it is not the first (and adds it for its workers)."""
    keep = [o for o in overrides if not o.startswith(("run.resume=", "launch.slurm="))]
    return [*keep, "launch.slurm=chain", *(["run.resume=true"] if resume else [])]


def check_chain(cfg: Config) -> None:
    """Refuse a chain that cannot run.

    Raises:
        LaunchError: ``growth.max_workers`` unset (the chain's widest span), elastic, or a
            run directory with a control character (it is written into each batch script).
    """
    if cfg.growth.max_workers is None:
        raise LaunchError(
            "launch.slurm=chain sizes each span's job from the plan, but growth.max_workers is "
            "unset, so the plan has no widest span. Fix: set growth.max_workers (e.g. "
            "growth.max_workers=8)."
        )
    if cfg.launch.elastic:
        raise LaunchError(
            "launch.slurm=chain starts a new job for each wider span; launch.elastic=true grows "
            "inside one job. Fix: set launch.elastic=false (or use launch.slurm=allocation)."
        )
    bad = control_characters(cfg.run.resolved_output_dir)
    if bad:
        raise LaunchError(
            f"run.output_dir = {cfg.run.resolved_output_dir!r} holds control characters "
            f"({', '.join(bad)}); launch.slurm=chain writes it into each span's batch script, "
            "where one could end its line. Fix: a directory name without them."
        )


# --------------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------------


def submission_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment ``sbatch`` exports to the next span: this one's, without the variables
    of the job it runs in (SLURM's own, SBATCH_* inputs), which would describe the wrong job."""
    return {
        k: v
        for k, v in env.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"
    }


def _sbatch(argv: list[str], env: Mapping[str, str], runner: Runner, what: str) -> str:
    """Submit the batch script of ``argv`` (``sbatch --parsable ... SCRIPT``); its job id.

    Raises:
        LaunchError: ``sbatch`` is missing or refused the job (its message is quoted).
    """
    try:
        done = runner(argv, submission_env(env))
    except FileNotFoundError:
        raise LaunchError(
            "launch.slurm=chain submits each span with sbatch, which is not on PATH here. Fix: "
            "run on a SLURM login node, or set launch.slurm=allocation."
        ) from None
    if done.returncode != 0:
        raise LaunchError(
            f"sbatch refused {what}: "
            f"{(done.stderr or done.stdout).strip()}. Fix: change launch.chain (partition, "
            f"time, tasks_per_node, gpus_per_node) to a shape this cluster accepts; the script "
            f"is {argv[-1]}."
        )
    return done.stdout.strip().split(";")[0]


def submit_span(
    *,
    cfg: Config,
    run: RunDir,
    workers: int,
    python: str,
    config_path: str,
    overrides: Sequence[str],
    resume: bool,
    after: str | None,
    env: Mapping[str, str],
    chdir: Path,
    runner: Runner = run_slurm_command,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> SlurmJob | None:
    """Write span ``n``'s batch script into the run's launch folder and ``sbatch`` it.

    Args:
        after: The job the span waits for (``--dependency=afterok``), None for the first.
        dry_run: Log the script and the command instead of submitting.

    Returns:
        The span's record (also in ``slurm_jobs.json``), None in a dry run.

    Raises:
        LaunchError: ``sbatch`` is missing or refused the job (its message is quoted).
    """
    name = chain_name(cfg, run.path)
    known = run.read_slurm_jobs()
    index = len(known.jobs) + 1 if known else 1
    shape = span_shape(workers, cfg.launch.chain)
    script, output = run.span_script(index), run.span_output(index)
    options = sbatch_options(shape, cfg.launch.chain, name, output, chdir)
    text = span_script(index, options, python, config_path, span_overrides(overrides, resume))
    argv = ["sbatch", "--parsable"]
    if after:
        argv.append(f"--dependency=afterok:{after}")
    argv.append(str(script))
    if dry_run:
        log(f"span {index}: {workers} worker(s) on {shape.nodes} node(s); batch script:")
        for line in text.splitlines():
            log(f"  {line}")
        log(f"  $ {format_command(argv)}")
        return None
    run.launch_dir.mkdir(parents=True, exist_ok=True)
    script.write_text(text, encoding="utf-8")
    job_id = _sbatch(
        argv, env, runner, f"span {index} ({workers} worker(s), {shape.nodes} node(s))"
    )
    job = SlurmJob(
        index=index,
        job_id=job_id,
        workers=workers,
        state="submitted",
        nodes=shape.nodes,
        tasks=workers,
        partition=cfg.launch.chain.partition,
        time_limit=cfg.launch.chain.time,
        submitted=time.time(),
    )
    with updating(run, "chain", name) as jobs:
        jobs.jobs.append(job)
    log(
        f"submitted span {index}: job {job_id}, {workers} worker(s) on {shape.nodes} node(s)"
        + (f", after job {after} ends well (afterok)" if after else "")
        + f"; script {script}"
    )
    return job


# --------------------------------------------------------------------------------------------
# The controller's side
# --------------------------------------------------------------------------------------------


def resume_command(python: str, config_path: str, overrides: Sequence[str]) -> str:
    """The command that resumes the chain (from the directory the first span was submitted)."""
    return format_command(
        [python, "-m", "distgrow", "launch", config_path, *span_overrides(overrides, True)]
    )


def submit_first_span(
    job: Job,
    first_workers: int,
    overrides: Sequence[str],
    env: Mapping[str, str],
    dry_run: bool,
    log: Callable[[str], None],
) -> int:
    """``distgrow launch CONFIG launch.slurm=chain`` outside SLURM: submit the first span."""
    workers = first_workers
    known = job.run.read_slurm_jobs()
    if job.cfg.run.resume and known and known.jobs:
        # Continue as wide as the chain last was (the span that failed or was stopped).
        workers = known.jobs[-1].workers
    submitted = submit_span(
        cfg=job.cfg,
        run=job.run,
        workers=workers,
        python=job.python,
        config_path=job.config_path,
        overrides=overrides,
        resume=job.cfg.run.resume,
        after=None,
        env=env,
        chdir=Path.cwd(),
        dry_run=dry_run,
        log=log,
    )
    if submitted is not None:
        name = chain_name(job.cfg, job.run.path)
        log(
            f"the chain continues by itself, one job per span; see it with `distgrow chain "
            f"status {job.run_dir}`, stop it with `distgrow chain cancel {job.run_dir}` (or "
            f"scancel --name={name})"
        )
    return EXIT_OK


def _submit_next_span(
    job: Job,
    record: SlurmJob,
    resize: ResizeRequest,
    overrides: Sequence[str],
    env: Mapping[str, str],
    log: Callable[[str], None],
    runner: Runner,
) -> int:
    """The workers outgrew this span: submit the next, wider one (``afterok`` on this job),
    unless the chain was cancelled; record how this span ended."""
    fix_resume = resume_command(job.python, job.config_path, overrides)
    need = resize.need_workers
    jobs = job.run.read_slurm_jobs()
    if jobs is not None and jobs.cancel_requested:
        log("the chain was cancelled: not submitting the next span")
        record_end(
            job.run, record, time.time(), state="stopped", exit_code=EXIT_OK,
            message="the chain was cancelled (distgrow chain cancel): no next span",
            fix=f"resume: {fix_resume}",
        )  # fmt: skip
        return EXIT_OK
    try:
        nxt = submit_span(
            cfg=job.cfg,
            run=job.run,
            workers=need,
            python=job.python,
            config_path=job.config_path,
            overrides=overrides,
            resume=False,  # implied: the span's controller sees it is not the first
            after=record.job_id,
            env=env,
            chdir=Path.cwd(),
            runner=runner,
            log=log,
        )
    except LaunchError as err:
        log(f"error: {err}")
        record_end(
            job.run, record, time.time(), state="failed", exit_code=EXIT_USAGE,
            message=f"the next span ({need} workers) could not be submitted: {err}",
            fix=f"fix the span's shape (launch.chain), then resume: {fix_resume}",
        )  # fmt: skip
        return EXIT_USAGE
    assert nxt is not None  # not a dry run
    record_end(
        job.run, record, time.time(), state="grown", exit_code=EXIT_OK,
        next_job_id=nxt.job_id,
        message=f"the plan needs {need} workers from epoch {resize.epoch} (step "
        f"{resize.step}): span {nxt.index} is job {nxt.job_id}",
    )  # fmt: skip
    return EXIT_OK


def end_of_job(
    job: Job,
    record: SlurmJob,
    decision: Decision,
    resize: ResizeRequest | None,
    overrides: Sequence[str],
    env: Mapping[str, str],
    log: Callable[[str], None],
    runner: Runner = run_slurm_command,
) -> int:
    """After the controller's last launch in a SLURM job: record how the job ended and, in a
    chain, submit the next span when the workers asked for more than this job has.

    Returns:
        The controller's exit status: 0 after submitting the next span (SLURM's ``afterok``
        needs it), else the decision's.
    """
    chain = job.cfg.launch.slurm == "chain"
    fix_resume = resume_command(job.python, job.config_path, overrides)
    if (
        chain
        and decision.status == EXIT_NEED_WORKERS
        and resize is not None
        and resize.need_workers > job.limit
    ):
        return _submit_next_span(job, record, resize, overrides, env, log, runner)
    status = decision.status
    if decision.action == "done":
        record_end(job.run, record, time.time(), state="completed", exit_code=EXIT_OK)
        return EXIT_OK
    stopped = signal_from_status(status)
    if stopped is not None:
        state = "stopped"
        if chain and stopped == signal.SIGUSR1 and env.get(CHAIN_SPAN_ENV):
            # Pre-emption or the time limit (--signal=B:USR1@120): the workers checkpointed;
            # the requeued job resumes (SLURM_RESTART_COUNT > 0).
            done = runner(["scontrol", "requeue", record.job_id], submission_env(env))
            if done.returncode == 0:
                state = "requeued"
                log(f"stopped by USR1 (pre-emption or time limit); requeued job {record.job_id}")
            else:
                log(f"scontrol requeue {record.job_id} failed: {done.stderr.strip()}")
        record_end(
            job.run, record, time.time(), state=state, exit_code=status,
            message=decision.message, fix=None if state == "requeued" else f"resume: {fix_resume}",
        )  # fmt: skip
        return status
    record_end(
        job.run, record, time.time(), state="failed", exit_code=status,
        message=decision.message,
        fix=(decision.fix + "; " if decision.fix else "") + f"resume: {fix_resume}"
        + (" (no later span was submitted: nothing waits on this one)" if chain else ""),
    )  # fmt: skip
    return status
