"""Registry-parametrised tests: every model `cifar_models` registers gets the same checks, with no per-model code.

A new variant is picked up automatically; its exact parameter count must be added to `PARAM_COUNTS`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import model_entrypoint

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
}

# Registered variants built with non-default kwargs, as the seed's tables use them.
KWARG_PARAM_COUNTS = [
    ("resnet_preact20", dict(initial_channels=64), 4_326_986),  # "widening factor 4"
]

# Too slow for a backward pass on 2 CPU cores: these get a no-grad forward (output shape) only.
FORWARD_ONLY = {
    "resnet1202",
    "resnet_preact1001",
    "resnext29_16x64d",
    "densenet_bc250_k24",
    "densenet_bc190_k40",
    "pyramidnet272_200",
}

ALL_MODELS = list_cifar_models()
BACKWARD_MODELS = [name for name in ALL_MODELS if name not in FORWARD_ONLY]
FORWARD_ONLY_MODELS = [name for name in ALL_MODELS if name in FORWARD_ONLY]


def _smallest_per_family() -> list[str]:
    """The smallest registered model of each family module: the sample for the slow checks (script, FX)."""
    sample = []
    for module in FAMILY_MODULES:
        names = timm.list_models(module=module)
        if names:
            sample.append(min(names, key=lambda n: PARAM_COUNTS.get(n, float("inf"))))
    return sample


SAMPLE_MODELS = _smallest_per_family()
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 forwards are per-op overhead, not arithmetic: one thread is faster and avoids OpenMP spin-waits
    that multiply CPU time when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _create_eval(name: str, **kwargs) -> nn.Module:
    """A model in eval mode whose BN running statistics come from one batch, as after training.

    Freshly initialised statistics (mean 0, var 1) make very deep post-activation nets (resnet1202) overflow
    in eval mode, which says nothing about the model.
    """
    model = _create(name, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: after one batch, the running stats are that batch's
    with torch.no_grad():
        model.train()(torch.randn(4, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(2)))
    return model.eval()


def _input(model: nn.Module, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_table_model():
    missing = sorted(set(PARAM_COUNTS) - set(ALL_MODELS))
    assert not missing, f"in the design table but not registered by cifar_models: {missing}"


def test_every_family_registers_models():
    empty = [module for module in FAMILY_MODULES if not timm.list_models(module=module)]
    assert not empty, f"family modules that register no model: {empty}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_param_count(name: str):
    assert name in PARAM_COUNTS, f"{name} is registered but has no expected count in PARAM_COUNTS; add it"
    assert _n_params(_create(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize(("name", "kwargs", "expected"), KWARG_PARAM_COUNTS)
def test_param_count_with_kwargs(name: str, kwargs: dict, expected: int):
    assert _n_params(_create(name, **kwargs)) == expected


@pytest.mark.parametrize("name", BACKWARD_MODELS)
def test_forward_backward(name: str):
    model = _create(name).train()
    out = model(_input(model))
    assert out.shape == (BATCH, 10)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", FORWARD_ONLY_MODELS)
def test_forward_shape_only(name: str):
    """The largest models: forward only (backward skipped to keep CPU time small)."""
    model = _create(name).train()
    with torch.no_grad():
        out = model(_input(model))
    assert out.shape == (BATCH, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_timm_contract(name: str):
    """Attributes, forward_features/forward_head, classifier, reset_classifier, eval determinism, in one build;
    the classifier changes are checked on the cached features."""
    model = _create_eval(name)
    cfg, x = model.pretrained_cfg, _input(model)
    assert model.num_classes == 10
    assert model.num_features == model.feature_info[-1]["num_chs"]
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        whole = model(x)
    assert features.shape[:2] == (BATCH, model.num_features)
    assert tuple(features.shape[2:]) == tuple(cfg["pool_size"])
    assert pre_logits.shape == (BATCH, model.head_hidden_size)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert (classifier.in_features, classifier.out_features) == (model.head_hidden_size, 10)
    torch.testing.assert_close(logits, classifier(pre_logits))
    assert torch.equal(whole, logits), "eval-mode forward is not repeatable"

    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model.forward_head(features).shape == (BATCH, 5)
        model.reset_classifier(0, "")
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model.forward_head(features), features)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_create_unpooled(name: str):
    model = _create(name, num_classes=0, global_pool="").train()
    with torch.no_grad():
        out = model(_input(model))
    assert out.ndim == 4
    assert out.shape[:2] == (BATCH, model.num_features)
    assert tuple(out.shape[2:]) == tuple(model.pretrained_cfg["pool_size"])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_features_only(name: str):
    info = _create(name).feature_info
    model = _create(name, features_only=True).train()
    assert model.feature_info.channels() == [f["num_chs"] for f in info]
    assert model.feature_info.reduction() == [f["reduction"] for f in info]
    x = _input(model)
    with torch.no_grad():
        maps = model(x)
    assert len(maps) == len(info)
    for fmap, f in zip(maps, info):
        assert fmap.shape[:2] == (BATCH, f["num_chs"]), f["module"]
        assert x.shape[-1] // fmap.shape[-1] == f["reduction"], f["module"]
        assert x.shape[-2] // fmap.shape[-2] == f["reduction"], f["module"]
    assert tuple(maps[-1].shape[2:]) == tuple(model.pretrained_cfg["pool_size"])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pretrained_cfg(name: str):
    model = _create(name)
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


@pytest.mark.parametrize("name", ALL_MODELS)
def test_one_channel_28x28_and_100_classes(name: str):
    """MNIST-family input (1 channel, 28x28) and a CIFAR-100-sized head, in one build."""
    model = _create(name, in_chans=1, num_classes=100).train()
    assert model.num_classes == 100
    assert model.state_dict()[f"{model.pretrained_cfg['first_conv']}.weight"].shape[1] == 1
    with torch.no_grad():
        out = model(torch.randn(BATCH, 1, 28, 28))
    assert out.shape == (BATCH, 100)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_eval_output_is_per_sample(name: str):
    """In eval mode a sample's output does not depend on the rest of its batch (BN uses running statistics).

    Float64, because in float32 batch-size-dependent conv algorithms differ by up to 2% after 1000 layers."""
    model = _create_eval(name).double()
    x = _input(model).double()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_torchscript(name: str):
    model = _create_eval(name)
    scripted = torch.jit.script(model)
    x = _input(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_fx_symbolic_trace(name: str):
    model = _create_eval(name)
    traced = torch.fx.symbolic_trace(model)
    x = _input(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_fx_feature_extraction(name: str):
    """timm's FX feature extractor finds every `feature_info` module as a graph node."""
    model = _create(name, features_only=True, feature_cls="fx").eval()
    x = _input(model)
    with torch.no_grad():
        maps = model(x)
    assert [m.shape[1] for m in maps] == model.feature_info.channels()


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_grad_checkpointing_keeps_output(name: str):
    model = _create_eval(name)
    x = _input(model)
    with torch.no_grad():
        plain = model(x)
        model.set_grad_checkpointing(True)
        checkpointed = model(x)
    torch.testing.assert_close(checkpointed, plain)
    assert isinstance(model.group_matcher(), dict)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_bad_init_mode_is_a_value_error(name: str):
    with pytest.raises(ValueError, match="kaiming_fan_out"):
        timm.create_model(name, init_mode="orthogonal")


_BASELINE_SCRIPT = """
import json, timm
print(json.dumps({m: timm.list_models(module=m) for m in timm.list_modules()}))
"""


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


# Family-specific behaviour of the ResNet / ResNet-preact switches.


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet20", dict(depth=21)),
        ("resnet164", dict(depth=30)),  # 30 is not 9n + 2
        ("resnet_preact20", dict(block_type="bottle")),
        ("resnet_preact20", dict(preact_stage=(True, False))),
        ("se_resnet_preact110", dict(se_reduction=64)),  # 16 channels cannot be reduced 64-fold
        ("vgg15_bn", dict(layers=(2, 2, 3))),
    ],
)
def test_bad_architecture_kwargs_are_value_errors(name: str, kwargs: dict):
    with pytest.raises(ValueError, match="got"):
        timm.create_model(name, **kwargs)


def test_se_resnet_preact_switches_are_kwargs():
    """The registered SE default (no first ReLU, last BN, preact stages T/F/F) differs from plain switches."""
    default = _create("se_resnet_preact110")
    plain = _create("se_resnet_preact110", remove_first_relu=False, add_last_bn=False, preact_stage=(True,) * 3)
    block = default.stages[1][0]
    assert not block.preact and isinstance(block.act1, nn.Identity) and isinstance(block.bn3, nn.BatchNorm2d)
    assert plain.stages[1][0].preact and isinstance(plain.stages[1][0].bn3, nn.Identity)
    # the last-BN layers account for the difference: 2 x channels per block, 18 blocks per stage
    assert _n_params(default) - _n_params(plain) == 2 * 18 * (16 + 32 + 64)


def test_preact_first_block_shortcut_sees_preactivation():
    """With preact on, the shortcut of a stage's first block takes BN-ReLU(x), so it ignores negative inputs."""
    torch.manual_seed(0)
    model = timm.create_model("resnet_preact20", preact_stage=(True, False, False)).eval()
    on, off = model.stages[0][0], model.stages[1][0]
    x_on, x_off = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        # bn1 with running stats 0/1 and weight 1 is ~identity, so only x > 0 reaches the shortcut through ReLU
        torch.testing.assert_close(on(x_on), on(x_on.clamp(min=0)))
        assert not torch.allclose(off(x_off), off(x_off.clamp(min=0)))


# forward_intermediates / prune_intermediate_layers on every registered model.


def _assert_same_maps(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_intermediates(name: str):
    """One map per `feature_info` level, of its channels and reduction; the last is what the head sees; `indices`
    as a count and as a list with negative entries, `stop_early` and `intermediates_only` select the same maps."""
    model = _create_eval(name)
    x = _input(model)
    info = model.feature_info
    with torch.no_grad():
        features = model.forward_features(x)
        final, maps = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        early_final, early_maps = model.forward_intermediates(x, indices=[0, -2], stop_early=True)
    assert len(maps) == len(info)
    for fmap, f in zip(maps, info):
        assert fmap.shape[:2] == (BATCH, f["num_chs"]), f["module"]
        assert x.shape[-1] // fmap.shape[-1] == f["reduction"], f["module"]
    assert torch.equal(final, features)
    assert torch.equal(maps[-1], final)
    _assert_same_maps(last_two, maps[-2:])
    _assert_same_maps(early_maps, [maps[0], maps[-2]])
    assert torch.equal(early_final, maps[-2])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_prune_intermediate_layers(name: str):
    model = _create_eval(name)
    x = _input(model)
    n_levels = len(model.feature_info)
    with torch.no_grad():
        _, maps = model.forward_intermediates(x)
    kept = model.prune_intermediate_layers([0, -2])
    assert kept == [0, n_levels - 2]
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        final, pruned_maps = model.forward_intermediates(x, indices=kept)
        assert torch.equal(model.forward_head(final), final)
    _assert_same_maps(pruned_maps, [maps[0], maps[-2]])


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_features_only_getter_matches_default(name: str):
    default = _create(name, features_only=True).eval()
    getter = _create(name, features_only=True, feature_cls="getter").eval()
    x = _input(default)
    with torch.no_grad():
        _assert_same_maps(getter(x), default(x))
