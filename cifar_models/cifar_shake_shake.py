"""Shake-Shake regularised ResNet-26 for CIFAR.

Paper: `Shake-Shake regularization` - https://arxiv.org/abs/1705.07485

Each block has two residual branches (ReLU-conv-BN-ReLU-conv-BN) that are mixed as
`alpha * b1 + (1 - alpha) * b2` in the forward pass while the gradient flows back as
`beta * g` and `(1 - beta) * g`, with alpha and beta drawn independently from U(0, 1) per image
("Image" level) or once per batch ("Batch" level). The default is the paper's S-S-I
(shake forward, shake backward, per image). In eval mode the two branches are averaged.
Same layers, order and initialisation as `models/cifar/shake_shake.py` of
hysts/pytorch_image_classification (16-channel stem, widths initial_channels * (1, 2, 4)).
"""

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models import generate_default_cfgs, register_model

from ._builder import CifarNet, build_cifar_model, cifar_cfg, conv_stem, init_weights

__all__ = [
    "ShakeShakeBlock",
    "ShakeShakeBranch",
    "ShakeShakeMix",
    "ShakeShakeResNet",
    "ShakeShakeShortcut",
    "draw_shake_weights",
    "shake_shake_mix",
]


class ShakeShakeMix(torch.autograd.Function):
    """`alpha * x1 + (1 - alpha) * x2` forward; gradients `beta * g` and `(1 - beta) * g` backward."""

    @staticmethod
    def forward(ctx: Any, x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(beta)
        return alpha * x1 + (1.0 - alpha) * x2

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (beta,) = ctx.saved_tensors
        grad_x1 = grad_output * beta if ctx.needs_input_grad[0] else None
        grad_x2 = grad_output * (1.0 - beta) if ctx.needs_input_grad[1] else None
        return grad_x1, grad_x2, None, None


@register_notrace_function
@torch.jit.ignore
def shake_shake_mix(x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Apply `ShakeShakeMix`; a leaf for FX tracing and a Python call under TorchScript."""
    return ShakeShakeMix.apply(x1, x2, alpha, beta)


torch.fx.wrap("shake_shake_mix")  # keep it a leaf under plain `torch.fx.symbolic_trace` too


def draw_shake_weights(x: torch.Tensor, shake: bool, per_image: bool) -> torch.Tensor:
    """Mixing weight(s) broadcastable to `x` (N, C, H, W): U(0, 1) per image or per batch, or 0.5 when not shaking."""
    if not shake:
        return torch.full((1, 1, 1, 1), 0.5, dtype=x.dtype, device=x.device)
    num = x.shape[0] if per_image else 1
    return torch.rand((num, 1, 1, 1), dtype=x.dtype, device=x.device)


class ShakeShakeBranch(nn.Module):
    """One residual branch: ReLU -> 3x3 conv (carries the stride) -> BN -> ReLU -> 3x3 conv -> BN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.act0 = nn.ReLU()  # not in place: the block input also feeds the other branch and the shortcut
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(self.act0(x))))
        return self.bn2(self.conv2(x))


class ShakeShakeShortcut(nn.Module):
    """Projection shortcut of the paper: ReLU, then two 1x1 convs on the input subsampled at offsets (0, 0) and
    (1, 1), each giving half the output channels, concatenated and batch-normalised."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        if out_chs % 2:
            raise ValueError(f"shake-shake shortcut needs an even number of output channels; got {out_chs}")
        self.stride = stride
        self.act = nn.ReLU()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, kernel_size=1, bias=False)
        self.conv2 = nn.Conv2d(in_chs, out_chs // 2, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        y1 = self.conv1(x[:, :, :: self.stride, :: self.stride])
        # shift by one pixel (zero fill at the bottom/right) so the second path samples the other grid
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        y2 = self.conv2(shifted[:, :, :: self.stride, :: self.stride])
        return self.bn(torch.cat([y1, y2], dim=1))


class ShakeShakeBlock(nn.Module):
    """Two branches mixed by shake-shake (training) or averaged (eval), plus the shortcut; no ReLU after the sum."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        shake_forward: bool = True,
        shake_backward: bool = True,
        shake_image: bool = True,
    ) -> None:
        super().__init__()
        self.shake_forward = shake_forward
        self.shake_backward = shake_backward
        self.shake_image = shake_image
        self.branch1 = ShakeShakeBranch(in_chs, out_chs, stride)
        self.branch2 = ShakeShakeBranch(in_chs, out_chs, stride)
        if in_chs != out_chs:
            self.shortcut = ShakeShakeShortcut(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.branch1(x)
        x2 = self.branch2(x)
        if self.training:
            alpha = draw_shake_weights(x1, self.shake_forward, self.shake_image)
            beta = draw_shake_weights(x1, self.shake_backward, self.shake_image)
            mixed = shake_shake_mix(x1, x2, alpha, beta)
        else:
            mixed = 0.5 * (x1 + x2)
        return self.shortcut(x) + mixed


class ShakeShakeResNet(CifarNet):
    """Shake-Shake ResNet for 32x32 inputs: stem conv-BN, three stages of shake-shake blocks (strides 1, 2, 2),
    final ReLU, global pool, linear."""

    def __init__(
        self,
        depth: int = 26,
        initial_channels: int = 96,
        stem_channels: int = 16,
        shake_forward: bool = True,
        shake_backward: bool = True,
        shake_image: bool = True,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init_mode: str = "kaiming_fan_out",
    ) -> None:
        """
        Args:
            depth: 6 * blocks_per_stage + 2 (26 -> 4 blocks per stage).
            initial_channels: width of the first stage (the "32d" of 2x32d); doubles each stage.
            stem_channels: width of the stem convolution.
            shake_forward: draw alpha at random in training (else 0.5).
            shake_backward: draw beta at random in training (else 0.5).
            shake_image: draw per image (else once per batch).
            drop_rate: dropout before the classifier (0 in the seed).
            init_mode: one of `cifar_models._builder.INIT_MODES`.
        """
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"shake-shake depth must be 6 * n + 2 with n >= 1 (26, 32, ...); got {depth}")
        blocks_per_stage = (depth - 2) // 6

        self.stem = conv_stem(in_chans, stem_channels, norm=True)
        self.feature_info = [dict(num_chs=stem_channels, reduction=1, module="stem.bn")]

        stages = []
        in_chs = stem_channels
        for stage_idx in range(3):
            out_chs = initial_channels * 2**stage_idx
            stride = 1 if stage_idx == 0 else 2
            blocks = []
            for block_idx in range(blocks_per_stage):
                blocks.append(
                    ShakeShakeBlock(
                        in_chs,
                        out_chs,
                        stride=stride if block_idx == 0 else 1,
                        shake_forward=shake_forward,
                        shake_backward=shake_backward,
                        shake_image=shake_image,
                    )
                )
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            # the last stage is reported after the final ReLU, as timm does for pre-activation nets
            module = f"stages.{stage_idx}" if stage_idx < 2 else "norm"
            self.feature_info.append(dict(num_chs=out_chs, reduction=2**stage_idx, module=module))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.ReLU(inplace=True)  # a final activation in `CifarNet`'s norm slot (no normalisation)

        self.build_head(num_classes, global_pool, drop_rate)
        init_weights(self, init_mode)


def _create_shake_shake(variant: str, pretrained: bool = False, **kwargs: Any) -> ShakeShakeResNet:
    return build_cifar_model(ShakeShakeResNet, variant, pretrained, feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "shake_shake26_2x32d": cifar_cfg(),
        "shake_shake26_2x64d": cifar_cfg(),
        "shake_shake26_2x96d": cifar_cfg(),
        "shake_shake26_2x128d": cifar_cfg(),
    }
)


@register_model
def shake_shake26_2x32d(pretrained: bool = False, **kwargs: Any) -> ShakeShakeResNet:
    """Shake-Shake-26 2x32d, S-S-I (2.9M parameters)."""
    model_args = dict(depth=26, initial_channels=32)
    return _create_shake_shake("shake_shake26_2x32d", pretrained, **dict(model_args, **kwargs))


@register_model
def shake_shake26_2x64d(pretrained: bool = False, **kwargs: Any) -> ShakeShakeResNet:
    """Shake-Shake-26 2x64d, S-S-I (11.7M parameters)."""
    model_args = dict(depth=26, initial_channels=64)
    return _create_shake_shake("shake_shake26_2x64d", pretrained, **dict(model_args, **kwargs))


@register_model
def shake_shake26_2x96d(pretrained: bool = False, **kwargs: Any) -> ShakeShakeResNet:
    """Shake-Shake-26 2x96d, S-S-I (26.2M parameters)."""
    model_args = dict(depth=26, initial_channels=96)
    return _create_shake_shake("shake_shake26_2x96d", pretrained, **dict(model_args, **kwargs))


@register_model
def shake_shake26_2x128d(pretrained: bool = False, **kwargs: Any) -> ShakeShakeResNet:
    """Shake-Shake-26 2x128d, S-S-I (46.5M parameters)."""
    model_args = dict(depth=26, initial_channels=128)
    return _create_shake_shake("shake_shake26_2x128d", pretrained, **dict(model_args, **kwargs))
