"""CIFAR architectures of the seed project, registered into timm's model registry.

`import cifar_models` registers every variant, after which `timm.create_model('wrn28_10')` works.
Adding a family is its file plus one name in `FAMILY_MODULES`.
"""

import importlib

import timm

from ._builder import CIFAR10_MEAN, CIFAR10_STD

# The family modules, by the name timm's registry files their models under (`timm.list_models(module=...)`).
# Importing one registers its models; each becomes an attribute of this package (`cifar_models.cifar_wrn`).
FAMILY_MODULES = (
    "cifar_airbench",
    "cifar_densenet",
    "cifar_pyramidnet",
    "cifar_resnet",
    "cifar_resnet_preact",
    "cifar_resnext",
    "cifar_shake_shake",
    "cifar_vgg",
    "cifar_wrn",
)
for _family in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_family}")


def list_cifar_models() -> list[str]:
    """Every model name this package registers into timm, sorted as `timm.list_models` sorts."""
    return timm.list_models(module=list(FAMILY_MODULES))


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "FAMILY_MODULES", "list_cifar_models", *FAMILY_MODULES]
