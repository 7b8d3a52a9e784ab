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

A NaN loss on one rank (2 gloo ranks, the backend and the agreement driven as the trainer
drives them): the update is skipped on both ranks (weights and momentum unchanged, bit for bit)
and the next one equals that of a run without the NaN update, bit for bit.

A single-process ZeRO-3 engine (in a subprocess: DeepSpeed's process group must not leak into
pytest) shows the partitioning, the gathered state and its load, and the bf16 semantics of
stages 0-2: float32 outputs and float32 gradient reduction.
"""

from __future__ import annotations

import importlib.util
import json
import math
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
    exit_spawned_rank,
    free_port,
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


def _nan_skip_rank(rank: int, port: int, out: str, user: str, nan: bool, absent: int) -> None:
    """Three updates of 2 micro-steps under ZeRO-3 on 2 gloo ranks, as the trainer runs them:
    the agreement on the loss, then ``step`` when it is finite, ``zero_grad`` when it is not.
    ``nan``: rank 1's first micro-step of update 1 has a NaN loss (its gradients NaN too, and
    the reduce-scatter carries them into both ranks' partitions). ``absent``: the update not
    run at all (-1: none), the reference."""
    import os

    from distgrow.agreement import Agreement
    from distgrow.backends import make_backend
    from distgrow.runtime import Runtime
    from distgrow.signals import StopSignals

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    cfg = load_config(
        None,
        [
            "backend.name=deepspeed",
            "backend.zero_stage=3",
            "run.device=cpu",
            f"backend.deepspeed_config={user}",
        ],
    )
    backend = make_backend(cfg, Runtime(rank, 2, rank, 2, "127.0.0.1", port, "none"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = backend.setup(model, opt)
    agreement = Agreement(backend, StopSignals(), torch.device("cpu"))
    backend.begin_update(4, 2)
    seen: list[Any] = []
    for update in range(3):
        if update == absent:
            continue
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro, sync in enumerate((False, True)):
            seed = 100 * update + 10 * micro + rank
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
            with backend.micro_step(sync):
                loss = engine(x).square().sum()
                if nan and (rank, update, micro) == (1, 1, 0):
                    loss = loss * math.nan
                backend.backward(loss)
            loss_sum += loss.detach().double()
        mean = agreement.mean_loss(loss_sum)
        if math.isfinite(mean):
            backend.step(opt, None)
        else:
            backend.zero_grad(opt)
        seen.append(
            (update, mean, backend.model_state_dict(), backend.optimizer_state_dict(opt)["state"])
        )
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
    exit_spawned_rank()


def _spawn_nan_skip(tmp: Path, user: Path, nan: bool, absent: int) -> list[list[Any]]:
    import torch.multiprocessing as mp

    out = tmp / f"nan{int(nan)}-absent{absent}"
    out.mkdir()
    mp.start_processes(
        _nan_skip_rank,
        args=(free_port(), str(out), str(user), nan, absent),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _equal_states(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_deepspeed
@pytest.mark.integration
def test_zero3_skips_an_update_whose_loss_is_nan_on_one_rank(tmp_path: Path) -> None:
    """The NaN update leaves the weights and momentum exactly as they were on both ranks, and
    the next update trains bit for bit as in a run where it never happened: ``zero_grad`` drops
    the partitioned gradients (the next backward copies into ZeRO-3's partition buffers instead
    of adding to the NaNs there)."""
    user = tmp_path / "ds3.json"  # partition every parameter
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    skipped = _spawn_nan_skip(tmp_path, user, nan=True, absent=-1)
    reference = _spawn_nan_skip(tmp_path, user, nan=False, absent=1)
    for rank in range(2):
        (u0, m0, w0, o0), (u1, m1, w1, o1), (u2, m2, w2, o2) = skipped[rank]
        (r0, n0, v0, p0), (r2, n2, v2, p2) = reference[rank]
        assert (u0, u1, u2, r0, r2) == (0, 1, 2, 0, 2)
        assert math.isnan(m1) and math.isfinite(m0) and math.isfinite(m2)  # every rank's NaN
        assert (m0, m2) == (n0, n2)
        # The skipped update: weights and momentum exactly those of update 0.
        assert _equal_states(w1, w0) and o1.keys() == o0.keys()
        assert all(torch.equal(o1[i]["momentum_buffer"], o0[i]["momentum_buffer"]) for i in o0)
        # After it, training goes on as if it were absent, bit for bit.
        assert _equal_states(w0, v0) and _equal_states(w2, v2)
        assert not _equal_states(w2, w0)  # update 2 did train
        assert all(torch.equal(o0[i]["momentum_buffer"], p0[i]["momentum_buffer"]) for i in p0)
        assert all(torch.equal(o2[i]["momentum_buffer"], p2[i]["momentum_buffer"]) for i in p2)
        assert all(torch.isfinite(v).all() for v in w2.values())
    assert _equal_states(skipped[0][2][2], skipped[1][2][2])  # both ranks hold the same model
