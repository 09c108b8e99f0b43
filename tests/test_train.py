"""End-to-end training on real small data: the run-directory contract, resume, several processes.

Runs use scikit-learn's real 8x8 digits and ResNet-20, a few steps each, through the real command
(`python train_accelerate.py`), real Accelerate and real `torchrun` where a user would meet them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import cifar_models  # noqa: F401
from cifar_train import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc1",
    "val_loss",
    "val_acc1",
    "val_acc5",
    "epoch_seconds",
    "images_per_second",
}


def write_recipe(path: Path, dataset: Path, **sections: dict) -> Path:
    base = {
        "model": {"name": "resnet20"},
        "data": {"dataset": str(dataset), "train_limit": 256},
        "augment": {"crop_padding": 1, "hflip": False},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 3, "batch_size": 32, "val_batch_size": 128, "checkpoint_every": 1},
        "log": {"progress": False},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # numbers, booleans, strings and arrays read the same in TOML


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train_accelerate.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


def test_run_writes_every_file_of_the_contract(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.toml", digits_dir)
    run_dir = tmp_path / "run"
    result = run_cli(str(recipe), "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    for name in ("recipe.toml", "env.json", "metrics.jsonl", "model.safetensors", "config.json", "README.md"):
        assert (run_dir / name).is_file(), name
    assert load_recipe(run_dir / "recipe.toml") == load_recipe(recipe)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(set(r) >= METRIC_KEYS for r in rows)
    assert rows[-1]["step"] == 3 * (256 // 32)
    env = json.loads((run_dir / "env.json").read_text())
    assert {"torch", "timm", "accelerate", "datasets", "command", "device"} <= set(env)
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2  # keep_checkpoints = 2
    # The exported folder is what timm loads, after `import cifar_models`.
    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
    assert model.num_classes == 10
    state = weights(run_dir)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)
    # Learning happened: training accuracy after 24 steps on 256 images. (Validation this early is dominated by
    # unsettled batch-norm statistics: 11-38% over train.seed 0-5, whichever 256 images train.)
    assert rows[-1]["train_acc1"] > 20.0  # chance is 10%
    card = (run_dir / "README.md").read_text()
    assert "import cifar_models" in card
    # evaluate.py on the run directory scores exactly what the run logged for its last epoch.
    from cifar_train import evaluate

    scored = evaluate(run_dir)
    assert scored["num_samples"] == 360
    assert scored["top1"] == pytest.approx(rows[-1]["val_acc1"], abs=1e-9)
    assert scored["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)


def test_validation_does_not_change_training(tmp_path, digits_dir):
    # Validating draws nothing from the training RNG streams: evaluating every epoch or only at the end
    # gives bit-identical weights.
    every = write_recipe(tmp_path / "every.toml", digits_dir, train={"epochs": 3, "eval_every": 1})
    once = write_recipe(tmp_path / "once.toml", digits_dir, train={"epochs": 3, "eval_every": 100})
    train(load_recipe(every), tmp_path / "every")
    train(load_recipe(once), tmp_path / "once")
    assert_same_weights(tmp_path / "every", tmp_path / "once")


def test_tensorboard_tracker_gets_metrics_and_flattened_recipe(tmp_path, digits_dir):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"epochs": 1}, log={"trackers": ["tensorboard"]})
    final = train(load_recipe(recipe), tmp_path / "run")
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file was written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"val_acc1", "train_loss"} <= tags
    assert final["val_acc1"] >= 0


def test_existing_run_directory_is_refused_and_left_untouched(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"epochs": 1})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    result = run_cli(str(recipe), "--output-dir", str(run_dir))
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["precious.txt"]


def test_resume_after_kill_9_ends_bit_identical(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"epochs": 4, "checkpoint_every": 1})
    reference = tmp_path / "reference"
    assert run_cli(str(recipe), "--output-dir", str(reference)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_accelerate.py"), str(recipe), "--output-dir", str(killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list((killed / "checkpoints").glob("step_*_e0002_*")):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert list((killed / "checkpoints").glob("step_*")), "no checkpoint appeared before the kill"
    assert not (killed / "model.safetensors").exists()

    result = run_cli("--resume", str(killed))
    assert result.returncode == 0, result.stderr
    assert_same_weights(reference, killed)
    rows = [json.loads(line)["epoch"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]


def test_sigint_mid_epoch_saves_and_resume_ends_bit_identical(tmp_path, digits_dir):
    recipe = write_recipe(
        tmp_path / "r.toml", digits_dir, train={"epochs": 3, "checkpoint_every": 10}, data={"train_limit": 0}
    )
    reference = tmp_path / "reference"
    assert run_cli(str(recipe), "--output-dir", str(reference)).returncode == 0

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_accelerate.py"), str(recipe), "--output-dir", str(stopped)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (stopped / "metrics.jsonl").is_file():
        time.sleep(0.02)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    (checkpoint,) = (stopped / "checkpoints").glob("step_*")
    assert "_b000000" not in checkpoint.name, "the checkpoint should be mid-epoch"

    result = run_cli("--resume", str(stopped))
    assert result.returncode == 0, result.stderr
    assert_same_weights(reference, stopped)


def test_two_processes_under_torchrun(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"epochs": 2, "batch_size": 64})
    run_dir = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(ROOT / "train_accelerate.py"),
            str(recipe),
            "--output-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["step"] == 2 * (256 // 64)  # the global batch is split, not multiplied
    env_json = json.loads((run_dir / "env.json").read_text())
    assert env_json["num_processes"] == 2
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["ranks_in_sync"] is True


def test_grad_accumulation_equals_the_large_batch_without_batch_norm(tmp_path, digits_dir):
    # A ViT has no batch norm, so two accumulated batches of 32 are one batch of 64, up to rounding.
    common = dict(
        model={"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 8, "patch_size": 4}},
        augment={"random_crop": False, "hflip": False},
        optim={"weight_decay": 0.0},
        schedule={"name": "constant"},
        data={"train_limit": 128},
    )
    big = write_recipe(tmp_path / "big.toml", digits_dir, train={"epochs": 2, "batch_size": 64}, **common)
    acc = write_recipe(
        tmp_path / "acc.toml", digits_dir, train={"epochs": 2, "batch_size": 32, "grad_accum_steps": 2}, **common
    )
    train(load_recipe(big), tmp_path / "big")
    train(load_recipe(acc), tmp_path / "acc")
    wa, wb = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 * 2  # optimizer steps, not batches


def test_bad_model_name_leaves_nothing_behind(tmp_path, digits_dir):
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, model={"name": "resnet_preact21"})
    result = run_cli(str(recipe), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "unknown model.name 'resnet_preact21'" in result.stderr and "did you mean" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_ghost_batch_step_equals_hand_computed_chunks(alpha):
    from accelerate import Accelerator

    from cifar_train.loop import _forward_backward, dual_cutout_loss, soft_cross_entropy

    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    twin = timm.create_model("resnet20", num_classes=10)
    twin.load_state_dict(model.state_dict())
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    views = 2 if alpha > 0 else 1
    images = torch.randn(views * 8, 3, 32, 32)
    targets = torch.nn.functional.one_hot(torch.randint(0, 10, (views * 8,)), 10).float()
    loss, _, _ = _forward_backward(accelerator, prepared, prepared, images, targets, 2, alpha)

    # By hand: two chunks of 4 (per view), each its own forward (its own BN statistics), loss / 2 each.
    total = 0.0
    for chunk in range(2):
        sl = slice(4 * chunk, 4 * chunk + 4)
        if alpha > 0:
            l1, l2 = twin(images[:8][sl]), twin(images[8:][sl])
            chunk_loss = dual_cutout_loss(l1, l2, targets[:8][sl], alpha)
        else:
            chunk_loss = soft_cross_entropy(twin(images[sl]), targets[sl])
        (chunk_loss / 2).backward()
        total += chunk_loss.item() / 2
    assert loss.item() == pytest.approx(total, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
