"""Data larger than memory: an image folder read through the DataLoader feed, against memory.

Usage::

    python benchmarks/data_loader.py                      # 50,000 generated 32×32 PNGs
    python benchmarks/data_loader.py --images 50000 --workers 0,1,2 --batches 64,256

It generates an image folder (``--images`` PNG files in 10 class folders, once: a later run
with the same ``--folder`` reuses it) and prints, side by side in one run:

1. the loader alone: samples/s of decode + collate through ``torch.utils.data.DataLoader``
   (``image_folder``'s own ``Dataset``), by number of loader workers;
2. the model alone: samples/s the model's training step consumes from tensors in memory, per
   batch size (forward, backward, SGD step);
3. ``distgrow``'s trainer on the same ``--train-samples`` images, read from the files
   (``data.feed=loader``) and held in memory (``data.feed=memory``), per batch size: the
   training throughput of its update phases (``summary.json``), and files / memory.

The training data are ``--train-samples`` of the folder's images (``data.limit_train``) so a
run takes minutes on a small CPU; the loader reads them from the files as in a full epoch.
On a CPU-only machine the loader workers and the model share the cores: the ratio files /
memory then shows what the decoding takes away from the model (with a GPU the model runs on
the device and the cores only feed it).

Measured (2026-11-29, the 2-core CPU machine shared with up to six other jobs at the time, so
absolute rates are low and noisy; the ratios in part 3 come from one run, side by side), with
``--images 50000 --train-samples 2048 --loader-samples 4096 --batches 64,256
--loader-workers 1``: writing the 50,000 PNGs took 288 s.

* loader alone, samples/s: workers 0: 353, workers 1: 266, workers 2: 276;
* model alone (cnn), samples/s: batch 64: 9, batch 256: 50;
* distgrow train, files / memory: batch 64: 27 / 31 = 0.84, batch 256: 124 / 118 = 1.05.

At the largest batch training from the files runs as fast as from memory (within 10%). On 2
cores the loader and the model share the CPU: a worker process decodes at ~270 images/s, so
feeding a model that trains at R samples/s takes about R / 270 of a core away from it, which
showed at batch 64 (-16%). Extra workers did not decode faster here because no core was free
(workers 2 ≈ workers 1 < workers 0, which skips the inter-process copy).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distgrow.backends.torch_ddp import TorchBackend
from distgrow.config import load_config
from distgrow.config.filesizes import list_image_folder
from distgrow.data.readers.image_folder import ImageFiles
from distgrow.models import build_model
from distgrow.runtime import Runtime
from distgrow.startup import load_data
from distgrow.trainer import Trainer

CLASSES = 10


def make_folder(root: Path, images: int, size: int) -> float:
    """Write ``images`` PNGs (noise plus a class colour) in ``CLASSES`` folders; seconds taken."""
    marker = root / f".complete-{images}-{size}"
    if marker.exists():
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % CLASSES
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[: size // 4, :, c % 3] = 25 * c  # a band of colour the model can learn
        Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i:06d}.png", compress_level=1)
    marker.touch()
    return time.perf_counter() - start


def loader_rate(files: ImageFiles, samples: int, workers: int, batch: int) -> float:
    """Samples/s of decode + collate through a DataLoader (random order, as in training)."""
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:samples]
    batches = [order[i : i + batch].tolist() for i in range(0, samples, batch)]
    loader = DataLoader(
        files,
        batch_sampler=batches,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    count = sum(int(x.shape[0]) for x, _ in loader)
    return count / (time.perf_counter() - start)


def model_rate(model_name: str, x: torch.Tensor, y: torch.Tensor, batch: int, device: str) -> float:
    """Samples/s of the model's training step on in-memory, already normalised tensors."""
    torch.manual_seed(0)
    model = build_model(
        model_name, input_shape=tuple(x.shape[1:]), num_outputs=CLASSES, hidden=None
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xs = ((x.float() / 255.0 - 0.5) / 0.25).to(device)
    ys = y.to(device)
    steps = max(3, len(xs) // batch)
    start = 0.0
    for step in range(steps + 1):
        if step == 1:  # the first step warms up (allocations, kernel choice)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        i = (step * batch) % max(1, len(xs) - batch + 1)
        loss = torch.nn.functional.cross_entropy(model(xs[i : i + batch]), ys[i : i + batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def trainer_rate(folder: Path, feed: str, args: argparse.Namespace, batch: int, out: Path) -> float:
    """Training throughput of distgrow's trainer (its update phases) for one feed and batch."""
    run_dir = out / f"{feed}-{batch}"
    cfg = load_config(
        None,
        [
            "data.name=image_folder",
            f"data.path={folder}",
            f"data.feed={feed}",
            f"data.limit_train={args.train_samples}",
            "data.limit_val=256",
            f"data.loader_workers={args.loader_workers}",
            f"model.name={args.model}",
            "schedule.type=constant",
            f"growth.base_batch={batch}",
            f"growth.micro_batch={batch}",
            "growth.max_dataset_fraction=null",
            "run.epochs=1",
            f"run.device={args.device}",
            f"run.output_dir={run_dir}",
            "logging.progress='off'",
            *([f"run.threads={args.threads}"] if args.threads else []),
        ],
    )
    device = "cuda" if args.device == "cuda" else "cpu"
    single = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")
    backend = TorchBackend(cfg.backend, single, device=device)
    trainer = Trainer(cfg, backend, load_data(cfg), echo=lambda line: None)
    assert trainer.train() == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    samples = sum(p["samples"] for p in summary["phases"])
    seconds = sum(p["train_s"] for p in summary["phases"])
    return samples / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--folder", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--workers", default="0,1,2", help="loader workers to measure")
    parser.add_argument("--loader-workers", type=int, default=2, help="the trainer's")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--train-samples", type=int, default=8192)
    parser.add_argument("--loader-samples", type=int, default=8192)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    base = Path(tempfile.mkdtemp(prefix="distgrow-loader-"))
    folder = args.folder or base / "images"
    made = make_folder(folder, args.images, args.size)
    _, samples = list_image_folder(folder)
    print(
        f"image folder: {folder}: {len(samples):,} PNG files {args.size}×{args.size}, "
        f"{CLASSES} classes" + (f" (written in {made:.1f} s)" if made else " (reused)")
    )
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    files = ImageFiles([str(p) for p, _ in samples], [c for _, c in samples], "RGB", None, None)

    print("\n1. loader alone (decode + collate, batch 256), samples/s by workers:")
    for w in (int(s) for s in args.workers.split(",")):
        rate = loader_rate(files, min(args.loader_samples, len(files)), w, 256)
        print(f"   workers={w}: {rate:10,.0f}")

    print(f"\n2. the model alone ({args.model}, {args.device}), samples/s it consumes:")
    x, y = next(iter(DataLoader(files, batch_size=min(2048, len(files)), num_workers=2)))
    for b in (int(s) for s in args.batches.split(",")):
        print(f"   batch {b:5d}: {model_rate(args.model, x, y, b, args.device):10,.0f}")

    print(
        f"\n3. distgrow train, {args.model}, {args.train_samples:,} images, loader workers "
        f"{args.loader_workers}: samples/s from files vs in memory"
    )
    for b in (int(s) for s in args.batches.split(",")):
        from_files = trainer_rate(folder, "loader", args, b, base)
        in_memory = trainer_rate(folder, "memory", args, b, base)
        print(
            f"   batch {b:5d}: files {from_files:10,.0f}  memory {in_memory:10,.0f}  "
            f"files/memory {from_files / in_memory:5.2f}"
        )


if __name__ == "__main__":
    main()
