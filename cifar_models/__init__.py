"""CIFAR architectures of the seed project, registered into timm's model registry.

`import cifar_models` registers every variant, after which `timm.create_model('wrn28_10')` works.
"""

import timm

from . import (
    cifar_densenet,
    cifar_pyramidnet,
    cifar_resnet,
    cifar_resnet_preact,
    cifar_resnext,
    cifar_shake_shake,
    cifar_vgg,
    cifar_wrn,
)
from ._builder import CIFAR10_MEAN, CIFAR10_STD

# The family modules, by the name timm's registry files their models under (`timm.list_models(module=...)`).
FAMILY_MODULES = (
    "cifar_densenet",
    "cifar_pyramidnet",
    "cifar_resnet",
    "cifar_resnet_preact",
    "cifar_resnext",
    "cifar_shake_shake",
    "cifar_vgg",
    "cifar_wrn",
)


def list_cifar_models() -> list[str]:
    """Every model name this package registers into timm, sorted as `timm.list_models` sorts."""
    return timm.list_models(module=list(FAMILY_MODULES))


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FAMILY_MODULES",
    "cifar_densenet",
    "cifar_pyramidnet",
    "cifar_resnet",
    "cifar_resnet_preact",
    "cifar_resnext",
    "cifar_shake_shake",
    "cifar_vgg",
    "cifar_wrn",
    "list_cifar_models",
]
