"""timm's model contract, checked on every model `cifar_models` registers, with no per-model code.

A new variant is picked up automatically; its exact parameter count must be added to `PARAM_COUNTS` (the one
place counts are asserted). Each model is built once, by the module-scoped `built` fixture: pytest runs all the
tests of one model together, then drops it. Tests that change a model change a deep copy.

Checks that exercise a family's code rather than a variant's data (create-time kwargs, feature extractors,
TorchScript, FX, gradient checkpointing) run on the smallest registered model of each family (`ON_SAMPLE`
reuses the same built models).
Family-specific architecture checks live in test_model_families.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import cached_property

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import model_entrypoint
from timm.models._features import FeatureListNet

import cifar_models
from cifar_models import CIFAR10_MEAN, CIFAR10_STD, FAMILY_MODULES, list_cifar_models

# Exact parameter counts at 10 classes, 3x32x32 (design.md's table; seed-exact except the two bottleneck
# ResNet families, which follow the paper's widths).
PARAM_COUNTS = {
    "vgg15_bn": 14_728_266,
    "resnet20": 272_474,
    "resnet32": 466_906,
    "resnet44": 661_338,
    "resnet56": 855_770,
    "resnet110": 1_730_714,
    "resnet1202": 19_424_026,
    "resnet164": 1_704_154,
    "resnet_preact20": 272_282,
    "resnet_preact32": 466_714,
    "resnet_preact44": 661_146,
    "resnet_preact56": 855_578,
    "resnet_preact110": 1_730_522,
    "resnet_preact164": 1_703_258,
    "resnet_preact1001": 10_327_706,
    "resnet_preact50": 758_362,
    "se_resnet_preact110": 1_748_792,
    "wrn16_4": 2_748_890,
    "wrn16_8": 10_961_370,
    "wrn28_10": 36_479_194,
    "wrn40_4": 8_949_210,
    "densenet40_k12": 1_059_298,
    "densenet100_k12": 7_083_538,
    "densenet100_k24": 28_071_706,
    "densenet_bc100_k12": 769_162,
    "densenet_bc250_k24": 15_324_406,
    "densenet_bc190_k40": 25_624_430,
    "pyramidnet110_84": 3_904_446,
    "pyramidnet110_270": 28_485_477,
    "pyramidnet164_270": 27_216_021,
    "pyramidnet272_200": 26_210_842,
    "resnext29_4x64d": 17_562_442,
    "resnext29_8x64d": 34_426_698,
    "resnext29_16x64d": 68_155_210,
    "shake_shake26_2x32d": 2_923_162,
    "shake_shake26_2x64d": 11_653_978,
    "shake_shake26_2x96d": 26_192_922,
    "shake_shake26_2x128d": 46_539_994,
    "airbench94": 1_972_792,  # as the published lib_airbench94.make_net94 counts it (1,971,352 of them train)
}

# Registered variants built with non-default kwargs, as the seed's tables use them.
KWARG_PARAM_COUNTS = [
    ("resnet_preact20", dict(initial_channels=64), 4_326_986),  # "widening factor 4"
]

# Too slow for a backward pass on 2 shared CPU cores (over ~25M parameters, or 1000 layers): these get a no-grad
# training forward (output shape) only. The smaller variants of each family run the same code with a backward.
FORWARD_ONLY = {
    "resnet1202",
    "resnet_preact1001",
    "wrn28_10",
    "densenet100_k24",
    "densenet_bc250_k24",
    "densenet_bc190_k40",
    "pyramidnet110_270",
    "pyramidnet164_270",
    "pyramidnet272_200",
    "resnext29_8x64d",
    "resnext29_16x64d",
    "shake_shake26_2x96d",
    "shake_shake26_2x128d",
}

ALL_MODELS = list_cifar_models()
TRAIN_BATCH = 2  # training-mode forward/backward
EVAL_BATCH = 1  # eval-mode checks: a sample's output does not depend on its batch (test_eval_output_is_per_sample)


def _smallest_per_family() -> list[str]:
    """The smallest registered model of each family module: the sample for the family-level checks."""
    sample = []
    for module in FAMILY_MODULES:
        names = timm.list_models(module=module)
        if names:
            sample.append(min(names, key=lambda n: PARAM_COUNTS.get(n, float("inf"))))
    return sample


SAMPLE_MODELS = _smallest_per_family()
ON_SAMPLE = pytest.mark.parametrize("built", SAMPLE_MODELS, indirect=True)  # the `built` fixture, on the sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _input(model: nn.Module, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(seed))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_same_maps(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


class Built:
    """One registered model, shared by its tests, and its outputs, each computed once.

    The first use runs one training-mode forward at batch `TRAIN_BATCH` (with gradients, except for FORWARD_ONLY):
    it is `train_output` for test_train_forward_backward, and it sets the BN running statistics to that batch's,
    so that `model` is then in eval mode as after training. (Freshly initialised statistics, mean 0 and var 1,
    make very deep post-activation nets such as resnet1202 overflow in eval mode, which says nothing about them.)
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._model = _create(name)

    @cached_property
    def train_output(self) -> torch.Tensor:
        for module in self._model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # cumulative average: after one batch, the running stats are that batch's
        x = _input(self._model, TRAIN_BATCH, seed=2)
        with torch.set_grad_enabled(self.name not in FORWARD_ONLY):
            out = self._model.train()(x)
        self._model.eval()
        return out

    @property
    def model(self) -> nn.Module:
        self.train_output  # noqa: B018  (BN statistics first)
        return self._model

    @cached_property
    def x(self) -> torch.Tensor:
        return _input(self._model, EVAL_BATCH)

    @cached_property
    def features(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.forward_features(self.x)

    @cached_property
    def intermediates(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            return self.model.forward_intermediates(self.x)


# The quick loop (`pytest -m "not slow"`) checks every family on its smaller variants; `pytest` checks all.
@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=pytest.mark.slow) if name in FORWARD_ONLY else name for name in ALL_MODELS],
)
def built(request: pytest.FixtureRequest) -> Built:
    return Built(request.param)


# Registry ---------------------------------------------------------------------------------------------------


def test_registry_lists_every_table_model():
    missing = sorted(set(PARAM_COUNTS) - set(ALL_MODELS))
    assert not missing, f"in the design table but not registered by cifar_models: {missing}"


def test_every_family_registers_models():
    empty = [module for module in FAMILY_MODULES if not timm.list_models(module=module)]
    assert not empty, f"family modules that register no model: {empty}"
    assert all(getattr(cifar_models, module).__name__ == f"cifar_models.{module}" for module in FAMILY_MODULES)
    assert set(FAMILY_MODULES) <= set(cifar_models.__all__)


def test_param_count(built: Built):
    assert built.name in PARAM_COUNTS, f"{built.name} is registered but has no expected count in PARAM_COUNTS; add it"
    assert _n_params(built.model) == PARAM_COUNTS[built.name]


@pytest.mark.parametrize(("name", "kwargs", "expected"), KWARG_PARAM_COUNTS)
def test_param_count_with_kwargs(name: str, kwargs: dict, expected: int):
    assert _n_params(_create(name, **kwargs)) == expected


# Every model: forward, head, pretrained cfg, intermediates ----------------------------------------------------


def test_train_forward_backward(built: Built):
    """Training-mode forward at batch 2, then a backward that reaches every trainable parameter (airbench94 freezes
    its whitening filters and BN scales). The largest models (FORWARD_ONLY) run the forward without gradients:
    their backward costs too much CPU time."""
    out = built.train_output
    assert out.shape == (TRAIN_BATCH, 10)
    assert torch.isfinite(out).all()
    if built.name not in FORWARD_ONLY:
        out.square().mean().backward()
        model = built.model
        no_grad = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
        ]
        model.zero_grad(set_to_none=True)
        assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


def test_timm_contract(built: Built):
    """Attributes, forward_features -> forward_head(pre_logits=...) and the classifier they reach.
    (`forward` is checked by test_train_forward_backward, repeatability by test_forward_intermediates,
    `reset_classifier` on each family by test_reset_classifier.)"""
    model, x, features = built.model, built.x, built.features
    cfg = model.pretrained_cfg
    assert model.num_classes == 10
    assert model.num_features == model.feature_info[-1]["num_chs"]
    with torch.no_grad():
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    assert features.shape[:2] == (len(x), model.num_features)
    assert tuple(features.shape[2:]) == tuple(cfg["pool_size"])
    assert pre_logits.shape == (len(x), model.head_hidden_size)
    assert logits.shape == (len(x), 10)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert (classifier.in_features, classifier.out_features) == (model.head_hidden_size, 10)
    torch.testing.assert_close(logits, classifier(pre_logits))


def test_pretrained_cfg(built: Built):
    model = built.model
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["num_classes"] == 10
    assert tuple(cfg["mean"]) == CIFAR10_MEAN
    assert tuple(cfg["std"]) == CIFAR10_STD
    assert len(cfg["pool_size"]) == 2
    state = model.state_dict()
    first_conv, classifier = cfg["first_conv"], cfg["classifier"]
    assert f"{first_conv}.weight" in state, f"first_conv {first_conv!r} is not a parameter"
    assert state[f"{first_conv}.weight"].shape[1] == 3
    assert f"{classifier}.weight" in state, f"classifier {classifier!r} is not a parameter"
    assert state[f"{classifier}.weight"].shape[0] == 10
    assert model.get_classifier() is model.get_submodule(classifier)


def test_forward_intermediates(built: Built):
    """One map per `feature_info` level, of its channels and reduction (a map may be one pixel short of the input
    over the reduction: airbench94's unpadded 2x2 stem); the last is what the head sees; `indices` as a list with
    negative entries and `stop_early` select the same maps."""
    model, x = built.model, built.x
    final, maps = built.intermediates
    info = model.feature_info
    assert len(maps) == len(info)
    for fmap, f in zip(maps, info):
        assert fmap.shape[:2] == (len(x), f["num_chs"]), f["module"]
        for side, map_side in zip(x.shape[-2:], fmap.shape[-2:]):
            assert -(-side // f["reduction"]) - map_side in (0, 1), f["module"]
    assert torch.equal(final, built.features)
    assert torch.equal(maps[-1], final)

    with torch.no_grad():
        early_final, early_maps = model.forward_intermediates(x, indices=[0, -2], stop_early=True)
    _assert_same_maps(early_maps, [maps[0], maps[-2]])
    assert torch.equal(early_final, maps[-2]), "stop_early ends at the last level asked for"


@ON_SAMPLE
def test_forward_intermediates_index_forms(built: Built):
    """`indices` as a count of last levels with `intermediates_only`; bad indices and layouts are errors."""
    model, x = built.model, built.x
    _, maps = built.intermediates
    with torch.no_grad():
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    _assert_same_maps(last_two, maps[-2:])
    with pytest.raises(ValueError, match="NHWC"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(AssertionError, match="out of range"):
        model.forward_intermediates(x, indices=[len(maps)])


def test_prune_intermediate_layers(built: Built):
    """A model pruned to some levels gives the unpruned model's maps for them and has no head."""
    _, maps = built.intermediates
    n_levels = len(built.model.feature_info)
    model = copy.deepcopy(built.model)
    kept = model.prune_intermediate_layers([0, -2])
    assert kept == [0, n_levels - 2]
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    assert model.num_features == model.feature_info[n_levels - 2]["num_chs"]
    with torch.no_grad():
        final, pruned_maps = model.forward_intermediates(built.x, indices=kept)
        assert torch.equal(model.forward_head(final), final), "a pruned model neither pools nor classifies"
    _assert_same_maps(pruned_maps, [maps[0], maps[-2]])
    assert torch.equal(final, maps[-2])


# Every family: create-time kwargs, feature extractors, export paths -------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_reset_classifier(name: str):
    model = _create(name).eval()
    with torch.no_grad():
        features = model.forward_features(_input(model, EVAL_BATCH))
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model.forward_head(features).shape == (EVAL_BATCH, 5)
        model.reset_classifier(0, "")
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model.forward_head(features), features)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_create_unpooled(name: str):
    model = _create(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        out = model(_input(model, EVAL_BATCH))
    assert out.ndim == 4
    assert out.shape[:2] == (EVAL_BATCH, model.num_features)
    assert tuple(out.shape[2:]) == tuple(model.pretrained_cfg["pool_size"])


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_one_channel_28x28_and_100_classes(name: str):
    """MNIST-family input (1 channel, 28x28) and a CIFAR-100-sized head, in one build."""
    model = _create(name, in_chans=1, num_classes=100).train()
    assert model.num_classes == 100
    assert model.state_dict()[f"{model.pretrained_cfg['first_conv']}.weight"].shape[1] == 1
    with torch.no_grad():
        out = model(torch.randn(TRAIN_BATCH, 1, 28, 28))
    assert out.shape == (TRAIN_BATCH, 100)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_drop_rate_is_classifier_dropout(name: str):
    """`drop_rate` is timm's dropout before the classifier in every family: it acts on the pooled features only."""
    model = _create(name, drop_rate=0.5).eval()
    assert model.drop_rate == 0.5 and model.head.drop.p == 0.5
    with torch.no_grad():
        features = model.forward_features(_input(model, TRAIN_BATCH))
        model.head.train()
        assert not torch.equal(model.forward_head(features), model.forward_head(features))
        model.head.eval()
        assert torch.equal(model.forward_head(features), model.forward_head(features))


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_feature_extractors_agree(name: str):
    """`features_only` (timm's FeatureListNet, as for timm's own CNNs), the 'getter' wrapper around
    `forward_intermediates` and the FX extractor return the same maps, one per `feature_info` level."""
    model = _create(name).eval()
    info = model.feature_info
    extractors = {cls: _create(name, features_only=True, feature_cls=cls).eval() for cls in ("getter", "fx")}
    extractors["default"] = _create(name, features_only=True).eval()
    assert isinstance(extractors["default"], FeatureListNet)
    x = _input(model, EVAL_BATCH)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        for cls, extractor in extractors.items():
            assert extractor.feature_info.channels() == [f["num_chs"] for f in info], cls
            assert extractor.feature_info.reduction() == [f["reduction"] for f in info], cls
            _assert_same_maps(extractor(x), expected)
    # the getter prunes the model to the levels it returns: all of them here, so only the classifier goes
    assert _n_params(extractors["getter"]) == _n_params(model) - _n_params(model.get_classifier())


@ON_SAMPLE
def test_eval_output_is_per_sample(built: Built):
    """In eval mode a sample's output does not depend on the rest of its batch (BN uses running statistics).

    Float64, because in float32 batch-size-dependent conv algorithms differ by up to 2% after 1000 layers."""
    model = copy.deepcopy(built.model).double()
    x = _input(model, 2).double()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-7, atol=1e-7)


@pytest.mark.slow  # TorchScript (deprecated in torch, still in timm's own contract tests): 10 s of the quick loop
@ON_SAMPLE
def test_torchscript(built: Built):
    model, x = built.model, built.x
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@ON_SAMPLE
def test_fx_symbolic_trace(built: Built):
    model, x = built.model, built.x
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@ON_SAMPLE
def test_grad_checkpointing(built: Built):
    """Checkpointing (one segment per block) keeps the outputs and the intermediates, and trains every parameter."""
    model, x = copy.deepcopy(built.model), built.x
    _, plain_maps = built.intermediates
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        checkpointed, checkpointed_maps = model(x), model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(checkpointed, model.forward_head(built.features))
    torch.testing.assert_close(checkpointed_maps, plain_maps)
    model.train()(_input(model, TRAIN_BATCH)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert isinstance(model.group_matcher(), dict)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_bad_init_mode_is_a_value_error(name: str):
    with pytest.raises(ValueError, match="kaiming_fan_out"):
        timm.create_model(name, init_mode="orthogonal")


_BASELINE_SCRIPT = """
import json, timm
print(json.dumps({m: timm.list_models(module=m) for m in timm.list_modules()}))
"""


@pytest.mark.slow
def test_import_shadows_no_timm_name_or_group():
    """timm without cifar_models (fresh interpreter) vs timm after `import cifar_models`: nothing of timm's changed."""
    assert "cifar_models" in sys.modules
    done = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], capture_output=True, text=True, check=True)
    baseline: dict[str, list[str]] = json.loads(done.stdout)
    builtin_names = {name for names in baseline.values() for name in names}

    assert not set(FAMILY_MODULES) & set(baseline), "a family module is named like a timm module"
    assert not set(ALL_MODELS) & builtin_names, "a cifar_models name shadows a timm model"
    for module, names in baseline.items():
        assert timm.list_models(module=module) == names, f"timm group {module!r} changed"
    moved = [n for n in sorted(builtin_names) if not model_entrypoint(n).__module__.startswith("timm.")]
    assert not moved, f"timm names now built by other code: {moved[:5]}"
    assert set(timm.list_modules()) == set(baseline) | set(FAMILY_MODULES)
