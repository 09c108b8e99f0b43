"""One optimizer step, with no host read of a device value.

`TrainStep` runs forward and backward for a batch (the seed's ghost batches: `subdivision` chunks, one
optimizer step; Dual-Cutout: two views of every image), clips the gradients, applies the non-finite-loss
policy and adds the batch to running sums that stay on the device (`RunningMetrics`). The loop reads those
sums every `log.every_steps` steps and at the end of an epoch, never per step: a GPU would otherwise wait
for the host at every `.item()`.

Non-finite losses: with `"stop"` the sums count them and the loop stops at its next read (the weights may
already be NaN by then; the last good checkpoint is kept). With `"skip"` the optimizer step is skipped on the
device, the way gradient scalers do: fused SGD/Adam/AdamW take a `found_inf` flag. Other optimizers (LARS,
AdaBound, timm's) have no such kernel, so under `"skip"` they read one flag per step.

Under fp16 Accelerate's gradient scaler already skips every step whose gradients are not finite (a gradient
overflow while its scale settles, and every step with a non-finite loss, whose gradients are NaN too), so no
inf/NaN ever reaches the weights. Those non-finite-loss steps are counted as skipped under either policy, and
`"stop"` stops only when the loss stays non-finite for `FP16_STOP_AFTER` optimizer steps in a row: while every
step is skipped the weights cannot change, so the run has stalled (see `nonfinite_stop`).

With `compile`, the forward pass and the loss are one `torch.compile`d function; autograd then runs the
compiled backward, so the whole step is compiled, not only the forward. Compiled steps keep their gradients in
buffers allocated once (see `persistent_gradients`); validation runs the model eagerly (see `TrainStep`).

Two additions of airbench's (https://arxiv.org/abs/2404.00498): `freeze_after` names parameters that stop training
after a given optimizer step (their gradients are dropped before each later step, so the optimizer leaves them
alone: no update, no weight decay, no momentum, as a parameter with `requires_grad = False` would be), and a
`lookahead` (`cifar_train.lookahead.ModelLookahead`) is stepped after every optimizer step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator

from .errors import UserError, did_you_mean
from .losses import dual_cutout_loss, soft_correct, soft_cross_entropy
from .running import RunningMetrics
from .schema import COMPILE_MODES, FP16_STOP_AFTER, Findings, checked_section

__all__ = [
    "CUDA_GRAPH_MODES",
    "FP16_STOP_AFTER",
    "TrainStep",
    "check_step",
    "compile_mode",
    "nonfinite_stop",
    "per_process_batch",
    "persistent_gradients",
]

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes whose steps replay CUDA graphs


def check_step(*, batch_size: int, subdivision: int, grad_accum_steps: int, **train: Any) -> Findings:
    """The rules of the train section that need no data: the ghost batch divides the batch, and is not combined
    with gradient accumulation (both split a batch); `freeze_after_epochs` holds epochs >= 0. `train` takes the
    other `[train]` settings these rules read (missing ones at the schema's defaults)."""
    t = checked_section("train", train)
    if batch_size % subdivision:
        raise UserError(f"train.batch_size = {batch_size} is not divisible by train.subdivision = {subdivision}")
    if subdivision > 1 and grad_accum_steps > 1:
        raise UserError("train.subdivision and train.grad_accum_steps both split the batch; use one of them")
    for name, epochs in t.freeze_after_epochs.items():
        if isinstance(epochs, bool) or not isinstance(epochs, int | float) or not 0 <= epochs < math.inf:
            raise UserError(
                f"train.freeze_after_epochs: {name!r} = {epochs!r} must be a number of epochs >= 0 after which the "
                "parameter stops training"
            )
    found = Findings()
    if t.lookahead_steps == 0:
        for key in ("lookahead_decay", "lookahead_decay_power"):
            found.ignored[f"train.{key}"] = "train.lookahead_steps = 0"
    return found


def frozen_parameters(model: nn.Module, freeze_after: dict[str, int]) -> list[tuple[nn.Parameter, int]]:
    """`(parameter, last optimizer step it trains in)` for names of `model.named_parameters()`; a UserError names
    an unknown one (with "did you mean")."""
    named = dict(model.named_parameters())
    found = []
    for name, last_step in freeze_after.items():
        if name not in named:
            raise UserError(
                f"train.freeze_after_epochs names {name!r}, which is no parameter of the model"
                f"{did_you_mean(name, named)}"
            )
        found.append((named[name], last_step))
    return found


def per_process_batch(batch_size: int, num_processes: int, *, subdivision: int, mix: str) -> int:
    """The global batch split over processes; refused when it does not split evenly."""
    per_process, remainder = divmod(batch_size, num_processes)
    if remainder or per_process % subdivision:
        raise UserError(
            f"train.batch_size = {batch_size} must split evenly over {num_processes} process(es) and then into "
            f"train.subdivision = {subdivision} chunks"
        )
    if mix in ("mixup", "cutmix") and per_process % 2:
        raise UserError(
            f"augment.mix = {mix!r} needs an even batch per process; train.batch_size = {batch_size} over "
            f"{num_processes} process(es) gives {per_process}"
        )
    return per_process


def compile_mode(compile: bool | str) -> str | None:
    """`model.compile` as a torch.compile mode, or None for eager."""
    if compile not in COMPILE_MODES:
        raise UserError(
            f"model.compile = {compile!r} is not allowed; choose one of {', '.join(map(repr, COMPILE_MODES))}"
        )
    if compile is False:
        return None
    return "default" if compile is True else compile


def persistent_gradients(*, mode: str | None, chunks: int, channels_last: bool) -> bool:
    """Whether a compiled step keeps every gradient in a buffer allocated once, before the first backward, with its
    parameter's exact layout, and zeroes it in place after each optimizer step instead of setting it to None.

    `chunks` counts the backward passes per optimizer step (`train.subdivision` x `train.grad_accum_steps`).
    The compiled backward hands its gradients to autograd, which keeps them as `.grad` when none exists yet. Two
    things then go wrong that such buffers (an in-place add of each backward's gradient) prevent:

    - CUDA graphs (`reduce-overhead`, `max-autotune`) with several backward passes per step: the handed-over
      gradient lives in the graphs' memory pool, and the next chunk's replay overwrites it before that chunk's
      gradient is added to it (torch then raises "accessing ... tensor output of CUDAGraphs that has been
      overwritten"). A buffer allocated outside the graphs is not theirs to reuse.
    - NCHW parameters: inductor runs convolutions in channels_last and returns the gradients of 1x1 convolutions
      with channels_last strides; autograd accepts them (they differ only in size-1 dimensions), the fused
      SGD/Adam/AdamW kernels refuse them on a GPU. A `zeros_like(param)` buffer has the parameter's strides.

    Otherwise torch's default stays, which saves one add per parameter and backward: with channels_last
    parameters (`model.channels_last`, the default) inductor's convolution gradients share their layout, and an
    unsplit step with CUDA graphs uses its gradients before the next replay. (With buffers, a parameter that no
    forward pass uses has a zero gradient rather than none, so weight decay still reaches it; every CIFAR model
    here uses all of its parameters.)
    """
    if mode is None:
        return False
    return (mode in CUDA_GRAPH_MODES and chunks > 1) or not channels_last


def nonfinite_stop(summary: dict[str, Any], *, policy: str, scaled: bool) -> str | None:
    """Why the run must stop for non-finite losses (the start of the loop's message), or None to go on.

    `summary` is a `RunningMetrics.read()`; `scaled` says that a gradient scaler (fp16) checks every step. "skip"
    never stops. "stop" stops at the first non-finite loss, except under a scaler: it has already skipped those
    steps (their gradients are not finite either), so a short spell, e.g. one batch overflowing fp16 in the
    forward pass, costs nothing, and the run stops only after `FP16_STOP_AFTER` such steps in a row, when it
    has stalled (no step changes the weights, so the next batches overflow the same way).
    """
    if policy != "stop" or not summary["nonfinite"]:
        return None
    first = summary["first_nonfinite"]
    if not scaled:
        return f"the loss is not finite (NaN or inf) at step {first}"
    if summary["skipped_run"] < FP16_STOP_AFTER:
        return None
    return (
        f"the loss was not finite (NaN or inf) in {summary['skipped_run']} optimizer steps in a row under fp16 "
        f"(the first non-finite one at step {first}); the gradient scaler skipped them, so the weights have not "
        "changed since"
    )


class TrainStep:
    """Forward, backward and optimizer step of one batch under Accelerate, metrics on the device.

    Call it with a batch from the batch source: `(images, soft targets)`, where Dual-Cutout batches hold the
    two views stacked, `[view1; view2]`, with their targets repeated.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        subdivision: int,
        dual_cutout_alpha: float,
        label_smoothing: float,
        grad_clip: float,
        nonfinite_loss: str,
        channels_last: bool,
        compile: bool | str = False,
        compile_backend: str = "inductor",
        freeze_after: dict[str, int] | None = None,  # parameter name -> last optimizer step it trains in
        lookahead: Any = None,  # a cifar_train.lookahead.ModelLookahead, stepped after each optimizer step
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.subdivision = subdivision
        self.dual_cutout_alpha = dual_cutout_alpha
        self.label_smoothing = label_smoothing
        self.grad_clip = grad_clip
        self.nonfinite_loss = nonfinite_loss
        self.channels_last = channels_last
        self.metrics = RunningMetrics(accelerator.device)
        self.frozen_after = frozen_parameters(accelerator.unwrap_model(model), dict(freeze_after or {}))
        self.lookahead = lookahead
        self._group_finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
        self.scaler = accelerator.scaler  # fp16: Accelerate's GradScaler; it skips steps with non-finite gradients
        inner = getattr(optimizer, "optimizer", optimizer)
        self._device_skip = getattr(inner, "_step_supports_amp_scaling", False) and self.scaler is None
        self.mode = compile_mode(compile)
        chunks = subdivision * accelerator.gradient_accumulation_steps
        self.persistent_grads = persistent_gradients(mode=self.mode, chunks=chunks, channels_last=channels_last)
        if self.persistent_grads:
            _allocate_gradients(model)
        self._loss_fn = self._loss_and_correct
        if self.mode is not None:
            options = {"mode": self.mode} if compile_backend == "inductor" else {}  # the modes are inductor's presets
            self._loss_fn = torch.compile(self._loss_and_correct, backend=compile_backend, **options)
        # Validation calls the model uncompiled. Compiling it too would not reuse the step's graph but add a second
        # compilation (eval-mode BatchNorm and no backward make another graph, and with CUDA graphs a second set of
        # recorded graphs) for a pass over the validation split that is a small share of an epoch's time.
        self.eval_model = model

    def _loss_and_correct(
        self, views: tuple[torch.Tensor, ...], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [self.model(view) for view in views]
        if self.dual_cutout_alpha > 0:
            loss = dual_cutout_loss(outputs[0], outputs[1], targets, self.dual_cutout_alpha)
        else:
            loss = soft_cross_entropy(outputs[0], targets)
        return loss, soft_correct(outputs[0].detach(), targets, self.label_smoothing)

    def forward_backward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Forward and backward one batch; returns (mean loss, soft-correct sum, images) as device tensors.

        Ghost batches: the chunks run one after another (each its own BatchNorm statistics), gradients add up,
        and DDP synchronises on the last chunk only.
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.dual_cutout_alpha > 0:
            half = len(images) // 2
            views, targets = (images[:half], images[half:]), targets[:half]
        else:
            views = (images,)
        chunks = [view.chunk(self.subdivision) for view in views]
        chunk_targets = targets.chunk(self.subdivision)
        total = torch.zeros((), device=images.device)
        correct = torch.zeros((), device=images.device)
        for j, target in enumerate(chunk_targets):
            last = j == len(chunk_targets) - 1
            if self.mode in CUDA_GRAPH_MODES:  # a new replay: the previous chunk's graph outputs are used up
                torch.compiler.cudagraph_mark_step_begin()
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                loss, chunk_correct = self._loss_fn(tuple(c[j] for c in chunks), target)
                self.accelerator.backward(loss / len(chunk_targets))
            total += loss.detach() / len(chunk_targets)
            correct += chunk_correct
        return total, correct, len(targets)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> int:
        """Train on one batch; `step` is the 1-based optimizer step it belongs to (to name a bad step).

        Returns the number of images trained in this process (Dual-Cutout's two views count once).
        """
        with self.accelerator.accumulate(self.model):
            loss, correct, count = self.forward_backward(images, targets)
            finite = torch.isfinite(loss)
            self._group_finite &= finite
            if self.accelerator.sync_gradients:
                self._optimizer_step(step)
        self.metrics.add(loss, correct, count, finite, step)
        return count

    def _optimizer_step(self, step: int) -> None:
        for param, last_step in self.frozen_after:
            if step > last_step:
                param.grad = None  # the optimizer skips it: no update, no weight decay, no momentum
        if self.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is not None or self.nonfinite_loss == "skip":
            bad = ~self._group_finite
            if self.accelerator.num_processes > 1:  # every rank skips together, and counts the same
                bad = self.accelerator.reduce(bad.float(), reduction="sum") > 0
            self.metrics.skipped(bad)
            if self.scaler is not None:
                # Under fp16 the scaler decides: it skips a step whose gradients are not finite, and a non-finite
                # loss (fp16 logits that overflowed) always has such gradients. Stepping it on every step also keeps
                # its state consistent (an unscale_ for clipping must be followed by step and update).
                self.optimizer.step()
            elif self._device_skip:
                self._gated_step(bad)
            elif not bool(bad):  # the one host read of "skip" on optimizers without a found_inf kernel
                self.optimizer.step()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.persistent_grads)
        self._group_finite.fill_(True)
        if self.lookahead is not None:
            self.lookahead.step(step)

    def _gated_step(self, bad: torch.Tensor) -> None:
        """Step with a device-side flag: a fused kernel leaves weights and optimizer state alone where it is set."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if isinstance(inner, torch.optim.SGD):
            # A skipped first step would leave SGD's momentum buffer uninitialised; a zero buffer gives the
            # same first step as torch's (buf = g).
            for group in inner.param_groups:
                for p in group["params"]:
                    if group["momentum"] and "momentum_buffer" not in inner.state[p]:
                        inner.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        inner.grad_scale, inner.found_inf = None, bad.float()
        try:
            self.optimizer.step()
        finally:
            del inner.grad_scale, inner.found_inf


def _allocate_gradients(model: nn.Module) -> None:
    """A zero gradient for every trainable parameter, with the parameter's own strides (`zeros_like` keeps them),
    allocated here, outside any CUDA graph; autograd then adds each backward's gradient into it in place."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
