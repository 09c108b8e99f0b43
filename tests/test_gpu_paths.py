"""The GPU-only paths of the train step, tested as far as a CPU allows: CUDA-graph modes with split batches,
gradient layouts under inductor, one compilation per run, fp16's gradient scaler, SyncBatchNorm.

CUDA graphs, fused kernels' layout checks and Accelerate's own GradScaler exist only on a GPU; what is tested here
is what the step does about them, with the real torch.compile, Accelerate and (where noted) GradScaler on a CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from helpers import ROOT, assert_one_line_error, free_port, run_main, write_recipe
from test_step import HostReads, _step

import cifar_models  # noqa: F401
from cifar_train.cli import main
from cifar_train.components import sync_batchnorm
from cifar_train.step import CUDA_GRAPH_MODES, FP16_STOP_AFTER, TrainStep, nonfinite_stop


def _tiny_net() -> nn.Module:
    """A 1x1 convolution (inductor returns its gradient with channels_last strides), BatchNorm and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 10),
    )  # fmt: skip


def _twins(make=_tiny_net) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model, twin = make(), make()
    twin.load_state_dict(model.state_dict())
    return model, twin


def _batch(size: int = 8, seed: int = 0, spatial: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, spatial, spatial, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator)
    return images, nn.functional.one_hot(labels, 10).float()


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs with split batches, and gradient layouts


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "split"), list(zip(CUDA_GRAPH_MODES, ["subdivision", "grad_accum_steps"])))
def test_cuda_graph_modes_add_every_chunk_into_gradient_buffers_allocated_before_the_graphs(monkeypatch, mode, split):
    """With CUDA graphs and several backward passes per optimizer step, every gradient lives in one buffer allocated
    before the first compiled backward (outside the graphs' memory, which each replay reuses), each chunk adds into
    it in place, and each chunk starts a new graph step; the result equals the eager step. (Before: gradients were
    set to None after every step, so the first chunk's gradient was the graph's own output, which the next chunk's
    replay overwrites on a GPU; and max-autotune's steps were not marked.)"""
    marks = []
    real_mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: (marks.append(1), real_mark()))
    model, twin = _twins()
    accumulate = 2 if split == "grad_accum_steps" else 1
    subdivision = 2 if split == "subdivision" else 1

    def accelerator() -> Accelerator:
        return Accelerator(cpu=True, gradient_accumulation_steps=accumulate)

    graphed = _step(
        model, accelerator=accelerator(), subdivision=subdivision, compile=mode, compile_backend="aot_eager"
    )
    buffers = {name: p.grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.stride() == p.stride() and not p.grad.any(), name
    eager = _step(twin, accelerator=accelerator(), subdivision=subdivision)
    batches = [_batch(seed=seed) for seed in range(2 * accumulate)]  # two optimizer steps
    for index, (images, targets) in enumerate(batches):
        graphed(images, targets, index // accumulate + 1)
        eager(images, targets, index // accumulate + 1)
    assert len(marks) == 2 * subdivision * accumulate  # one per backward pass
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is buffers[name] and not p.grad.any(), f"{name}: not the same buffer, zeroed in place"
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_inductor_gradients_of_an_nchw_model_keep_their_parameters_strides():
    """Inductor (here on the CPU, as on a GPU) runs convolutions in channels_last and returns a 1x1 convolution's
    weight gradient with channels_last strides, which the fused SGD/Adam/AdamW kernels refuse on a GPU ("params,
    grads ... must have same dtype, device, and layout"). A compiled NCHW step keeps every gradient in its
    parameter's strides. (Before: the 1x1 convolution's gradient came back as (3, 1, 3, 3) for a (3, 1, 1, 1)
    weight.)"""
    model, _ = _twins()
    step = _step(model, compile="default")
    step.forward_backward(*_batch())
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), f"{name}: gradient strides {p.grad.stride()}, weight {p.stride()}"


def test_a_compiled_run_compiles_the_train_step_only():
    """Validation calls the model uncompiled: one compilation per run, not a second for an eval-mode graph (and,
    with CUDA graphs, a second set of graphs). (Before: `eval_model` was a second `torch.compile` of the model.)"""
    from torch._dynamo.utils import counters

    from cifar_train.data import DecodedSplit, MemoryEvalBatches
    from cifar_train.loop import validate

    torch._dynamo.reset()
    model, _ = _twins()
    step = _step(model, compile="default", compile_backend="aot_eager")
    step(*_batch(), 1)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 1
    generator = torch.Generator().manual_seed(0)
    split = DecodedSplit(
        torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (20,), generator=generator),
    )
    batches = MemoryEvalBatches(split, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=8)
    validate(step.accelerator, step.eval_model, batches, channels_last=False)
    step.model.train()  # as the next epoch does
    step(*_batch(seed=1), 2)
    assert counters["stats"]["unique_graphs"] == compiled


# ----------------------------------------------------------------------------------------------------------
# fp16: the gradient scaler decides which steps are skipped


def _scaled_step(model: nn.Module, **options) -> TrainStep:
    """A step under Accelerate's fp16 path with a real GradScaler. Accelerate makes its scaler only for a CUDA
    device, so here the Accelerator is given a CPU GradScaler before `prepare`: the loss is scaled in
    `accelerator.backward`, and `AcceleratedOptimizer.step` runs `scaler.step` and `scaler.update`, as on a GPU."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return _step(model, accelerator=accelerator, **options)


def _poisoned(images: torch.Tensor) -> torch.Tensor:
    images = images.clone()
    images[0] = float("inf")
    return images


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_fp16_a_nonfinite_loss_is_a_step_the_scaler_skipped_not_a_reason_to_stop(policy):
    """Under a gradient scaler a non-finite loss has non-finite gradients, so the scaler skips the step (weights and
    momentum untouched, its scale halved) with no host read; the step counts as skipped, and "stop" does not stop
    for it. (Before: "stop" stopped the run at the next read, and "skip" read a flag per step and bypassed the
    scaler, whose scale then never came down.)"""
    model, _ = _twins()
    step = _scaled_step(model, nonfinite_loss=policy)
    images, targets = _batch()
    step(images, targets, 1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    scale = step.scaler.get_scale()
    with HostReads() as reads:
        step(_poisoned(images), targets, 2)
    assert reads.total == 0, reads.where
    assert step.scaler.get_scale() == scale / 2
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed in a skipped step"
    step(images, targets, 3)
    summary, _ = step.metrics.read(step.accelerator)
    counted = (summary["nonfinite"], summary["skipped"], summary["skipped_run"], summary["first_nonfinite"])
    assert counted == (1, 1, 1, 2)
    assert nonfinite_stop(summary, policy=policy, scaled=True) is None
    assert not torch.equal(model[-1].weight, before["5.weight"])  # the next good step trained


def test_fp16_stop_stops_when_every_step_has_been_skipped_for_a_while():
    """A run whose loss stays non-finite does not learn (every step is skipped, so the weights never change):
    "stop" stops it once FP16_STOP_AFTER optimizer steps in a row were skipped, and names the first bad step."""
    model, _ = _twins()
    step = _scaled_step(model)
    images, targets = _batch()
    step(images, targets, 1)
    for index in range(FP16_STOP_AFTER - 1):
        step(_poisoned(images), targets, index + 2)
    summary, _ = step.metrics.read(step.accelerator)
    assert nonfinite_stop(summary, policy="stop", scaled=True) is None
    step(_poisoned(images), targets, FP16_STOP_AFTER + 1)
    summary, _ = step.metrics.read(step.accelerator)
    reason = nonfinite_stop(summary, policy="stop", scaled=True)
    assert reason is not None and f"in {FP16_STOP_AFTER} optimizer steps in a row" in reason, reason
    assert "at step 2" in reason


def test_nonfinite_policy_without_a_scaler_is_unchanged():
    """bf16 / fp32: "stop" stops at the first non-finite loss, "skip" never stops."""
    summary = {"nonfinite": 1, "first_nonfinite": 7, "skipped": 0, "skipped_run": 0}
    assert nonfinite_stop(summary, policy="stop", scaled=False) == "the loss is not finite (NaN or inf) at step 7"
    assert nonfinite_stop({**summary, "skipped": 1, "skipped_run": 1}, policy="skip", scaled=False) is None
    assert nonfinite_stop({**summary, "nonfinite": 0, "first_nonfinite": None}, policy="stop", scaled=False) is None


# ----------------------------------------------------------------------------------------------------------
# SyncBatchNorm


@pytest.mark.parametrize("dry_run", [False, True])
def test_sync_bn_on_one_process_is_refused_before_any_work(tmp_path, digits_dir, monkeypatch, dry_run):
    import cifar_train.loop

    def no_data(**kwargs):
        raise AssertionError("the dataset was opened before train.sync_bn was checked")

    monkeypatch.setattr(cifar_train.loop, "open_training_data", no_data)
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"sync_bn": True})
    extra = ["--dry-run"] if dry_run else []
    result = run_main(main, str(recipe), "--output-dir", str(tmp_path / "run"), *extra)
    assert_one_line_error(result, "train.sync_bn = true needs several processes, this run has 1", "set it false")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sync_bn_on_cpu_processes_under_torchrun_is_refused_before_any_work(tmp_path, digits_dir):
    """Two CPU processes: torch's SyncBatchNorm cannot train on CPU tensors, so the ranks refuse before they open
    anything (no process group, no run directory); the first rank says why, once."""
    recipe = write_recipe(tmp_path / "r.toml", digits_dir, train={"sync_bn": True, "batch_size": 64})
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(ROOT / "train_accelerate.py"), str(recipe), "--output-dir", str(tmp_path / "run"),
        ],
        capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    refusal = "error: train.sync_bn = true needs CUDA GPUs: torch's SyncBatchNorm cannot train on CPU processes"
    assert result.stderr.count(refusal) == 1, result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr  # torchrun's summary of the ranks' exit statuses
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["resnet_preact20", "mobilenetv3_small_050"])
def test_sync_batchnorm_keeps_the_weights_and_timms_norm_activation_layers(name):
    """Every BatchNorm becomes a SyncBatchNorm with the same parameters and statistics, including timm's fused
    BatchNorm + activation layers, which torch's own converter turns into plain SyncBatchNorms without their
    activation (ResNet-preact's last norm is one): outputs are unchanged."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    for module in model.modules():  # statistics other than the initial ones, so that a lost buffer shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        converted = sync_batchnorm(model)
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == norms > 0
        assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
        torch.testing.assert_close(converted.eval()(images), expected, rtol=0, atol=0)
