"""distgrow.checkpoint: atomic writes, pruning, safe loading, and clear refusals."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from distgrow.checkpoint import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    PER_LAUNCH_KEYS,
    CheckpointError,
    _flatten,
    checkpoint_path,
    config_differences,
    fingerprint,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from distgrow.config import load_config
from distgrow.metrics import atomic_write_bytes

FINGERPRINT = {"model": {"name": "mlp", "hidden": [8]}, "seed": 0, "optimizer": "sgd"}


def make_state(step: int, **extra: Any) -> dict[str, Any]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()  # creates momentum buffers: a real optimizer state
    state = {
        "format_version": FORMAT_VERSION,
        "fingerprint": FINGERPRINT,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "plan_state": {"rung": 0, "current": {"global_batch": 32}, "trigger": {"best": math.inf}},
        "epoch": 1,
        "position": 0,
        "step": step,
        "samples_seen": 100 * step,
        "rng": torch.get_rng_state(),
    }
    state.update(extra)
    return state


class Evil:
    """Loading this with pickle would create a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    state = make_state(7)
    path = save_checkpoint(tmp_path, state, keep=3)
    assert path == tmp_path / "ckpt-000000007.pt"
    loaded = load_checkpoint(path, FINGERPRINT)
    assert loaded["step"] == 7 and loaded["plan_state"]["trigger"]["best"] == math.inf
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    momentum = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, state["optimizer"]["state"][0]["momentum_buffer"])
    assert torch.equal(loaded["rng"], state["rng"])


def test_adam_state_loads_with_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, make_state(1, optimizer=opt.state_dict()), keep=1)
    assert load_checkpoint(path)["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_prunes_to_the_newest_keep(tmp_path: Path) -> None:
    for step in (1, 5, 12, 100, 1_000_000_000):
        save_checkpoint(tmp_path, make_state(step), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-000000100.pt", "ckpt-1000000000.pt"]


def test_a_crash_before_the_rename_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save_checkpoint(tmp_path, make_state(1), keep=1)
    before = first.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)  # the atomic write renames with os.replace
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, make_state(2), keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt"]  # no temp left
    assert first.read_bytes() == before
    assert load_latest(tmp_path, FINGERPRINT) is not None


def test_temporary_files_are_never_taken_for_checkpoints(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(3), keep=3)
    (tmp_path / ".ckpt-000000009.pt.abc.tmp").write_bytes(b"half written")
    found = load_latest(tmp_path)
    assert found is not None and found[0].name == "ckpt-000000003.pt"


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = checkpoint_path(tmp_path, 4)
    torch.save(make_state(4, extra=Evil(marker)), path)
    with pytest.raises(CheckpointError, match=r"ckpt-000000004\.pt.*weights_only"):
        load_latest(tmp_path)
    assert not marker.exists()
    assert path.exists()


def test_a_corrupt_newest_file_is_an_error_naming_it_and_is_left_alone(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(1), keep=3)
    bad = checkpoint_path(tmp_path, 2)
    good = save_checkpoint(tmp_path, make_state(2), keep=3).read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # torn by something other than distgrow
    with pytest.raises(CheckpointError, match=r"ckpt-000000002\.pt cannot be read") as info:
        load_latest(tmp_path)
    assert "previous checkpoint" in str(info.value)
    assert bad.read_bytes() == good[: len(good) // 2]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000001.pt", bad.name]


def test_a_mismatched_fingerprint_names_what_differs(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, make_state(1), keep=1)
    before = path.read_bytes()
    other = {**FINGERPRINT, "seed": 1}
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 0, config 1"):
        load_latest(tmp_path, other)
    assert path.read_bytes() == before


def test_wrong_format_version_and_missing_keys(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, 1)
    torch.save(make_state(1, format_version=99), path)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)
    state = make_state(1)
    del state["plan_state"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="lacks plan_state"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="not a distgrow checkpoint"):
        load_checkpoint(path)


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "missing") is None
    assert load_latest(tmp_path) is None


def test_save_checks_its_input(tmp_path: Path) -> None:
    state = make_state(1)
    del state["rng"]
    with pytest.raises(ValueError, match="rng"):
        save_checkpoint(tmp_path, state, keep=1)
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, make_state(1), keep=0)


def test_atomic_write_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub" / "summary.json"
    atomic_write_bytes(target, b"one")
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        atomic_write_bytes(target, b"two")
    monkeypatch.undo()
    assert target.read_bytes() == b"one"
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]


def test_fingerprint_covers_model_data_seed_optimizer_only() -> None:
    base = load_config(None, ["data.name=digits"])
    same = load_config(None, ["data.name=digits", "run.epochs=99", "optim.lr=0.5"])
    assert fingerprint(base, 1000) == fingerprint(same, 1000)
    for override in ("run.seed=1", "model.hidden=[8]", "optim.name=adam", "data.limit_train=5"):
        changed = load_config(None, ["data.name=digits", override])
        assert fingerprint(changed, 1000) != fingerprint(base, 1000), override
    assert fingerprint(base, 999) != fingerprint(base, 1000)


def test_the_refusal_never_passes_on_torchs_advice_to_run_the_code(tmp_path: Path) -> None:
    torch.save(make_state(4, extra=Evil(tmp_path / "code-ran")), checkpoint_path(tmp_path, 4))
    with pytest.raises(CheckpointError) as caught:
        load_latest(tmp_path)
    message = str(caught.value)
    assert (
        "(weights_only=True refuses to run pickled code): Unsupported global: GLOBAL io.open. "
        "Fix: resume only" in message
    )
    for advice in ("weights_only=False", "`False`", "safe_globals", "trust", "\x1b["):
        assert advice not in message, advice
    assert "\n" not in message


def test_identity_keys_are_the_fingerprints_keys() -> None:
    own = load_config(
        None,
        [
            "model.name=user.py:build",
            'model.kwargs={"depth": 3}',
            "data.name=user.py:make",
            'data.kwargs={"n": 5}',
        ],
    )
    names = {"seed": "run.seed", "optimizer": "optim.name"}
    flat = [k for k in _flatten(fingerprint(own, 10)) if k != "data.train_size"]
    flat = [k.rsplit(".", 1)[0] if ".kwargs." in k else k for k in flat]
    assert sorted(names.get(k, k) for k in flat) == sorted(IDENTITY_KEYS)


def test_entry_point_kwargs_are_fingerprinted_only_when_set() -> None:
    base = ["model.name=user.py:build", "data.name=user.py:make"]
    plain = fingerprint(load_config(None, base), 10)
    assert "kwargs" not in plain["model"] and "kwargs" not in plain["data"]
    deeper = fingerprint(load_config(None, [*base, 'model.kwargs={"depth": 3}']), 10)
    assert deeper["model"]["kwargs"] == {"depth": 3}
    more = fingerprint(load_config(None, [*base, 'data.kwargs={"n": 5}']), 10)
    assert more["data"]["kwargs"] == {"n": 5}
    assert len({repr(plain), repr(deeper), repr(more)}) == 3


def test_a_resume_with_other_model_kwargs_is_refused(tmp_path: Path) -> None:
    base = ["model.name=user.py:build", "data.name=user.py:make"]
    written = fingerprint(load_config(None, [*base, 'model.kwargs={"depth": 3}']), 10)
    torch.save(make_state(4, fingerprint=written), checkpoint_path(tmp_path, 4))
    wanted = fingerprint(load_config(None, [*base, 'model.kwargs={"depth": 4}']), 10)
    with pytest.raises(CheckpointError, match=r"model\.kwargs\.depth: checkpoint 3, config 4"):
        load_latest(tmp_path, wanted)
    assert load_latest(tmp_path, written) is not None


def test_identity_differences_reach_below_a_mapping_key() -> None:
    a = {"model": {"name": "m:f", "kwargs": {"depth": 3}}, "run": {"epochs": 1}}
    b = {"model": {"name": "m:f", "kwargs": {"depth": 4}}, "run": {"epochs": 2}}
    assert config_differences(a, b, only=IDENTITY_KEYS) == [
        "model.kwargs.depth: 3 in config.yaml, 4 now"
    ]


def test_config_differences_name_both_values() -> None:
    a = {"run": {"epochs": 1, "resume": False}, "model": {"hidden": [32]}}
    b = {"run": {"epochs": 2, "resume": True}, "model": {"hidden": [8]}}
    assert config_differences(a, b, ignore=PER_LAUNCH_KEYS) == [
        "model.hidden: [32] in config.yaml, [8] now",
        "run.epochs: 1 in config.yaml, 2 now",
    ]
    assert config_differences(a, b, only=("model.hidden",)) == [
        "model.hidden: [32] in config.yaml, [8] now"
    ]
    assert config_differences(a, a) == []
