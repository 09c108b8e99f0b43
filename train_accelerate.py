"""Train from a TOML recipe: `python train_accelerate.py recipes/quickstart.toml` (see cifar_train/cli.py)."""

import sys

from cifar_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
