"""Tests for distgrow.models: shapes, ghost batch norm semantics, invariance, errors."""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgrow.entrypoints import EntryPointError
from distgrow.models import (
    MODELS,
    GhostBatchNorm,
    build_entry_model,
    build_model,
    count_parameters,
    uses_batch_norm,
)

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# (model name, input_shape, extra build kwargs): small inputs keep the suite fast on CPU.
BUILD_CASES: list[tuple[str, tuple[int, ...], dict[str, object]]] = [
    ("mlp", (54,), {}),
    ("mlp", (1, 28, 28), {"hidden": [32, 16], "dropout": 0.1}),
    ("bottleneck_mlp", (54,), {}),
    ("cnn", (1, 28, 28), {}),
    ("cnn", (3, 32, 32), {"ghost_batch": 4, "dropout": 0.2}),
    ("wrn", (3, 32, 32), {"depth": 10, "width": 1, "ghost_batch": 4}),
    ("wrn", (1, 28, 28), {"depth": 10, "width": 1}),
]


def _chunked_batch_norm_reference(
    ghost: GhostBatchNorm, x: Tensor, chunk: int
) -> tuple[Tensor, nn.modules.batchnorm._BatchNorm]:
    """Plain nn.BatchNorm with the ghost layer's parameters, applied chunk by chunk in order."""
    bn_class = nn.BatchNorm1d if x.dim() == 2 else nn.BatchNorm2d
    bn = bn_class(ghost.num_features, eps=ghost.eps, momentum=ghost.momentum)
    bn.load_state_dict(ghost.state_dict())
    bn.train()
    return torch.cat([bn(part) for part in x.split(chunk)]), bn


def _with_plain_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of `model` with every GhostBatchNorm replaced by an equal nn.BatchNorm2d."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, GhostBatchNorm):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
                bn.load_state_dict(child.state_dict())
                setattr(parent, child_name, bn)
    return model


def _summed_loss_gradient(
    model: nn.Module, x: Tensor, y: Tensor, micro_batches: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gradient of the summed loss over x, fed as `micro_batches` equal micro-batches.

    Returns the flat accumulated gradient and the model's buffers afterwards.
    """
    model = copy.deepcopy(model)
    model.train()
    for x_part, y_part in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        F.cross_entropy(model(x_part), y_part, reduction="sum").backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads), {k: v.clone() for k, v in model.named_buffers()}


# ------------------------------------------------------------------------------- building


@pytest.mark.parametrize(("name", "input_shape", "kwargs"), BUILD_CASES)
def test_models_give_batch_by_outputs(
    name: str, input_shape: tuple[int, ...], kwargs: dict[str, object]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=input_shape, num_outputs=7, **kwargs)  # type: ignore[arg-type]
    out = model(torch.randn(5, *input_shape))
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()


def test_every_non_torchvision_model_is_covered() -> None:
    covered = {name for name, _, _ in BUILD_CASES}
    # The transformer takes token ids and gives (batch, seq, vocab): covered in test_lm.py.
    assert covered == set(MODELS) - set(TORCHVISION_MODELS) - {"transformer"}


def test_wrn_16_4_parameter_count() -> None:
    torch.manual_seed(0)
    model = build_model("wrn", input_shape=(3, 32, 32), num_outputs=10)
    # WRN-16-4, CIFAR-10: n = (16 - 4) / 6 = 2 blocks per group, widths 64, 128, 256.
    #   stem conv 3→16:                             3·16·9                    =       432
    #   group 1, block 1 (16→64):  bn 2·16 + conv 16·64·9 + bn 2·64 + conv 64·64·9
    #                              + 1×1 shortcut 16·64                          =    47,264
    #   group 1, block 2 (64→64):  bn 128 + conv 36,864 + bn 128 + conv 36,864   =    73,984
    #   group 2, block 1 (64→128): 128 + 73,728 + 256 + 147,456 + 8,192          =   229,760
    #   group 2, block 2:          256 + 147,456 + 256 + 147,456                 =   295,424
    #   group 3, block 1 (128→256): 256 + 294,912 + 512 + 589,824 + 32,768       =   918,272
    #   group 3, block 2:          512 + 589,824 + 512 + 589,824                 = 1,180,672
    #   final bn 2·256 = 512; head 256·10 + 10 = 2,570
    #   total                                                                    = 2,748,890
    # which is the 2.7M quoted for WRN-16-4 by Zagoruyko & Komodakis (Table 1).
    assert count_parameters(model) == 2_748_890
    # Ghost batch default is the paper's 128, on all 13 batch norms (2 per block × 6, + final).
    ghost_layers = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghost_layers) == 13
    assert {m.ghost_batch for m in ghost_layers} == {128}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_bottleneck_mlp_is_the_article_network() -> None:
    torch.manual_seed(0)
    model = build_model("bottleneck_mlp", input_shape=(54,), num_outputs=7)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (54, 512),
        (512, 256),
        (256, 256),
        (256, 128),
        (128, 256),
        (256, 256),
        (256, 512),
        (512, 7),
    ]
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.25] * 4
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)  # Keras zero bias
    overridden = build_model("bottleneck_mlp", input_shape=(54,), num_outputs=7, dropout=0.5)
    assert [m.p for m in overridden.modules() if isinstance(m, nn.Dropout)] == [0.5] * 4


def test_mlp_layers_and_dropout() -> None:
    model = build_model("mlp", input_shape=(2, 3), num_outputs=4, hidden=[8, 5], dropout=0.3)
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(6, 8), (8, 5), (5, 4)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    default = build_model("mlp", input_shape=(10,), num_outputs=3)
    assert count_parameters(default) == (10 * 512 + 512) + (512 * 512 + 512) + (512 * 3 + 3)


def test_uses_batch_norm() -> None:
    assert uses_batch_norm(build_model("wrn", input_shape=(3, 8, 8), num_outputs=2, depth=10))
    assert uses_batch_norm(build_model("cnn", input_shape=(1, 8, 8), num_outputs=2, ghost_batch=2))
    assert not uses_batch_norm(build_model("cnn", input_shape=(1, 8, 8), num_outputs=2))
    assert not uses_batch_norm(build_model("mlp", input_shape=(4,), num_outputs=2))
    assert uses_batch_norm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))


def test_build_model_is_deterministic_under_manual_seed() -> None:
    def state(seed: int) -> dict[str, Tensor]:
        torch.manual_seed(seed)
        model = build_model("wrn", input_shape=(3, 8, 8), num_outputs=3, depth=10, width=1)
        return model.state_dict()

    first, second, other = state(3), state(3), state(4)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    assert not torch.equal(first["stem.weight"], other["stem.weight"])


# ------------------------------------------------------------------------ ghost batch norm


@pytest.mark.parametrize("shape", [(4 * 3, 5), (4 * 3, 5, 4, 4)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batch_norm_matches_batch_norm_per_chunk(
    shape: tuple[int, ...], momentum: float | None
) -> None:
    torch.manual_seed(0)
    ghost = GhostBatchNorm(5, ghost_batch=3, momentum=momentum)
    with torch.no_grad():  # non-trivial affine params and stats, so copying them matters
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
        ghost.running_mean.uniform_(-1.0, 1.0)
        ghost.running_var.uniform_(0.5, 2.0)
    # Per-chunk offsets make the chunks' statistics differ, so a whole-batch norm would not pass.
    x = torch.randn(shape) + torch.arange(4.0).repeat_interleave(3).view(
        -1, *[1] * (len(shape) - 1)
    )
    expected, bn = _chunked_batch_norm_reference(ghost, x, chunk=3)
    out = ghost(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ghost.running_mean, bn.running_mean)
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    assert bn.num_batches_tracked is not None
    assert ghost.num_batches_tracked.item() == bn.num_batches_tracked.item() == 4
    # One plain BN over the whole batch differs: the chunking is what is being tested.
    whole = F.batch_norm(x, None, None, ghost.weight, ghost.bias, True)
    assert (whole - out).abs().max() > 0.1
    # eval(): running statistics, like nn.BatchNorm.
    ghost.eval()
    bn.eval()
    torch.testing.assert_close(ghost(x), bn(x))


def test_ghost_batch_norm_last_chunk_may_be_smaller() -> None:
    torch.manual_seed(0)
    ghost = GhostBatchNorm(3, ghost_batch=4)
    x = torch.randn(10, 3, 2, 2)  # chunks of 4, 4, 2
    expected, bn = _chunked_batch_norm_reference(ghost, x, chunk=4)
    torch.testing.assert_close(ghost(x), expected)
    torch.testing.assert_close(ghost.running_var, bn.running_var)
    assert int(ghost.num_batches_tracked) == 3


def test_ghost_batch_norm_state_dict_matches_batch_norm() -> None:
    assert GhostBatchNorm(4, 2).state_dict().keys() == nn.BatchNorm2d(4).state_dict().keys()


def test_ghost_batch_norm_rejects_single_value_chunk() -> None:
    ghost = GhostBatchNorm(3, ghost_batch=4)
    with pytest.raises(ValueError, match="ghost batch of 1 sample"):
        ghost(torch.randn(5, 3))  # chunks of 4 and 1: the last has no variance


def test_ghost_batch_norm_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, \.\.\.\).*\(4, 5\)"):
        GhostBatchNorm(3, ghost_batch=2)(torch.randn(4, 5))


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3, 3)])
def test_ghost_batch_norm_empty_batch(shape: tuple[int, ...]) -> None:
    ghost = GhostBatchNorm(4, ghost_batch=2)
    ghost(torch.randn(6, *shape[1:]) * 3 + 1)  # move the stats off their initial values
    before = {k: v.clone() for k, v in ghost.named_buffers()}
    out = ghost(torch.empty(shape))
    assert out.shape == shape
    for key, value in ghost.named_buffers():
        assert torch.equal(value, before[key]), key
    # Still attached to the affine params, so DDP sees a (zero) gradient for each.
    out.sum().backward()
    assert ghost.weight.grad is not None and torch.count_nonzero(ghost.weight.grad) == 0


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("cnn", {"ghost_batch": 2}), ("wrn", {"depth": 10, "width": 1, "ghost_batch": 2})],
)
def test_models_pass_an_empty_batch_without_touching_buffers(
    name: str, kwargs: dict[str, object]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=(3, 8, 8), num_outputs=5, **kwargs)  # type: ignore[arg-type]
    model.train()
    model(torch.randn(4, 3, 8, 8))
    before = {k: v.clone() for k, v in model.named_buffers()}
    assert before  # the check below must have something to check
    out = model(torch.empty(0, 3, 8, 8))
    assert out.shape == (0, 5)
    for key, value in model.named_buffers():
        assert torch.equal(value, before[key]), key
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- the key invariance


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("cnn", {}), ("wrn", {"depth": 10, "width": 1})],
)
def test_ghost_bn_gradient_does_not_depend_on_micro_batching(
    name: str, kwargs: dict[str, object]
) -> None:
    g = 4
    torch.manual_seed(0)
    model = build_model(name, input_shape=(3, 8, 8), num_outputs=5, ghost_batch=g, **kwargs)  # type: ignore[arg-type]
    x = torch.randn(4 * g, 3, 8, 8) + torch.linspace(-2, 2, 4 * g).view(-1, 1, 1, 1)
    y = torch.randint(0, 5, (4 * g,))

    reference, reference_buffers = _summed_loss_gradient(model, x, y, micro_batches=1)
    scale = reference.abs().max().item()
    assert scale > 0
    for micro_batches in (2, 4):
        grad, buffers = _summed_loss_gradient(model, x, y, micro_batches=micro_batches)
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6 * scale)
        for key, value in buffers.items():
            torch.testing.assert_close(value, reference_buffers[key], rtol=1e-5, atol=1e-6)

    # The same model with plain batch norm is not invariant: the test can tell them apart.
    plain = _with_plain_batch_norm(model)
    assert uses_batch_norm(plain)
    assert not any(isinstance(m, GhostBatchNorm) for m in plain.modules())
    plain_whole, _ = _summed_loss_gradient(plain, x, y, micro_batches=1)
    plain_split, _ = _summed_loss_gradient(plain, x, y, micro_batches=4)
    # Fed as micro-batches of g, plain BN equals ghost BN; as one batch of 4g it does not.
    torch.testing.assert_close(plain_split, reference, rtol=1e-5, atol=1e-6 * scale)
    assert (plain_whole - plain_split).abs().max().item() > 1e-2 * scale


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("lstm", {}, r"'lstm'.*mlp, bottleneck_mlp, cnn, wrn, resnet18"),
        ("wrn", {"depth": 15}, r"depth \(15\).*6n \+ 4.*use 16"),
        ("wrn", {"depth": 4}, r"depth \(4\)"),
        ("wrn", {"width": 0}, r"width \(0\).*>= 1"),
        ("wrn", {"ghost_batch": 0}, r"ghost_batch \(0\).*>= 1"),
        ("cnn", {"ghost_batch": -3}, r"ghost_batch \(-3\)"),
        ("mlp", {"ghost_batch": 8}, r"ghost_batch \(8\).*'mlp' has no batch norm"),
        ("cnn", {"hidden": [4]}, r"hidden \(\[4\]\) applies only to 'mlp'"),
        ("mlp", {"hidden": [4, 0]}, r"hidden \(\[4, 0\]\)"),
        ("mlp", {"dropout": 1.0}, r"dropout \(1\.0\).*\[0, 1\)"),
        ("mlp", {"num_outputs": 0}, r"num_outputs \(0\)"),
        ("cnn", {"input_shape": (784,)}, r"\(C, H, W\) but got \(784,\).*'mlp'"),
        ("wrn", {"input_shape": (28, 28)}, r"wrn needs an image input_shape.*\(28, 28\)"),
        ("resnet18", {"input_shape": (54,)}, r"resnet18 needs an image input_shape"),
        ("cnn", {"input_shape": (1, 3, 3)}, r"\(1, 3, 3\).*at least 4×4"),
        ("mlp", {"input_shape": (0, 4)}, r"input_shape \(0, 4\)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(
    name: str, kwargs: dict[str, object], pattern: str
) -> None:
    args: dict[str, object] = {"input_shape": (3, 32, 32), "num_outputs": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        build_model(name, **args)  # type: ignore[arg-type]


def test_ghost_batch_norm_constructor_rejects_bad_ghost_batch() -> None:
    with pytest.raises(ValueError, match=r"ghost_batch \(0\)"):
        GhostBatchNorm(4, ghost_batch=0)


# ------------------------------------------------------------------------ torchvision


@pytest.mark.parametrize("ghost_batch", [None, 2])
def test_resnet18_builds_or_says_torchvision_is_missing(ghost_batch: int | None) -> None:
    torch.manual_seed(0)
    if HAS_TORCHVISION:
        model = build_model(
            "resnet18", input_shape=(1, 32, 32), num_outputs=6, ghost_batch=ghost_batch
        )
        assert model(torch.randn(4, 1, 32, 32)).shape == (4, 6)
        assert uses_batch_norm(model)
        has_ghost = any(isinstance(m, GhostBatchNorm) for m in model.modules())
        assert has_ghost == (ghost_batch is not None)
    else:
        with pytest.raises(ImportError, match=r"resnet18 needs torchvision.*'wrn'.*'cnn'"):
            build_model("resnet18", input_shape=(1, 32, 32), num_outputs=6, ghost_batch=ghost_batch)


def test_resnet_wiring_with_a_stand_in_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs everywhere (torchvision is absent on CPU-only torch): checks what build_model asks of
    # torchvision (no weights, num_classes, a GhostBatchNorm norm_layer) and the stem swap.
    calls: list[dict[str, object]] = []

    def fake_resnet18(**kwargs: object) -> nn.Module:
        calls.append(kwargs)
        norm_layer = kwargs.get("norm_layer", nn.BatchNorm2d)
        assert callable(norm_layer)
        model = nn.Module()
        model.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        model.bn1 = norm_layer(64)
        return model

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(  # type: ignore[attr-defined]
        resnet18=fake_resnet18, resnet34=fake_resnet18, resnet50=fake_resnet18
    )
    monkeypatch.setitem(sys.modules, "torchvision", fake)

    model = build_model("resnet18", input_shape=(1, 28, 28), num_outputs=6, ghost_batch=16)
    assert calls[-1]["weights"] is None and calls[-1]["num_classes"] == 6
    assert isinstance(model.bn1, GhostBatchNorm) and model.bn1.ghost_batch == 16
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 1

    model = build_model("resnet50", input_shape=(3, 32, 32), num_outputs=6)
    assert "norm_layer" not in calls[-1]
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 3


# ------------------------------------------------------------------------ entry points


def test_an_entry_point_model_is_built_from_its_kwargs(tmp_path: Path) -> None:
    (tmp_path / "nets.py").write_text(
        "from torch import nn\n"
        "def tiny(width, out=2):\n"
        "    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, out))\n"
    )
    name = f"{tmp_path / 'nets.py'}:tiny"
    torch.manual_seed(5)
    model = build_entry_model(name, {"width": 7, "out": 4})
    assert model.training and count_parameters(model) == 3 * 7 + 7 + 7 * 4 + 4
    torch.manual_seed(5)
    again = build_entry_model(name, {"width": 7, "out": 4})
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # drawn from torch's global RNG, like the built-ins
    with pytest.raises(EntryPointError, match=r"model.name = .*failed \(TypeError"):
        build_entry_model(name, {"depth": 3})


@pytest.mark.skipif(
    not HAS_TORCHVISION, reason="torchvision is not installed: the error is tested below"
)
def test_a_torchvision_entry_point_builds_where_torchvision_imports() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(EntryPointError, match="torchvision is not importable here"):
            build_entry_model("torchvision.models:resnet18", {"num_classes": 6})
        return
    model = build_entry_model("torchvision.models:resnet18", {"num_classes": 6})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)


def test_a_torchvision_entry_point_says_how_to_get_torchvision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A torchvision whose import fails the way a CUDA build does with CPU torch.
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ModuleNotFoundError
    with pytest.raises(EntryPointError) as info:
        build_entry_model("torchvision.models:resnet50", {"num_classes": 10})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model.name = 'torchvision.models:resnet50': torchvision is not")
    assert f"install the torchvision built for your torch (torch {torch.__version__})" in message


def test_a_torchvision_entry_point_goes_through_the_same_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = types.ModuleType("torchvision")
    fake_models = types.ModuleType("torchvision.models")
    fake_models.resnet50 = lambda num_classes: nn.Linear(2, num_classes)  # type: ignore[attr-defined]
    fake.models = fake_models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake_models)
    model = build_entry_model("torchvision.models:resnet50", {"num_classes": 10})
    assert isinstance(model, nn.Linear) and model.out_features == 10
