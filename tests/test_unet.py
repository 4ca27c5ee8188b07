import math

import pytest
import torch

from ldm.diffusion.unet import UNet, UNetConfig, timestep_embedding

CROSS = UNetConfig(4, 4, 32, (1, 2, 2), 1, (2, 4), num_head_channels=16, context_dim=24, transformer_depth=2)
SELF_FILM = UNetConfig(3, 3, 32, (1, 2), 1, (1, 2), num_heads=2, use_scale_shift_norm=True, resblock_updown=True)
CONCAT = UNetConfig(7, 3, 32, (1, 2), 1, (), num_heads=4)


def _perturbed(cfg: UNetConfig) -> UNet:
    """A UNet whose zero-initialised output layers are not zero, so every path shows in the output."""
    model = UNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cfg, context", [(CROSS, (5, 24)), (SELF_FILM, None), (CONCAT, None)])
@pytest.mark.parametrize("hw", [(16, 16), (8, 24)])
def test_shapes_and_gradients(cfg, context, hw):
    model = _perturbed(cfg)
    x = torch.randn(2, cfg.in_channels, *hw, requires_grad=True)
    c = torch.randn(2, *context, requires_grad=True) if context else None
    out = model(x, torch.tensor([0, 999]), c)
    assert out.shape == (2, cfg.out_channels, *hw)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert x.grad.abs().sum() > 0
    if c is not None:
        assert c.grad.abs().sum() > 0


def test_output_depends_on_time_and_context():
    model = _perturbed(CROSS).eval()
    x, c = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 24)
    with torch.no_grad():
        base = model(x, torch.tensor([10]), c)
        assert not torch.allclose(base, model(x, torch.tensor([500]), c))
        assert not torch.allclose(base, model(x, torch.tensor([10]), torch.randn(1, 5, 24)))


def test_fresh_unet_predicts_zero():
    # zero-initialised output conv (openaimodel): an untrained model's eps prediction is 0.
    out = UNet(CONCAT)(torch.randn(1, 7, 8, 8), torch.tensor([3]))
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_inputs_say_what_to_change():
    with pytest.raises(ValueError, match="multiples of the UNet's total downsampling 4"):
        UNet(CROSS)(torch.randn(1, 4, 18, 16), torch.tensor([1]), torch.randn(1, 5, 24))
    with pytest.raises(ValueError, match="needs a context"):
        UNet(CROSS)(torch.randn(1, 4, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="exactly one of unet.num_heads and unet.num_head_channels"):
        UNetConfig(4, 4, 32, (1, 2), num_heads=4, num_head_channels=8)
    with pytest.raises(ValueError, match="num_head_channels=12 does not divide 32"):
        UNet(UNetConfig(4, 4, 32, (1,), 1, (1,), num_head_channels=12))


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    # [cos(t * f_i) | sin(t * f_i)] with f_i = 10000^(-i/4)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = torch.tensor([[1.0] * 4 + [0.0] * 4,
                             [math.cos(f) for f in freqs] + [math.sin(f) for f in freqs]])
    torch.testing.assert_close(emb, expected)
