"""ResNeXt-29 and Shake-Shake-26: exact parameter counts, grouped convs, and the shake-shake mixing."""

import pytest
import timm
import torch

import cifar_models  # noqa: F401  (registers the models)
from cifar_models.cifar_resnext import ResNeXt, ResNeXtBottleneck
from cifar_models.cifar_shake_shake import (
    ShakeShakeBlock,
    ShakeShakeMix,
    ShakeShakeResNet,
    draw_shake_weights,
    shake_shake_mix,
)

PARAM_COUNTS = {
    "resnext29_4x64d": 17_562_442,
    "resnext29_8x64d": 34_426_698,
    "resnext29_16x64d": 68_155_210,
    "shake_shake26_2x32d": 2_923_162,
    "shake_shake26_2x64d": 11_653_978,
    "shake_shake26_2x96d": 26_192_922,
    "shake_shake26_2x128d": 46_539_994,
}


@pytest.mark.parametrize("name,expected", PARAM_COUNTS.items())
def test_parameter_count(name: str, expected: int) -> None:
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name,cardinality", [("resnext29_4x64d", 4), ("resnext29_8x64d", 8), ("resnext29_16x64d", 16)])
def test_resnext_grouped_conv_cardinality(name: str, cardinality: int) -> None:
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


def test_resnext_features_and_mnist_input() -> None:
    model = timm.create_model("resnext29_4x64d", in_chans=1, num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    features = timm.create_model("resnext29_4x64d", features_only=True)(torch.randn(2, 3, 32, 32))
    assert [f.shape[1:] for f in features] == [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8)]


@pytest.mark.parametrize("cls,depth,allowed", [(ResNeXt, 30, "9 \\* n \\+ 2"), (ShakeShakeResNet, 25, "6 \\* n \\+ 2")])
def test_bad_depth_is_named(cls: type, depth: int, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"{allowed}.*got {depth}"):
        cls(depth=depth)


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


@pytest.mark.parametrize("per_image,shape", [(True, (4, 1, 1, 1)), (False, (1, 1, 1, 1))])
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
    model = timm.create_model("shake_shake26_2x32d").train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_no_shake_forward_gives_deterministic_training_forward() -> None:
    model = timm.create_model("shake_shake26_2x32d", shake_forward=False).train()
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


def test_shake_shake_features_and_mnist_input() -> None:
    model = timm.create_model("shake_shake26_2x32d", in_chans=1, num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    features = timm.create_model("shake_shake26_2x32d", features_only=True)(torch.randn(2, 3, 32, 32))
    assert [f.shape[1:] for f in features] == [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]
    assert (features[-1] >= 0).all()  # the last feature map is taken after the final ReLU


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
