"""The 8x8 handwritten digits that ship inside scikit-learn, written out as a Hub-layout dataset.

The quickstart trains on them offline: `data.dataset = "digits"` materialises 1,797 real 8x8 grayscale
images (UCI optical digits, values 0-16 scaled to 0-255) once, as parquet shards with an `Image` column
`image` and a `ClassLabel` column `label`, split by a fixed seed into 1,437 train and 360 test images.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError

__all__ = ["DIGITS_ALIAS", "materialize_digits"]

DIGITS_ALIAS = "digits"
TEST_SIZE = 360  # 20% of 1,797
SPLIT_SEED = 0


def materialize_digits(root: Path) -> Path:
    """Write (once) and return a folder `datasets.load_dataset` reads like a Hub parquet dataset."""
    target = Path(root) / "sklearn_digits_v1"
    if (target / "README.md").is_file():
        return target
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            'data.dataset = "digits" needs scikit-learn (pip install -e ".[quickstart]" or ".[dev]")'
        ) from None
    import datasets
    from PIL import Image

    from .atomic import read_only_above

    blocked = read_only_above(root)
    if blocked is not None:
        raise UserError(
            f'data.dataset = "digits" is written once into the decode cache, but {str(blocked)!r} is read-only; '
            "set data.cache_dir or $CIFAR_RECIPES_CACHE to a writable folder"
        )
    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pixels))
    splits = {"test": order[:TEST_SIZE], "train": order[TEST_SIZE:]}
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        (tmp / "data").mkdir()
        for split, index in splits.items():
            images = []
            for i in index:
                buffer = io.BytesIO()
                Image.fromarray(pixels[i], mode="L").save(buffer, format="PNG")
                images.append({"bytes": buffer.getvalue(), "path": None})
            table = datasets.Dataset.from_dict(
                {"image": images, "label": [int(bunch.target[i]) for i in index]}, features=features
            )
            table.to_parquet(str(tmp / "data" / f"{split}-00000-of-00001.parquet"))
        (tmp / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
            "  - split: test\n    path: data/test-*\n---\n# scikit-learn 8x8 digits (UCI optical recognition of "
            "handwritten digits), 1,437 train / 360 test\n"
        )
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "README.md").is_file():  # another process finished first
            return target
        raise
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return target
