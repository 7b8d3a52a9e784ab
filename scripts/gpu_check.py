"""The GPU check: what the CPU test suite cannot show, run on one machine with a GPU.

    bash scripts/gpu_check.sh            # or: make gpu-check
    .venv/bin/python scripts/gpu_check.py --only sync,ddp

Runs, each in a few seconds to minutes (the whole check in under ten minutes on one GPU):

* ``gpu tests``: the ``gpu``-marked test tier (``pytest -m gpu``);
* ``sync count``: host-device syncs per update of a ghost-batch-norm WRN on the GPU, counted as
  ``tests/test_sync_free.py`` counts them on the CPU (reads of CUDA tensors and
  ``torch.cuda.synchronize``), at 1 and 4 micro-batches per update: one read (the loss) each;
* ``OOM fallback``: a real CUDA out-of-memory error under
  ``torch.cuda.set_per_process_memory_fraction``, ending in the fallback's smaller micro-batch;
* ``DDP 2 ranks``: two torchrun ranks training on CUDA: NCCL on two GPUs, gloo with CUDA
  tensors on one;
* ``DeepSpeed ZeRO-2 fp16`` / ``bf16``: one rank of the DeepSpeed backend at ZeRO stage 2;
* ``Fashion-MNIST compare``: ``distgrow compare configs/fashion_mnist_mlp.yaml`` on the GPU, its
  wall-clock.

It prints one table (Markdown, for docs/speed.md) and exits 1 if a check failed. A check
that cannot run here (no GPU, DeepSpeed not installed, the data set absent) is ``skip`` with
what is missing; ``--allow-cpu`` runs the checks that can run on a CPU (to test this script).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
JOB_TIMEOUT_S = 300

# A small synthetic job: an MLP with batch norm, the batch growing 32 -> 64 at epoch 1.
SYNTHETIC = """\
# The GPU check's small job (scripts/gpu_check.py); not meant to be run by hand.
run: {epochs: 2, seed: 0}
data: {name: synthetic_classification, synthetic_samples: 1291, synthetic_features: 16}
model: {name: mlp, hidden: [64]}
optim: {name: sgd, lr: 0.05, momentum: 0.9}
schedule: {type: multistep, milestones: [1], gamma: 0.5}
growth: {base_batch: 32, micro_batch: 8, max_micro_batch: 8, max_dataset_fraction: null}
logging: {every_steps: 5, progress: "off"}
"""


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str  # ok, FAIL or skip
    seconds: float
    detail: str


class SkipCheck(Exception):
    """A check that cannot run on this machine; the message says what is missing."""


def format_table(rows: Sequence[Row], device: str) -> str:
    """The check's one table, in Markdown."""
    lines = [
        f"GPU check on {device}",
        "",
        "| check | result | seconds | detail |",
        "|---|---|---:|---|",
    ]
    for row in rows:
        detail = row.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {row.check} | {row.result} | {row.seconds:.1f} | {detail} |")
    return "\n".join(lines)


def run_check(name: str, check: Callable[[], str]) -> Row:
    """``check()`` as a row: its detail when it returns, FAIL with the error's last line."""
    started = time.perf_counter()
    try:
        detail, result = check(), "ok"
    except SkipCheck as why:
        detail, result = str(why), "skip"
    except Exception as err:  # one broken check must not hide the others
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        detail, result = last[:300], "FAIL"
    return Row(name, result, time.perf_counter() - started, detail)


# -- counting syncs ----------------------------------------------------------------------------

READS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")


class SyncCounter:
    """Counts reads of tensors on ``device_type`` and ``torch.cuda.synchronize`` calls.

    Use as a context manager: it patches ``torch.Tensor`` while open. ``where`` keeps the
    caller of each counted read (file:line), to say what to fix.
    """

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.counting = False
        self.calls: collections.Counter[str] = collections.Counter()
        self.where: collections.Counter[str] = collections.Counter()
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, name: str, original: Callable[..., Any], on_tensor: bool) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            watched = not on_tensor or args[0].device.type == self.device_type
            if self.counting and watched:
                self.calls[name] += 1
                caller = sys._getframe(1)
                self.where[f"{name} {caller.f_code.co_filename}:{caller.f_lineno}"] += 1
            return original(*args, **kwargs)

        return counted

    def __enter__(self) -> SyncCounter:
        import torch

        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved.append((torch.Tensor, name, original))
            setattr(torch.Tensor, name, self._wrap(name, original, True))
        self._saved.append((torch.cuda, "synchronize", torch.cuda.synchronize))
        torch.cuda.synchronize = self._wrap("synchronize", torch.cuda.synchronize, False)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    @contextmanager
    def update(self) -> Iterator[None]:
        """Count only inside this block."""
        self.calls.clear()
        self.counting = True
        try:
            yield
        finally:
            self.counting = False

    def total(self) -> int:
        return sum(self.calls.values())


def _single_runtime() -> Any:
    from distgrow.runtime import Runtime

    return Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")


def _wrn_images(n: int = 256) -> Any:
    import torch

    from distgrow.data import ArrayDataset, DataBundle
    from distgrow.data.transforms import Compose, NormalizeImages, RandomCropFlip

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    normalize = NormalizeImages((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    train = ArrayDataset(x, y, Compose(RandomCropFlip(0, 4, True), normalize))
    return DataBundle(
        "cifar10", train, ArrayDataset(x[:32], y[:32], normalize), (3, 32, 32), 10, "classification"
    )


def sync_counts(device: str, out: Path, updates: int = 3) -> dict[str, list[int]]:
    """Reads of ``device`` tensors per update of a WRN-10-1 with ghost batch norm and the
    batch-norm merger on, data on the device, at 1 and 4 micro-batches per update."""
    import torch

    from distgrow.backends.torch_ddp import TorchBackend
    from distgrow.bn_merge import RunningStatsMerger
    from distgrow.config import load_config
    from distgrow.data.order import epoch_permutation
    from distgrow.gpu import place_data
    from distgrow.trainer import Trainer

    counts: dict[str, list[int]] = {}
    with SyncCounter(torch.device(device).type) as counter:
        for accum in (1, 4):
            micro = 64 // accum
            cfg = load_config(
                None,
                [
                    "data.name=synthetic_classification",
                    "data.augment=true",
                    "model.name=wrn",
                    "model.depth=10",
                    "model.width=1",
                    "model.ghost_batch=8",
                    "growth.base_batch=64",
                    f"growth.micro_batch={micro}",
                    f"growth.max_micro_batch={micro}",
                    "growth.max_dataset_fraction=null",
                    "run.epochs=1",
                    f"run.output_dir={out / f'sync{accum}'}",
                    "logging.every_steps=1000",
                    "logging.progress='off'",
                ],
            )
            backend = TorchBackend(cfg.backend, _single_runtime(), device=device)
            data = place_data(_wrn_images(), backend.device, 0.5, lambda line: None)
            trainer = Trainer(cfg, backend, data)
            trainer.bn_merger = RunningStatsMerger(trainer.model, trainer.backend)
            trainer.open_run()
            order = epoch_permutation(trainer.num_train, cfg.run.seed, 0)
            per_update = []
            for _ in range(updates):
                setting = trainer.next_setting()
                indices = order[
                    trainer.state.position : trainer.state.position + setting.global_batch
                ]
                with counter.update():
                    loss, setting = trainer.oom.run(trainer.train_step, indices, setting)
                    trainer.after_update(int(indices.numel()), loss, setting)
                per_update.append(counter.total())
            counts[f"{setting.split.micro_batch}x{setting.split.accum_steps}"] = per_update
    return counts


# -- the checks ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(
    nproc: int, config: Path, overrides: Sequence[str], env: dict[str, str] | None = None
) -> str:
    """``distgrow train`` as ``nproc`` torchrun ranks; its output, or an error with its tail."""
    argv = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "distgrow", "train", str(config), *overrides,
    ]  # fmt: skip
    environ = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO, env=environ, timeout=JOB_TIMEOUT_S
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' / '.join(tail)}")
    return proc.stdout + proc.stderr


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())  # type: ignore[no-any-return]


class Checks:
    """The checks, sharing a scratch folder and the device."""

    def __init__(self, scratch: Path, device: str) -> None:
        self.scratch = scratch
        self.device = device
        self.config = scratch / "synthetic.yaml"
        self.config.write_text(SYNTHETIC)

    def _needs_cuda(self) -> None:
        if self.device != "cuda":
            raise SkipCheck("needs a CUDA device (torch.cuda.is_available() is False)")

    def gpu_tests(self) -> str:
        self._needs_cuda()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
            capture_output=True, text=True, cwd=REPO, timeout=JOB_TIMEOUT_S,
        )  # fmt: skip
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        if proc.returncode != 0:
            failed = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
            raise RuntimeError(f"{last}; {' / '.join(failed[:3])}")
        return last.strip("= ")

    def sync(self) -> str:
        counts = sync_counts(self.device, self.scratch)
        values = {n for per in counts.values() for n in per}
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items()) + " reads per update"
        if len(values) != 1 or max(values) > 2:
            raise RuntimeError(f"not a small constant: {detail}")
        return detail

    def oom(self) -> str:
        self._needs_cuda()
        import torch

        from distgrow.backends.torch_ddp import TorchBackend
        from distgrow.config import load_config
        from distgrow.exits import EXIT_OK
        from distgrow.startup import load_data
        from distgrow.trainer import Trainer

        run_dir = self.scratch / "oom"
        # 75 M parameters (0.9 GiB with gradients and momentum); a micro-batch of 16384 needs
        # about 3 GiB more of activations: within 3 GiB it runs out and falls back.
        cfg = load_config(
            str(self.config),
            [
                "data.synthetic_samples=40000",
                "data.synthetic_features=1024",
                "model.hidden=[8192,8192]",
                "growth.base_batch=16384",
                "growth.micro_batch=16384",
                "growth.max_micro_batch=16384",
                "run.epochs=1",
                "run.oom_fallback=true",
                f"run.output_dir={run_dir}",
            ],
        )
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 3 * 2**30 / total))
        try:
            backend = TorchBackend(cfg.backend, _single_runtime(), device="cuda")
            trainer = Trainer(cfg, backend, load_data(cfg))
            code = trainer.train()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        if code != EXIT_OK:
            raise RuntimeError(f"the run ended with exit status {code}")
        events = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"oom_fallback"' in line
        ]
        if not events:
            raise RuntimeError("no oom_fallback event: the micro-batch fitted in 3 GiB")
        return (
            f"{len(events)} fallback(s) within 3 GiB: micro-batch 16384 -> "
            f"{trainer.oom.ceiling}; the run finished ({trainer.state.step} updates)"
        )

    def ddp(self) -> str:
        import torch

        if self.device != "cuda":
            dist, overrides = "gloo", ["run.device=cpu"]
        else:
            dist = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
            overrides = ["run.device=cuda", f"backend.dist_backend={dist}"]
        run_dir = self.scratch / "ddp"
        _job(2, self.config, [*overrides, f"run.output_dir={run_dir}"])
        summary = _summary(run_dir)
        return (
            f"{dist}, 2 ranks on {self.device}: {summary['total_updates']} updates, "
            f"val_acc {summary['val_acc']:.3f}"
        )

    def deepspeed(self, precision: str) -> str:
        self._needs_cuda()
        import importlib.util

        import torch

        if importlib.util.find_spec("deepspeed") is None:
            raise SkipCheck("deepspeed is not installed (bash scripts/bootstrap.sh installs it)")
        if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise SkipCheck(f"{torch.cuda.get_device_name(0)} has no native bf16 (pre-Ampere)")
        run_dir = self.scratch / f"ds_{precision}"
        _job(
            1,
            self.config,
            [
                "run.device=cuda",
                "backend.name=deepspeed",
                "backend.zero_stage=2",
                f"backend.precision={precision}",
                f"run.output_dir={run_dir}",
            ],
        )
        summary = _summary(run_dir)
        updates, acc = summary["total_updates"], summary["val_acc"]
        return f"ZeRO-2 {precision}: {updates} updates, val_acc {acc:.3f}"

    def compare(self) -> str:
        self._needs_cuda()
        if not FASHION.is_dir():
            raise SkipCheck(f"Fashion-MNIST not at {FASHION} (apt install dataset-fashion-mnist)")
        out = self.scratch / "compare"
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "distgrow", "compare", "configs/fashion_mnist_mlp.yaml",
             "run.device=cuda", "--out", str(out)],
            capture_output=True, text=True, cwd=REPO, timeout=2 * JOB_TIMEOUT_S,
        )  # fmt: skip
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        table = re.findall(r"^\| (\w+) .*$", (out / "report.md").read_text(), re.MULTILINE)
        return f"{wall:.0f} s wall-clock for 3 runs ({', '.join(table[1:4])})"


CHECKS = ("tests", "sync", "oom", "ddp", "ds_fp16", "ds_bf16", "compare")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"from {','.join(CHECKS)}")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="without a GPU, run what can run on the CPU"
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")  # (its jobs too) W&B is not checked here
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(CHECKS))
    if unknown:
        parser.error(f"--only: unknown check(s) {unknown}; choose from {','.join(CHECKS)}")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(
            "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}). Fix: run it on a GPU machine, or pass --allow-cpu.",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if cuda else "cpu"
    described = (
        f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
        if cuda
        else f"the CPU (no CUDA device), torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        checks = Checks(Path(scratch), device)
        table: dict[str, tuple[str, Callable[[], str]]] = {
            "tests": ("gpu tests", checks.gpu_tests),
            "sync": ("sync count", checks.sync),
            "oom": ("OOM fallback", checks.oom),
            "ddp": ("DDP 2 ranks", checks.ddp),
            "ds_fp16": ("DeepSpeed ZeRO-2 fp16", lambda: checks.deepspeed("fp16")),
            "ds_bf16": ("DeepSpeed ZeRO-2 bf16", lambda: checks.deepspeed("bf16")),
            "compare": ("Fashion-MNIST compare", checks.compare),
        }
        rows = []
        for key in wanted:
            name, check = table[key]
            rows.append(run_check(name, check))
            print(f"gpu_check: {name}: {rows[-1].result} ({rows[-1].seconds:.1f} s)", flush=True)
    print(format_table(rows, described))
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    return 1 if any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
