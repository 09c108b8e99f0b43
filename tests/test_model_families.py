"""Family-specific architecture checks: what makes each CIFAR family itself (block wiring, widths, shortcuts,
dropout placement, shake-shake mixing). The timm contract and parameter counts of every registered model are
checked in test_models.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import cifar_models  # noqa: F401  (registers the models)
from cifar_models.cifar_densenet import (
    DenseBasicLayer,
    DenseBottleneckLayer,
    DenseNet,
    DenseTransition,
    densenet_stage_channels,
)
from cifar_models.cifar_pyramidnet import PyramidBasicBlock, PyramidBottleneckBlock, PyramidNet, pyramidnet_widths
from cifar_models.cifar_resnext import ResNeXt, ResNeXtBottleneck
from cifar_models.cifar_shake_shake import (
    ShakeShakeBlock,
    ShakeShakeMix,
    ShakeShakeResNet,
    draw_shake_weights,
    shake_shake_mix,
)
from cifar_models.cifar_wrn import WideBasicBlock, WideResNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- Bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet20", dict(depth=21)),
        ("resnet164", dict(depth=30)),  # 30 is not 9n + 2
        ("resnet_preact20", dict(block_type="bottle")),
        ("resnet_preact20", dict(preact_stage=(True, False))),
        ("se_resnet_preact110", dict(se_reduction=64)),  # 16 channels cannot be reduced 64-fold
        ("vgg15_bn", dict(layers=(2, 2, 3))),
    ],
)
def test_bad_architecture_kwargs_are_value_errors(name: str, kwargs: dict):
    with pytest.raises(ValueError, match="got"):
        timm.create_model(name, **kwargs)


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
        (lambda: ResNeXt(depth=30), "9 \\* n \\+ 2.*got 30"),
        (lambda: ShakeShakeResNet(depth=25), "6 \\* n \\+ 2.*got 25"),
    ],
)
def test_bad_arguments_name_the_value(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# --- ResNet-preact ------------------------------------------------------------------------------


def test_se_resnet_preact_switches_are_kwargs():
    """The registered SE default (no first ReLU, last BN, preact stages T/F/F) differs from plain switches."""
    with torch.device("meta"):
        default = timm.create_model("se_resnet_preact110")
        plain = timm.create_model(
            "se_resnet_preact110", remove_first_relu=False, add_last_bn=False, preact_stage=(True,) * 3
        )
    block = default.stages[1][0]
    assert not block.preact and isinstance(block.act1, nn.Identity) and isinstance(block.bn3, nn.BatchNorm2d)
    assert plain.stages[1][0].preact and isinstance(plain.stages[1][0].bn3, nn.Identity)
    # the last-BN layers account for the difference: 2 x channels per block, 18 blocks per stage
    assert _n_params(default) - _n_params(plain) == 2 * 18 * (16 + 32 + 64)


def test_preact_first_block_shortcut_sees_preactivation():
    """With preact on, the shortcut of a stage's first block takes BN-ReLU(x), so it ignores negative inputs."""
    torch.manual_seed(0)
    model = timm.create_model("resnet_preact20", preact_stage=(True, False, False)).eval()
    on, off = model.stages[0][0], model.stages[1][0]
    x_on, x_off = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        # bn1 with running stats 0/1 and weight 1 is ~identity, so only x > 0 reaches the shortcut through ReLU
        torch.testing.assert_close(on(x_on), on(x_on.clamp(min=0)))
        assert not torch.allclose(off(x_off), off(x_off.clamp(min=0)))


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


@pytest.mark.parametrize(
    ("name", "block_types", "n_blocks"),
    [
        ("wrn16_4", (WideBasicBlock,), 6),  # (16 - 4) / 6 = 2 blocks x 3 stages
        ("densenet40_k12", (DenseBasicLayer, DenseTransition), 36 + 2),  # (40 - 4) / 3 layers + 2 transitions
        ("densenet_bc100_k12", (DenseBottleneckLayer, DenseTransition), 48 + 2),  # (100 - 4) / 6 layers
    ],
    ids=["wrn16_4", "densenet40_k12", "densenet_bc100_k12"],
)
def test_proj_drop_rate_is_in_block_and_drop_rate_is_the_classifiers(
    name: str, block_types: tuple[type, ...], n_blocks: int
) -> None:
    """timm's names: `proj_drop_rate` reaches every block (the WRN / DenseNet papers' dropout), `drop_rate` only
    the classifier head."""
    with torch.device("meta"):
        in_block = timm.create_model(name, proj_drop_rate=0.3)
        in_head = timm.create_model(name, drop_rate=0.3)
    blocks = [m for m in in_block.modules() if isinstance(m, block_types)]
    assert len(blocks) == n_blocks
    assert all(b.proj_drop_rate == 0.3 for b in blocks) and in_block.head.drop.p == 0.0
    assert all(b.proj_drop_rate == 0.0 for b in in_head.modules() if isinstance(b, block_types))
    assert in_head.head.drop.p == 0.3


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
    model = WideResNet(depth=10, widen_factor=8)
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
    """The stem is conv-BN with no ReLU, and it is feature level 0 as it stands."""
    model = PyramidNet(depth=11, alpha=12, block_type="bottleneck").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = model.stem(x)
        (level0,) = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert list(model.stem) == [model.stem.conv, model.stem.bn]
    assert (stem < 0).any()  # no ReLU after the stem BN
    assert torch.equal(level0, stem)


# --- ResNeXt -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cardinality"), [("resnext29_4x64d", 4), ("resnext29_8x64d", 8), ("resnext29_16x64d", 16)]
)
def test_resnext_grouped_conv_cardinality(name: str, cardinality: int) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    for stage_idx, stage in enumerate(model.stages):
        assert len(stage) == 3  # depth 29 = 9 * 3 + 2
        for block in stage:
            assert isinstance(block, ResNeXtBottleneck)
            assert block.conv2.groups == cardinality
            # each group is 64 channels wide in stage 1 and doubles per stage
            assert block.conv2.out_channels == cardinality * 64 * 2**stage_idx
            assert block.conv3.out_channels == 256 * 2**stage_idx
    assert model.num_features == 1024
    assert [f["num_chs"] for f in model.feature_info] == [64, 256, 512, 1024]
    assert [f["reduction"] for f in model.feature_info] == [1, 1, 2, 4]


# --- Shake-Shake ---------------------------------------------------------------------------------


def test_mix_forward_uses_alpha_backward_uses_beta() -> None:
    x1 = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]], requires_grad=True)  # (2, 1, 1, 2)
    x2 = torch.tensor([[[[10.0, 20.0]]], [[[30.0, 40.0]]]], requires_grad=True)
    alpha = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1)
    beta = torch.tensor([0.9, 0.1]).view(2, 1, 1, 1)
    out = ShakeShakeMix.apply(x1, x2, alpha, beta)
    # image 0: 0.25 * x1 + 0.75 * x2; image 1: 0.75 * x1 + 0.25 * x2
    expected = torch.tensor([[[[7.75, 15.5]]], [[[9.75, 13.0]]]])
    torch.testing.assert_close(out, expected)
    weights = torch.tensor([[[[1.0, -2.0]]], [[[3.0, 0.5]]]])
    (out * weights).sum().backward()
    # d/dx1 = beta * weights, d/dx2 = (1 - beta) * weights -- alpha plays no part
    torch.testing.assert_close(x1.grad, torch.tensor([[[[0.9, -1.8]]], [[[0.3, 0.05]]]]))
    torch.testing.assert_close(x2.grad, torch.tensor([[[[0.1, -0.2]]], [[[2.7, 0.45]]]]))


def test_mix_wrapper_matches_function() -> None:
    x1, x2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    alpha = torch.rand(2, 1, 1, 1)
    torch.testing.assert_close(shake_shake_mix(x1, x2, alpha, alpha), ShakeShakeMix.apply(x1, x2, alpha, alpha))


@pytest.mark.parametrize(("per_image", "shape"), [(True, (4, 1, 1, 1)), (False, (1, 1, 1, 1))])
def test_draw_shake_weights(per_image: bool, shape: tuple[int, ...]) -> None:
    x = torch.zeros(4, 3, 8, 8)
    torch.manual_seed(0)
    weights = draw_shake_weights(x, shake=True, per_image=per_image)
    assert weights.shape == shape
    assert ((weights > 0) & (weights < 1)).all()
    if per_image:
        assert weights.unique().numel() == 4
    torch.testing.assert_close(draw_shake_weights(x, shake=False, per_image=per_image), torch.full((1, 1, 1, 1), 0.5))


def test_training_forward_is_stochastic_eval_is_deterministic() -> None:
    model = ShakeShakeResNet(depth=8, initial_channels=8).train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_no_shake_forward_gives_deterministic_training_forward() -> None:
    model = ShakeShakeResNet(depth=8, initial_channels=8, shake_forward=False).train()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))


def test_eval_block_is_branch_average() -> None:
    block = ShakeShakeBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 8, 8)
    expected = block.shortcut(x) + 0.5 * (block.branch1(x) + block.branch2(x))
    torch.testing.assert_close(block(x), expected)


def _input_grad(block: ShakeShakeBlock, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    block(x).sum().backward()
    return x.grad


def test_block_backward_shake_changes_gradient_not_output() -> None:
    """With alpha fixed at 0.5 and beta random, outputs agree across draws but input gradients differ."""
    block = ShakeShakeBlock(8, 8, shake_forward=False, shake_backward=True).train()
    x = torch.randn(2, 8, 6, 6)
    torch.manual_seed(1)
    out1 = block(x)
    torch.manual_seed(2)
    torch.testing.assert_close(block(x), out1)
    assert not torch.allclose(_input_grad(block, x, 1), _input_grad(block, x, 2))
    block_no_shake = ShakeShakeBlock(8, 8, shake_forward=False, shake_backward=False).train()
    torch.testing.assert_close(_input_grad(block_no_shake, x, 1), _input_grad(block_no_shake, x, 2))


def test_shake_shake_last_level_is_after_the_final_relu() -> None:
    model = ShakeShakeResNet(depth=8, initial_channels=8).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, 32, 32), intermediates_only=True)
    assert [m.shape[1:] for m in maps] == [(16, 32, 32), (8, 32, 32), (16, 16, 16), (32, 8, 8)]
    assert (maps[-1] >= 0).all() and (maps[-2] < 0).any()  # only the last level went through the ReLU


def test_shake_shake_fx_keeps_custom_backward() -> None:
    """FX tracing must keep the mix as one call (else the traced graph silently back-propagates with alpha)."""
    model = ShakeShakeResNet(depth=8, initial_channels=8).train()
    graph = torch.fx.symbolic_trace(model)
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert shake_shake_mix in targets
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    traced = graph(x)
    torch.manual_seed(0)
    torch.testing.assert_close(traced, model(x))


def test_shake_shake_scripts_and_runs_in_training() -> None:
    """The autograd Function is called through `torch.jit.ignore`: scripting works (saving the script does not)."""
    model = ShakeShakeResNet(depth=8, initial_channels=8)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    scripted.train()
    scripted(x).sum().backward()
    model.eval()
    scripted.eval()
    torch.testing.assert_close(scripted(x), model(x))


# --- Shallow instances on MNIST-shaped input ------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: WideResNet(depth=10, widen_factor=2, proj_drop_rate=0.1, in_chans=1),
        lambda: DenseNet(depth=10, growth_rate=4, block_type="bottleneck", proj_drop_rate=0.1, in_chans=1),
        lambda: DenseNet(depth=7, growth_rate=4, block_type="basic", compression_rate=1.0, in_chans=1),
        lambda: PyramidNet(depth=8, alpha=6, block_type="basic", in_chans=1),
        lambda: PyramidNet(depth=11, alpha=6, block_type="bottleneck", in_chans=1),
        lambda: ResNeXt(depth=11, cardinality=2, base_channels=4, initial_channels=8, in_chans=1),
        lambda: ShakeShakeResNet(depth=8, initial_channels=8, in_chans=1),
    ],
    ids=["wrn", "densenet_bc", "densenet", "pyramidnet", "pyramidnet_bottleneck", "resnext", "shake_shake"],
)
def test_shallow_instances_on_mnist_shaped_input(build) -> None:
    """28x28 single-channel input: features at 7x7, logits, and gradients through grad checkpointing, for
    constructor arguments the registered variants do not use."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 1, 28, 28)
    assert model.forward_features(x).shape == (2, model.num_features, 7, 7)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
