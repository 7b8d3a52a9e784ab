"""DeepSpeed ZeRO-3 (``backend.zero_stage: 3``) against ZeRO-0, through growth and relaunches.

Integration (real jobs on the CPU, gloo, DeepSpeed's CPU accelerator):

* the shared plan with a growth event (conftest.SYN_PLAN: batch 32 = 2×8×2 for epoch 1, then
  64 = 2×8×4, an accumulation change at an update boundary) trained by ZeRO-0 on 2 ranks is the
  reference;
* ZeRO-3 trains epochs 1-2 on 2 ranks (every parameter partitioned:
  ``stage3_param_persistence_threshold: 0``), saves, and resumes for epoch 3 at 4 ranks (the
  relaunch wider: 4×8×2) and, from a copy of the same run directory, at 1 rank (1×8×8).

Each must end within ``rtol=1e-5, atol=1e-6`` of the reference, parameters and momentum
buffers, and log the same batches, workers, accumulation and learning rates. Why not bit for
bit: ZeRO-3 (like ZeRO-2) reduce-scatters every micro-step's gradients as they are produced,
so the update is a sum over micro-steps of averages over ranks where ZeRO-0 all-reduces the
summed micro-steps once; float32 addition in another order differs in the last bits
(measured: 1.8e-7 at most after 67 updates, the same as ZeRO-2 in docs/backends.md).

A single-process ZeRO-3 engine (in a subprocess: DeepSpeed's process group must not leak into
pytest) shows the partitioning, the gathered state and its load, and the bf16 semantics of
stages 0-2: float32 outputs and float32 gradient reduction.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    SYN_PLAN,
    SYN_UPDATES,
    assert_same_model,
    distgrow_job_env,
    distgrow_job_run,
    write_config,
)

from distgrow.backends.deepspeed_backend import build_ds_config
from distgrow.checkpoint import load_latest
from distgrow.config import ConfigError, load_config
from distgrow.metrics import read_jsonl
from distgrow.trainer.pieces import val_pieces

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed: DS_BUILD_OPS=0 pip install -c constraints.txt deepspeed "
    "(scripts/bootstrap.sh; CI installs it)",
)

SYN: dict[str, Any] = {
    **SYN_PLAN,
    "run": {**SYN_PLAN["run"], "device": "cpu", "keep_checkpoints": 10},
    "logging": {"every_steps": 5, "progress": "lines", "wandb": {"mode": "disabled"}},
}
ZERO0 = ("backend.name=deepspeed", "backend.zero_stage=0")
COMPARED = ("kind", "event", "epoch", "step", "global_batch", "workers", "accum_steps", "lr")
TOLERANCE = 1e-6  # assert_same_model's atol; measured 1.8e-7 (see the module docstring)


# -- unit -----------------------------------------------------------------------------------


def test_zero_stage_3_is_accepted_and_reaches_deepspeed_4_is_refused() -> None:
    cfg = load_config(None, ["backend.name=deepspeed", "backend.zero_stage=3"])
    ds = build_ds_config(cfg, world_size=2, micro_batch=8, accum_steps=4)
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match=r"backend.zero_stage = 4.*Fix: use 0-3"):
        load_config(None, ["backend.name=deepspeed", "backend.zero_stage=4"])


@pytest.mark.parametrize(("n", "piece", "world"), [(258, 8, 2), (1258, 500, 4), (3, 8, 2)])
def test_validation_pieces_cover_every_sample_once_and_do_not_depend_on_the_world(
    n: int, piece: int, world: int
) -> None:
    """Each rank's forwards (which the trainer pads to the busiest rank's count, so that a
    ZeRO-3 forward, itself a collective, runs as often on every rank)."""
    pieces = val_pieces(n, 500, piece, world)
    flat = sorted((c, s, e) for rank in pieces for (c, s, e) in rank)
    assert flat == sorted(p for p in val_pieces(n, 500, piece, 1)[0])
    covered = [i for _, s, e in flat for i in range(s, e)]
    assert covered == list(range(n))
    assert all(e - s <= piece and s // 500 == c == (e - 1) // 500 for c, s, e in flat)
    assert all(c % world == rank for rank, got in enumerate(pieces) for c, _, _ in got)


# -- integration ------------------------------------------------------------------------------


def _train(nproc: int, config: Path, run_dir: Path, *extra: str, resume: bool = False) -> str:
    args = [str(config), f"run.output_dir={run_dir}", f"growth.max_workers={nproc}", *extra]
    out = distgrow_job_run(nproc, [*args, *(["--resume"] if resume else [])], timeout=300).stdout
    return str(out)


def _state(run_dir: Path, step: int | None = None) -> dict[str, Any]:
    if step is None:
        found = load_latest(run_dir)
        assert found is not None, f"no checkpoint in {run_dir}"
        return found[1]
    path = run_dir / f"ckpt-{step:09d}.pt"
    assert path.is_file(), sorted(p.name for p in run_dir.iterdir())
    return dict(torch.load(path, map_location="cpu", weights_only=False))


def _rows(run_dir: Path, upto: int | None = None) -> list[tuple[Any, ...]]:
    return [
        tuple(r.get(k) for k in COMPARED)
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if (r["kind"] in ("step", "epoch") or r.get("event") == "growth")
        and (upto is None or int(r.get("step", 0)) <= upto)
    ]


def _assert_same(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert got["step"] == want["step"]
    diff = max(
        float((got["model"][k].double() - want["model"][k].double()).abs().max())
        for k in want["model"]
    )
    print(f"{what}: max |Δparameter| vs ZeRO-0 = {diff:.3g}")
    assert_same_model(got["model"], want["model"])
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for index, entry in want["optimizer"]["state"].items():
        torch.testing.assert_close(
            got["optimizer"]["state"][index]["momentum_buffer"],
            entry["momentum_buffer"],
            rtol=1e-5,
            atol=TOLERANCE,
        )


@needs_deepspeed
@pytest.mark.integration
def test_zero3_trains_like_zero0_through_growth_and_resumes_at_4_and_1_ranks(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "syn.yaml", SYN)
    user = tmp_path / "ds3.json"  # partition every parameter (DeepSpeed keeps < 1e5 whole)
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    zero3 = ("backend.name=deepspeed", "backend.zero_stage=3", f"backend.deepspeed_config={user}")

    ref = tmp_path / "zero0"
    _train(2, config, ref, *ZERO0)
    growth = [r for r in _rows(ref) if r[1] == "growth"]
    assert [(r[4], r[5], r[6]) for r in growth] == [(64, 2, 4)]  # accumulation 2 -> 4

    # Epochs 1-2 on 2 ranks: the accumulation change happens inside this ZeRO-3 job.
    run = tmp_path / "zero3"
    _train(2, config, run, *zero3, "run.epochs=2")
    _assert_same(_state(run, 50), _state(ref, 50), "ZeRO-3, 2 ranks, 50 updates")
    assert _rows(run) == _rows(ref, upto=50)
    narrow = tmp_path / "zero3-to-1"
    shutil.copytree(run, narrow)

    # The relaunch wider: the full state saved at 2 ranks resumes partitioned over 4.
    out = _train(4, config, run, *zero3, resume=True)
    assert "on 4 worker(s)" in out
    wide = _state(run)
    _assert_same(wide, _state(ref), "ZeRO-3, 2 -> 4 ranks")
    assert wide["samples_seen"] == 3 * 1033 and wide["step"] == SYN_UPDATES
    assert next(r[4:7] for r in _rows(run) if r[0] == "step" and r[2] == 3) == (64, 4, 2)

    out = _train(1, config, narrow, *zero3, resume=True)
    assert "on 1 worker(s)" in out
    _assert_same(_state(narrow), _state(ref), "ZeRO-3, 2 -> 1 rank")


@needs_deepspeed
@pytest.mark.integration
def test_zero3_partitions_gathers_and_loads_with_the_precision_of_stages_0_to_2(
    tmp_path: Path,
) -> None:
    """One worker, bf16: the weights are partitioned (empty outside a forward), the saved state
    is the full float32 model, a loaded state reaches the fp32 master copy, logits come back
    float32 and gradients are reduced in float32 (as under ZeRO 0-2 and DDP)."""
    user = tmp_path / "ds3.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    code = f"""
import torch
from deepspeed.utils import safe_get_full_fp32_param
from distgrow.backends import make_backend
from distgrow.config import load_config
from distgrow.runtime import Runtime
cfg = load_config(None, ["backend.name=deepspeed", "backend.zero_stage=3", "run.device=cpu",
                         "backend.precision=bf16", "backend.deepspeed_config={user}"])
backend = make_backend(cfg, Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
before = {{k: v.clone() for k, v in model.state_dict().items()}}
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
engine = backend.setup(model, opt)
assert all(p.numel() == 0 for p in model.parameters()), [p.shape for p in model.parameters()]
saved = backend.model_state_dict()
assert all(torch.equal(saved[k], before[k]) and saved[k].dtype == torch.float32 for k in before)
assert set(engine.optimizer.ipg_buckets) == {{torch.float32}}, set(engine.optimizer.ipg_buckets)
backend.begin_update(4, 1)
backend.micro_step(True).__enter__()
out = engine(torch.randn(4, 5))
assert out.dtype == torch.float32, out.dtype
backend.backward(out.square().sum())
backend.step(opt, None)
assert backend.optimizer_state_dict(opt)["state"][0]["momentum_buffer"].shape == (7, 5)
changed = {{k: v + 1.0 for k, v in before.items()}}
backend.load_model_state_dict(changed)
again = backend.model_state_dict()
assert all(torch.equal(again[k], changed[k]) for k in changed)
master = safe_get_full_fp32_param(model[0].weight)
assert torch.equal(master, changed["0.weight"]), (master, changed["0.weight"])
print("ok")
backend.shutdown(0)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=distgrow_job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
