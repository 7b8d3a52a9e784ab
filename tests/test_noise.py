"""The noise-scale estimator against exact values from per-example gradients, and its inputs.

The exact values: on a finite data set of ``N`` examples with per-example gradients ``g_i``,
``G = mean g_i`` and ``tr(Σ) = mean |g_i − G|²`` (the population covariance). Batches drawn
with replacement are i.i.d. draws from that distribution, so ``E|G_n|² = |G|² + tr(Σ)/n``
holds exactly and the estimator's expectation can be checked by Monte Carlo.

Tolerances: an average of ``M`` independent draws lies within ``Z`` standard errors
(``std/√M``, with the std measured from the same draws) of its expectation except with
probability about ``2·Φ(−Z)``; ``Z = 4`` gives ~6e-5, and the seed is fixed, so the tests
are deterministic and fail only if the estimator's expectation is wrong by several standard
errors. Each test also checks that the error it guards against would exceed that tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import exit_spawned_rank, free_port
from torch import nn
from torch.func import functional_call, grad, vmap

from distgrow.noise import (
    MicroStepNorms,
    NoiseScaleEstimator,
    mean_gradient_scale,
    measurable,
    pack_local_norm,
    squared_norm,
    unbiased_estimates,
    unpack_local_norms,
)

Z = 4.0


# --------------------------------------------------------------------------------------------
# A small problem with exact |G|² and tr(Σ)
# --------------------------------------------------------------------------------------------


def per_example_grads(n: int = 256, d: int = 6, seed: int = 0) -> torch.Tensor:
    """``[n, d + 1]`` per-example gradients of a squared-error linear model (torch.func)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.8 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    model = nn.Linear(d, 1).double()
    with torch.no_grad():  # away from the optimum, so that |G|² is not tiny
        model.weight.fill_(0.3)
        model.bias.fill_(-0.5)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return (functional_call(model, p, (xi[None],)).squeeze() - yi) ** 2

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads["weight"].reshape(n, -1), grads["bias"].reshape(n, -1)], dim=1)


def exact(per_example: torch.Tensor) -> tuple[float, float]:
    """``(|G|², tr(Σ))`` of the distribution that draws one example uniformly."""
    mean = per_example.mean(0)
    return float(mean.square().sum()), float((per_example - mean).square().sum(1).mean())


def draw_updates(
    per_example: torch.Tensor, small: int, ranks: int, draws: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` simulated DDP updates: ``(|G_b|²`` averaged over ranks, ``|G_B|²)``."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(len(per_example), (draws, ranks, small), generator=gen)
    local = per_example[index].mean(2)  # [draws, ranks, params]: each rank's G_b
    small_sq = local.square().sum(2).mean(1)
    big_sq = local.mean(1).square().sum(1)  # the all-reduced mean: G_B with B = ranks · b
    return small_sq, big_sq


def within(values: torch.Tensor, expected: float) -> tuple[bool, float, float]:
    """Whether the mean of ``values`` is within Z standard errors of ``expected``."""
    mean = float(values.mean())
    tolerance = Z * float(values.std()) / len(values) ** 0.5
    return abs(mean - expected) <= tolerance, mean, tolerance


@pytest.mark.parametrize(("small", "ranks"), [(1, 2), (2, 4), (8, 2), (16, 8)])
def test_unbiased_estimates_match_the_exact_values(small: int, ranks: int) -> None:
    """Averaged over many updates, both estimates equal the exact |G|² and tr(Σ)."""
    per_example = per_example_grads()
    grad_sq, trace_cov = exact(per_example)
    small_sq, big_sq = draw_updates(per_example, small, ranks, draws=20000)
    est = [
        unbiased_estimates(float(s), small, float(g), small * ranks)
        for s, g in zip(small_sq, big_sq, strict=True)
    ]
    est_grad_sq = torch.tensor([e[0] for e in est], dtype=torch.float64)
    est_trace = torch.tensor([e[1] for e in est], dtype=torch.float64)
    ok, mean, tol = within(est_grad_sq, grad_sq)
    assert ok, f"|G|²: estimated {mean:.4g} ± {tol:.2g}, exact {grad_sq:.4g}"
    ok, mean, tol = within(est_trace, trace_cov)
    assert ok, f"tr(Σ): estimated {mean:.4g} ± {tol:.2g}, exact {trace_cov:.4g}"
    # The naive |G_b|² is off by tr(Σ)/b, and by more than the tolerance: the test can fail.
    ok, mean, tol = within(small_sq, grad_sq + trace_cov / small)
    assert ok, f"E|G_b|²: {mean:.4g} ± {tol:.2g}, want |G|² + tr(Σ)/b"
    assert trace_cov / small > 3 * tol


def test_bias_of_the_naive_estimate_falls_as_one_over_b() -> None:
    """At small batches |G_b|² overestimates |G|² many times over; the two-batch estimate not."""
    per_example = per_example_grads()
    grad_sq, trace_cov = exact(per_example)
    assert trace_cov / grad_sq > 4  # a noisy problem: B_simple well above the small batches
    for small in (1, 2, 4):
        small_sq, big_sq = draw_updates(per_example, small, 2, draws=20000, seed=small)
        naive_bias = float(small_sq.mean()) - grad_sq
        torch.testing.assert_close(naive_bias * small, trace_cov, rtol=0.05, atol=0)
        assert naive_bias > grad_sq  # the naive estimate is more than double the truth
        est = torch.tensor(
            [
                unbiased_estimates(float(s), small, float(g), 2 * small)[0]
                for s, g in zip(small_sq, big_sq, strict=True)
            ],
            dtype=torch.float64,
        )
        ok, mean, tol = within(est, grad_sq)
        assert ok and tol < naive_bias, (small, mean, tol, naive_bias)


def test_estimator_averages_converge_to_b_simple() -> None:
    """The moving averages (decay d) lie within Z·std·√((1−d)/(1+d)) of the exact values
    (the stationary spread of an exponential average of independent draws), and b_simple is
    their ratio."""
    per_example = per_example_grads()
    grad_sq, trace_cov = exact(per_example)
    small_sq, big_sq = draw_updates(per_example, 4, 4, draws=6000, seed=7)
    decay = 0.998
    estimator = NoiseScaleEstimator(decay=decay)
    raw = []
    for s, g in zip(small_sq, big_sq, strict=True):
        estimate = estimator.update(float(s), 4, float(g), 16)
        assert estimate is not None
        raw.append((estimate.grad_sq, estimate.trace_cov))
    spread = ((1 - decay) / (1 + decay)) ** 0.5
    std_grad = float(torch.tensor([r[0] for r in raw]).std())
    std_trace = float(torch.tensor([r[1] for r in raw]).std())
    assert estimator.ema_grad_sq is not None and estimator.ema_trace_cov is not None
    assert abs(estimator.ema_grad_sq - grad_sq) < Z * std_grad * spread
    assert abs(estimator.ema_trace_cov - trace_cov) < Z * std_trace * spread
    assert estimator.b_simple == estimator.ema_trace_cov / estimator.ema_grad_sq
    torch.testing.assert_close(estimator.b_simple, trace_cov / grad_sq, rtol=0.25, atol=0)


# --------------------------------------------------------------------------------------------
# The estimator's arithmetic, state and errors
# --------------------------------------------------------------------------------------------


def test_update_pins_the_formulas_and_the_bias_corrected_average() -> None:
    estimator = NoiseScaleEstimator(decay=0.5)
    assert estimator.b_simple is None and estimator.ema_grad_sq is None
    first = estimator.update(small_sq_norm=5.0, small_batch=2, big_sq_norm=2.0, big_batch=8)
    assert first is not None
    # |G|² = (8·2 − 2·5)/6 = 1; tr(Σ) = (5 − 2)/(1/2 − 1/8) = 8
    assert (first.grad_sq, first.trace_cov) == (1.0, 8.0)
    assert (first.ema_grad_sq, first.ema_trace_cov, first.b_simple) == (1.0, 8.0, 8.0)
    second = estimator.update(small_sq_norm=3.0, small_batch=4, big_sq_norm=2.0, big_batch=8)
    assert second is not None
    # |G|² = (16 − 12)/4 = 1; tr(Σ) = 1/(1/8) = 8... both averages stay at the same values:
    assert (second.grad_sq, second.trace_cov) == (1.0, 8.0)
    third = estimator.update(small_sq_norm=4.0, small_batch=4, big_sq_norm=1.0, big_batch=8)
    assert third is not None
    # |G|² = (8 − 16)/4 = −2, tr(Σ) = 3·8 = 24; raw averages 0.5·(0.5·(0.5·1)+0.5·1)... corrected:
    # weights 0.25, 0.5, 1 (then / 1.75 after correction by 1 − 0.5³ = 0.875 on the 0.5 scale)
    want_grad = (0.125 * 1 + 0.25 * 1 + 0.5 * -2) / 0.875
    want_trace = (0.125 * 8 + 0.25 * 8 + 0.5 * 24) / 0.875
    assert third.ema_grad_sq == pytest.approx(want_grad, rel=1e-15)
    assert third.ema_trace_cov == pytest.approx(want_trace, rel=1e-15)
    assert want_grad < 0 and third.b_simple is None  # a negative |G|² average: no ratio
    assert third.metrics()["noise/b_simple"] is None
    assert third.metrics()["noise/grad_sq"] == -2.0


def test_non_finite_norms_are_skipped_and_bad_input_is_refused() -> None:
    estimator = NoiseScaleEstimator()
    assert estimator.update(float("inf"), 2, 1.0, 4) is None
    assert estimator.update(1.0, 2, float("nan"), 4) is None
    assert (estimator.updates, estimator.skipped, estimator.ema_grad_sq) == (0, 2, None)
    with pytest.raises(ValueError, match=r"small batch \(4\) must be positive and smaller"):
        estimator.update(1.0, 4, 1.0, 4)
    with pytest.raises(ValueError, match="must be >= 0"):
        estimator.update(-1.0, 2, 1.0, 4)
    with pytest.raises(ValueError, match=r"decay \(1.0\) must be in \[0, 1\)"):
        NoiseScaleEstimator(decay=1.0)
    assert measurable(2, 1) and measurable(1, 2) and not measurable(1, 1)


def test_state_dict_round_trip_reproduces_the_run_exactly() -> None:
    gen = torch.Generator().manual_seed(3)
    inputs = [(float(a) + 1.0, float(b)) for a, b in torch.rand(40, 2, generator=gen)]
    whole = NoiseScaleEstimator(decay=0.9)
    first_half = NoiseScaleEstimator(decay=0.9)
    for small, big in inputs[:20]:
        whole.update(small, 2, big, 8)
        first_half.update(small, 2, big, 8)
    first_half.update(float("inf"), 2, 1.0, 8)
    whole.update(float("inf"), 2, 1.0, 8)
    resumed = NoiseScaleEstimator(decay=0.5)  # the saved decay wins
    resumed.load_state_dict(first_half.state_dict())
    assert resumed.state_dict() == first_half.state_dict()
    for small, big in inputs[20:]:
        a, b = whole.update(small, 2, big, 8), resumed.update(small, 2, big, 8)
        assert a == b
    assert resumed.state_dict() == whole.state_dict()
    assert (whole.updates, whole.skipped) == (40, 1)


# --------------------------------------------------------------------------------------------
# The inputs: scaling under the loss convention, packing for the all-reduce, one process
# --------------------------------------------------------------------------------------------


def test_pack_and_unpack_average_the_ranks_and_take_the_harmonic_batch() -> None:
    # 3 ranks, 12 samples: shares 6, 6, 0 (an empty rank), observed |g_r|² 1 and 4.
    parts = [pack_local_norm(1.0, 6, 3, 12), pack_local_norm(4.0, 6, 3, 12)]
    parts.append(pack_local_norm(9.0, 0, 3, 12))
    assert parts[2].abs().sum() == 0  # an empty share adds nothing
    got = unpack_local_norms(sum(parts))  # type: ignore[arg-type]
    assert got is not None
    # A 6-sample share holds (3·6/12)·G_6 = 1.5·G_6: |G_6|² = |g|²/2.25.
    small_sq, small_batch = got
    assert small_sq == pytest.approx((1.0 + 4.0) / 2.25 / 2)
    assert small_batch == pytest.approx(6.0)
    uneven = unpack_local_norms(pack_local_norm(1.0, 2, 2, 6) + pack_local_norm(1.0, 4, 2, 6))
    assert uneven is not None and uneven[1] == pytest.approx(2 / (1 / 2 + 1 / 4))
    assert unpack_local_norms(pack_local_norm(1.0, 6, 2, 6) + pack_local_norm(0.0, 0, 2, 6)) is None
    assert mean_gradient_scale(8, 2, 16) == 1.0
    with pytest.raises(ValueError, match="must be positive"):
        mean_gradient_scale(0, 2, 16)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 5, generator=gen), torch.randint(3, (samples,), generator=gen)


def mean_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The per-sample mean gradient over (x, y), computed on its own."""
    clone = copy.deepcopy(model)
    clone.zero_grad()
    nn.functional.cross_entropy(clone(x), y).backward()
    return [p.grad.clone() for p in clone.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 3, 2], [5, 0, 3]])
def test_one_process_micro_steps_give_the_hand_computed_inputs(sizes: list[int]) -> None:
    """The trainer's loss convention (sum × 1/B per micro-batch) on one process: the recorded
    micro-batch norms and the accumulated norm equal those computed batch by batch."""
    model = tiny_model()
    batches = [batch(n, seed) for seed, n in enumerate(sizes)]
    total = sum(sizes)
    norms = MicroStepNorms(model.parameters())
    for rounds in range(2):  # the second update checks that begin_update forgets the first
        model.zero_grad(set_to_none=rounds == 0)
        norms.begin_update()
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * (1 / total)
            loss.backward()
            norms.after_micro_step(len(x))
        got = norms.observations(total)
        assert got is not None
        nonempty = [(x, y) for x, y in batches if len(x)]
        want_small = sum(float(squared_norm(mean_gradient(model, x, y))) for x, y in nonempty)
        want_small /= len(nonempty)
        want_b = len(nonempty) / sum(1 / len(x) for x, _ in nonempty)
        want_big = float(
            squared_norm(
                mean_gradient(
                    model, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
                )
            )
        )
        torch.testing.assert_close(got[0], want_small, rtol=1e-5, atol=0)
        torch.testing.assert_close(got[1], want_b, rtol=1e-12, atol=0)
        torch.testing.assert_close(got[2], want_big, rtol=1e-5, atol=0)
        assert got[3] == total
        # The per-micro-batch norms are far from the accumulated one: a wrong scale would show.
        assert abs(want_small - want_big) > 0.05 * want_big


def test_one_micro_step_cannot_measure() -> None:
    model = tiny_model()
    norms = MicroStepNorms(model.parameters())
    x, y = batch(8, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    norms.after_micro_step(8)
    assert norms.observations(8) is None


# --------------------------------------------------------------------------------------------
# The DDP hook on 2 gloo ranks
# --------------------------------------------------------------------------------------------

WORLD = 2
# Per update: each rank's micro-batch sizes (update 2 is uneven, as the last of an epoch).
UPDATES = [
    [[4, 4], [4, 4]],
    [[3, 2], [2, 0]],
]


def rank_batches(update: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(n, 100 * update + 10 * rank + k) for k, n in enumerate(UPDATES[update][rank])]


def _ddp_worker(rank: int, port: int, out: str, mode: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from distgrow.backends.noise_hook import (
        NoiseHookState,
        all_reduce_local_norm,
        all_reduce_measured,
        mean_local_norm,
        register,
    )
    from distgrow.backends.torch_ddp import Carrier

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # Several buckets: a small bucket cap puts the layers' gradients in separate buckets.
        # "carried": the trainer's DDP, the model in a Carrier whose band carries 3 numbers in
        # the same all-reduce (TorchBackend.carry); the hook must leave them out of the norms.
        module = Carrier(tiny_model(), torch.device("cpu")) if mode == "carried" else tiny_model()
        ddp = DistributedDataParallel(module, bucket_cap_mb=1e-4)
        model = module.inner if isinstance(module, Carrier) else module
        params = list(model.parameters())
        state = NoiseHookState()
        if mode in ("hook", "carried"):
            register(ddp, state)
        optimizer = torch.optim.SGD(params, lr=0.5)
        results = []
        for update, shares in enumerate(UPDATES):
            total = sum(map(sum, shares))
            batches = rank_batches(update, rank)
            state.reset()
            for k, (x, y) in enumerate(batches):
                # "measured": every micro-step under no_sync; the update averages itself.
                sync = k == len(batches) - 1 and mode != "measured"
                context = ddp.no_sync() if not sync else contextlib.nullcontext()
                with context:
                    out_ = ddp(x)
                    loss = nn.functional.cross_entropy(out_, y, reduction="sum") * (WORLD / total)
                    if sync and isinstance(module, Carrier):
                        loss = loss + torch.dot(module.band, torch.tensor([7.0, 1.0, 1e3]))
                    loss.backward()
            local_samples = sum(UPDATES[update][rank])
            if mode == "measured":
                local, global_ = all_reduce_measured(list(ddp.parameters()), None)
                small = mean_local_norm(local, local_samples, total, None, torch.device("cpu"))
            record: dict[str, Any] = {"params": [p.detach().clone() for p in params]}
            if mode == "measured":
                record.update(local=float(local), global_=float(global_), small=small)
                record["global"] = record.pop("global_")
            if mode in ("hook", "carried"):
                record["local"] = float(state.local_sq_norm())
                record["global"] = float(state.global_sq_norm())
                record["buckets"] = state.buckets
                record["small"] = all_reduce_local_norm(
                    state, local_samples, total, torch.device("cpu")
                )
            record["grad"] = [p.grad.clone() for p in params]  # type: ignore[union-attr]
            if isinstance(module, Carrier):  # every rank holds the numbers' mean over ranks
                assert module.band.grad is not None
                record["carried"] = module.band.grad.tolist()
                module.band.grad = None
            optimizer.step()
            optimizer.zero_grad()
            record["after"] = [p.detach().clone() for p in params]
            results.append(record)
        torch.save(results, Path(out) / f"{mode}-{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()


def run_ranks(tmp_path: Path, mode: str) -> list[list[dict[str, Any]]]:
    mp.start_processes(
        _ddp_worker,
        args=(free_port(), str(tmp_path), mode),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    return [torch.load(tmp_path / f"{mode}-{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["hook", "measured", "carried"])
def test_ddp_norms_equal_hand_computed_and_leave_gradients_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # "hook": the communication hook on DDP's buckets; "measured": the update averaged by
    # all_reduce_measured after no_sync micro-steps (what training under DDP uses); "carried":
    # the hook on the trainer's DDP (a Carrier whose band rides in the same all-reduce).
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    hooked = run_ranks(tmp_path, mode)
    plain = run_ranks(tmp_path, "plain")
    model = tiny_model()  # the same start as the ranks; replayed by hand below
    for update, shares in enumerate(UPDATES):
        total = sum(map(sum, shares))
        rank_means, rank_local_sq = [], []
        for rank in range(WORLD):
            batches = [b for b in rank_batches(update, rank) if len(b[0])]
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            mean = mean_gradient(model, x, y)
            # The rank's observed gradient is (world · n / total) · G_n under the convention.
            observed = [g * (WORLD * len(x) / total) for g in mean]
            rank_local_sq.append(float(squared_norm(observed)))
            rank_means.append((float(squared_norm(mean)), len(x)))
        everything = [b for r in range(WORLD) for b in rank_batches(update, r) if len(b[0])]
        full = mean_gradient(
            model, torch.cat([b[0] for b in everything]), torch.cat([b[1] for b in everything])
        )
        for rank in range(WORLD):
            got = hooked[rank][update]
            # DDP puts everything in one bucket at first and rebuilds its buckets after the
            # first update (with the small cap, several: the norms sum over them).
            if mode in ("hook", "carried") and update == 0:
                assert got["buckets"] == 1
            elif mode in ("hook", "carried"):
                assert got["buckets"] > 1
            if mode == "carried":
                assert got["carried"] == [7.0, 1.0, 1e3]  # the same numbers on both ranks
            torch.testing.assert_close(got["local"], rank_local_sq[rank], rtol=1e-5, atol=0)
            torch.testing.assert_close(got["global"], float(squared_norm(full)), rtol=1e-5, atol=0)
            small = got["small"]
            want_small = sum(sq for sq, _ in rank_means) / WORLD
            want_b = WORLD / sum(1 / n for _, n in rank_means)
            torch.testing.assert_close(small[0], want_small, rtol=1e-5, atol=0)
            torch.testing.assert_close(small[1], want_b, rtol=1e-12, atol=0)
            # Averaged exactly as DDP without it: bit-identical gradients and steps (2 ranks).
            for key in ("grad", "after"):
                for a, b in zip(got[key], plain[rank][update][key], strict=True):
                    assert torch.equal(a, b), (update, rank, key)
        # Advance the hand-kept model as the ranks did (SGD, lr 0.5, on the full mean gradient).
        with torch.no_grad():
            for p, g in zip(model.parameters(), full, strict=True):
                p.sub_(0.5 * g)
        for rank in range(WORLD):
            for p, q in zip(model.parameters(), hooked[rank][update]["after"], strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # Update 2 is uneven (5 and 2 samples): its small batch is their harmonic mean.
    assert hooked[0][1]["small"][1] == pytest.approx(2 / (1 / 5 + 1 / 2))


# --------------------------------------------------------------------------------------------
# What a training run logs
# --------------------------------------------------------------------------------------------


def test_step_records_send_the_noise_values_to_wandb() -> None:
    from distgrow.wandb_logger import wandb_metrics

    record = {
        "kind": "step",
        "step": 50,
        "global_batch": 128,
        "train_loss": 0.5,
        "noise/grad_sq": 0.25,
        "noise/b_simple": 812.5,
        "noise/b_simple_window": None,  # not formed in this window: nothing logged
        "noise/measured": 5,
    }
    got = wandb_metrics(record)
    assert got["noise/b_simple"] == 812.5 and got["noise/grad_sq"] == 0.25
    assert got["noise/measured"] == 5 and "noise/b_simple_window" not in got
    # Events carry b_simple as a value, not as a curve.
    assert not any(k.startswith("noise/") for k in wandb_metrics({**record, "kind": "epoch"}))


def test_engines_that_reduce_in_place_are_named_as_not_measured() -> None:
    from types import SimpleNamespace

    from distgrow.backends.noise_hook import attach

    class HorovodBackend(SimpleNamespace):  # the name is what the message shows
        pass

    source, state, why = attach(HorovodBackend(world_size=2), nn.Linear(2, 1))
    assert (source, state) == ("none", None)
    assert "HorovodBackend all-reduces each gradient in place" in why
    assert "backend.name=torch" in why
    source, _, why = attach(HorovodBackend(world_size=1), nn.Linear(2, 1))
    assert source == "none" and "torch backend only, not HorovodBackend" in why
