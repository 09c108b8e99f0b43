"""The one-call GPU check: throughput, host syncs, a real accuracy run and the projected 200-epoch times.

    benchmarks/gpu_check.sh OUT_DIR                 # on a machine with a CUDA GPU (installs datasets if missing)
    python benchmarks/gpu_check.py --out OUT --smoke   # on a CPU, a few seconds: keeps the script from rotting

Phases, most valuable first; each is written to OUT/gpu_check.json as soon as it finishes (a failing phase
records its error and the next one runs):

1. environment: GPU, driver-side versions, library versions.
2. throughput: images/s of a bare training step (model, soft-target loss, backward, fused SGD on one batch
   already on the GPU) against the real loop (`cifar_train.train`: data on the device, augmentation, the
   step, running metrics, schedule) for ResNet-preact-20 @128, ResNet-preact-110 @128 and WRN-28-10 @64,
   in fp32 NCHW, bf16 channels_last, and bf16 channels_last + torch.compile.
3. host syncs: `torch.cuda.set_sync_debug_mode("warn")` around one epoch of the loop; syncs per step.
4. accuracy: ResNet-preact-20 for 15 epochs on real CIFAR-10 (the seed's settings, cosine to 0), every epoch
   validated on the 10,000 test images.
5. projections: 200 epochs of ResNet-preact-20 and of WRN-28-10 + RICAP from the measured rates, against
   the goals (<= 3 and <= 20 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GOAL_MINUTES = {"resnet_preact20": 3.0, "wrn28_10_ricap": 20.0}  # 200 epochs of CIFAR-10, evaluation included
CONFIGS = {
    "fp32_nchw": {"precision": "no", "channels_last": False, "compile": False},
    "bf16_channels_last": {"precision": "bf16", "channels_last": True, "compile": False},
    "bf16_channels_last_compile": {"precision": "bf16", "channels_last": True, "compile": "default"},
}
MODELS = (("resnet_preact20", 128), ("resnet_preact110", 128), ("wrn28_10", 64))
CIFAR10_TRAIN = 50_000  # training images per epoch


class Report:
    """The JSON report, rewritten after every phase, and the phases' time budget."""

    def __init__(self, out: Path, budget_seconds: float) -> None:
        self.path = out / "gpu_check.json"
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": {}}
        self.deadline = time.monotonic() + budget_seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {}
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            yield record
        except Exception as err:  # a broken phase is reported, and the check goes on with the next one
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc()
            print(record["traceback"], flush=True)
        record["seconds"] = round(time.perf_counter() - started, 1)
        self.data["phases"][name] = record
        self.write()

    def write(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(temporary, self.path)


def environment() -> dict[str, Any]:
    import accelerate
    import datasets
    import timm

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16=torch.cuda.is_bf16_supported(),
        )
    return env


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_step_rate(name: str, batch: int, config: dict[str, Any], *, in_chans: int, size: int, seconds: float) -> float:
    """Images/s of the bare step: model, soft-target loss, backward and fused SGD on one batch on the device."""
    import timm

    import cifar_models  # noqa: F401
    from cifar_train.losses import soft_cross_entropy
    from cifar_train.optim import create_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = torch.channels_last if config["channels_last"] else torch.contiguous_format
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=in_chans).to(device, memory_format=memory).train()
    optimizer = create_optimizer(model, name="sgd", lr=0.1)
    images = torch.randn(batch, in_chans, size, size, device=device).contiguous(memory_format=memory)
    targets = torch.nn.functional.one_hot(torch.randint(0, 10, (batch,), device=device), 10).float()
    dtype = torch.bfloat16 if config["precision"] == "bf16" else None

    def loss_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return soft_cross_entropy(model(x), t)

    if config["compile"]:
        torch._dynamo.reset()
        loss_of = torch.compile(loss_of, mode=config["compile"])

    def step() -> None:
        loss = loss_of(images, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: cuDNN autotuning, compilation
        step()
    _synchronize()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            step()
        _synchronize()
        steps += 10
    return steps * batch / (time.perf_counter() - started)


def run_recipe(recipe_file: str, overrides: list[str], work: Path, name: str) -> tuple[dict[str, Any], list[dict]]:
    """`cifar_train.train` on a recipe, quietly; returns (final metrics, metrics.jsonl rows)."""
    from cifar_train.loop import train
    from cifar_train.recipe import load_recipe
    from cifar_train.rundir import read_metrics

    recipe = load_recipe(ROOT / recipe_file, overrides, on_warning=lambda message: None)
    run_dir = work / name
    with contextlib.redirect_stdout(io.StringIO()):
        final = train(recipe, run_dir, recipe_file=recipe_file, overrides=overrides, log=lambda message: None)
    return final, read_metrics(run_dir)


def loop_rate(
    name: str, batch: int, config: dict[str, Any], *, dataset: str, work: Path, images: int
) -> tuple[float, float]:
    """The real loop: (training images/s, validation seconds per epoch), from the best epoch after the first
    (which pays for warm-up and compilation). Every epoch validates on the whole test split."""
    if config["compile"]:
        torch._dynamo.reset()
    overrides = [
        f"model.name={name}", f"model.channels_last={str(config['channels_last']).lower()}",
        f"model.compile={json.dumps(config['compile'])}", f"train.precision={config['precision']}",
        f"data.dataset={json.dumps(dataset)}", f"data.train_limit={images}", f"train.batch_size={batch}",
        "train.epochs=3", "train.checkpoint_every=100", "log.progress=false", "log.every_steps=100",
        "schedule.name=cosine",
    ]  # fmt: skip
    run_name = f"loop-{name}-{len(os.listdir(work))}"
    _, rows = run_recipe("recipes/experiments/resnet_preact20.toml", overrides, work, run_name)
    best = max(rows[1:], key=lambda row: row["images_per_second"])
    trained = images // batch * batch
    return best["images_per_second"], max(0.0, best["epoch_seconds"] - trained / best["images_per_second"])


def throughput(record: dict[str, Any], report: Report, *, smoke: bool, dataset: str, work: Path) -> None:
    models = (("resnet20", 16),) if smoke else MODELS
    configs = {"fp32_nchw": CONFIGS["fp32_nchw"]} if smoke else CONFIGS
    in_chans, size = (1, 8) if smoke else (3, 32)
    for name, batch in models:
        for label, config in configs.items():
            key = f"{name}@{batch} {label}"
            if report.left() < 60 and not smoke:
                record[key] = {"skipped": "time budget spent"}
                continue
            bare = bare_step_rate(name, batch, config, in_chans=in_chans, size=size, seconds=0.5 if smoke else 4.0)
            loop, validation = loop_rate(
                name, batch, config, dataset=dataset, work=work, images=256 if smoke else 25_600
            )
            record[key] = {
                "bare_step_images_per_second": round(bare),
                "loop_images_per_second": round(loop),
                "loop_over_bare": round(loop / bare, 3),
                "validation_seconds": round(validation, 2),
            }
            print(f"{key}: bare {bare:,.0f} img/s, loop {loop:,.0f} img/s ({loop / bare:.2f})", flush=True)
            report.write()


def host_syncs(record: dict[str, Any], *, smoke: bool, dataset: str, work: Path) -> None:
    """Synchronising calls inside one epoch of the loop (steady state, no periodic read inside the epoch)."""
    import cifar_train.loop

    if not torch.cuda.is_available():
        record["skipped"] = "no CUDA device: torch.cuda.set_sync_debug_mode needs one"
        return
    counts: list[int] = []
    real = cifar_train.loop.train_one_epoch

    def watched(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
        return result

    cifar_train.loop.train_one_epoch = watched
    try:
        overrides = [f"data.dataset={json.dumps(dataset)}", "data.train_limit=12800", "train.epochs=2",
                     "train.eval_every=100", "train.checkpoint_every=100", "log.every_steps=1000",
                     "log.progress=false"]  # fmt: skip
        run_recipe("recipes/experiments/resnet_preact20.toml", overrides, work, "syncs")
    finally:
        cifar_train.loop.train_one_epoch = real
    steps = 12800 // 128
    record.update(syncs_per_epoch=counts, steps_per_epoch=steps, syncs_per_step=round(counts[-1] / steps, 3))


def accuracy(record: dict[str, Any], *, smoke: bool, dataset: str, work: Path) -> None:
    epochs = 2 if smoke else 15
    overrides = [f"train.epochs={epochs}", f"data.dataset={json.dumps(dataset)}", "log.progress=false"]
    if smoke:
        overrides += ["model.name=resnet20", "data.train_limit=256", "train.batch_size=32", "augment.crop_padding=1"]
    command = "python train_accelerate.py recipes/experiments/resnet_preact20.toml " + " ".join(
        f"--set {item}" for item in overrides
    )
    started = time.perf_counter()
    final, rows = run_recipe("recipes/experiments/resnet_preact20.toml", overrides, work, "accuracy")
    record.update(
        command=command,
        minutes=round((time.perf_counter() - started) / 60, 2),
        epochs=[{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
        final_top1=round(final["val_acc1"], 2),
        best_top1=round(final["best_val_acc1"], 2),
        train_images_per_second=round(max(row["images_per_second"] for row in rows[1:] or rows)),
    )


def projections(report: Report) -> dict[str, Any]:
    """200 epochs of CIFAR-10 from the measured loop: training at its rate plus its validation of every epoch."""
    measured = report.data["phases"].get("throughput", {})
    found: dict[str, Any] = {}
    for model, goal_key, batch in (("resnet_preact20", "resnet_preact20", 128), ("wrn28_10", "wrn28_10_ricap", 64)):
        for label in CONFIGS:
            row = measured.get(f"{model}@{batch} {label}", {})
            if "loop_images_per_second" not in row:
                continue
            minutes = 200 * (CIFAR10_TRAIN / row["loop_images_per_second"] + row["validation_seconds"]) / 60
            goal = GOAL_MINUTES[goal_key]
            found[f"{goal_key} {label}"] = {"minutes_200_epochs": round(minutes, 1), "goal_minutes": goal,
                                            "meets_goal": minutes <= goal}  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and the run folders")
    parser.add_argument("--dataset", default=str(ROOT / ".gpu" / "cifar10"), help="CIFAR-10 in the Hub's layout")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on a CPU (digits), for the tests")
    parser.add_argument("--budget-minutes", type=float, default=7.5, help="the throughput phase stops in time")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = "digits" if args.smoke else args.dataset
    report = Report(args.out, args.budget_minutes * 60 - 150)  # keep ~2.5 minutes for the later phases
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    os.environ.setdefault("CIFAR_RECIPES_CACHE", str(work / "cache"))
    steps: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("environment", lambda r: r.update(environment())),
        ("throughput", lambda r: throughput(r, report, smoke=args.smoke, dataset=dataset, work=work)),
        ("host_syncs", lambda r: host_syncs(r, smoke=args.smoke, dataset=dataset, work=work)),
        ("accuracy", lambda r: accuracy(r, smoke=args.smoke, dataset=dataset, work=work)),
        ("projections", lambda r: r.update(projections(report))),
    ]
    for name, run in steps:
        with report.phase(name) as record:
            run(record)
    print(json.dumps(report.data["phases"].get("projections", {}), indent=2))
    print(f"report: {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
