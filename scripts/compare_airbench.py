"""Our airbench94 against the published code: the network, the whitening statistics, the schedules, the per-step
updates of the whole recipe, and test-time augmentation, on the CPU in fp32.

The published code is the `airbench` package (version 0.1.8, `lib_airbench94.py` and `utils.py`), installed apart
from the project, never a dependency:

    pip download airbench==0.1.8 --no-deps -d /tmp/airbench_pkg
    pip install --no-deps --target /tmp/airbench_site /tmp/airbench_pkg/airbench-0.1.8.tar.gz
    python scripts/compare_airbench.py --airbench /tmp/airbench_site --dataset ../shared/datasets/cifar10

The published code runs on a CUDA GPU in fp16. Here its functions run on the CPU: `.cuda()` is a no-op while its
network is built, which is then cast to fp32; its CUDA timers are stand-ins that time nothing; its own test loader is
not built (nothing is evaluated during its training); its training loop is fed batches through a stand-in loader.
Both sides then see the same fp32 inputs. Two things are aligned on purpose, each reported on its own first: the
whitening statistics are computed by the published function from float64 patches (it casts them to fp32, whose sum
over millions of patches moves the smallest eigenvalues by about 1%), and the published Lookahead copy is re-taken
after its whitening step (it takes it before; see recipes/speedrun/airbench94.toml). Prints one line per check and
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import math
import re
import sys
import textwrap
from collections.abc import Iterator

import timm
import torch
import torch.nn as nn

import cifar_models  # noqa: F401
from cifar_train.components import build_augment
from cifar_train.data import MemoryTrainBatches, load_dataset_splits
from cifar_train.data.decoded import DecodedSplit
from cifar_train.data.info import DatasetInfo
from cifar_train.data_init import init_from_data
from cifar_train.lookahead import ModelLookahead
from cifar_train.normalize import normalize
from cifar_train.optim import create_optimizer
from cifar_train.recipe import load_recipe
from cifar_train.schedule import create_scheduler, run_steps, schedule_curve
from cifar_train.schema import section_kwargs
from cifar_train.tta import tta_log_probs, tta_views

RECIPE = "recipes/speedrun/airbench94.toml"
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILED.append(name)


def ours_name(published: str) -> str:
    """A published state-dict key as ours: 0. -> stem.conv., 2./3./4. -> stages.N.0., 7. -> head.fc."""
    name = re.sub(r"^0\.", "stem.conv.", published)
    name = re.sub(r"^([234])\.", lambda m: f"stages.{int(m.group(1)) - 2}.0.", name)
    return re.sub(r"^7\.", "head.fc.", name)


def max_difference(ours: dict[str, torch.Tensor], published: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest |ours - published| / (1 + |published|) over every floating-point entry, and where."""
    worst, where = 0.0, ""
    for key, value in published.items():
        if not value.is_floating_point():
            continue
        mine = ours[ours_name(key)].double()
        gap = float(((mine - value.double()).abs() / (1 + value.double().abs())).max())
        if gap > worst:
            worst, where = gap, ours_name(key)
    return worst, where


@contextlib.contextmanager
def published_on_cpu(airbench_lib, utils) -> Iterator[None]:
    """The published code's CUDA calls as no-ops for the duration: `.cuda()`, its timers, its own test loader."""

    class Timer:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def record(self) -> None:
            pass

        def elapsed_time(self, other) -> float:
            return 0.0

    saved = (nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize, utils.CifarLoader)
    nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.Event, torch.cuda.synchronize = Timer, lambda *args: None
    utils.CifarLoader = lambda *args, **kwargs: None  # train() builds a test loader it only uses when verbose
    try:
        yield
    finally:
        nn.Module.cuda, torch.cuda.Event, torch.cuda.synchronize, utils.CifarLoader = saved


def published_net(airbench_lib) -> nn.Module:
    return airbench_lib.make_net94().float().to(memory_format=torch.contiguous_format)


def nested_function(function, name: str):
    """A function defined inside `function` (the published `triangle` lives inside `train`), compiled from source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "<published>", "exec"), namespace)
    return namespace[name]


def training_images(dataset: str | None, count: int) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    if dataset:
        train, _, info = load_dataset_splits(dataset, val_split="test")
        return train.images[:count].clone(), train.labels[:count].clone(), info.mean, info.std
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(count, 3, 36, 36, generator=generator)
    blurred = nn.functional.avg_pool2d(noise, 5, stride=1) * 2.5
    images = (blurred * 50 + 128).clamp(0, 255).round().to(torch.uint8)
    return images, torch.randint(0, 10, (count,), generator=generator), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)


def check_network(airbench_lib, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    published = airbench_lib.make_net94()  # fp16, as published
    torch.manual_seed(0)
    ours = timm.create_model("airbench94")
    ours_state = ours.state_dict()
    same = all(torch.equal(ours_state[ours_name(k)].to(v.dtype), v) for k, v in published.state_dict().items())
    report("same initial weights from the same seed", same, "ours rounded to fp16 equal the published net exactly")
    count = (sum(p.numel() for p in published.parameters()), sum(p.numel() for p in ours.parameters()))
    report("parameter count", count[0] == count[1], f"published {count[0]:,}, ours {count[1]:,}")

    ours.init_from_images(images)  # whitened: a network that sees real structure
    published = published_net(airbench_lib)
    state = ours.state_dict()
    published.load_state_dict({k: state[ours_name(k)] for k in published.state_dict()})
    x = images[:8]
    for mode in ("eval", "train"):
        with torch.no_grad():
            a, b = ours.train(mode == "train")(x), published.train(mode == "train")(x)
        gap = float((a - b).abs().max())
        report(
            f"same outputs ({mode} mode)", gap < 1e-5, f"max |difference| {gap:.2e}, logits up to {b.abs().max():.2f}"
        )


def check_whitening(utils, images: torch.Tensor) -> None:
    model = timm.create_model("airbench94")
    model.init_from_images(images)
    ours = model.stem.conv.weight.detach().double().flatten(1)
    layer = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    utils.init_whitening_conv(layer, images)  # the published code, fp32
    fp32 = layer.weight.detach().double().flatten(1)
    sign = torch.sign((ours * fp32).sum(1, keepdim=True))
    relative = ((ours - sign * fp32).norm(dim=1) / ours.norm(dim=1)).max()
    flips = int((sign < 0).sum()) // 2
    report(
        "whitening filters, published fp32 vs ours (float64)",
        bool(relative < 0.05),
        f"{len(images)} images; largest relative filter difference {relative:.2e} (fp32 rounding of the published "
        f"sum), {flips} of 12 eigenvector signs differ",
    )
    get_patches = utils.get_patches
    utils.get_patches = lambda x, patch_shape: get_patches(x, patch_shape).double()  # the published method in float64
    try:
        utils.init_whitening_conv(layer, images)
    finally:
        utils.get_patches = get_patches
    fp64 = layer.weight.detach().double().flatten(1)
    relative = ((ours - fp64).norm(dim=1) / ours.norm(dim=1)).max()
    report("whitening filters, published method in float64 vs ours", bool(relative < 1e-5), f"{relative:.2e}")


def check_schedules(utils, airbench_lib) -> None:
    hyp = airbench_lib.hyp["opt"]
    total = math.ceil(50_000 // hyp["batch_size"] * hyp["train_epochs"])
    triangle = nested_function(utils.train, "triangle")(total, start=0.2, end=0.07, peak=0.23)
    recipe = load_recipe(RECIPE)
    curve = schedule_curve(
        steps_per_epoch=50_000 // 1024, epochs=recipe.train.epochs, **section_kwargs(recipe.schedule)
    )
    gap = max(abs(curve(k) - float(triangle[k])) for k in range(total + 1))
    report("triangle schedule", total == curve.main_steps and gap < 1e-6, f"{total} steps, max difference {gap:.1e}")
    alpha = 0.95**5 * (torch.arange(total + 1) / total) ** 3  # the published expression of the Lookahead share
    t = recipe.train
    lookahead = ModelLookahead(
        nn.Linear(1, 1), total_steps=total, lookahead_steps=t.lookahead_steps, lookahead_decay=t.lookahead_decay,
        lookahead_decay_power=t.lookahead_decay_power,
    )  # fmt: skip
    same = all(lookahead.decay(k) == float(alpha[k]) for k in range(total + 1))
    report("Lookahead share schedule", same, "equal at every step (float32, as published)")


def our_batches(recipe, images, labels, mean, std) -> MemoryTrainBatches:
    info = DatasetInfo(
        name="compare", num_classes=10, class_names=[str(i) for i in range(10)], channels=3, image_size=(32, 32),
        mean=mean, std=std,
    )  # fmt: skip
    return MemoryTrainBatches(
        DecodedSplit(images, labels), build_augment(recipe, info), batch_size=recipe.train.batch_size,
        num_replicas=1, rank=0, seed=recipe.train.seed, device="cpu",
    )  # fmt: skip


def train_ours(recipe, batches, mean, std, epochs_batches) -> tuple[list[dict], nn.Module]:
    """The components as the loop wires them; a state snapshot before every step, and the final state."""
    from accelerate import Accelerator

    from cifar_train.step import TrainStep

    torch.manual_seed(0)
    model = timm.create_model("airbench94")
    optimizer = create_optimizer(model, **section_kwargs(recipe.optim))
    steps_per_epoch, t = len(batches), recipe.train
    scheduler = create_scheduler(
        optimizer, steps_per_epoch=steps_per_epoch, epochs=t.epochs, **section_kwargs(recipe.schedule)
    )
    init_from_data(model, batches, mean=mean, std=std, images=recipe.model.data_init_images)
    total = run_steps(steps_per_epoch, t.epochs)
    lookahead = ModelLookahead(
        model, total_steps=total, lookahead_steps=t.lookahead_steps, lookahead_decay=t.lookahead_decay,
        lookahead_decay_power=t.lookahead_decay_power,
    )  # fmt: skip
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(
        accelerator, model, optimizer, subdivision=1, dual_cutout_alpha=0.0, grad_clip=0.0, nonfinite_loss="stop",
        label_smoothing=recipe.augment.label_smoothing, channels_last=False, lookahead=lookahead,
        freeze_after={k: run_steps(steps_per_epoch, e) for k, e in t.freeze_after_epochs.items()},
    )  # fmt: skip
    snapshots, done = [], 0
    for epoch_batches in epochs_batches:
        for inputs, targets in epoch_batches:
            if done == total:
                break
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            step(inputs, targets, done + 1)
            scheduler.step()
            done += 1
    return snapshots, model


def train_published(airbench_lib, utils, recipe, batches, epochs_batches, ours_initial) -> tuple[list[dict], nn.Module]:
    """The published `train()` on the same batches (hard labels), from the same initial weights."""
    holder: dict[str, nn.Module] = {}
    snapshots: list[dict] = []
    states: list = []

    class SnapshotAfterWhitening(utils.LookaheadState):
        def __init__(self, net) -> None:
            super().__init__(net)
            states.append(self)

    def make_net() -> nn.Module:
        net = published_net(airbench_lib)
        net.load_state_dict({k: ours_initial[ours_name(k)] for k in net.state_dict()})
        holder["net"] = net
        return net

    class Loader:  # the published loop's view of a loader: our batches, hard labels
        batch_size = recipe.train.batch_size
        epoch = 0
        images = batches.images.float() / 255
        normalize = staticmethod(
            lambda x: normalize((x * 255).round().to(torch.uint8), batches.augment.mean, batches.augment.std)
        )

        def __len__(self) -> int:
            return len(batches)

        def __iter__(self):
            for inputs, targets in epochs_batches[self.epoch]:
                snapshots.append({k: v.clone() for k, v in holder["net"].state_dict().items()})
                yield inputs, targets.argmax(dim=1)
            self.epoch += 1

    init_whitening_conv, get_patches, lookahead_state = (
        utils.init_whitening_conv,
        utils.get_patches,
        utils.LookaheadState,
    )

    def whiten_then_snapshot(layer, train_set, eps=5e-4):
        init_whitening_conv(layer, train_set, eps)
        for state in states:  # the Lookahead copy of the whitening weights, taken after the whitening step
            state.net_ema["0.weight"].copy_(layer.weight)

    utils.init_whitening_conv, utils.LookaheadState = whiten_then_snapshot, SnapshotAfterWhitening
    utils.get_patches = lambda x, patch_shape: get_patches(x, patch_shape).double()
    try:
        t, o = recipe.train, recipe.optim
        net = utils.train(
            Loader(), t.epochs, recipe.augment.label_smoothing, learning_rate=11.5, bias_scaler=o.norm_bias_lr_scale,
            momentum=o.momentum, weight_decay=0.0153, whiten_bias_epochs=t.freeze_after_epochs["stem.conv.bias"],
            tta_level=2, make_net=make_net, run=0, verbose=False,
        )  # fmt: skip
    finally:
        utils.init_whitening_conv, utils.get_patches, utils.LookaheadState = (
            init_whitening_conv,
            get_patches,
            lookahead_state,
        )
    return snapshots, net


def check_training(airbench_lib, utils, images, labels, mean, std, batch_size: int) -> None:
    """The recipe at `batch_size` (lr scaled linearly, as the published lr per 1024 images is) for a few steps."""
    epochs, images_used = 2.5, 4 * batch_size
    recipe = load_recipe(
        RECIPE,
        [f"train.batch_size={batch_size}", f"optim.lr={1.5 * batch_size / 1024}", f"train.epochs={epochs}",
         "train.freeze_after_epochs={ 'stem.conv.bias' = 1 }", f"model.data_init_images={images_used}"],
    )  # fmt: skip
    batches = our_batches(recipe, images[:images_used], labels[:images_used], mean, std)
    torch.manual_seed(1)
    epochs_batches = [list(batches.epoch(e)) for e in range(math.ceil(epochs))]  # the same inputs for both
    ours_snaps, ours_model = train_ours(recipe, batches, mean, std, epochs_batches)
    torch.manual_seed(0)
    initial = timm.create_model("airbench94").state_dict()
    published_snaps, published_model = train_published(airbench_lib, utils, recipe, batches, epochs_batches, initial)
    steps = len(ours_snaps)
    report("steps", steps == len(published_snaps), f"ours {steps}, published {len(published_snaps)} (2.5 epochs of 4)")
    worst = 0.0
    for index, (a, b) in enumerate(zip(ours_snaps, published_snaps)):
        gap, where = max_difference(a, b)
        worst = max(worst, gap)
        when = f"after step {index}" if index else "before step 1 (after the whitening step)"
        print(f"     {when}: largest difference {gap:.2e} ({where})")
    gap, where = max_difference(ours_model.state_dict(), published_model.state_dict())
    print(f"     final (after the last Lookahead sync): {gap:.2e} ({where})")
    worst = max(worst, gap)
    report("per-step updates of the whole recipe", worst < 1e-4, f"largest relative difference {worst:.2e}")


def check_tta(airbench_lib, utils, images, mean, std) -> None:
    torch.manual_seed(0)
    model = timm.create_model("airbench94").eval()
    normalised = normalize(images, mean, std)
    model.init_from_images(normalised)
    published = published_net(airbench_lib)
    published.load_state_dict({k: model.state_dict()[ours_name(k)] for k in published.state_dict()})
    published.eval()

    class Loader:
        def __init__(self) -> None:
            self.images = images.float() / 255
            self.normalize = lambda x: normalize((x * 255).round().to(torch.uint8), mean, std)

    with torch.no_grad():
        theirs = utils.infer(published, Loader(), tta_level=2)
        logit_mean = sum(w * model(v) for w, v in tta_views(normalised, "flip_translate"))
        ours = tta_log_probs(model, normalised, "flip_translate", channels_last=False)
    gap = float((logit_mean - theirs).abs().max())
    report("TTA views and weights", gap < 1e-4, f"our six views, logits averaged, vs published infer(): {gap:.1e}")
    agree = int((ours.argmax(1) == theirs.argmax(1)).sum())
    print(
        f"note TTA prediction: the softmax mean (ours) and the logit mean (published) pick the same class for {agree} "
        f"of {len(images)} images (of a network not trained; the recipe says why we average probabilities)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--airbench", required=True, help="folder holding the installed `airbench` package")
    parser.add_argument("--dataset", help="training images (e.g. ../shared/datasets/cifar10); default: synthetic")
    parser.add_argument("--whitening-images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the per-step comparison")
    args = parser.parse_args()
    sys.path.insert(0, args.airbench)
    import airbench.lib_airbench94 as airbench_lib
    import airbench.utils as utils

    torch.set_num_threads(2)
    images, labels, mean, std = training_images(args.dataset, max(args.whitening_images, 4 * args.batch_size))
    print(f"published code: {inspect.getsourcefile(airbench_lib)}; images: {args.dataset or 'synthetic'}")
    with published_on_cpu(airbench_lib, utils):
        normalised = normalize(images[: args.whitening_images], mean, std)
        check_network(airbench_lib, normalised)
        check_whitening(utils, normalised)
        check_schedules(utils, airbench_lib)
        check_training(airbench_lib, utils, images, labels, mean, std, args.batch_size)
        check_tta(airbench_lib, utils, images[:500], mean, std)
    print("all checks passed" if not FAILED else f"failed: {', '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
