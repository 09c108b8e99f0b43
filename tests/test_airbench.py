"""airbench94 (`cifar_models.cifar_airbench`) and the data-dependent initialisation: the network against a hand-built
functional forward, the whitening filters against a direct eigendecomposition, the Dirac start, the frozen
parameters, and the init step as the loop runs it. The published recipe end to end (a short run, its resume) is at
the bottom; `scripts/compare_airbench.py` checks all of it against the published code itself."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_same_weights, checkpoints, read_metrics, run_main, write_parquet_dataset

import cifar_models  # noqa: F401
from cifar_models.cifar_airbench import PatchWhitening, patch_moments
from cifar_train import load_recipe
from cifar_train.cli import main
from cifar_train.components import build_model
from cifar_train.data import MemoryTrainBatches
from cifar_train.data.decoded import DecodedSplit
from cifar_train.data_init import init_from_data

ROOT_RECIPE = "recipes/speedrun/airbench94.toml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _smooth_images(count: int, seed: int = 0) -> torch.Tensor:
    """Images with neighbouring pixels correlated (blurred noise), as natural images are: their 2x2 patch
    statistics have a spread of eigenvalues like CIFAR's."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 3, 36, 36, generator=generator, dtype=torch.float64)
    kernel = torch.ones(3, 1, 5, 5, dtype=torch.float64) / 25
    mixed = noise + 0.5 * noise.mean(dim=1, keepdim=True)  # correlated channels
    return F.conv2d(mixed, kernel, groups=3).float() * 3  # (count, 3, 32, 32)


def _reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, training: bool) -> torch.Tensor:
    """airbench94 written out with torch.nn.functional from a state dict: whitening conv + bias, GELU, three
    groups of conv -> max pool -> BN -> GELU -> conv -> BN -> GELU, global max pool, linear without bias, x 1/9."""

    def bn(y: torch.Tensor, name: str) -> torch.Tensor:
        mean, var = state[f"{name}.running_mean"].clone(), state[f"{name}.running_var"].clone()
        weight, bias = state[f"{name}.weight"], state[f"{name}.bias"]
        return F.batch_norm(y, mean, var, weight, bias, training=training, momentum=0.4, eps=1e-12)

    x = F.gelu(F.conv2d(x, state["stem.conv.weight"], state["stem.conv.bias"]))
    for stage in range(3):
        p = f"stages.{stage}.0."
        x = F.gelu(bn(F.max_pool2d(F.conv2d(x, state[f"{p}conv1.weight"], padding=1), 2), f"{p}norm1"))
        x = F.gelu(bn(F.conv2d(x, state[f"{p}conv2.weight"], padding=1), f"{p}norm2"))
    pooled = x.amax(dim=(2, 3))
    return pooled @ state["head.fc.weight"].T / 9


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_equals_a_hand_built_reference(training: bool):
    torch.manual_seed(0)
    model = timm.create_model("airbench94")
    model.init_from_images(_smooth_images(64))
    with torch.no_grad():  # trained-looking statistics, so eval mode is not the identity BN
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.2, 0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.train(training)(x)
    torch.testing.assert_close(got, _reference_forward(state, x, training), rtol=1e-5, atol=1e-6)


def test_whitening_filters_are_the_eigenvectors_of_the_patch_second_moments():
    images = _smooth_images(200)
    layer = PatchWhitening(3, kernel_size=2, eps=5e-4)
    layer.init_from_images(images)

    # Directly: every 2x2 patch as a row (channel, row, column order), the uncentred second-moment matrix, eigh.
    patches = torch.stack(
        [images[:, :, i : i + 2, j : j + 2].reshape(len(images), 12) for i in range(31) for j in range(31)], dim=1
    ).reshape(-1, 12)
    moments = patches.double().T @ patches.double() / len(patches)
    torch.testing.assert_close(patch_moments(images, 2), moments, rtol=1e-10, atol=1e-12)
    values, vectors = torch.linalg.eigh(moments)
    values, vectors = values.flip(0), vectors.flip(1)  # largest first
    filters = layer.weight.double().reshape(24, 12)
    torch.testing.assert_close(filters[12:], -filters[:12])  # each filter and its negative
    expected = vectors.T / (values[:, None] + 5e-4).sqrt()
    signs = (filters[:12] * expected).sum(dim=1).sign()  # an eigenvector's sign is arbitrary
    torch.testing.assert_close(filters[:12], expected * signs[:, None], rtol=1e-5, atol=1e-6)
    # What the filters do: the whitened patches have second moments lambda / (lambda + eps), nearly the identity.
    whitened = filters[:12] @ moments @ filters[:12].T
    torch.testing.assert_close(whitened, torch.diag(values / (values + 5e-4)), rtol=1e-5, atol=1e-6)
    assert layer.bias.requires_grad and not layer.weight.requires_grad


def test_convs_start_as_the_identity_on_their_first_channels():
    torch.manual_seed(0)
    model = timm.create_model("airbench94")
    x = torch.randn(2, 64, 8, 8)
    for name in ("stages.0.0.conv2", "stages.1.0.conv1", "stages.2.0.conv2"):
        conv = model.get_submodule(name)
        inputs = x[:, : conv.in_channels] if conv.in_channels <= 64 else torch.randn(2, conv.in_channels, 8, 8)
        with torch.no_grad():
            out = conv(inputs)
        torch.testing.assert_close(out[:, : conv.in_channels], inputs, msg=name)
        if conv.out_channels > conv.in_channels:
            assert out[:, conv.in_channels :].abs().amin() > 0, "the other filters keep their random start"
    assert all(m.bias is None or not m.bias.any() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen[0] == "stages.0.0.norm1.weight" and frozen[-1] == "stem.conv.weight" and len(frozen) == 7


def test_the_dirac_recipe_option_starts_any_model_as_the_identity():
    torch.manual_seed(0)
    plain = build_model(load_recipe(None, ["model.name='resnet20'"]))
    torch.manual_seed(0)
    dirac = build_model(load_recipe(None, ["model.name='resnet20'", "model.dirac_init=true"]))
    conv = dirac.get_submodule("stages.1.0.conv2")  # 32 -> 32 channels, 3x3
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), x)
        assert not torch.allclose(plain.get_submodule("stages.1.0.conv2")(x), x)
    widening = dirac.get_submodule("stages.1.0.conv1")  # 16 -> 32, stride 2: the first 16 filters copy the input
    torch.testing.assert_close(widening.weight[:16, :, 1, 1], torch.eye(16))
    assert widening.weight[:16].abs().sum() == 16 and widening.weight[16:].abs().amin() > 0


def test_data_init_sees_the_first_training_images_whatever_the_rank():
    torch.manual_seed(0)
    images = (_smooth_images(80).clamp(-3, 3) * 40 + 128).round().to(torch.uint8)
    split = DecodedSplit(images, torch.zeros(80, dtype=torch.long))
    mean, std = (0.5, 0.4, 0.45), (0.25, 0.2, 0.3)
    weights = []
    for rank in range(2):
        batches = MemoryTrainBatches(
            split, lambda x, y: (x, y), batch_size=8, num_replicas=2, rank=rank, seed=0, device="cpu"
        )
        model = timm.create_model("airbench94")
        assert init_from_data(model, batches, mean=mean, std=std, images=50) == 50
        weights.append(model.stem.conv.weight.clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    expected = PatchWhitening(3)
    normalised = (images[:50].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected.init_from_images(normalised)
    torch.testing.assert_close(weights[0], expected.weight)
    assert init_from_data(timm.create_model("resnet20"), batches, mean=mean, std=std, images=50) == 0


# --------------------------------------------------------------------------------------------------------------
# The recipe, end to end on a tiny dataset


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cifar")
    write_parquet_dataset(root, splits={"train": 64, "test": 16}, size=32, classes=tuple(f"c{i}" for i in range(10)))
    return root


def _airbench_args(dataset, run_dir) -> list[str]:
    """The published recipe, shrunk: 64 images in batches of 16 (4 steps an epoch), 2.5 epochs = 10 steps, the
    whitening bias frozen after 1 epoch, Lookahead every 3 steps, a checkpoint every epoch."""
    overrides = [
        f"data.dataset={str(dataset)!r}", "train.batch_size=16", "train.epochs=2.5", "train.val_batch_size=16",
        "train.checkpoint_every=1", "train.lookahead_steps=3", "train.freeze_after_epochs={ 'stem.conv.bias' = 1 }",
        "model.data_init_images=32", "train.keep_checkpoints=3", "log.progress=false",
    ]  # fmt: skip
    return [ROOT_RECIPE, "--output-dir", str(run_dir), *[a for o in overrides for a in ("--set", o)]]


@pytest.mark.slow
def test_the_recipe_trains_a_fractional_last_epoch_and_resumes_bit_identically(tmp_path, tiny_cifar):
    run_dir = tmp_path / "run"
    result = run_main(main, *_airbench_args(tiny_cifar, run_dir))
    assert result.returncode == 0, result.stderr
    rows = read_metrics(run_dir)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 4), (2, 8), (2.5, 10)]
    assert rows[-1]["lr"] == pytest.approx(1.5 * 0.07)  # the triangle's end
    assert "val_acc1" in rows[0] and "val_acc1" in rows[-1]
    newest = checkpoints(run_dir)[-1]
    assert newest.name.startswith("step_000000010_e0003") and (newest / "loop_tensors.safetensors").is_file()

    # Resume from the end of epoch 1: data init not rerun, Lookahead's slow weights and the frozen bias restored.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    (resumed / "model.safetensors").unlink()
    for later in checkpoints(resumed)[1:]:
        shutil.rmtree(later)
    assert checkpoints(resumed)[0].name.startswith("step_000000004_e0001")
    result = run_main(main, "--resume", str(resumed))
    assert result.returncode == 0, result.stderr
    assert_same_weights(run_dir, resumed)
    assert [r["epoch"] for r in read_metrics(resumed)] == [1, 2, 2.5]
