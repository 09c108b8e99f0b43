"""The one-call GPU check: which precision x compile modes work, how fast, how many host syncs, and the projected
200-epoch times against our goals.

    benchmarks/gpu_check.sh OUT_DIR                # a CUDA machine, <= 4 minutes; installs what it lacks first
    benchmarks/gpu_check.sh OUT_DIR --smoke        # any CPU, seconds (the test suite runs it)

Every entry is one row of OUT/gpu_check.jsonl, appended and flushed to disk the moment it ends, so a timeout
loses nothing already measured. Entries run most valuable first; each one's cost is estimated before it starts
(a guess until something alike has run, then that measurement), and one that the time left cannot hold is
recorded as skipped, with the reason. A failing entry records its error and the next one runs. The exit status
is 1 when any entry failed.

1. modes: each precision (bf16, fp32, fp16) x compile mode (eager, reduce-overhead, default) trains one short
   epoch of ResNet-preact-20 (recipes/experiments/resnet_preact20.toml) and of WRN-28-10 + RICAP
   (recipes/wrn_ricap.toml) and validates on the 10,000 test images: ok, or failed with the error. One more
   entry runs reduce-overhead with train.grad_accum_steps = 2 (CUDA graphs with gradients added over chunks).
2. throughput: images/s of the bare step (`TrainStep` on one batch already on the GPU: forward, loss, backward,
   fused SGD; cuDNN benchmark on, as in the loop) against the whole loop on the same recipe (data on the device,
   augmentation, the step, metrics, schedule), ResNet-preact-20 and WRN-28-10 + RICAP first, then
   ResNet-preact-110; bf16 eager, bf16 reduce-overhead, fp32 NCHW eager, bf16 default.
3. host syncs: `torch.cuda.set_sync_debug_mode("warn")` around the RICAP recipe's training epochs and its
   validation passes: syncs per step and per validation, and where they come from.
4. projections: 200 epochs from each measured loop (training at its rate plus a validation per epoch) against
   the goals (ResNet-preact-20 <= 3 minutes, WRN-28-10 + RICAP <= 20 minutes).
5. time to accuracy: the whole airbench94 recipe (recipes/speedrun/airbench94.toml, 9.9 epochs) on CIFAR-10, its
   training seconds and final top-1 (flip + translate TTA) beside the published 94.01% in 3.29 s on an A100:
   the quickest end-to-end check of the whole stack.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GOAL_MINUTES = {"resnet_preact20": 3.0, "wrn28_10_ricap": 20.0}  # 200 epochs of CIFAR-10, validation included
CIFAR10_TRAIN = 50_000  # training images per epoch
# Every train.precision ("no" is fp32) x compile mode ("eager" is model.compile = false), most valuable first: the
# default precision eager and with CUDA graphs (the fastest candidate), the other precisions eager, then the rest.
MODE_ORDER = (
    ("bf16", "eager"), ("bf16", "reduce-overhead"), ("no", "eager"), ("fp16", "eager"), ("bf16", "default"),
    ("no", "reduce-overhead"), ("fp16", "reduce-overhead"), ("no", "default"), ("fp16", "default"),
)  # fmt: skip
THROUGHPUT_CONFIGS = (  # (name, precision, channels_last, compile mode), most valuable first
    ("bf16_eager", "bf16", True, "eager"),
    ("bf16_reduce_overhead", "bf16", True, "reduce-overhead"),
    ("fp32_nchw_eager", "no", False, "eager"),
    ("bf16_default", "bf16", True, "default"),
)


@dataclass(frozen=True)
class Target:
    """A recipe as the check trains it: short epochs of `short_images`, loop epochs of `loop_images`."""

    key: str
    recipe: str
    batch: int
    short_images: int
    loop_images: int
    overrides: tuple[str, ...] = ()


TARGETS = (
    Target("resnet_preact20", "recipes/experiments/resnet_preact20.toml", 128, 5_120, 12_800),
    Target("wrn28_10_ricap", "recipes/wrn_ricap.toml", 64, 2_560, 3_840),
)
LATER_TARGETS = (Target("resnet_preact110", "recipes/cifar10/resnet_preact110.toml", 128, 5_120, 12_800),)
_SMOKE = ("model.name='resnet20'", "train.batch_size=32", "augment.crop_padding=1")  # 8x8 digits on a CPU
SMOKE_TARGETS = (
    Target("resnet_preact20", "recipes/experiments/resnet_preact20.toml", 32, 128, 128, _SMOKE),
    Target("wrn28_10_ricap", "recipes/wrn_ricap.toml", 32, 128, 128, _SMOKE),
)

# Seconds an entry takes on a fresh machine, guessed until something alike has been measured in this run:
# a short eager run, a first compilation (inductor, fwd + bwd) with its run, the same graph again (inductor's
# cache), a throughput entry (bare step + a two-epoch loop), the host-sync entry.
GUESSES = {"eager": 20.0, "compile": 60.0, "recompile": 20.0, "throughput": 25.0, "syncs": 25.0, "speedrun": 40.0}
SPEEDRUN_RECIPE = "recipes/speedrun/airbench94.toml"
SPEEDRUN_PUBLISHED = "94.01% top-1 (mean of 1,000 runs) in 3.29 s on one A100 (Jordan, arXiv 2404.00498)"
KEEP_FOR_LATER = {"modes": 70.0, "throughput": 25.0}  # seconds a phase leaves to the phases after it


class Check:
    """The rows on disk, the time budget, and the estimates."""

    def __init__(self, out: Path, *, deadline: float) -> None:
        self.path = out / "gpu_check.jsonl"
        self.deadline = deadline  # time.time() by which every entry must have ended
        self.measured: dict[str, float] = {}  # cost key -> seconds of the last entry of that kind
        self.rows: list[dict[str, Any]] = []
        self.failed = 0

    def left(self) -> float:
        return self.deadline - time.time()

    def estimate(self, cost_key: str, kind: str) -> float:
        return self.measured.get(cost_key, GUESSES[kind])

    def run(
        self,
        phase: str,
        entry: str,
        fn: Callable[[], dict[str, Any]],
        *,
        estimate: float,
        cost_key: str = "",
        **fields: Any,
    ) -> dict[str, Any]:
        """One entry: skipped when `estimate` seconds do not fit in the budget left to this phase, else run; its
        row (`fields`, then ok with `fn`'s fields, or failed with the error) goes to disk at once."""
        row: dict[str, Any] = {"phase": phase, "entry": entry, **fields, "estimate_seconds": round(estimate, 1)}
        room = self.left() - KEEP_FOR_LATER.get(phase, 0.0)
        if estimate > room:
            row.update(status="skipped", reason=f"needs ~{estimate:.0f} s, {max(room, 0):.0f} s left for this phase")
            return self.append(row)
        started = time.perf_counter()
        try:
            row.update(fn())
            row["status"] = row.get("status", "ok")
        except Exception as err:  # one broken entry is reported; the next one runs
            self.failed += 1
            row.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000])
            row["traceback"] = traceback.format_exc(limit=-8)
        row["seconds"] = round(time.perf_counter() - started, 1)
        _release()
        if cost_key and row["status"] == "ok":
            self.measured[cost_key] = row["seconds"]
        return self.append(row)

    def skip(self, phase: str, entry: str, reason: str, **fields: Any) -> dict[str, Any]:
        return self.append({"phase": phase, "entry": entry, **fields, "status": "skipped", "reason": reason})

    def append(self, row: dict[str, Any]) -> dict[str, Any]:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("phase", "traceback")}
        print(f"[{row['phase']}] {json.dumps(shown)}", flush=True)
        return row


# ----------------------------------------------------------------------------------------------------------
# Runs


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


def overrides_for(target: Target, dataset: str, *, precision: str, mode: str, images: int, epochs: int) -> list[str]:
    compile_value = "false" if mode == "eager" else json.dumps(mode)
    return [
        f"data.dataset={json.dumps(dataset)}", f"data.train_limit={images}", f"train.epochs={epochs}",
        f"train.precision={json.dumps(precision)}", f"model.compile={compile_value}", "log.progress=false",
        "log.every_steps=1000", "train.checkpoint_every=1000", *target.overrides,
    ]  # fmt: skip


def run_recipe(recipe_file: str, overrides: list[str], work: Path, name: str) -> list[dict[str, Any]]:
    """`cifar_train.train` on a recipe, quietly, in a fresh compile state; its metrics.jsonl rows."""
    from cifar_train.loop import train
    from cifar_train.recipe import load_recipe
    from cifar_train.rundir import read_metrics

    _release()  # each run compiles its own step (dynamo's per-function cache has a size limit)
    recipe = load_recipe(ROOT / recipe_file, overrides, on_warning=lambda message: None)
    run_dir = work / name
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train(recipe, run_dir, recipe_file=recipe_file, overrides=overrides, log=lambda message: None)
        return read_metrics(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # WRN-28-10's weights and checkpoints are 0.6 GB a run


def short_epoch(target: Target, dataset: str, work: Path, *, precision: str, mode: str, extra=()) -> dict[str, Any]:
    overrides = overrides_for(target, dataset, precision=precision, mode=mode, images=target.short_images, epochs=1)
    rows = run_recipe(target.recipe, [*overrides, *extra], work, f"mode-{target.key}")
    row = rows[-1]
    if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
        raise FloatingPointError(f"non-finite loss: train {row['train_loss']}, validation {row['val_loss']}")
    return {
        "train_loss": round(row["train_loss"], 4),
        "val_acc1": round(row["val_acc1"], 2),
        "epoch_seconds": round(row["epoch_seconds"], 2),
        "skipped_steps": row.get("skipped_steps", 0),
    }


def bare_step_rate(target: Target, overrides: list[str], *, size: tuple[int, int, int], seconds: float) -> float:
    """Images/s of `TrainStep` alone on one batch already on the device (compiled as the loop compiles it)."""
    from cifar_train.components import build_model, build_optimizer, make_accelerator
    from cifar_train.recipe import load_recipe
    from cifar_train.step import TrainStep

    _release()
    recipe = load_recipe(ROOT / target.recipe, overrides, on_warning=lambda message: None)
    t, a = recipe.train, recipe.augment
    accelerator = make_accelerator(precision=t.precision, grad_accum_steps=1, trackers=(), project_dir=".")
    memory = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    model = build_model(recipe, num_classes=10, in_chans=size[0]).to(accelerator.device, memory_format=memory)
    optimizer = build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(
        accelerator, model, optimizer, subdivision=t.subdivision, dual_cutout_alpha=a.dual_cutout_alpha,
        label_smoothing=a.label_smoothing, grad_clip=t.grad_clip, nonfinite_loss=t.nonfinite_loss,
        channels_last=recipe.model.channels_last, compile=recipe.model.compile,
    )  # fmt: skip
    images = torch.randn(t.batch_size, *size, device=accelerator.device)
    targets = torch.nn.functional.one_hot(torch.randint(0, 10, (t.batch_size,), device=accelerator.device), 10)
    targets = targets.float()
    model.train()
    for index in range(5):  # warm-up: cuDNN autotuning, compilation, CUDA graph recording
        step(images, targets, index + 1)
    _synchronize()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            step(images, targets, steps + 1)
        _synchronize()
        steps += 10
    return steps * t.batch_size / (time.perf_counter() - started)


def throughput(target: Target, dataset: str, work: Path, config: tuple, *, size, seconds: float) -> dict[str, Any]:
    _, precision, channels_last, mode = config
    overrides = overrides_for(target, dataset, precision=precision, mode=mode, images=target.loop_images, epochs=2)
    overrides.append(f"model.channels_last={str(channels_last).lower()}")
    bare = bare_step_rate(target, overrides, size=size, seconds=seconds)
    rows = run_recipe(target.recipe, overrides, work, f"loop-{target.key}")
    loop = rows[-1]["images_per_second"]  # the second epoch: no compilation or warm-up in it
    trained = target.loop_images // target.batch * target.batch
    validation = max(0.0, rows[-1]["epoch_seconds"] - trained / loop)
    return {
        "bare_step_images_per_second": round(bare),
        "loop_images_per_second": round(loop),
        "loop_over_bare": round(loop / bare, 3),
        "validation_seconds": round(validation, 2),
    }


def host_syncs(target: Target, dataset: str, work: Path) -> dict[str, Any]:
    """Synchronising CUDA calls per training step (second epoch) and per validation pass, and where from."""
    import cifar_train.loop

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device: torch.cuda.set_sync_debug_mode needs one"}
    counts: dict[str, list[int]] = {"train_one_epoch": [], "validate": []}
    where: Counter[str] = Counter()
    real = {name: getattr(cifar_train.loop, name) for name in counts}

    def watched(name: str) -> Callable:
        def call(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = real[name](*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            counts[name].append(len(syncs))
            where.update(f"{name}: {Path(w.filename).name}:{w.lineno}" for w in syncs)
            return result

        return call

    for name in counts:
        setattr(cifar_train.loop, name, watched(name))
    try:
        images = target.batch * 20
        overrides = overrides_for(target, dataset, precision="bf16", mode="eager", images=images, epochs=2)
        run_recipe(target.recipe, overrides, work, "syncs")
    finally:
        for name, function in real.items():
            setattr(cifar_train.loop, name, function)
    return {
        "train_syncs_per_epoch": counts["train_one_epoch"],
        "steps_per_epoch": images // target.batch,
        "train_syncs_per_step": round(counts["train_one_epoch"][-1] / (images // target.batch), 3),
        "validation_syncs_per_pass": counts["validate"],
        "where": dict(where.most_common(8)),
    }


def projections(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """200 epochs of CIFAR-10 from each measured loop: training at its rate plus its validation of every epoch."""
    found: dict[str, Any] = {}
    for row in rows:
        if row["phase"] != "throughput" or row["status"] != "ok" or row["target"] not in GOAL_MINUTES:
            continue
        minutes = 200 * (CIFAR10_TRAIN / row["loop_images_per_second"] + row["validation_seconds"]) / 60
        goal = GOAL_MINUTES[row["target"]]
        found[row["entry"]] = {"minutes_200_epochs": round(minutes, 1), "goal": goal, "meets_goal": minutes <= goal}
    return found


def speedrun(dataset: str, work: Path) -> dict[str, Any]:
    """The airbench94 recipe end to end: training seconds (its epochs' time, validations included, start-up not)
    and the final top-1 with its test-time augmentation."""
    overrides = [f"data.dataset={json.dumps(dataset)}", "log.progress=false", "log.every_steps=1000"]
    rows = run_recipe(SPEEDRUN_RECIPE, overrides, work, "speedrun")
    last = rows[-1]
    return {
        "epochs": last["epoch"],
        "seconds": round(sum(row["epoch_seconds"] for row in rows), 2),
        "val_acc1": round(last["val_acc1"], 2),
        "published": SPEEDRUN_PUBLISHED,
    }


def _release() -> None:
    """What an entry left behind (compiled graphs, CUDA graph pools, cached blocks) is not the next one's to carry."""
    if "torch._dynamo" in sys.modules:  # (imported by the first compilation; not worth importing for nothing)
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------
# The plan


def check_modes(check: Check, targets, dataset: str, work: Path, *, smoke: bool) -> None:
    for precision, mode in MODE_ORDER:
        for target in targets:
            entry = f"{target.key} {precision} {mode}"
            fields = {"target": target.key, "precision": precision, "mode": mode}
            if smoke and (mode, precision) != ("eager", "no"):
                check.skip("modes", entry, "smoke: fp32 eager only (the rest is for a CUDA GPU)", **fields)
                continue
            if precision == "fp16" and not torch.cuda.is_available():
                check.skip("modes", entry, "fp16 needs a CUDA GPU", **fields)
                continue
            kind = "eager" if mode == "eager" else "compile"
            check.run(
                "modes", entry, estimate=check.estimate(f"{target.key} {kind}", kind), cost_key=f"{target.key} {kind}",
                fn=lambda t=target, p=precision, m=mode: short_epoch(t, dataset, work, precision=p, mode=m), **fields,
            )  # fmt: skip
        if (precision, mode) == ("bf16", "reduce-overhead") and not smoke:  # the same graphs, from inductor's cache
            target = targets[0]
            check.run(
                "modes", f"{target.key} bf16 reduce-overhead grad_accum_steps=2", target=target.key, precision="bf16",
                mode="reduce-overhead", grad_accum_steps=2,
                estimate=check.estimate(f"{target.key} recompile", "recompile"), cost_key=f"{target.key} recompile",
                fn=lambda t=target: short_epoch(
                    t, dataset, work, precision="bf16", mode="reduce-overhead", extra=["train.grad_accum_steps=2"]
                ),
            )  # fmt: skip


def check_throughput(check: Check, targets, dataset: str, work: Path, *, smoke: bool) -> None:
    size = (1, 8, 8) if smoke else (3, 32, 32)
    configs = THROUGHPUT_CONFIGS[2:3] if smoke else THROUGHPUT_CONFIGS  # smoke: fp32 eager, the CPU's mode
    for config in configs:
        for target in targets[:1] if smoke else targets:
            check.run(
                "throughput", f"{target.key}@{target.batch} {config[0]}", target=target.key, precision=config[1],
                channels_last=config[2], mode=config[3],
                estimate=check.estimate(f"throughput {target.key}", "throughput"), cost_key=f"throughput {target.key}",
                fn=lambda t=target, c=config: throughput(t, dataset, work, c, size=size, seconds=0.5 if smoke else 2.0),
            )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.jsonl")
    parser.add_argument("--dataset", default=str(ROOT / ".gpu" / "cifar10"), help="CIFAR-10 in the Hub's layout")
    parser.add_argument("--smoke", action="store_true", help="seconds on a CPU (scikit-learn's digits), for tests")
    parser.add_argument("--budget-seconds", type=float, default=240.0, help="the whole check's time, from --started")
    parser.add_argument("--started", type=float, default=None, help="when the check began (Unix time; default now)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.jsonl").unlink(missing_ok=True)
    started = args.started or time.time()
    check = Check(args.out, deadline=started + args.budget_seconds - 10)  # 10 s to print and exit
    dataset = "digits" if args.smoke else args.dataset
    targets = SMOKE_TARGETS if args.smoke else TARGETS
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    os.environ.setdefault("CIFAR_RECIPES_CACHE", str(ROOT / ".gpu" / "cache"))
    try:
        check.run("environment", "environment", environment, estimate=5.0)
        check_modes(check, targets, dataset, work, smoke=args.smoke)
        check_throughput(check, targets, dataset, work, smoke=args.smoke)
        check.run(
            "syncs", f"{targets[1].key} training and validation",
            lambda: host_syncs(targets[1], dataset, work), estimate=check.estimate("syncs", "syncs"),
        )  # fmt: skip
        check.run("projections", "200 epochs", lambda: projections(check.rows), estimate=0.0)
        if args.smoke:
            check.skip("speedrun", "airbench94", "smoke: airbench94 needs 32x32 CIFAR-10 images, not the 8x8 digits")
        else:
            check.run(
                "speedrun", "airbench94", lambda: speedrun(dataset, work), estimate=check.estimate("", "speedrun")
            )
        if not args.smoke:
            check_throughput(check, LATER_TARGETS, dataset, work, smoke=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts = Counter(row["status"] for row in check.rows)
    print(f"{dict(counts)}; rows in {check.path}", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
