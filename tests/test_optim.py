"""Optimizers: parameter groups by role, the seed's LARS by hand, AdaBound's bounds, every name builds and learns."""

from __future__ import annotations

import math

import pytest
import timm.layers
import timm.optim
import torch
from torch import nn

from cifar_train.errors import UserError
from cifar_train.optim import OPTIMIZER_NAMES, OWN_OPTIMIZER_NAMES, create_optimizer, param_groups
from cifar_train.seed_optimizers import LARS, AdaBound


class TinyNet(nn.Module):
    """Conv -> BN -> a BatchNorm registered under the name `conv` (so its weight is 'conv.weight', which the
    seed's substring rule would have decayed) -> GroupNorm -> timm LayerNorm2d -> pool -> final Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = timm.layers.LayerNorm2d(4)
        self.proj = nn.Conv2d(4, 4, 1, bias=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.gn(self.conv(torch.relu(self.bn(self.stem(x))))))
        return self.fc(self.proj(x).mean((2, 3)))


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_weight_decay_on_bn_groups_by_role_not_by_name():
    model = TinyNet()
    decay, no_decay = param_groups(model, weight_decay=5e-4, no_weight_decay_on_bn=True)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay["params"]) == {"stem.weight", "proj.weight", "fc.weight"}  # the classifier too
    assert _names(model, no_decay["params"]) == {
        "bn.weight",
        "bn.bias",
        "conv.weight",  # a BatchNorm, whatever its name
        "conv.bias",
        "gn.weight",
        "gn.bias",
        "ln.weight",
        "ln.bias",
        "proj.bias",
        "fc.bias",
    }


def test_without_the_flag_everything_decays_in_one_group():
    model = TinyNet()
    (group,) = param_groups(model, weight_decay=1e-4, no_weight_decay_on_bn=False)
    assert group["weight_decay"] == 1e-4
    assert _names(model, group["params"]) == {n for n, _ in model.named_parameters()}


def test_timm_resnet_groups_cover_every_parameter_once():
    model = timm.create_model("resnet18", num_classes=10)
    groups = param_groups(model, weight_decay=1e-4, no_weight_decay_on_bn=True)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decayed = _names(model, groups[0]["params"])
    assert "fc.weight" in decayed and all(n.endswith(".weight") and "bn" not in n for n in decayed)


def test_the_groups_reach_the_optimizer():
    model = TinyNet()
    opt = create_optimizer(model, name="sgd", lr=0.1, weight_decay=5e-4, no_weight_decay_on_bn=True)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("no_decay_on_bn", [False, True])
def test_normalisation_biases_get_their_own_lr_and_weight_decay_scale(no_decay_on_bn):
    model = TinyNet()
    opt = create_optimizer(
        model, name="sgd", lr=0.1, momentum=0.0, nesterov=False, weight_decay=1e-2,
        no_weight_decay_on_bn=no_decay_on_bn, norm_bias_lr_scale=64.0, norm_bias_weight_decay_scale=1 / 64,
    )  # fmt: skip
    *others, norm_biases = opt.param_groups
    assert _names(model, norm_biases["params"]) == {"bn.bias", "conv.bias", "gn.bias", "ln.bias"}  # by role
    assert norm_biases["lr"] == pytest.approx(6.4) and others[0]["lr"] == 0.1  # group 0 keeps the base lr
    assert norm_biases["weight_decay"] == (0.0 if no_decay_on_bn else pytest.approx(1e-2 / 64))
    assert [g["weight_decay"] for g in others] == ([1e-2, 0.0] if no_decay_on_bn else [1e-2])
    if not no_decay_on_bn:  # lr x weight decay, the decay per step, is the same for every parameter
        assert norm_biases["lr"] * norm_biases["weight_decay"] == pytest.approx(0.1 * 1e-2)

    # One plain SGD step: a normalisation bias moves by 64 x lr x (gradient) + lr x wd x (its value).
    bias = model.bn.bias
    with torch.no_grad():
        bias.copy_(torch.linspace(-1, 1, len(bias)))
    before = bias.detach().clone()
    grad = torch.linspace(0.5, -0.5, len(bias))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bias.grad = grad.clone()
    opt.step()
    expected = before - 6.4 * grad - (0.0 if no_decay_on_bn else 0.1 * 1e-2 * before)
    torch.testing.assert_close(bias.detach(), expected)


def _lars_step(w: list[float], g: list[float], buf: list[float], *, lr, momentum, wd, eps=1e-9, thresh=1e-2):
    """One step of the seed's LARS on plain Python floats."""
    w_norm = math.sqrt(sum(x * x for x in w))
    g_norm = math.sqrt(sum(x * x for x in g))
    local = 1.0 if w_norm < thresh else w_norm / (eps + g_norm + wd * w_norm)
    buf = [momentum * b + lr * local * (gi + wd * wi) for b, gi, wi in zip(buf, g, w)]
    return [wi - b for wi, b in zip(w, buf)], buf


def test_lars_two_steps_against_the_formula_including_the_threshold_branch():
    big = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # |w| = 5
    small = nn.Parameter(torch.tensor([0.003, -0.004], dtype=torch.float64))  # |w| = 0.005 < thresh
    idle = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))  # no gradient: untouched, no state
    opt = LARS([big, small, idle], lr=0.1, momentum=0.9, weight_decay=0.01)
    grads = {"big": ([0.6, 0.8], [-0.3, 0.5]), "small": ([0.2, 0.1], [0.05, -0.4])}

    expect = {"big": ([3.0, 4.0], [0.0, 0.0]), "small": ([0.003, -0.004], [0.0, 0.0])}
    for step in range(2):
        for name, p in (("big", big), ("small", small)):
            p.grad = torch.tensor(grads[name][step], dtype=torch.float64)
            w, buf = expect[name]
            expect[name] = _lars_step(w, grads[name][step], buf, lr=0.1, momentum=0.9, wd=0.01)
        grad_before = big.grad.clone()
        opt.step()
        assert big.tolist() == pytest.approx(expect["big"][0], rel=1e-12)
        assert small.tolist() == pytest.approx(expect["small"][0], rel=1e-12)
        assert opt.state[big]["momentum_buffer"].tolist() == pytest.approx(expect["big"][1], rel=1e-12)
        assert torch.equal(big.grad, grad_before)  # the seed added weight decay into .grad; we do not
    assert idle.item() == 1.0 and idle not in opt.state
    # the threshold branch really differs: with the trust ratio the small tensor would move far more
    w_norm, g_norm = 0.005, math.hypot(0.2, 0.1)
    assert w_norm / (1e-9 + g_norm + 0.01 * w_norm) < 0.03


def test_lars_closure_returns_the_loss():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([p], lr=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    assert p.tolist() != [1.0, 2.0]


def test_adabound_first_step_and_the_bounds_follow_the_schedule():
    g = [0.5, 100.0, 1e-6]  # Adam's rate inside the bounds, below the lower bound, above the upper bound
    lr, final_lr, gamma, b1, b2, eps = 0.01, 0.1, 0.5, 0.9, 0.999, 1e-8
    p = nn.Parameter(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    opt = AdaBound([p], lr=lr, betas=(b1, b2), final_lr=final_lr, gamma=gamma, eps=eps)
    opt.param_groups[0]["lr"] = lr / 2  # a schedule halves the lr: final_lr halves with it
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    fl = final_lr / 2
    lower, upper = fl * (1 - 1 / (gamma * 1 + 1)), fl * (1 + 1 / (gamma * 1))  # bounds at step t = 1
    rates = [(lr / 2) * math.sqrt(1 - b2) / (1 - b1) / (math.sqrt((1 - b2) * gi * gi) + eps) for gi in g]
    assert lower < rates[0] < upper and rates[1] < lower and rates[2] > upper
    expected = [1.0 - min(max(rate, lower), upper) * (1 - b1) * gi for rate, gi in zip(rates, g)]
    assert p.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adabound_weight_decay_l2_or_decoupled(decoupled):
    p = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = AdaBound([p], lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)
    p.grad = torch.tensor([0.0], dtype=torch.float64)
    opt.step()
    if decoupled:  # gradient zero: only w -= wd * w happens
        assert p.item() == pytest.approx(2.0 * (1 - 0.1))
    else:  # L2: the gradient becomes wd * w = 0.2 and Adam moves by about the bounded rate
        assert p.item() < 2.0 and opt.state[p]["exp_avg"].item() == pytest.approx(0.1 * 0.2)


def _adabound_reference(w, g, state, *, t, lr, final_lr, betas, gamma, eps, wd, decoupled, amsbound):
    """AdaBound on one tensor, written out from the paper's update (the vectorised step must agree)."""
    b1, b2 = betas
    g = g + wd * w if wd and not decoupled else g
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["v"] = b2 * state["v"] + (1 - b2) * g * g
    state["vmax"] = torch.maximum(state["vmax"], state["v"])
    denom = (state["vmax"] if amsbound else state["v"]).sqrt() + eps
    rate = lr * math.sqrt(1 - b2**t) / (1 - b1**t) / denom
    rate = rate.clamp(final_lr * (1 - 1 / (gamma * t + 1)), final_lr * (1 + 1 / (gamma * t)))
    w = w * (1 - wd) if wd and decoupled else w
    return w - rate * state["m"]


@pytest.mark.parametrize("decoupled,amsbound", [(False, False), (True, False), (False, True)])
def test_adabound_vectorised_step_equals_the_per_tensor_update(decoupled, amsbound):
    """Several steps over tensors of two dtypes and shapes, one of them without a gradient every other step (so
    the step counts differ), against the per-tensor formula."""
    generator = torch.Generator().manual_seed(0)
    shapes_dtypes = [((3, 4), torch.float64), ((5,), torch.float64), ((2, 2), torch.float32)]
    params = [nn.Parameter(torch.randn(*shape, generator=generator, dtype=dtype)) for shape, dtype in shapes_dtypes]
    settings = dict(betas=(0.9, 0.99), gamma=1e-2, eps=1e-8, weight_decay=0.05)
    opt = AdaBound(params, lr=0.01, final_lr=0.1, decoupled_weight_decay=decoupled, amsbound=amsbound, **settings)
    expected = [p.detach().clone() for p in params]
    states = [
        {"m": torch.zeros_like(w), "v": torch.zeros_like(w), "vmax": torch.zeros_like(w), "t": 0} for w in expected
    ]
    for step in range(6):
        for index, p in enumerate(params):
            p.grad = None if (index == 1 and step % 2) else torch.randn(p.shape, generator=generator, dtype=p.dtype)
        opt.param_groups[0]["lr"] = 0.01 * (1 - step / 10)  # a schedule: final_lr follows it
        opt.step()
        for index, p in enumerate(params):
            if p.grad is None:
                continue
            states[index]["t"] += 1
            expected[index] = _adabound_reference(
                expected[index], p.grad, states[index], t=states[index]["t"], lr=opt.param_groups[0]["lr"],
                final_lr=0.1 * (1 - step / 10), betas=settings["betas"], gamma=settings["gamma"],
                eps=settings["eps"], wd=settings["weight_decay"], decoupled=decoupled, amsbound=amsbound,
            )  # fmt: skip
    assert [opt.state[p]["step"] for p in params] == [6, 3, 6]
    for p, want in zip(params, expected, strict=True):
        tolerance = 1e-12 if p.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(p.detach(), want, rtol=tolerance, atol=tolerance)


TIMM = set(timm.optim.list_optimizers())
# learning rates that make a few steps of each optimizer clearly reduce the loss of the tiny task
LEARNING_RATES = {"sgd": 0.1, "lars": 0.02, "adabound": 0.01, "adaboundw": 0.01}
TIMM_NAMES = [
    n for n in ("lamb", "adamp", "sgdp", "lookahead_adamw") if n.removeprefix("lookahead_") in OPTIMIZER_NAMES
]


@pytest.mark.parametrize("name", [*OWN_OPTIMIZER_NAMES, *TIMM_NAMES])
def test_every_optimizer_builds_steps_and_learns(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(64, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()  # a separable task: any working optimizer gets the loss down fast
    opt = create_optimizer(
        model, name=name, lr=LEARNING_RATES.get(name, 0.01), weight_decay=1e-4, no_weight_decay_on_bn=True
    )
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    ("name", "kind", "check"),
    [
        ("lars", LARS, lambda o: o.defaults["thresh"] == 0.02),
        ("adaboundw", AdaBound, lambda o: o.defaults["decoupled_weight_decay"] and o.defaults["final_lr"] == 0.05),
        ("adabound", AdaBound, lambda o: not o.defaults["decoupled_weight_decay"]),
        ("amsgrad", torch.optim.Adam, lambda o: o.defaults["amsgrad"] and o.defaults["betas"] == (0.8, 0.99)),
        ("adamw", torch.optim.AdamW, lambda o: o.defaults["weight_decay"] == 1e-4 and o.defaults["fused"]),  # schema's
        ("sgd", torch.optim.SGD, lambda o: o.defaults["fused"] and o.defaults["nesterov"]),  # one fused kernel a step
        ("lamb", timm.optim.Lamb, lambda o: o.defaults["betas"] == (0.8, 0.99)),
    ],
)
def test_names_build_the_right_class_with_the_settings(name, kind, check):
    opt = create_optimizer(TinyNet(), name=name, lr=0.01, betas=(0.8, 0.99), lars_thresh=0.02, adabound_final_lr=0.05)
    assert type(opt) is kind and check(opt)


def test_unknown_optimizer_names_ours_and_points_at_timm():
    with pytest.raises(UserError) as err:
        create_optimizer(TinyNet(), name="sgdd", lr=0.1)
    text = str(err.value)
    assert "unknown optim.name 'sgdd' (did you mean 'sgd'?)" in text
    assert ", ".join(OWN_OPTIMIZER_NAMES) in text and "timm.optim.list_optimizers()" in text
    with pytest.raises(UserError, match="did you mean 'adaboundw'"):
        create_optimizer(TinyNet(), name="AdaBoundW", lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="sgd", lr=-0.1), "optim.lr = -0.1 is out of range; it must be > 0"),
        (dict(name="lars", lr=-1.0), "optim.lr = -1.0 is out of range"),
        (
            dict(name="lars", lr=0.1, weight_decay=-1e-4),
            "optim.weight_decay = -0.0001 is out of range; it must be >= 0",
        ),
        (dict(name="adabound", lr=0.1, adabound_gamma=1.5), "optimizer 'adabound': Invalid gamma parameter: 1.5"),
        (dict(name="adaboundw", lr=0.1, betas=(0.9, 1.0)), "optim.betas = [0.9, 1.0]: beta 2 must be in [0, 1)"),
        (dict(name="lamb", lr=-0.1), "optim.lr = -0.1 is out of range"),
        (dict(name="sgd", lr=0.1, momentum=0.0, nesterov=True), "optim.nesterov = true needs optim.momentum > 0"),
    ],
)
def test_bad_values_raise_user_error_naming_them(kwargs, message):
    """The recipe's checks and the optimizers' own: the same messages whichever way the optimizer is built."""
    with pytest.raises(UserError) as err:
        create_optimizer(TinyNet(), **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda ps: LARS(ps, lr=-0.5), "Invalid learning rate: -0.5"),
        (lambda ps: LARS(ps, lr=0.1, thresh=-1.0), "Invalid LARS threshold: -1.0"),
        (lambda ps: AdaBound(ps, final_lr=-0.1), "Invalid final learning rate: -0.1"),
        (lambda ps: AdaBound(ps, betas=(-0.1, 0.9)), "Invalid beta parameter at index 0: -0.1"),
    ],
)
def test_optimizer_classes_validate_like_timm(build, message):
    with pytest.raises(ValueError, match=message):
        build([nn.Parameter(torch.zeros(2))])
