"""Resizing: a plan wider than the job (elastic interim splits, resize.json) and the stops."""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import Any

from distgrow.exits import EXIT_NEED_WORKERS, EXIT_NONFINITE
from distgrow.planner import Setting
from distgrow.rundir import ResizeRequest
from distgrow.signals import exit_status, signal_name
from distgrow.trainer.lifecycle import RunLifecycle

# Elastic: how long workers that cannot split the batch among themselves wait for the workers
# they asked for before giving up (exit 75); torchrun's own rendezvous join timeout is 600 s.
ELASTIC_JOIN_WAIT_S = 300.0


class Resize(RunLifecycle):
    """More workers, elastic interim splits and stops of a :class:`~distgrow.trainer.Trainer`."""

    def _fit_to_job(self, setting: Setting) -> Setting:
        """The schedule's ``fit``: log the policy's decisions; a plan wider than the job runs
        on the workers there are while elastic workers join (:meth:`elastic_interim`), else
        stays as it is (the loop stops for more workers)."""
        self._log_policy_events(setting, self.policy.take_events())
        if setting.workers > self.world:
            return self.elastic_interim(setting) or setting
        return setting

    def elastic_interim(self, setting: Setting) -> Setting | None:
        """``launch.elastic``: the planned global batch on the workers the job has, for now.

        The plan wants ``setting.workers`` workers. Rank 0 asks for them in ``resize.json``
        (once per count; the elastic controller starts them), the workers wait up to
        ``launch.elastic_wait_s`` for them, then go on with the same global batch split over
        this job's workers (more accumulation: the same updates). When the new workers join,
        torchrun stops these with SIGTERM (see :meth:`stop_for_signal`) and restarts all.

        Returns:
            The interim setting; None when not elastic, when a stop signal ended the wait (the
            caller stops for it before any update), or when the batch cannot be split exactly
            over this job's workers and no worker joined within :data:`ELASTIC_JOIN_WAIT_S`
            (the caller then stops for more workers, exit 75).
        """
        if not self.cfg.launch.elastic:
            return None
        here = replace(self.policy.limits, max_workers=self.world)
        split = here.realise(setting.global_batch, self.world)
        exact = split is not None and split.global_batch == setting.global_batch
        if self._asked_for_workers != setting.workers:
            self._asked_for_workers = setting.workers
            self._ask_for_workers(setting, elastic=True)
            wait = self.cfg.launch.elastic_wait_s if exact else ELASTIC_JOIN_WAIT_S
            then = (
                f"going on as {split} until they join"
                if exact and split is not None
                else f"the batch cannot be split over {self.world} worker(s) until they join"
            )
            self._say(
                f"epoch {self.state.epoch + 1}: the plan needs {setting.workers} workers for a "
                f"global batch of {setting.global_batch}; asked for them in {self.run_dir.resize}"
                + (f"; waiting up to {wait:g} s for them; " if wait > 0 else "; ")
                + f"{then} (launch.elastic)"
            )
            if self.agreement.wait_for_stop(wait):
                # The workers asked for joined (or the job is being stopped): no update runs
                # at this width, so no growth is logged for it; train_epoch stops next.
                return None
        if not exact or split is None:
            return None
        return replace(setting, split=split)

    def _ask_for_workers(self, setting: Setting, **extra: Any) -> None:
        """Write ``resize.json`` (rank 0) and log a ``need_workers`` event: where the run is,
        how many workers the plan needs for ``setting`` and how many it has, plus ``extra``."""
        request = ResizeRequest(
            need_workers=setting.workers,
            have_workers=self.world,
            epoch=self.state.epoch,
            position=self.state.position,
            step=self.state.step,
            samples_seen=self.state.samples_seen,
            global_batch=setting.global_batch,
            time=self.clock.unix(),
            **extra,
        )
        if self.backend.is_main:
            self.run_dir.write_resize(request)
        # The event names what this request says (no null keys), as before the typed record.
        said = {k: v for k, v in asdict(request).items() if v is not None and v is not False}
        said.pop("version")
        self._log_event("need_workers", setting, **said)

    def stop_for_workers(self, setting: Setting) -> int:
        """Checkpoint and write ``resize.json``: the plan needs more workers than the job has."""
        path = self.save("need_workers")
        self._ask_for_workers(
            setting,
            micro_batch=setting.micro_batch,
            accum_steps=setting.accum_steps,
            checkpoint=str(path),
            exit_code=EXIT_NEED_WORKERS,
        )
        self._say(
            f"epoch {self.state.epoch + 1}: the plan needs {setting.workers} workers for a global "
            f"batch of {setting.global_batch}, the job has {self.world}. Checkpoint {path}; wrote "
            f"{self.run_dir.resize}. Relaunch with {setting.workers} workers and --resume "
            f"(exit status {EXIT_NEED_WORKERS})."
        )
        return EXIT_NEED_WORKERS

    def stop_for_signal(self, signum: int) -> int:
        """Checkpoint at this update boundary and return ``128 + signum``.

        Called between updates, so the checkpoint holds the exact (epoch, position, step): a
        resume at any world size continues with the next global batch of the same epoch.
        """
        path = self.save("signal")
        name, code = signal_name(signum), exit_status(signum)
        self._log_event(
            "stopped",
            self.last_setting,  # its width: a resume by the controller starts as wide
            signal=name,
            exit_code=code,
            position=self.state.position,
            checkpoint=str(path),
        )
        if self.backend.is_main:
            st = self.state
            where = (
                f"after update {st.step:,} (epoch {st.epoch + 1}, {st.position:,} of "
                f"{self.num_train:,} samples in); checkpoint {path}"
            )
            if self.cfg.launch.elastic and self._asked_for_workers > self.world:
                # The expected stop: torchrun restarts every worker when the ones asked joined.
                then = (
                    f"The {self._asked_for_workers} workers asked for are joining; torchrun "
                    "restarts all of them from it"
                )
            else:
                then = (
                    "Resume with the same command and --resume (run.resume=true), on any "
                    f"number of workers; exit status {code}"
                )
            print(f"distgrow: stopped by {name} {where}. {then}.", file=sys.stderr, flush=True)
        return code

    def stop_nonfinite(self, loss: float, setting: Setting) -> int:
        """Stop on a NaN/inf loss; the last good checkpoint stays as it is."""
        last = self._last_checkpoint[1] if self._last_checkpoint else None
        self._log_event("nonfinite", setting, loss=str(loss))
        if self.backend.is_main:
            print(
                f"distgrow: stopping: the training loss is {loss} at epoch {self.state.epoch + 1}, "
                f"update {self.state.step + 1} (global batch {setting.global_batch}, lr "
                f"{setting.lr:.4g}); the parameters were not updated with it. Last good "
                f"checkpoint: {last or 'none yet'}. Fix: lower optim.lr (now "
                f"{self.cfg.optim.lr:g}) or set optim.grad_clip (e.g. 1.0), then rerun with "
                "--resume.",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_NONFINITE
