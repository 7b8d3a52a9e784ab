"""The run's lifecycle: its run directory (refuse, resume, prepare), checkpoints, and summary."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from distgrow import __version__
from distgrow.backends.sharded_state import load_model_and_optimizer, save_model_and_optimizer
from distgrow.checkpoint import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    PER_LAUNCH_KEYS,
    CheckpointError,
    config_differences,
    load_latest,
    save_checkpoint,
)
from distgrow.config import dump_config
from distgrow.config.loader import read_yaml_file
from distgrow.held import held_so_far
from distgrow.loop import ScheduleError, resplit_policy_state
from distgrow.metrics import (
    JsonlLogger,
    MultiLogger,
    ThroughputMeter,
    drop_replayed_records,
)
from distgrow.progress import Progress
from distgrow.rundir import Summary, atomic_write_bytes
from distgrow.savings import try_estimated_savings
from distgrow.state import RunDirWriteError, TrainError, write_error
from distgrow.trainer.telemetry import Telemetry
from distgrow.wandb_logger import open_wandb_logger


class RunLifecycle(Telemetry):
    """Run directory, checkpoints and summary of a :class:`~distgrow.trainer.Trainer`."""

    def open_run(self) -> bool:
        """Refuse to overwrite a run; resume from its newest checkpoint when asked.

        Rank 0 looks at the run directory, loads the checkpoint and prepares the directory
        (``config.yaml``, ``metrics.jsonl``); the decision (or the error) is broadcast, so every
        rank resumes from the same state without a shared file system, and a directory that
        cannot be written stops every rank alike.

        Returns:
            False when the run is finished and a resume has nothing to train: nothing is
            written (``summary.json``, ``config.yaml`` and ``metrics.jsonl`` stay as they are).

        Raises:
            TrainError: the directory holds a run and ``run.resume`` is false, or its
                ``config.yaml`` is another run's.
            RunDirWriteError: the run directory cannot be written (one line: errno, path, fix).
            CheckpointError: the newest checkpoint is unreadable or from another run.
        """
        payload: tuple[str, Any] = ("fresh", None)
        replaced = 0
        if self.backend.is_main:
            payload = self._inspect_run_dir()
            if payload[0] in ("fresh", "resume"):
                try:
                    replaced = self._prepare_run_dir(payload[1] if payload[0] == "resume" else None)
                except OSError as err:
                    payload = (
                        "write_error",
                        str(write_error(err, "run directory", self.run_dir.path)),
                    )
        kind, value = self.backend.broadcast_object(payload)
        if kind == "refuse":
            raise TrainError(value)
        if kind == "write_error":
            raise RunDirWriteError(value)
        if kind == "checkpoint_error":
            raise CheckpointError(value)
        if kind == "finished":
            if self.backend.is_main:
                self.echo(f"distgrow: {value}")
            return False
        if self.backend.is_main:
            self._open_outputs()
        if kind == "resume":
            self._resume_from(value, replaced)
        else:
            if self.cfg.run.resume:
                self._say(f"no checkpoint in {self.run_dir}: starting a fresh run")
            self._log_event("start", None, world_size=self.world, startup=self.startup_marks)
        self._say(
            f"training {self.cfg.model.name} on {self.data.name} (N={self.num_train:,}) for "
            f"{self.cfg.run.epochs} epochs on {self.world} worker(s), {self.device}; "
            f"plan: {self.plan.total_updates or '?'} updates (decay_lr baseline: "
            f"{self.plan.baseline_total_updates or '?'}); run dir {self.run_dir}"
        )
        self.startup_s = self.state.startup_s + self.clock.start_training()
        self.phases.start()
        self._meter, self._epoch_meter = (
            ThroughputMeter(self.clock.now),
            ThroughputMeter(self.clock.now),
        )
        return True

    def _open_outputs(self) -> None:
        """Rank 0: the progress bar or lines, and the loggers (metrics.jsonl, W&B)."""
        if self.cfg.logging.progress != "off":
            self.progress = Progress(
                self.cfg.logging.progress,
                total_samples=self.num_train * self.cfg.run.epochs,
                total_epochs=self.cfg.run.epochs,
                clock=self.clock.now,
            )
        wandb = open_wandb_logger(
            self.cfg,
            self.run_dir.path,
            rank=self.rank,
            plan=self.plan.to_json(),
            echo=self._line,
        )
        assert self._jsonl is not None  # opened by _prepare_run_dir
        self.logger = MultiLogger([self._jsonl, wandb])

    def _resume_from(self, value: tuple[str, dict[str, Any]], replaced: int) -> None:
        """Load the checkpoint ``value`` (path, state) and log the resume."""
        path, state = value
        self.load_state(state)
        self._last_checkpoint = (
            (self.state.epoch, self.state.position, self.state.step),
            Path(path),
        )
        self._log_event(
            "resume",
            None,
            checkpoint=str(path),
            world_size=self.world,
            startup=self.startup_marks,
            # Records of the updates this resume runs again, taken out of metrics.jsonl.
            replaced_records=replaced,
            config_changes=self._config_changes,
        )
        self._say(
            f"resuming from {path}: epoch {self.state.epoch + 1}, {self.state.position:,} "
            f"samples in, {self.state.step:,} updates, on {self.world} worker(s)"
        )

    def _inspect_run_dir(self) -> tuple[str, Any]:
        """Rank 0: ('fresh' | 'resume' | 'finished' | 'refuse' | 'checkpoint_error', detail).

        Reads only: nothing in the directory changes here.
        """
        existing = self._existing_config()
        if isinstance(existing, str):
            return ("refuse", existing)
        if not self.cfg.run.resume:
            present = [p.name for p in self.run_dir.checkpoints()[-1:]] + [
                p.name for p in (self.run_dir.summary, self.run_dir.metrics) if p.exists()
            ]
            if present:
                return (
                    "refuse",
                    f"run directory {self.run_dir} already holds a run ({', '.join(present)}); "
                    "distgrow never overwrites a run's results. Fix: pass --resume "
                    "(run.resume=true) to continue it, or choose another run.output_dir "
                    "(or run.name).",
                )
        # A fresh run may not replace another run's config.yaml in any key; a resume may change
        # what the checkpoint allows (epochs, lr, schedule, growth), not what makes the run.
        if existing is not None:
            only = IDENTITY_KEYS if self.cfg.run.resume else None
            differ = config_differences(
                existing, self.cfg.to_dict(), only=only, ignore=PER_LAUNCH_KEYS
            )
            if differ:
                return ("refuse", self._config_refusal(differ))
            self._config_changes = config_differences(
                existing, self.cfg.to_dict(), ignore=PER_LAUNCH_KEYS
            )
        if not self.cfg.run.resume:
            return ("fresh", None)
        try:
            found = load_latest(self.run_dir.path, self.fingerprint)
        except CheckpointError as err:
            return ("checkpoint_error", str(err))
        if found is None:
            return ("fresh", None)
        path, state = found
        done = int(state["epoch"]) >= self.cfg.run.epochs and int(state["position"]) == 0
        if done and self.run_dir.summary.is_file():
            return (
                "finished",
                f"the run in {self.run_dir} is finished ({state['epoch']} epochs, "
                f"{state['step']:,} updates; run.epochs={self.cfg.run.epochs}): nothing to "
                f"resume; its {self.run_dir.summary.name}, config and metrics were left as "
                "they are. To train on, raise run.epochs.",
            )
        return ("resume", (str(path), state))

    def _existing_config(self) -> dict[str, Any] | str | None:
        """The run directory's ``config.yaml`` as a tree; None when there is none; a refusal
        (str) when it cannot be read as a config."""
        path = self.run_dir.config
        if not path.exists():
            return None
        # The bounded loader: a hand-edited alias bomb is refused, not expanded.
        tree, problem = read_yaml_file(path)
        if isinstance(tree, dict):
            return tree
        what = problem or f"a {type(tree).__name__}, not a mapping"
        return (
            f"{path} is not a distgrow config (it is {what}); distgrow never overwrites it, nor "
            "the checkpoints and metrics beside it. Fix: restore it from the job's YAML the run "
            "was trained with (or move it away and re-create the run), or choose another "
            "run.output_dir (or run.name)."
        )

    def _config_refusal(self, differ: list[str]) -> str:
        what = "the run" if self.cfg.run.resume else "this fresh run"
        return (
            f"{self.run_dir.config} is another run's config than {what} ({'; '.join(differ)}); "
            "distgrow never overwrites it. Fix: run with the config in that file (distgrow "
            f"train {self.run_dir.config} --resume), or choose another run.output_dir (or "
            "run.name)."
        )

    def _prepare_run_dir(self, resume: tuple[str, dict[str, Any]] | None) -> int:
        """Rank 0: create the run directory, write ``config.yaml``, take the records a resume
        replays out of ``metrics.jsonl`` and open it for appending.

        Returns:
            How many records were taken out of ``metrics.jsonl``.

        Raises:
            OSError: a write failed (the caller turns it into one line for every rank).
        """
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.run_dir.clear_resize()  # it described the last exit
        self.run_dir.remove_temporaries()  # a checkpoint a kill cut mid-write
        replaced = 0
        if resume is not None:
            state = resume[1]
            offset = state.get("metrics_bytes")
            replaced = drop_replayed_records(
                self.run_dir.metrics,
                offset if isinstance(offset, int) else None,
                int(state["step"]),
            )
        if not self.run_dir.config.exists() or self._config_changes:
            # Written when absent, or when a resume changed what it may change (the changes are
            # in the resume event); equal up to per-launch keys: the file stays as it is.
            atomic_write_bytes(self.run_dir.config, dump_config(self.cfg).encode("utf-8"))
            self.run_dir.config.chmod(0o644)  # as before the atomic write (mkstemp's is 0600)
        self._jsonl = JsonlLogger(self.run_dir.metrics)
        return replaced

    def state_dict(self, reason: str) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain types (``weights_only`` loads it)."""
        wall, worker_s = self._clock()
        model_state, optimizer_state = save_model_and_optimizer(
            self.backend, self.optimizer, self.run_dir.checkpoint(self.state.step)
        )
        counters = replace(
            self.state, wall_s=wall, worker_seconds=worker_s, startup_s=self.startup_s
        )
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "reason": reason,
            "distgrow_version": __version__,
            "world_size": self.world,
            # Full state dicts, or (a sharded backend) the name of the shards written now.
            "model": model_state,
            "optimizer": optimizer_state,
            "plan_state": self.policy.state_dict(),
            "noise": self.noise.state_dict() if self.noise is not None else None,
            "phases": self.phases.state_dict(),
            "oom": self.oom.state_dict(),  # the micro-batch ceiling an OOM set
            "rng": torch.get_rng_state(),
            # Rank 0's metrics.jsonl up to this checkpoint: a resume drops what follows.
            "metrics_bytes": self._jsonl.size if self._jsonl is not None else None,
            # The counters at the top level: the checkpoint keys of format version 1.
            **counters.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written at any world size.

        Raises:
            TrainError: the checkpoint's global batch cannot be split over this job's workers.
        """
        load_model_and_optimizer(self.backend, self.model, self.optimizer, state, self.run_dir.path)
        saved_world = int(state.get("world_size", self.world))
        try:
            plan_state, note = resplit_policy_state(
                state["plan_state"], saved_world, self.world, self.policy, self.align
            )
        except ScheduleError as err:
            raise TrainError(f"checkpoint: {err}") from None
        if note is not None:
            self._say(f"warning: checkpoint: {note}")
        self.policy.load_state_dict(plan_state)
        self.state.load_state_dict(state)
        st = self.state
        self.schedule.seek(st.epoch, st.position, st.step, st.samples_seen)
        torch.set_rng_state(state["rng"])
        self.phases.load_state_dict(state.get("phases") or {})
        self.oom.load_state_dict(state.get("oom") or {})
        if self.noise is not None and state.get("noise") is not None:
            self.noise.load_state_dict(state["noise"])

    def save(self, reason: str) -> Path:
        """Checkpoint now (rank 0 writes); a no-op returning the file if nothing moved since.

        Raises:
            RunDirWriteError: on every rank, when rank 0 could not write the checkpoint (or
                an earlier metrics record); the previous checkpoints are untouched.
        """
        key = (self.state.epoch, self.state.position, self.state.step)
        if self._last_checkpoint is not None and self._last_checkpoint[0] == key:
            return self._last_checkpoint[1]
        path = self.run_dir.checkpoint(self.state.step)
        # Every rank builds the state: engines that partition the optimizer (ZeRO) gather it.
        state = self.state_dict(reason)
        failure = None
        if self.backend.is_main:
            # A checkpoint past a lost record would make the loss permanent: stop before it.
            failure = self._metrics_failure()
            if failure is None:
                try:
                    path = save_checkpoint(self.run_dir.path, state, self.cfg.run.keep_checkpoints)
                except OSError as err:
                    failure = str(write_error(err, "checkpoint", path, self._after_failure()))
        self._raise_if_failed(failure)
        self._last_checkpoint = (key, path)
        self.clock.lap("checkpoint")  # the checkpoint interval counts from here
        return path

    def _metrics_failure(self) -> str | None:
        """Rank 0: the line for a metrics record that could not be written, if one failed."""
        if self._jsonl is None or self._jsonl.error is None:
            return None
        err = self._jsonl.error
        return str(write_error(err, "metrics record", self._jsonl.path, self._after_failure()))

    def _after_failure(self) -> str:
        last = self._last_checkpoint[1] if self._last_checkpoint else None
        where = f"the last good checkpoint {last} is untouched" if last else "no checkpoint yet"
        return f"Nothing was overwritten ({where}); then rerun with --resume."

    def _raise_if_failed(self, failure: str | None) -> None:
        """Every rank raises rank 0's write failure (one broadcast: the others wrote nothing)."""
        failure = self.backend.broadcast_object(failure)
        if failure:
            raise RunDirWriteError(failure)

    def finish(self) -> None:
        """Write ``summary.json`` (rank 0), with per-phase throughput and estimated savings."""
        self.phases.tick()
        wall, worker_s = self._clock()
        train_s = self.phases.train_seconds()
        st = self.state
        summary = Summary(
            status="completed",
            epochs=st.epoch,
            total_updates=st.step,
            samples_seen=st.samples_seen,
            train_loss=st.last_train_loss,
            val_loss=st.last_val["val_loss"],
            val_acc=st.last_val["val_acc"],
            wall_s=wall,
            worker_seconds=worker_s,
            world_size=self.world,
            growth_events=st.growth_events,
            final_setting=asdict(st.realisation) if st.realisation else None,
            growth_mode=self.cfg.growth.mode,
            planned_total_updates=self.plan.total_updates,
            baseline_total_updates=self.plan.baseline_total_updates,
            update_ratio_vs_baseline=(
                self.plan.baseline_total_updates / st.step
                if self.plan.baseline_total_updates and st.step
                else None
            ),
            distgrow_version=__version__,
            # Wall-clock above is training only; start-up is counted apart.
            startup_s=self.startup_s,
            train_s=train_s,
            train_cpu_s=self.phases.train_cpu_seconds(),
            samples_per_s=st.samples_seen / train_s if train_s > 0 else None,
            worker_hours=worker_s / 3600,
            gpu_hours=worker_s / 3600 if self.device.type == "cuda" else None,
            device=self.device.type,
            base_batch=self.cfg.growth.base_batch,
            dataset_size=self.num_train,
            phases=self.phases.to_list(),
        )
        # Measured savings need a baseline run: `distgrow compare` / `distgrow report`.
        summary.savings = {"estimated": try_estimated_savings(summary.to_dict())}
        # What the SLURM job(s) held so far (slurm_jobs.json); the report reads SLURM's records.
        summary.held = held_so_far(self.run_dir, summary.to_dict())
        if self.noise is not None:
            summary.extra["noise"] = self.noise.summary()
        failure = None
        if self.backend.is_main:
            failure = self._metrics_failure()  # a run with lost records is not complete
            if failure is None:
                try:
                    self.run_dir.write_summary(summary)
                except OSError as err:
                    failure = str(write_error(err, "summary", self.run_dir.summary))
        self._raise_if_failed(failure)
        self.logger.log({"kind": "event", "event": "end", **summary.to_dict()})
        acc = "" if summary.val_acc is None else f", val_acc {summary.val_acc:.4f}"
        self._say(
            f"done: {st.step:,} updates, {st.samples_seen:,} samples{acc}, {wall:.1f} s; "
            f"results in {self.run_dir}"
        )
