"""Training, evaluation and export for cifar-recipes (the CIFAR models live in `cifar_models`).

The command-line tools are thin layers over these functions, so a notebook can do the same:

    from cifar_train import load_recipe, train
    recipe = load_recipe("recipes/quickstart.toml", ["train.epochs=3"])
    train(recipe, "runs/notebook")
"""

from .errors import UserError
from .recipe import load_recipe
from .schema import Recipe

__all__ = [
    "Recipe",
    "UserError",
    "build_augment",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "load_recipe",
    "train",
]


def __getattr__(name: str):
    # The heavier pieces (timm, accelerate, datasets) load on first use, keeping `import cifar_train` light.
    if name in ("build_model", "build_optimizer", "build_scheduler", "build_augment"):
        from . import components

        return getattr(components, name)
    if name == "train":
        from .loop import train

        return train
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'cifar_train' has no attribute {name!r}")
