"""EMA of the weights (ldm/diffusion/ema.py), the LDM code's LitEma rule."""
import pytest
import torch
from torch import nn

from ldm.diffusion.ema import EMA


def _model(dtype=torch.float32):
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).to(dtype)
    model[2].bias.requires_grad_(False)  # frozen parameters are not averaged
    return model


def _set_all(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_warmup_decay_values():
    ema = EMA(_model().named_parameters(), decay=0.9999)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10) == pytest.approx(11 / 20)
    assert ema.decay_at(1000) == pytest.approx(1001 / 1010)
    assert ema.decay_at(10**6) == 0.9999  # (1 + n) / (10 + n) > 0.9999 once n > 89991
    assert EMA(_model().named_parameters(), decay=0.99, warmup=False).decay_at(1) == 0.99


def test_update_math_follows_the_warmup_rule():
    model = _model()
    _set_all(model, 0.0)
    ema = EMA(model.named_parameters(), decay=0.5)
    assert set(ema.shadow) == {"0.weight", "0.bias", "2.weight"}
    expected = 0.0
    for step, value in enumerate([1.0, 3.0, -2.0], start=1):
        _set_all(model, value)
        ema.update()
        d = min(0.5, (1 + step) / (10 + step))  # 2/11, 3/12, 4/13: all below 0.5
        expected = d * expected + (1 - d) * value
        for shadow in ema.shadow.values():
            torch.testing.assert_close(shadow, torch.full_like(shadow, expected))
    assert ema.num_updates == 3


def test_shadows_are_fp32_for_a_bf16_model():
    model = _model(torch.bfloat16)
    _set_all(model, 1.0)
    ema = EMA(model.named_parameters(), decay=0.9999, warmup=False)
    _set_all(model, 2.0)
    ema.update()  # 1 + 1e-4: a bf16 shadow (8-bit mantissa) would round it back to 1.0
    shadow = ema.shadow["0.weight"]
    assert shadow.dtype == torch.float32
    torch.testing.assert_close(shadow, torch.full_like(shadow, 1.0001), rtol=0, atol=1e-6)
    ema.copy_to(model)
    assert model[0].weight.dtype == torch.bfloat16


def test_store_copy_to_restore_round_trip():
    model = _model()
    _set_all(model, 2.0)
    ema = EMA(model.named_parameters(), decay=0.5, warmup=False)
    _set_all(model, 4.0)
    ema.update()  # shadow = 0.5 * 2 + 0.5 * 4 = 3
    ema.store(model)
    ema.copy_to(model)
    assert torch.equal(model[0].weight, torch.full((4, 3), 3.0))
    assert torch.equal(model[2].bias, torch.full((2,), 4.0))  # frozen: untouched
    ema.restore(model)
    for p in model.parameters():
        assert torch.equal(p, torch.full_like(p, 4.0))
    with pytest.raises(ValueError, match="store"):
        ema.restore(model)


def test_state_dict_round_trip():
    model = _model()
    ema = EMA(model.named_parameters())
    for _ in range(5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update()
    state = ema.state_dict()
    assert set(state) == {"0.weight", "0.bias", "2.weight", "num_updates"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = EMA(_model().named_parameters())
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert fresh.num_updates == 5
    for name, shadow in ema.shadow.items():
        assert torch.equal(fresh.shadow[name], shadow)
    assert fresh.decay_at(fresh.num_updates + 1) == ema.decay_at(6)


def test_mismatches_raise_value_errors():
    ema = EMA(_model().named_parameters())
    state = ema.state_dict()
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**state, "0.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="unwrapped"):
        ema.copy_to(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="decay"):
        EMA(_model().named_parameters(), decay=1.5)
