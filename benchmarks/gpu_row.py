"""One full-length seed row on a GPU in one call: ResNet-preact-20 on CIFAR-10, 200 epochs, the seed's settings.

    benchmarks/gpu_row.sh OUT_DIR [--mode auto|eager|reduce-overhead|default] [--check-rows FILE]
    benchmarks/gpu_row.sh OUT_DIR --smoke        # a CPU, seconds: 3 epochs on the digits (the tests run this)

Trains `recipes/experiments/resnet_preact20.toml` (the seed's "ResNet-preact-20 [200 epochs]" row, cosine, lr 0.2)
with `train_accelerate.py` in the fastest mode known to work: `--mode`, or with `--mode auto` (the default) the
fastest ResNet-preact-20 loop among a GPU check's rows (`--check-rows OUT/gpu_check.jsonl`) whose short run was
ok, else eager. Only the compile mode and the dataset copy are overridden; the recipe's precision ("auto": bf16
where the GPU has it) stays. From the second epoch on, each finished epoch projects the run's end from the
epochs after the first (which pays for compilation), with the evaluation and the record after it; when that
passes the budget, the run is stopped cleanly (SIGTERM: the loop checkpoints and exits) and the projection is
reported instead of a row: a shortened run is not a seed row. A finished run is evaluated (`evaluate.py --json`)
and recorded (`python -m cifar_train.results collect --with-weights`) into results/, then copied to OUT/results
for the way home.

OUT/gpu_row.json says what happened (status recorded, stopped or failed; mode; command; projection; evaluation;
record). Exit 0 recorded, 3 stopped for the budget, 1 failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/experiments/resnet_preact20.toml"
AFTER_TRAINING_SECONDS = 45.0  # evaluate.py (a fresh process, 10,000 images) and the record, with a margin
SMOKE = ["model.name='resnet20'", "data.train_limit=256", "train.batch_size=32", "augment.crop_padding=1"]


def fastest_known_mode(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(mode, why) from a GPU check's rows: the fastest ResNet-preact-20 loop at the recipe's precision (bf16)
    whose short run also passed; eager when the rows know none."""
    passed = {(row.get("precision"), row.get("mode")) for row in rows if row.get("target") == "resnet_preact20"
              and row.get("phase") == "modes" and row.get("status") == "ok"}  # fmt: skip
    measured = [
        row for row in rows
        if row.get("phase") == "throughput" and row.get("status") == "ok" and row.get("target") == "resnet_preact20"
        and row.get("precision") == "bf16" and (row["precision"], row["mode"]) in passed
    ]  # fmt: skip
    if not measured:
        return "eager", "no measured mode in the check's rows: eager, the least to go wrong"
    best = max(measured, key=lambda row: row["loop_images_per_second"])
    return best["mode"], f"fastest measured loop: {best['loop_images_per_second']:,} images/s ({best['entry']})"


def projected_end(now: float, epoch_times: list[float], epochs: int, after: float) -> float | None:
    """When the run will have trained and then spent `after` seconds on evaluation and the record, from the times
    (time.time()) at which its epochs ended; None before two epochs (the first pays for compilation, so the pace
    is taken from the later ones)."""
    if len(epoch_times) < 2:
        return None
    per_epoch = (epoch_times[-1] - epoch_times[0]) / (len(epoch_times) - 1)
    return now + (epochs - len(epoch_times)) * per_epoch + after


def epochs_done(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def train(command: list[str], run_dir: Path, log: Path, *, epochs: int, deadline: float, after: float) -> dict:
    """Run the training command, watching its pace; stop it cleanly when its projected end passes `deadline`."""
    report: dict[str, Any] = {}
    times: list[float] = []
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        forward = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
        try:
            while process.poll() is None:
                time.sleep(0.25)
                now = time.time()
                times += [now] * (epochs_done(run_dir) - len(times))
                end = projected_end(now, times, epochs, after)
                if (end is not None and end > deadline) or now > deadline - after:
                    report.update(stop_asked_after_epochs=len(times), deadline_in_seconds=round(deadline - now, 1))
                    if end is not None:
                        report["projected_end_in_seconds"] = round(end - now, 1)
                        report["seconds_per_epoch"] = round((times[-1] - times[0]) / (len(times) - 1), 2)
                    process.send_signal(signal.SIGTERM)  # the loop checkpoints at its next read and exits
                    try:
                        process.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        process.kill()
                    break
        finally:
            signal.signal(signal.SIGTERM, forward)
    report.update(returncode=process.wait(), epochs_trained=epochs_done(run_dir))
    return report


def evaluate(run_dir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "evaluate.py", str(run_dir), "--json"], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"evaluate.py failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {key: result[key] for key in ("top1", "top5", "loss", "ece", "num_samples", "split") if key in result}


def record(run_dir: Path, results: Path, out: Path) -> list[str]:
    """`results collect --with-weights` into `results`; the written files also under OUT/results."""
    done = subprocess.run(
        [sys.executable, "-m", "cifar_train.results", "collect", str(run_dir), "--out", str(results),
         "--with-weights"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"results collect failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
    written = [Path(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.endswith(".json")]
    copies = []
    for path in written:
        path = path if path.is_absolute() else ROOT / path
        target = out / "results"
        if path.parent.resolve() != target.resolve():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.name)
            weights = path.parent / "weights" / path.stem
            if weights.is_dir():
                shutil.copytree(weights, target / "weights" / path.stem, dirs_exist_ok=True)
        copies.append(str(target / path.name))
    return copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_row.json, the log and the run")
    parser.add_argument("--mode", choices=("auto", "eager", "reduce-overhead", "default"), default="auto")
    parser.add_argument("--check-rows", type=Path, help="a GPU check's gpu_check.jsonl, for --mode auto")
    parser.add_argument(
        "--dataset", default=".gpu/cifar10", help="CIFAR-10 in the Hub's layout (relative to the checkout, as recorded)"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="records folder (default: results/)")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="the whole call's time, from --started")
    parser.add_argument("--started", type=float, default=None, help="when the call began (Unix time; default now)")
    parser.add_argument("--smoke", action="store_true", help="resnet20 on 256 of the digits, on a CPU")
    parser.add_argument("--epochs", type=int, default=3, help="with --smoke: epochs (a seed row is the recipe's 200)")
    parser.add_argument("--after-seconds", type=float, default=AFTER_TRAINING_SECONDS, help="kept for evaluation")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = args.started or time.time()
    deadline = started + args.budget_seconds - 10  # 10 s to write the report and exit
    summary: dict[str, Any] = {"recipe": RECIPE, "budget_seconds": args.budget_seconds}
    if args.mode == "auto":
        rows = [json.loads(line) for line in args.check_rows.read_text().splitlines()] if args.check_rows else []
        summary["mode"], summary["mode_reason"] = fastest_known_mode(rows)
    else:
        summary["mode"], summary["mode_reason"] = args.mode, "--mode"
    overrides = [f"data.dataset={json.dumps('digits' if args.smoke else args.dataset)}"]
    if summary["mode"] != "eager":
        overrides.append(f"model.compile={json.dumps(summary['mode'])}")
    overrides += [*SMOKE, f"train.epochs={args.epochs}"] if args.smoke else []
    run_dir = args.out / "run"
    command = [sys.executable, "train_accelerate.py", RECIPE, "--output-dir", str(run_dir)]
    command += [item for override in overrides for item in ("--set", override)]
    summary["command"] = " ".join(["python", *command[1:]])
    summary["record_command"] = f"python -m cifar_train.results collect {run_dir} --out {args.results} --with-weights"
    epochs = args.epochs if args.smoke else 200
    status = 1
    try:
        log = args.out / "train.log"
        summary.update(train(command, run_dir, log, epochs=epochs, deadline=deadline, after=args.after_seconds))
        if "stop_asked_after_epochs" in summary:
            summary["status"], status = "stopped", 3
        elif summary["returncode"] != 0:
            summary["status"] = "failed"
            summary["error"] = (args.out / "train.log").read_text()[-2000:]
        else:
            summary["records"] = record(run_dir, args.results, args.out)  # the row first: it is what the call is for
            summary["evaluation"] = evaluate(run_dir)
            summary["status"], status = "recorded", 0
    except Exception as err:
        summary.update(status="failed", error=f"{type(err).__name__}: {err}")
    summary["seconds"] = round(time.time() - started, 1)
    (args.out / "gpu_row.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return status


if __name__ == "__main__":
    os.environ.setdefault("CIFAR_RECIPES_CACHE", str(ROOT / ".gpu" / "cache"))
    sys.exit(main())
