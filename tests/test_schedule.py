"""Learning-rate schedules: closed forms, the seed's step conventions, the LambdaLR wrapper and its state."""

from __future__ import annotations

import bisect
import math

import pytest
import torch

from cifar_train.errors import UserError
from cifar_train.schedule import check_schedule, create_scheduler, epoch_count, run_steps, schedule_curve
from cifar_train.schema import SCHEDULES, WARMUPS


def lr_factor(step: int, **cfg) -> float:
    return schedule_curve(**cfg)(step)


def _cos(m: float, t: float, period: float) -> float:
    return m + (1 - m) * (1 + math.cos(math.pi * t / period)) / 2


def seed_reference(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    name: str,
    milestones=(),
    decay=0.1,
    min_factor=1e-3,
    sgdr_t0=10,
    sgdr_t_mul=1,
    warmup="none",
    warmup_epochs=0,
    warmup_start_factor=1e-3,
    warmup_exponent=4.0,
) -> float:
    """The seed's mechanism, re-stated: a flat list of (length, f(local step)) pieces; step s is served by
    the piece i with offset_i < s <= offset_i+1 (s = 0 by the first piece); exponential warmup without
    the seed's extra factor of base lr."""
    spe, m, start = steps_per_epoch, min_factor, warmup_start_factor
    pieces = []
    if warmup != "none":
        tw = warmup_epochs * spe
        power = 1.0 if warmup == "linear" else warmup_exponent
        pieces.append((tw, lambda s: start + (1 - start) * (s / tw) ** power))
    main = epochs - warmup_epochs
    if name == "constant":
        pieces.append((main * spe, lambda s: 1.0))
    elif name == "multistep":
        edges = [0, *milestones, main]
        for i in range(len(edges) - 1):
            pieces.append(((edges[i + 1] - edges[i]) * spe, lambda s, f=decay**i: f))
    elif name == "linear":
        pieces.append((main * spe, lambda s: 1 + (m - 1) * s / (main * spe)))
    elif name == "cosine":
        pieces.append((main * spe, lambda s: _cos(m, s, main * spe)))
    elif name == "sgdr":
        period, used = sgdr_t0, 0
        while used < main:
            pieces.append((period * spe, lambda s, n=period * spe: _cos(m, s, n)))
            used, period = used + period, max(1, int(period * sgdr_t_mul))
    offsets = [0]
    for length, _ in pieces:
        offsets.append(offsets[-1] + length)
    i = min(max(bisect.bisect_left(offsets, step) - 1, 0), len(pieces) - 1)
    return pieces[i][1](step - offsets[i])


CONFIGS = [
    dict(steps_per_epoch=7, epochs=12, name="constant"),
    dict(steps_per_epoch=7, epochs=12, name="multistep", milestones=[3, 8], decay=0.2),
    dict(steps_per_epoch=5, epochs=16, name="multistep", milestones=[4, 8, 12], warmup="linear", warmup_epochs=3),
    dict(steps_per_epoch=4, epochs=10, name="linear", min_factor=0.01),
    dict(steps_per_epoch=6, epochs=9, name="cosine"),
    dict(steps_per_epoch=6, epochs=9, name="cosine", min_factor=0.0, warmup="exponential", warmup_epochs=2),
    dict(steps_per_epoch=3, epochs=11, name="cosine", warmup="linear", warmup_epochs=1, warmup_start_factor=0.1),
    dict(steps_per_epoch=4, epochs=9, name="sgdr", sgdr_t0=3, sgdr_t_mul=1),
    dict(steps_per_epoch=2, epochs=16, name="sgdr", sgdr_t0=1, sgdr_t_mul=2, warmup="linear", warmup_epochs=1),
    dict(steps_per_epoch=3, epochs=35, name="sgdr", sgdr_t0=10, sgdr_t_mul=1.5),  # periods 10, 15, 22 (cut short)
    dict(steps_per_epoch=4, epochs=10, name="multistep", milestones=[4, 12], decay=0.5),  # 12: past the end
    dict(steps_per_epoch=3, epochs=6, name="constant", warmup="exponential", warmup_epochs=2, warmup_exponent=2.0),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['name']}-{c.get('warmup', 'none')}")
def test_every_step_matches_the_seed_mechanism(cfg):
    total = cfg["steps_per_epoch"] * cfg["epochs"]
    for k in range(total + 1):
        assert lr_factor(k, **cfg) == pytest.approx(seed_reference(k, **cfg), rel=1e-12, abs=1e-15), k


def test_cosine_closed_form():
    cfg = dict(steps_per_epoch=10, epochs=20, name="cosine", min_factor=1e-3)
    total = 200
    for k in [0, 1, 37, 99, 100, 101, 150, 198, 199, 200]:
        assert lr_factor(k, **cfg) == pytest.approx(_cos(1e-3, k, total), abs=1e-15)
    assert lr_factor(100, **cfg) == pytest.approx(1e-3 + (1 - 1e-3) / 2)
    assert lr_factor(200, **cfg) == pytest.approx(1e-3)
    assert lr_factor(10_000, **cfg) == pytest.approx(1e-3)  # past the end: holds the final value


def test_linear_closed_form():
    cfg = dict(steps_per_epoch=4, epochs=25, name="linear", min_factor=0.05)
    for k in [0, 1, 50, 99, 100]:
        assert lr_factor(k, **cfg) == pytest.approx(1 + (0.05 - 1) * k / 100)


def test_constant_is_one_everywhere():
    cfg = dict(steps_per_epoch=3, epochs=5, name="constant")
    assert {lr_factor(k, **cfg) for k in range(16)} == {1.0}


def test_multistep_decays_one_step_after_each_milestone_like_the_seed():
    cfg = dict(steps_per_epoch=10, epochs=160, name="multistep", milestones=[80, 120], decay=0.1)
    assert lr_factor(0, **cfg) == 1.0
    assert lr_factor(800, **cfg) == 1.0  # the seed: milestone step itself still undecayed
    assert lr_factor(801, **cfg) == pytest.approx(0.1)
    assert lr_factor(1200, **cfg) == pytest.approx(0.1)
    assert lr_factor(1201, **cfg) == pytest.approx(0.01)
    assert lr_factor(1599, **cfg) == pytest.approx(0.01)


def test_multistep_milestones_count_from_the_end_of_warmup():
    cfg = dict(steps_per_epoch=10, epochs=20, name="multistep", milestones=[5], warmup="linear", warmup_epochs=2)
    assert lr_factor(70, **cfg) == 1.0  # 20 warmup steps + 50
    assert lr_factor(71, **cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["linear", "exponential"])
def test_warmup_closed_form_and_boundary(kind):
    start, power = 0.01, (1.0 if kind == "linear" else 4.0)
    cfg = dict(steps_per_epoch=10, epochs=12, name="cosine", warmup=kind, warmup_epochs=2, warmup_start_factor=start)
    for k in [0, 1, 5, 10, 19, 20]:
        assert lr_factor(k, **cfg) == pytest.approx(start + (1 - start) * (k / 20) ** power)
    assert lr_factor(0, **cfg) == pytest.approx(start)
    assert lr_factor(20, **cfg) == 1.0
    assert lr_factor(21, **cfg) == pytest.approx(_cos(1e-3, 1, 100))  # main clock starts after warmup


def test_sgdr_restarts():
    cfg = dict(steps_per_epoch=5, epochs=30, name="sgdr", sgdr_t0=10, sgdr_t_mul=2, min_factor=0.0)
    # periods 10 and 20 epochs = 50 and 100 steps; restart after step 50
    assert lr_factor(0, **cfg) == 1.0
    assert lr_factor(25, **cfg) == pytest.approx(0.5)
    assert lr_factor(50, **cfg) == pytest.approx(0.0, abs=1e-15)  # end of the first cycle
    assert lr_factor(51, **cfg) == pytest.approx(_cos(0.0, 1, 100))  # the second cycle begins
    assert lr_factor(100, **cfg) == pytest.approx(0.5)
    assert lr_factor(149, **cfg) == pytest.approx(_cos(0.0, 99, 100))
    assert lr_factor(150, **cfg) == pytest.approx(0.0, abs=1e-15)


def _model_and_optimizer(base_lrs=(0.1, 0.02)):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = [{"params": layer.parameters(), "lr": lr} for layer, lr in zip(model, base_lrs)]
    return model, torch.optim.SGD(groups, lr=base_lrs[0], momentum=0.9)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['name']}-{c.get('warmup', 'none')}")
def test_scheduler_lr_after_k_steps_is_lr_factor_k(cfg):
    _, optimizer = _model_and_optimizer()
    scheduler = create_scheduler(optimizer, **cfg)
    for k in range(cfg["steps_per_epoch"] * cfg["epochs"] + 1):
        f = lr_factor(k, **cfg)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * f, 0.02 * f], rel=1e-12), k
        assert scheduler.get_last_lr() == pytest.approx([0.1 * f, 0.02 * f], rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_round_trip_resumes_exactly(tmp_path):
    cfg = dict(steps_per_epoch=6, epochs=10, name="sgdr", sgdr_t0=3, sgdr_t_mul=2, warmup="linear", warmup_epochs=1)
    _, opt_a = _model_and_optimizer()
    sched_a = create_scheduler(opt_a, **cfg)
    for _ in range(23):
        opt_a.step()
        sched_a.step()
    torch.save({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, tmp_path / "state.pt")

    _, opt_b = _model_and_optimizer()
    sched_b = create_scheduler(opt_b, **cfg)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["sched"]["lr_lambdas"] == [None, None]  # the schedule's settings are not in the checkpoint
    opt_b.load_state_dict(state["opt"])
    sched_b.load_state_dict(state["sched"])
    for k in range(23, 60):
        f = lr_factor(k, **cfg)
        for opt in (opt_a, opt_b):
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * f, 0.02 * f], rel=1e-12), k
            opt.step()
        sched_a.step()
        sched_b.step()
    assert sched_b.state_dict() == sched_a.state_dict()


def test_exponential_warmup_is_not_multiplied_by_base_lr_twice():
    _, optimizer = _model_and_optimizer()
    cfg = dict(steps_per_epoch=2, epochs=5, name="constant", warmup="exponential", warmup_epochs=2)
    scheduler = create_scheduler(optimizer, **cfg)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the seed's bug would give 0.1 * 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="cosin"), 'schedule.name = "cosin" is not allowed; choose one of'),
        (dict(name="cosin"), "(did you mean 'cosine'?)"),
        (dict(name="step"), ", ".join(f'"{name}"' for name in SCHEDULES)),
        (dict(name="cosine", warmup="lineer"), "(did you mean 'linear'?)"),
        (dict(name="cosine", warmup="ramp", warmup_epochs=1), ", ".join(f'"{name}"' for name in WARMUPS)),
        (dict(name="multistep", milestones=[8, 4]), "schedule.milestones = [8, 4] must be strictly increasing"),
        (dict(name="multistep", milestones=[0, 4]), "epochs >= 1"),
        (dict(name="cosine", min_factor=1.5), "schedule.min_factor = 1.5 is out of range; it must be <= 1"),
        (dict(name="multistep", decay=0.0), "schedule.decay = 0.0 is out of range; it must be > 0"),
        (dict(name="sgdr", sgdr_t_mul=0.5), "schedule.sgdr_t_mul = 0.5 is out of range; it must be >= 1"),
        (dict(name="cosine", steps_per_epoch=0), "steps_per_epoch = 0 must be >= 1"),
    ],
)
def test_bad_settings_raise_user_error(kwargs, message):
    kwargs = {"steps_per_epoch": 5, "epochs": 10, **kwargs}
    with pytest.raises(UserError) as err:
        lr_factor(0, **kwargs)
    assert message in str(err.value)
    _, optimizer = _model_and_optimizer()
    with pytest.raises(UserError):
        create_scheduler(optimizer, **kwargs)


def test_milestones_after_the_end_are_kept_with_a_warning_and_never_drop_the_lr():
    found = check_schedule(epochs=10, name="multistep", milestones=(4, 10, 150))
    (warning,) = found.warnings
    assert "schedule.milestones 10, 150 are at or after the last epoch (10)" in warning
    assert "the lr will not drop" in warning
    cfg = dict(steps_per_epoch=3, epochs=10, name="multistep", milestones=[4, 10, 150])
    assert [lr_factor(k, **cfg) for k in range(13, 31)] == pytest.approx([0.1] * 18)  # only milestone 4 acts


def test_sgdr_periods_follow_a_fractional_t_mul_and_a_cut_short_last_period_is_a_warning():
    cfg = dict(steps_per_epoch=1, epochs=35, name="sgdr", sgdr_t0=10, sgdr_t_mul=1.5, min_factor=0.0)
    curve = schedule_curve(**cfg)
    assert curve.boundaries == (0, 10, 25) and curve.period_ends == (10, 25, 47)  # 10, int(15.0), int(22.5)
    assert lr_factor(25, **cfg) == pytest.approx(0.0, abs=1e-15)  # the second period ends at its minimum
    assert lr_factor(35, **cfg) == pytest.approx(_cos(0.0, 10, 22))  # the third is cut short, not squeezed
    (warning,) = check_schedule(epochs=35, name="sgdr", sgdr_t0=10, sgdr_t_mul=1.5).warnings
    assert "the last SGDR period (22 epochs from epoch 25) is cut short" in warning
    assert check_schedule(epochs=25, name="sgdr", sgdr_t0=10, sgdr_t_mul=1.5).warnings == []


def test_warmup_longer_than_training_is_a_warning_and_the_whole_run_warms_up():
    (warning,) = check_schedule(epochs=2, name="cosine", warmup="linear", warmup_epochs=5).warnings
    assert "the whole run is warmup" in warning
    cfg = dict(steps_per_epoch=2, epochs=2, name="cosine", warmup="linear", warmup_epochs=5, warmup_start_factor=0.1)
    assert lr_factor(4, **cfg) == pytest.approx(0.1 + 0.9 * 4 / 10)


@pytest.mark.parametrize(
    ("kwargs", "ignored"),
    [
        (dict(name="cosine"), {"schedule.milestones", "schedule.decay", "schedule.sgdr_t0", "schedule.sgdr_t_mul"}),
        (dict(name="multistep"), {"schedule.min_factor", "schedule.sgdr_t0"}),
        (dict(name="cosine", warmup="none", warmup_epochs=2), {"schedule.warmup_epochs"}),
        (dict(name="cosine", warmup="linear", warmup_epochs=0), {"schedule.warmup"}),
        (dict(name="cosine", warmup="linear", warmup_epochs=1), {"schedule.warmup_exponent"}),
    ],
)
def test_settings_without_effect_are_named(kwargs, ignored):
    found = check_schedule(epochs=10, **kwargs)
    assert ignored <= set(found.ignored)
    assert "schedule.name" not in found.ignored


def test_negative_step_is_a_value_error():
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        lr_factor(-1, steps_per_epoch=2, epochs=3, name="constant")


def _airbench_triangle(step: int, total: int, start: float, end: float, peak: float) -> float:
    """airbench's triangle, stated from its definition: linear through (0, start), (floor(peak x total), 1) and
    (total, end); the step at the peak belongs to the falling side."""
    top = int(peak * total)
    if step < top:
        return start + (1 - start) * step / top
    return 1 + (end - 1) * (step - top) / (total - top)


def test_triangle_closed_form_over_airbench94s_fractional_run():
    cfg = dict(steps_per_epoch=48, epochs=9.9, name="triangle", min_factor=0.07)  # airbench94: 476 steps
    assert schedule_curve(**cfg).main_steps == 476
    for k in range(477):
        assert lr_factor(k, **cfg) == pytest.approx(_airbench_triangle(k, 476, 0.2, 0.07, 0.23), rel=1e-12), k
    assert lr_factor(0, **cfg) == 0.2
    assert lr_factor(109, **cfg) == 1.0  # int(0.23 x 476) = 109
    assert lr_factor(476, **cfg) == pytest.approx(0.07) and lr_factor(500, **cfg) == pytest.approx(0.07)


def test_triangle_with_its_own_start_and_peak_and_the_edge_peaks():
    cfg = dict(steps_per_epoch=10, epochs=4, name="triangle", triangle_start_factor=0.5, triangle_peak=0.5)
    assert [lr_factor(k, **cfg) for k in (0, 10, 20, 30, 40)] == pytest.approx([0.5, 0.75, 1.0, 1 - 0.999 / 2, 1e-3])
    assert lr_factor(0, **dict(cfg, triangle_peak=0.0)) == 1.0  # the peak at the start: only the fall
    assert lr_factor(40, **dict(cfg, triangle_peak=1.0)) == 1.0  # the peak at the end: only the rise
    assert lr_factor(20, **dict(cfg, triangle_peak=1.0)) == pytest.approx(0.75)
    found = check_schedule(epochs=4, name="cosine", triangle_peak=0.5)
    assert {"schedule.triangle_peak", "schedule.triangle_start_factor"} <= set(found.ignored)


@pytest.mark.parametrize(
    ("steps_per_epoch", "epochs", "total", "started"),
    [(48, 9.9, 476, 10), (100, 1.1, 110, 2), (3, 0.7, 3, 1), (7, 2, 14, 2), (10, 3.0, 30, 3), (4, 2.5, 10, 3)],
)
def test_fractional_epochs_run_the_ceiling_of_the_steps_the_decimal_says(steps_per_epoch, epochs, total, started):
    assert run_steps(steps_per_epoch, epochs) == total
    assert epoch_count(epochs) == started
    cfg = dict(steps_per_epoch=steps_per_epoch, epochs=epochs, name="linear", min_factor=0.0)
    assert schedule_curve(**cfg).main_steps == total
    assert lr_factor(total, **cfg) == 0.0 and lr_factor(total - 1, **cfg) > 0.0
