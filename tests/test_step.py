"""One optimizer step (`cifar_train.step`) and the loop around it: ghost batches and Dual-Cutout against hand
computations, the non-finite-loss policies on the device, `torch.compile`, and no host read in the hot path."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest
import timm
import torch
from accelerate import Accelerator
from helpers import TINY_STEPS_PER_EPOCH, write_recipe
from torch.overrides import TorchFunctionMode

import cifar_models  # noqa: F401
import cifar_train.loop
from cifar_train import load_recipe
from cifar_train.errors import UserError
from cifar_train.losses import dual_cutout_loss, soft_cross_entropy
from cifar_train.step import TrainStep, compile_mode


def _step(model: torch.nn.Module, *, optimizer=None, accelerator=None, **options) -> TrainStep:
    accelerator = accelerator or Accelerator(cpu=True)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    settings = dict(
        subdivision=1, dual_cutout_alpha=0.0, label_smoothing=0.0, grad_clip=0.0, nonfinite_loss="stop",
        channels_last=False,
    )  # fmt: skip
    return TrainStep(accelerator, model, optimizer, **{**settings, **options})


def _twins(name: str = "resnet20") -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    twin = timm.create_model(name, num_classes=10)
    twin.load_state_dict(model.state_dict())
    return model, twin


def _batch(views: int = 1, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(views * size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator).repeat(views)
    return images, torch.nn.functional.one_hot(labels, 10).float()


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_ghost_batch_step_equals_hand_computed_chunks(alpha):
    model, twin = _twins()
    step = _step(model, subdivision=2, dual_cutout_alpha=alpha)
    images, targets = _batch(views=2 if alpha > 0 else 1)
    loss, _, count = step.forward_backward(images, targets)
    assert count == 8

    # By hand: two chunks of 4 (per view), each its own forward (its own BN statistics), loss / 2 each.
    total = 0.0
    for chunk in range(2):
        sl = slice(4 * chunk, 4 * chunk + 4)
        if alpha > 0:
            chunk_loss = dual_cutout_loss(twin(images[:8][sl]), twin(images[8:][sl]), targets[:8][sl], alpha)
        else:
            chunk_loss = soft_cross_entropy(twin(images[sl]), targets[sl])
        (chunk_loss / 2).backward()
        total += chunk_loss.item() / 2
    assert loss.item() == pytest.approx(total, rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_dual_cutout_loss_is_the_mean_cross_entropy_plus_alpha_times_the_mse_of_the_logits():
    logits1 = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    logits2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ce = lambda logits: -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()  # noqa: E731
    # The seed's consistency term: mean of the squared differences of the logits (not of the softmaxes).
    mse = ((1.0**2 + 1.0**2 + 1.0**2) + (0.5**2 + 1.5**2 + 2.0**2)) / 6
    expected = 0.5 * (ce(logits1) + ce(logits2)) + 0.1 * mse
    assert dual_cutout_loss(logits1, logits2, targets, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def _poisoned(images: torch.Tensor) -> torch.Tensor:
    images = images.clone()
    images[0] = float("nan")
    return images


def test_skip_policy_skips_on_the_device_and_leaves_weights_and_optimizer_state_alone():
    model, _ = _twins()
    step = _step(model, nonfinite_loss="skip")
    images, targets = _batch()
    step(images, targets, 1)  # a good step: momentum buffers exist from here
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    classifier = model.get_classifier().weight.detach().clone()
    buffers = {id(p): s["momentum_buffer"].clone() for p, s in step.optimizer.optimizer.state.items()}
    with HostReads() as reads:
        step(_poisoned(images), targets, 2)
    assert reads.total == 0, reads.where  # skipped on the device, not by reading the loss
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    for p, state in step.optimizer.optimizer.state.items():
        assert torch.equal(state["momentum_buffer"], buffers[id(p)]), "a skipped step changed the momentum"
    step(images, targets, 3)
    summary, _ = step.metrics.read(step.accelerator)
    assert (summary["nonfinite"], summary["skipped"], summary["first_nonfinite"]) == (1, 1, 2)
    assert summary["images"] == 16  # the skipped batch is not in the running loss and accuracy
    assert not torch.equal(classifier, model.get_classifier().weight)  # the next good step trained


def test_a_skipped_first_step_leaves_sgd_exactly_as_if_it_had_not_happened():
    model, twin = _twins()
    step = _step(model, nonfinite_loss="skip")
    images, targets = _batch()
    step(_poisoned(images), targets, 1)  # skipped before any momentum buffer existed
    step(images, targets, 2)
    reference = _step(twin, nonfinite_loss="stop")
    reference(images, targets, 1)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_stop_policy_counts_the_first_bad_step_for_the_loop_to_report():
    model, _ = _twins()
    step = _step(model)
    images, targets = _batch()
    step(images, targets, 1)
    step(_poisoned(images), targets, 2)
    step(_poisoned(images), targets, 3)
    summary, _ = step.metrics.read(step.accelerator)
    assert (summary["nonfinite"], summary["first_nonfinite"], summary["skipped"]) == (2, 2, 0)


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step():
    """The whole step (forward, loss, and through AOTAutograd the backward) goes through torch.compile; the
    cheap `aot_eager` backend checks the plumbing on a CPU (inductor's code generation is for the GPU check)."""
    model, twin = _twins()
    compiled = _step(model, compile="default", compile_backend="aot_eager")
    eager = _step(twin)
    images, targets = _batch()
    for index in range(2):
        compiled(images, targets, index + 1)
        eager(images, targets, index + 1)
    a, _ = compiled.metrics.read(compiled.accelerator)
    b, _ = eager.metrics.read(eager.accelerator)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("value", "mode"),
    [(False, None), (True, "default"), ("default", "default"), ("reduce-overhead", "reduce-overhead")],
)
def test_compile_modes(value, mode):
    assert compile_mode(value) == mode
    with pytest.raises(UserError, match=r"model.compile = 'fast' is not allowed"):
        compile_mode("fast")


# ----------------------------------------------------------------------------------------------------------
# No host read in the hot path


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (`item`, `tolist`, `bool()`, `float()`, `int()`, `numpy`, `cpu`)
    issued from cifar_train or accelerate code: on a GPU each one waits for the device."""

    READS: ClassVar[set[str]] = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}

    def __init__(self) -> None:
        super().__init__()
        self.where: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.where.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:  # the caller outside torch
                frame = frame.f_back
            source = frame.f_code.co_filename if frame is not None else ""
            if "/cifar_train/" in source or "/accelerate/" in source:
                self.where[f"{Path(source).name}:{frame.f_lineno} {name}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("every_steps", [1, 2, 1000])
def test_the_hot_loop_reads_the_device_only_at_its_periodic_reads(tmp_path, digits_dir, monkeypatch, every_steps):
    """Per epoch: one read group every `every_steps` optimizer steps, plus one at the end of the epoch; none per
    step. (Before this was built: 75 reads in 32 steps.)"""
    recipe = write_recipe(
        tmp_path / "r.toml", digits_dir, train={"epochs": 2, "checkpoint_every": 100}, log={"every_steps": every_steps}
    )
    per_epoch: list[Counter] = []
    real = cifar_train.loop.train_one_epoch

    def counted(*args, **kwargs):
        with HostReads() as reads:
            result = real(*args, **kwargs)
        per_epoch.append(reads.where)
        return result

    monkeypatch.setattr(cifar_train.loop, "train_one_epoch", counted)
    cifar_train.loop.train(load_recipe(recipe), tmp_path / "run", log=lambda message: None)
    expected = TINY_STEPS_PER_EPOCH // every_steps + 1  # periodic read groups + the end of the epoch
    assert [sum(reads.values()) for reads in per_epoch] == [expected, expected], per_epoch


def test_each_epochs_training_loss_and_accuracy_are_its_own(tmp_path, digits_dir, monkeypatch):
    """metrics.jsonl's train_loss / train_acc1 of an epoch average that epoch's batches only (image-weighted), not
    every batch since the run began."""
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"epochs": 3, "checkpoint_every": 100})
    batches: list[tuple[float, float, int]] = []  # (mean loss, soft-correct sum, images) of every batch, in order
    real = TrainStep.forward_backward

    def recorded(self, images, targets):
        loss, correct, count = real(self, images, targets)
        batches.append((float(loss), float(correct), count))
        return loss, correct, count

    monkeypatch.setattr(TrainStep, "forward_backward", recorded)
    cifar_train.loop.train(load_recipe(recipe), tmp_path / "run", log=lambda message: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(batches) == 3 * TINY_STEPS_PER_EPOCH and len(rows) == 3
    for epoch, row in enumerate(rows):
        own = batches[epoch * TINY_STEPS_PER_EPOCH : (epoch + 1) * TINY_STEPS_PER_EPOCH]
        images = sum(count for _, _, count in own)
        # metrics.jsonl holds 6 significant digits (cifar_train.rounding): within 5e-6 of the value, relatively
        assert row["train_loss"] == pytest.approx(sum(loss * count for loss, _, count in own) / images, rel=6e-6)
        assert row["train_acc1"] == pytest.approx(100 * sum(correct for _, correct, _ in own) / images, rel=6e-6)


@pytest.mark.parametrize("batch_size", [7, 50, 64])  # padded last batches of 6 and 14 rows, and one exact batch
def test_validation_over_padded_batches_equals_the_plain_computation(batch_size):
    """Fixed-size batches (no recompilation under torch.compile) change nothing: top-1 and top-5 are the same
    counts, the loss the same sum, as one plain pass over the split."""
    from cifar_train.data import DecodedSplit, MemoryEvalBatches
    from cifar_train.loop import validate
    from cifar_train.normalize import normalize

    generator = torch.Generator().manual_seed(0)
    split = DecodedSplit(
        torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (50,), generator=generator),
    )
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model, _ = _twins()
    model.eval()
    accelerator = Accelerator(cpu=True)
    batches = MemoryEvalBatches(split, mean=mean, std=std, batch_size=batch_size)
    got = validate(accelerator, model, batches, channels_last=False)
    with torch.no_grad():
        logits = model(normalize(split.images, mean, std))
    losses = torch.nn.functional.cross_entropy(logits, split.labels, reduction="none").double()
    top5 = (logits.topk(5, dim=1).indices == split.labels[:, None]).any(dim=1)
    assert got["val_acc1"] == 100.0 * (logits.argmax(dim=1) == split.labels).sum().item() / 50
    assert got["val_acc5"] == 100.0 * top5.sum().item() / 50
    assert got["val_loss"] == pytest.approx(losses.mean().item(), rel=1e-6)


class PythonTensors(HostReads):
    """Counts tensors built from Python data (`torch.tensor`, `as_tensor`, `asarray`, `new_tensor`) by cifar_train
    or accelerate code: on a GPU each one is a host-to-device copy that waits for the host. (A fill such as
    `torch.full((), n)` passes its value to a kernel, and is not one.)"""

    READS: ClassVar[set[str]] = {"tensor", "as_tensor", "asarray", "new_tensor"}


def test_no_tensor_is_built_from_python_values_per_batch(tmp_path, digits_dir, monkeypatch):
    """After the first batch has built the augmentation's constants, a training epoch builds one tensor (the stop
    flag at its one read) whatever its number of batches, and validation none. (Before: normalisation built its
    mean and std for every validation batch, RICAP its Beta distribution for every training batch.)"""
    recipe = write_recipe(
        tmp_path / "r.toml", digits_dir,
        augment={"mix": "ricap", "cutout": 4, "random_erasing": True, "crop_padding": 1, "hflip": True},
        train={"epochs": 2, "val_batch_size": 64, "checkpoint_every": 100}, log={"every_steps": 1000},
    )  # fmt: skip
    counts: dict[str, list[Counter]] = {"train_one_epoch": [], "validate": []}

    def counted(name: str):
        real = getattr(cifar_train.loop, name)

        def call(*args, **kwargs):
            with PythonTensors() as made:
                result = real(*args, **kwargs)
            counts[name].append(made.where)
            return result

        monkeypatch.setattr(cifar_train.loop, name, call)

    counted("train_one_epoch")
    counted("validate")
    cifar_train.loop.train(load_recipe(recipe), tmp_path / "run", log=lambda message: None)
    assert sum(counts["train_one_epoch"][1].values()) == 1, counts  # 4 batches, one read
    assert [sum(c.values()) for c in counts["validate"]] == [0, 0], counts  # 6 batches each


# --------------------------------------------------------------------------------------------------------------
# airbench's additions to the step: parameters that stop training, Lookahead


def test_a_parameter_frozen_after_step_n_is_left_alone_by_the_optimizer_from_step_n_plus_one():
    model, _ = _twins()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, fused=True)
    step = _step(model, optimizer=optimizer, freeze_after={"stem.conv.weight": 2})
    frozen, free = step.model.stem.conv.weight, step.model.head.fc.weight
    seen = [(frozen.detach().clone(), free.detach().clone())]
    for index in range(1, 5):
        step(*_batch(seed=index), index)
        seen.append((frozen.detach().clone(), free.detach().clone()))
    moved = [not torch.equal(seen[i][0], seen[i - 1][0]) for i in range(1, 5)]
    assert moved == [True, True, False, False], "momentum and weight decay must not move it after step 2 either"
    assert all(not torch.equal(seen[i][1], seen[i - 1][1]) for i in range(1, 5))


def test_a_frozen_name_that_is_no_parameter_is_refused_with_a_suggestion():
    model, _ = _twins()
    with pytest.raises(UserError, match=r"names 'stem.conv.bais', .* \(did you mean 'stem.conv.weight'"):
        _step(model, freeze_after={"stem.conv.bais": 3})
    with pytest.raises(UserError, match=r"train.freeze_after_epochs: 'stem.conv.weight' = -1 must be a number"):
        load_recipe(None, ["train.freeze_after_epochs={ 'stem.conv.weight' = -1 }"])


def test_the_step_drives_its_lookahead_after_every_optimizer_step():
    calls = []

    class Recorder:
        def step(self, index: int) -> None:
            calls.append(index)

    model, _ = _twins()
    step = _step(model, lookahead=Recorder())
    for index in (1, 2, 3):
        step(*_batch(seed=index), index)
    assert calls == [1, 2, 3]
