"""Start-up time of the data pipeline on a 60,000-image JPEG imagefolder (CIFAR-10 as a popular folder copy).

Builds once, under `--workdir`, `cifar10_imagefolder/{train,test}/<class>/<n>.jpg` from the Hub-layout copy
in `../shared/datasets/cifar10` (the JPEG bytes as stored there, not re-encoded), then measures, each in a
fresh Python process so that imports count:

* `cold`: empty decode cache -> `open_training_data` -> both batch sources -> the first training batch;
* `warm`: the same again, the cache valid (the target: <= 5 s to the first training step);
* `evaluate_data`: what `evaluate.py` does before its model runs, on the 10,000-image test folder, warm
  (the target for the whole of `evaluate.py`: <= 15 s).

Each row gives `seconds` (process start to the first batch, imports included), `import_seconds` and
`data_seconds` (after the imports). Prints one JSON object:

    python benchmarks/startup.py --workdir /tmp/cifar_startup

Measured on 2 CPU cores shared with other work (load average 2.4-3.2; Python 3.11, torch 2.14 CPU,
datasets 5.2), best of 3 where repeated: cold 20.6 s (decoding 10.4 s train + 2.9 s test on 2 worker
processes; the issue measured ~114 s before the data package), warm 4.9 s of which data 0.37 s (before:
50-60 s), evaluate_data 4.8 s of which data 0.36 s. The rest is importing torch and timm (4.5-5.3 s
here), which training and evaluation need for the model anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "cifar10"


def build_imagefolder(source: Path, target: Path) -> Path:
    """`target/{train,test}/<class>/<n>.jpg` with the stored JPEG bytes; built once (a marker file says so)."""
    import pyarrow.parquet as pq

    marker = target / ".complete"
    if marker.is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for split in ("train", "test"):
        parquet = next((source / "plain_text").glob(f"{split}-*.parquet"))
        table = pq.read_table(parquet)
        names = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
        for index, (image, label) in enumerate(zip(table["img"].to_pylist(), table["label"].to_pylist())):
            folder = target / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:05d}.jpg").write_bytes(image["bytes"])
    marker.write_text("")
    return target


# Run in a fresh interpreter (the decode cache comes from $CIFAR_RECIPES_CACHE); prints one JSON line.
_MEASURE = """
import json, sys, time
started = float(sys.argv[1])
mode, dataset = sys.argv[2:4]
lines = []
if mode == "evaluate":  # evaluate.py's data part, with a stand-in for the model it loads
    from types import SimpleNamespace
    import torch
    from cifar_train.evaluation import _load_data
    imported = time.time()
    cfg = {"input_size": (3, 32, 32), "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}
    data = _load_data(dataset, split="test", recipe=None, model=SimpleNamespace(pretrained_cfg=cfg, num_classes=10))
    images, labels = next(iter(data.batches(256)))
else:
    import torch
    from cifar_train.augment import BatchAugment
    from cifar_train.data import open_training_data
    imported = time.time()
    data = open_training_data(dataset=dataset, val_split="test", seed=0, say=lines.append)
    augment = BatchAugment(num_classes=data.info.num_classes, mean=data.info.mean, std=data.info.std)
    train = data.train_batches(augment, batch_size=128, num_replicas=1, rank=0, seed=0, device="cpu")
    val = data.val_batches(batch_size=256, num_replicas=1, rank=0, device="cpu")
    images, targets = next(iter(train.epoch(0)))
done = time.time()
row = {"seconds": done - started, "import_seconds": imported - started, "data_seconds": done - imported}
print(json.dumps({**row, "batch_shape": list(images.shape), "lines": lines}))
"""


def measure(mode: str, dataset: Path, cache: Path) -> dict:
    env = {**os.environ, "CIFAR_RECIPES_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-c", _MEASURE, repr(time.time()), mode, str(dataset)]
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_seconds"] = time.time() - started  # also counts interpreter start and exit
    return {key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="CIFAR-10 in the Hub's parquet layout")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cifar_startup"), help="folder copy and caches")
    parser.add_argument("--repeat", type=int, default=3, help="warm measurements (the best is reported too)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    folder = build_imagefolder(args.source, args.workdir / "cifar10_imagefolder")
    build_seconds = time.perf_counter() - started
    cache = args.workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    result = {"dataset": str(folder), "build_seconds": round(build_seconds, 1), "cpus": os.cpu_count()}
    result["cold"] = measure("train", folder, cache)
    result["warm"] = [measure("train", folder, cache) for _ in range(args.repeat)]
    result["evaluate_data"] = [measure("evaluate", folder, cache) for _ in range(args.repeat)]
    for key in ("warm", "evaluate_data"):
        for measured in ("seconds", "data_seconds"):
            result[f"{key}_best_{measured}"] = min(row[measured] for row in result[key])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
