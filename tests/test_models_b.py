"""Family-specific checks for Wide ResNet, DenseNet and PyramidNet (registry-wide checks live in test_models.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import cifar_models  # noqa: F401  (registers the models)
from cifar_models.cifar_densenet import DenseNet, DenseTransition, densenet_stage_channels
from cifar_models.cifar_pyramidnet import PyramidBasicBlock, PyramidBottleneckBlock, PyramidNet, pyramidnet_widths
from cifar_models.cifar_wrn import WideBasicBlock, WideResNet

# Seed project's parameter counts (10 classes, 3x32x32); the bottleneck families here follow the seed too.
PARAM_COUNTS = {
    "wrn16_4": 2_748_890,
    "wrn16_8": 10_961_370,
    "wrn28_10": 36_479_194,
    "wrn40_4": 8_949_210,
    "densenet40_k12": 1_059_298,
    "densenet100_k12": 7_083_538,
    "densenet100_k24": 28_071_706,
    "densenet_bc100_k12": 769_162,
    "densenet_bc250_k24": 15_324_406,
    "densenet_bc190_k40": 25_624_430,
    "pyramidnet110_84": 3_904_446,
    "pyramidnet110_270": 28_485_477,
    "pyramidnet164_270": 27_216_021,
    "pyramidnet272_200": 26_210_842,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count_matches_seed(name: str) -> None:
    # Built on the meta device: same modules and shapes, no memory or init time.
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]
    assert model.num_features == model.feature_info[-1]["num_chs"]


# --- Wide ResNet ---------------------------------------------------------------------------------


def test_wrn_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with_dropout = WideResNet(depth=10, widen_factor=1, proj_drop_rate=0.5)
    without = WideResNet(depth=10, widen_factor=1, proj_drop_rate=0.0)
    with_dropout.train()
    without.train()
    # BN in train mode is deterministic, so only dropout can make two passes differ.
    assert not torch.equal(with_dropout(x), with_dropout(x))
    assert torch.equal(without(x), without(x))
    with_dropout.eval()
    assert torch.equal(with_dropout(x), with_dropout(x))


def test_wrn_proj_drop_rate_reaches_every_block() -> None:
    model = timm.create_model("wrn16_4", proj_drop_rate=0.3)
    blocks = [m for m in model.modules() if isinstance(m, WideBasicBlock)]
    assert len(blocks) == 6  # (16 - 4) / 6 = 2 blocks x 3 stages
    assert all(b.proj_drop_rate == 0.3 for b in blocks)
    assert model.head.drop.p == 0.0  # drop_rate is the classifier's


@pytest.mark.parametrize(("in_chs", "out_chs", "stride"), [(8, 8, 1), (8, 16, 2)])
def test_wrn_block_shortcut(in_chs: int, out_chs: int, stride: int) -> None:
    """Identity on the raw input at equal width; a 1x1 conv of the pre-activated input when widening."""
    block = WideBasicBlock(in_chs, out_chs, stride).eval()
    nn.init.zeros_(block.conv2.weight)  # residual branch now contributes nothing
    with torch.no_grad():
        block.bn1.running_mean.uniform_(-1, 1)
        x = torch.randn(2, in_chs, 8, 8)
        out = block(x)
        expected = x if in_chs == out_chs else block.shortcut(F.relu(block.bn1(x)))
    assert torch.allclose(out, expected)


def test_wrn_uses_kaiming_fan_in() -> None:
    torch.manual_seed(0)
    model = WideResNet(depth=16, widen_factor=8)
    conv = model.stages[1][0].conv1  # 128 -> 256 channels: fan_in and fan_out differ by 2x
    fan_in = conv.in_channels * 9
    fan_out = conv.out_channels * 9
    std = conv.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert std != pytest.approx(math.sqrt(2 / fan_out), rel=0.2)


# --- DenseNet ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("depth", "k", "block_type", "compression", "expected"),
    [
        (40, 12, "basic", 1.0, [(24, 168), (168, 312), (312, 456)]),
        (100, 12, "bottleneck", 0.5, [(24, 216), (108, 300), (150, 342)]),
        (190, 40, "bottleneck", 0.5, [(80, 1320), (660, 1900), (950, 2190)]),
    ],
)
def test_densenet_channel_arithmetic(
    depth: int, k: int, block_type: str, compression: float, expected: list[tuple[int, int]]
) -> None:
    assert densenet_stage_channels(depth, k, block_type, compression) == expected


def test_densenet_layers_concatenate_and_transitions_compress() -> None:
    model = DenseNet(depth=16, growth_rate=4, block_type="bottleneck", compression_rate=0.5).eval()
    # (16 - 4) / 6 = 2 layers per stage; stem 8 -> 16, transition 8 -> 16, transition 8 -> 16
    assert [info["num_chs"] for info in model.feature_info] == [8, 16, 16, 16]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = model.stem(x)
        first_layer = model.stages[0][0]
        out = first_layer(stem)
    assert out.shape == (2, 8 + 4, 32, 32)
    assert torch.equal(out[:, :8], stem)  # dense connectivity: the input passes through unchanged
    transition = model.stages[1][0]
    assert isinstance(transition, DenseTransition)
    assert (transition.conv.in_channels, transition.conv.out_channels) == (16, 8)
    with torch.no_grad():
        assert transition(torch.randn(2, 16, 32, 32)).shape == (2, 8, 16, 16)


def test_densenet_basic_has_no_compression() -> None:
    with torch.device("meta"):
        model = timm.create_model("densenet40_k12")
    transitions = [m for m in model.modules() if isinstance(m, DenseTransition)]
    assert len(transitions) == 2
    assert all(t.conv.in_channels == t.conv.out_channels for t in transitions)


# --- PyramidNet ----------------------------------------------------------------------------------


def test_pyramidnet_widths_grow_linearly() -> None:
    widths = pyramidnet_widths(depth=110, alpha=84, block_type="basic")
    assert len(widths) == 1 + 54  # stem + (110 - 2) / 2 blocks
    assert widths[0] == 16 and widths[-1] == 16 + 84
    steps = {b - a for a, b in itertools.pairwise(widths)}
    assert steps <= {1, 2}  # 84 / 54 channels per block, rounded per block
    bottleneck = pyramidnet_widths(depth=164, alpha=270, block_type="bottleneck")
    assert bottleneck[0] == 16 and bottleneck[-1] == (16 + 270) * 4


@pytest.mark.parametrize(
    ("block_cls", "in_chs", "out_chs"), [(PyramidBasicBlock, 6, 9), (PyramidBottleneckBlock, 8, 16)]
)
@pytest.mark.parametrize("stride", [1, 2])
def test_pyramidnet_shortcut_is_zero_padded(block_cls: type[nn.Module], in_chs: int, out_chs: int, stride: int) -> None:
    block = block_cls(in_chs, out_chs, stride).eval()
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    last_bn = block.bn3 if block_cls is PyramidBasicBlock else block.bn4
    nn.init.zeros_(last_bn.weight)  # residual branch now outputs exactly zero
    x = torch.randn(2, in_chs, 8, 8)
    with torch.no_grad():
        out = block(x)
    pooled = F.avg_pool2d(x, 2) if stride == 2 else x
    assert out.shape == (2, out_chs, 8 // stride, 8 // stride)
    assert torch.allclose(out[:, :in_chs], pooled)
    assert torch.count_nonzero(out[:, in_chs:]) == 0


def test_pyramidnet_stem_has_bn_without_relu() -> None:
    model = PyramidNet(depth=11, alpha=12, block_type="bottleneck").eval()
    x = torch.randn(2, 3, 32, 32)
    features = timm.create_model("pyramidnet110_84", features_only=True, out_indices=(0,)).eval()
    with torch.no_grad():
        stem = model.stem(x)
        assert (stem < 0).any()  # no ReLU after the stem BN
        assert (features(x)[0] < 0).any()


# --- Shared options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: WideResNet(depth=12), "6n \\+ 4"),
        (lambda: DenseNet(depth=40, block_type="basik"), "'basik'"),
        (lambda: DenseNet(depth=41, block_type="bottleneck"), "41"),
        (lambda: DenseNet(depth=40, compression_rate=0.0), "compression_rate"),
        (lambda: PyramidNet(depth=100, block_type="bottleneck"), "9n \\+ 2"),
        (lambda: PyramidNet(depth=110, alpha=-1, block_type="basic"), "alpha"),
        (lambda: WideResNet(depth=10, init_mode="xavier"), "'xavier'"),
    ],
)
def test_bad_arguments_name_the_value(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "model",
    [
        WideResNet(depth=10, widen_factor=2, proj_drop_rate=0.1, in_chans=1),
        DenseNet(depth=10, growth_rate=4, block_type="bottleneck", in_chans=1),
        DenseNet(depth=7, growth_rate=4, block_type="basic", compression_rate=1.0, in_chans=1),
        PyramidNet(depth=8, alpha=6, block_type="basic", in_chans=1),
        PyramidNet(depth=11, alpha=6, block_type="bottleneck", in_chans=1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_small_variants_on_mnist_shaped_input(model: nn.Module) -> None:
    """28x28 single-channel input: features at 7x7, logits, gradients, grad checkpointing, scripting."""
    x = torch.randn(2, 1, 28, 28)
    assert model.forward_features(x).shape == (2, model.num_features, 7, 7)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
