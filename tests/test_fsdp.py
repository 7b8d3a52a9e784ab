"""backend.name=fsdp (FSDP2 ``fully_shard``) against DDP, and checkpoints that reshard.

Unit: the sharding rule, the optimizer-state re-keying, the refusals, the orphan shards.

Integration (gloo ranks on the CPU, ``distgrow train`` under torchrun), one reference run of
DDP on 2 ranks (SGD with momentum, clipping and dropout; batch 32 as 2 × 8 × 2, then 64 as
2 × 8 × 4 from epoch 2: a growth by accumulation) and two chains of resumes against it:

* fsdp on 2 ranks (epoch 1) → fsdp on 4 (epoch 2, the growth; DCP reshards 2 → 4) → fsdp on 1
  (epoch 3; DCP 4 → 1);
* DDP's full checkpoint after epoch 1 → fsdp on 2 (epoch 2) → DDP on 1 (epoch 3, from fsdp's
  DCP checkpoint).

Each checkpoint (1, 2 and 3 epochs) and each update's loss must equal the reference's.

Tolerance: rtol 1e-5 / atol 1e-6 on parameters (``assert_same_model``), rtol 1e-5 on losses.
Every micro-batch's gradient is the same computation in both engines; what differs is the
order of the sums: DDP all-reduces the rank-summed gradient, FSDP reduce-scatters it (gloo
sums the ranks' buffers in another order, and with 4 ranks not associatively alike), and
FSDP's clipping sums the squared norms per shard before summing over ranks. Each update thus
differs by a few float32 ulp (~1e-7 relative), and momentum carries that forward over the 67
updates without amplifying it much (measured here: fsdp on 2 ranks bit for bit DDP's; after
the 4-rank epoch 1.3e-7 of a tensor's largest value, after the last 1.2e-7; losses within
1.4e-7 relative; clipping at 1.0 is active in this plan), so 1e-5 leaves a wide margin,
while a lost or double-counted micro-batch, or a gradient not averaged over the ranks, changes
the gradient itself, not its rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    SYN_PLAN,
    assert_same_model,
    clear_launcher_env,
    distgrow_job_run,
    free_port,
    write_config,
)
from torch import nn

from distgrow.backends import BackendError
from distgrow.backends.sharded_state import (
    fqn_keyed,
    id_keyed,
    is_sharded,
    parameter_names,
    read_full,
    save_model_and_optimizer,
)
from distgrow.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    remove_orphan_shards,
    save_checkpoint,
)
from distgrow.config import load_config
from distgrow.launch import run_controller
from distgrow.metrics import read_jsonl

# The conftest plan (SGD, momentum: its buffers go through the sharded checkpoint; plain SGD
# also sees a wrong gradient scale, which Adam would hide) with gradient clipping (FSDP's norm
# over shards).
FSDP_PLAN: dict[str, Any] = {
    **SYN_PLAN,
    "optim": {**SYN_PLAN["optim"], "grad_clip": 1.0},
    "logging": {"every_steps": 1, "progress": "off"},
}
EPOCH_STEPS = {1: 33, 2: 50, 3: 67}  # updates after each epoch (conftest.SYN_PLAN)


# -- unit --------------------------------------------------------------------------------------


def test_shard_units_follow_the_documented_rule() -> None:
    from distgrow.backends.fsdp_backend import shard_units
    from distgrow.models_lm import TinyTransformer

    lm = TinyTransformer(vocab=256, max_len=16, depth=3, width=64)
    assert shard_units(lm) == list(lm.blocks)  # one unit per transformer block
    assert shard_units(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))) == []

    class Own(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def fsdp_units(self) -> list[nn.Module]:
            return [self.b]

    own = Own()
    assert shard_units(own) == [own.b]
    own.fsdp_units = lambda: [nn.Linear(1, 1)]  # type: ignore[method-assign]
    with pytest.raises(BackendError, match=r"not submodules of the model.*Fix:"):
        shard_units(own)


def test_wide_resnet_is_sharded_per_residual_block() -> None:
    from distgrow.backends.fsdp_backend import shard_units
    from distgrow.models import _WideBlock, _WideResNet

    wrn = _WideResNet(in_channels=3, num_outputs=10, depth=10, width=1, dropout=0.0, ghost_batch=8)
    units = shard_units(wrn)
    assert len(units) == 3 and all(isinstance(u, _WideBlock) for u in units)  # (10-4)/6 × 3


def test_optimizer_state_rekeys_by_name_and_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups: list[dict[str, Any]] = [
        {"params": [model[1].weight]},
        {"params": [model[0].weight, model[0].bias, model[1].bias], "lr": 0.1},
    ]
    opt = torch.optim.AdamW(groups)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    names = parameter_names(model, opt)
    assert names == [["1.weight"], ["0.weight", "0.bias", "1.bias"]]
    plain = opt.state_dict()
    keyed = fqn_keyed(plain, names)
    assert set(keyed["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert keyed["param_groups"][1]["params"] == ["0.weight", "0.bias", "1.bias"]
    assert torch.equal(keyed["state"]["0.bias"]["exp_avg"], plain["state"][2]["exp_avg"])
    back = id_keyed(keyed, names)
    assert back["param_groups"] == plain["param_groups"]
    for i, values in plain["state"].items():
        assert all(torch.equal(back["state"][i][k], v) for k, v in values.items())


def test_fp16_and_the_noise_meter_are_refused(tmp_path: Path) -> None:
    from distgrow.backends.fsdp_backend import FSDPBackend
    from distgrow.config import load_config
    from distgrow.runtime import Runtime

    cfg_path = write_config(tmp_path / "c.yaml", FSDP_PLAN)
    runtime = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")
    cfg = load_config(cfg_path, ["backend.name=fsdp", "backend.precision=fp16", "run.device=cpu"])
    with pytest.raises(BackendError, match=r"fp16.*Fix: set backend.precision=bf16"):
        FSDPBackend(cfg, runtime)
    cfg = load_config(cfg_path, ["backend.name=fsdp", "noise.measure=on", "run.device=cpu"])
    with pytest.raises(BackendError, match=r"noise.*reduce-scatters.*Fix: set backend.name=torch"):
        FSDPBackend(cfg, runtime)


def test_bf16_trains_the_transformer_in_one_process(tmp_path: Path, one_thread: None) -> None:
    """bf16: units compute in bf16 and hand bf16 on (the root's final norm is bf16 too), the
    loss comes back float32, the sharded weights and their gradients stay float32."""
    import torch.distributed as dist

    from distgrow.backends.fsdp_backend import FSDPBackend
    from distgrow.models_lm import TinyTransformer
    from distgrow.runtime import Runtime

    cfg = load_config(
        write_config(tmp_path / "c.yaml", FSDP_PLAN),
        ["backend.name=fsdp", "backend.precision=bf16", "run.device=cpu"],
    )
    backend = FSDPBackend(cfg, Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none"))
    try:
        torch.manual_seed(0)
        model = TinyTransformer(vocab=32, max_len=8, depth=2, width=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        train = backend.setup(model, opt)
        tokens = torch.randint(0, 32, (4, 8))
        for sync in (False, True):  # two micro-steps: the gradient syncs on the last only
            with backend.micro_step(sync):
                logits = train(tokens)
                assert logits.dtype == torch.float32
                backend.backward(logits.logsumexp(-1).sum())
        assert all(
            p.grad is not None and p.grad.dtype == torch.float32
            for p in opt.param_groups[0]["params"]
        )
        backend.step(opt, grad_clip=1.0)
        after = backend.model_state_dict()
        assert after.keys() == before.keys() and after["head.weight"].dtype == torch.float32
        assert not torch.equal(after["blocks.0.qkv.weight"], before["blocks.0.qkv.weight"])
        assert torch.equal(after["head.weight"], after["token.weight"])  # still tied
    finally:
        dist.destroy_process_group()


def test_orphan_and_temporary_shard_directories_are_removed(tmp_path: Path) -> None:
    for name in ("ckpt-000000004.dcp", "ckpt-000000008.dcp", ".ckpt-000000012.dcp.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "ckpt-000000008.pt").write_bytes(b"")
    removed = remove_orphan_shards(tmp_path)
    assert sorted(p.name for p in removed) == [".ckpt-000000012.dcp.tmp", "ckpt-000000004.dcp"]
    assert (tmp_path / "ckpt-000000008.dcp").is_dir()


class _FakeSharded:
    """A sharded backend of one rank whose shards are one file naming their write."""

    is_main = True

    def __init__(self) -> None:
        self.writes = 0

    def barrier(self) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def save_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        assert path.name.startswith(".") and path.name.endswith(".dcp.tmp")  # never the final
        path.mkdir()
        self.writes += 1
        (path / ".metadata").write_text(str(self.writes))

    def load_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        raise AssertionError("not loaded here")


def test_shards_are_written_aside_then_renamed_and_the_pt_names_them(tmp_path: Path) -> None:
    backend = _FakeSharded()
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    for _ in range(2):  # the same step saved twice: the second write replaces the first
        entry, optim_entry = save_model_and_optimizer(
            backend,  # type: ignore[arg-type]
            opt,
            tmp_path / "ckpt-000000005.pt",
        )
    assert entry == optim_entry == {"sharded_dcp": "ckpt-000000005.dcp"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000005.dcp"]
    assert (tmp_path / "ckpt-000000005.dcp" / ".metadata").read_text() == "2"
    state = {
        "format_version": FORMAT_VERSION,
        "fingerprint": {},
        "model": entry,
        "optimizer": optim_entry,
        "plan_state": {},
        "epoch": 0,
        "position": 0,
        "step": 5,
        "samples_seen": 0,
        "rng": torch.get_rng_state(),
    }
    path = save_checkpoint(tmp_path, state, keep=1)
    assert is_sharded(load_checkpoint(path)["model"])
    shutil.rmtree(tmp_path / "ckpt-000000005.dcp")
    with pytest.raises(CheckpointError, match=r"missing or incomplete.*Fix: restore"):
        load_checkpoint(path)


def test_shards_a_rank_cannot_see_stop_the_run_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank whose run directory is not rank 0's (no shared file system) does not see the
    renamed shards: every rank stops at that first checkpoint, not at a resume."""
    from distgrow.backends import sharded_state

    class Unshared(_FakeSharded):
        def save_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
            path.mkdir()  # this rank's shards; DCP's metadata went to another node's disk

    monkeypatch.setattr(sharded_state, "SEEN_WITHIN_S", 0.0)
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(BackendError, match=r"does not see .*shared file system.*Fix:"):
        save_model_and_optimizer(Unshared(), opt, tmp_path / "ckpt-000000005.pt")  # type: ignore[arg-type]


def test_a_resume_from_shards_a_rank_cannot_see_stops_with_the_same_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relaunch wider onto a node whose run directory is its own disk: that rank finds no
    shards at the resume, before any save; every rank stops with the line and the fix
    (not DCP's FileNotFoundError), and DCP is not asked to read."""
    from distgrow.backends import sharded_state

    monkeypatch.setenv(sharded_state.SEEN_WITHIN_ENV, "0")
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": {"sharded_dcp": "ckpt-000000005.dcp"}}
    with pytest.raises(BackendError, match=r"does not see .*resumes from.*shared file sy.*Fix:"):
        sharded_state.load_model_and_optimizer(
            _FakeSharded(),  # type: ignore[arg-type]
            model,
            opt,
            state,
            tmp_path,
        )
    monkeypatch.setenv(sharded_state.SEEN_WITHIN_ENV, "soon")
    with pytest.raises(BackendError, match=r"SEEN_WITHIN_S='soon' is not a number.*Fix:"):
        sharded_state.seen_within_s()
    monkeypatch.setenv(sharded_state.SEEN_WITHIN_ENV, "2.5")
    assert sharded_state.seen_within_s() == 2.5


# -- integration -------------------------------------------------------------------------------


def _train(nproc: int, config: Path, run_dir: Path, *overrides: str) -> str:
    args = [str(config), f"run.output_dir={run_dir}", f"growth.max_workers={nproc}", *overrides]
    return distgrow_job_run(nproc, args, timeout=240).stdout


def _model_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model of the checkpoint after ``step`` updates, full or sharded."""
    state = load_checkpoint(run_dir / f"ckpt-{step:09d}.pt")
    if is_sharded(state["model"]):
        return read_full(run_dir / state["model"]["sharded_dcp"])["model"]
    return state["model"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["train_loss"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "step"
    }


def _assert_same_run(got: Path, want: Path, epochs: list[int]) -> None:
    for epoch in epochs:
        assert_same_model(_model_at(got, EPOCH_STEPS[epoch]), _model_at(want, EPOCH_STEPS[epoch]))
    have, ref = _losses(got), _losses(want)
    assert set(have) == set(ref) and len(ref) == EPOCH_STEPS[3]
    for step, loss in ref.items():
        assert have[step] == pytest.approx(loss, rel=1e-5), step


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "fsdp.yaml", FSDP_PLAN)


@pytest.fixture(scope="module")
def ddp_reference(plan: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "ref"
    _train(2, plan, run_dir, "run.keep_checkpoints=3")
    return run_dir


@pytest.mark.integration
def test_fsdp_equals_ddp_and_reshards_2_4_1(
    plan: Path, ddp_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "fsdp"
    _train(2, plan, run_dir, "backend.name=fsdp", "run.epochs=1", "run.keep_checkpoints=3")
    assert (run_dir / "ckpt-000000033.dcp" / ".metadata").is_file()
    _train(4, plan, run_dir, "backend.name=fsdp", "run.epochs=2", "--resume")
    _train(1, plan, run_dir, "backend.name=fsdp", "--resume")
    _assert_same_run(run_dir, ddp_reference, [1, 2, 3])
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert {(r["workers"], r["accum_steps"]) for r in steps} == {(2, 2), (4, 2), (1, 8)}
    # Every checkpoint has its shards; the shards of pruned checkpoints are gone.
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == sorted(
        f"ckpt-{s:09d}.{ext}" for s in EPOCH_STEPS.values() for ext in ("pt", "dcp")
    )


@pytest.mark.integration
def test_ddp_checkpoint_resumes_under_fsdp_and_back(
    plan: Path, ddp_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "mixed"
    shutil.copytree(
        ddp_reference,
        run_dir,
        ignore=shutil.ignore_patterns("ckpt-00000005*", "ckpt-00000006*", "summary.json", "wandb*"),
    )
    _train(2, plan, run_dir, "backend.name=fsdp", "run.epochs=2", "--resume")  # full → fsdp
    assert is_sharded(load_checkpoint(run_dir / "ckpt-000000050.pt")["model"])
    _train(1, plan, run_dir, "backend.name=torch", "--resume")  # DCP → DDP (one worker)
    _assert_same_run(run_dir, ddp_reference, [2, 3])


# The plan of test_launch_integration.py, shortened: batch 32 on 1 worker for epoch 1, then 64
# on 2 workers (micro-batch 32): `distgrow launch` relaunches wider after epoch 1.
LAUNCHED: dict[str, Any] = {
    "run": {"name": "grow", "epochs": 2, "seed": 3, "device": "cpu", "threads": 1},
    "data": {"name": "synthetic_classification", "synthetic_samples": 2048},
    "model": {"name": "mlp", "hidden": [32]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1], "gamma": 0.5},
    "growth": {"base_batch": 32, "micro_batch": 32, "max_workers": 2},
    "logging": {"progress": "off"},
}


@pytest.mark.integration
def test_launch_relaunches_an_fsdp_run_wider_from_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_launcher_env(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tree = {**LAUNCHED, "launch": {"master_port": free_port(), "max_restarts": 0}}
    config = write_config(tmp_path / "grow.yaml", tree)
    run_dir = tmp_path / "fsdp"
    code = run_controller(
        str(config),
        [f"run.output_dir={run_dir}", "backend.name=fsdp"],
        load_config(config, [f"run.output_dir={run_dir}", "backend.name=fsdp"]),
        log=lambda line: None,
    )
    assert code == 0
    starts = [
        (r["event"], r["world_size"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r.get("event") in ("start", "resume")
    ]
    assert starts == [("start", 1), ("resume", 2)]  # the relaunch read the 1-rank shards
    # The same plan in one DDP process (the batch of 64 by accumulation) ends alike.
    reference = tmp_path / "ddp"
    _train(1, config, reference)
    last = max(int(p.stem.split("-")[1]) for p in run_dir.glob("ckpt-*.pt"))
    assert_same_model(_model_at(run_dir, last), _model_at(reference, last))
