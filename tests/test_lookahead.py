"""Lookahead over a model's whole floating-point state (`cifar_train.lookahead`), against a hand computation."""

from __future__ import annotations

import pytest
import torch

from cifar_train.lookahead import ModelLookahead


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


@pytest.mark.parametrize(("decay", "power"), [(0.7737809374999998, 3.0), (0.5, 0.0)], ids=["airbench", "constant"])
def test_syncs_every_k_steps_with_the_scheduled_share_and_ends_on_the_slow_weights(decay, power):
    model = _model()
    total, every = 11, 3
    lookahead = ModelLookahead(
        model, total_steps=total, lookahead_steps=every, lookahead_decay=decay, lookahead_decay_power=power
    )
    floats = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert floats == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    slow = {k: model.state_dict()[k].double().clone() for k in floats}
    generator = torch.Generator().manual_seed(1)
    for step in range(1, total + 1):
        with torch.no_grad():  # a "training step": every floating-point entry moves, the batch counter too
            for value in model.state_dict().values():
                if value.is_floating_point():
                    value.add_(torch.randn(value.shape, generator=generator))
            model[1].num_batches_tracked += 1
        fast = {k: model.state_dict()[k].double().clone() for k in floats}
        lookahead.step(step)
        expected = fast
        if step % every == 0:
            share = decay * (step / total) ** power
            slow = {k: share * slow[k] + (1 - share) * fast[k] for k in floats}
            expected = slow
        if step == total:
            expected = slow  # the run ends on the slow weights
        for k in floats:
            torch.testing.assert_close(model.state_dict()[k].double(), expected[k], rtol=1e-6, atol=1e-6, msg=k)
    assert int(model[1].num_batches_tracked) == total, "integer state is not averaged"


def test_the_share_is_airbenchs_float32_schedule_and_the_state_round_trips():
    model = _model()
    lookahead = ModelLookahead(
        model, total_steps=476, lookahead_steps=5, lookahead_decay=0.95**5, lookahead_decay_power=3.0
    )
    float32 = 0.95**5 * (torch.arange(477) / 476) ** 3  # as airbench writes its schedule
    assert [lookahead.decay(t) for t in (0, 5, 100, 475, 476)] == [float(float32[t]) for t in (0, 5, 100, 475, 476)]
    assert lookahead.decay(5) == pytest.approx(0.95**5 * (5 / 476) ** 3, rel=1e-6)

    saved = lookahead.state_dict()
    twin = ModelLookahead(_model(), total_steps=476, lookahead_steps=5, lookahead_decay=0.5, lookahead_decay_power=0)
    with torch.no_grad():
        for value in twin.slow.values():
            value.zero_()
    twin.load_state_dict(saved)
    for name, value in saved.items():
        assert torch.equal(twin.slow[name], value)
    with pytest.raises(ValueError, match="does not fit the model"):
        twin.load_state_dict({"0.weight": saved["0.weight"]})
