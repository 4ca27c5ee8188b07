"""Noise schedules (ldm/diffusion/schedules.py) and objectives / loss (ldm/diffusion/objectives.py)."""
import math

import pytest
import torch

from ldm.diffusion.objectives import (
    OBJECTIVES,
    diffusion_loss,
    min_snr_weight,
    predict_x0_eps,
    sample_noise,
    target,
)
from ldm.diffusion.schedules import NoiseSchedule, ScheduleConfig, gather

# Golden values, computed once in float64 with plain Python `math` from the closed forms
# beta_i = (sqrt(b0) + (sqrt(b1) - sqrt(b0)) i / (T-1))^2 and alpha_bar_t = prod_{i<=t} (1 - beta_i).
LDM_T2I_GOLDEN = {0: 0.99915, 249: 0.6754324137251241, 499: 0.27766965045646763,
                  749: 0.05662349159826969, 999: 0.004660098513077234}
LDM_VQ4_GOLDEN = {0: 0.9985, 249: 0.5105143007739076, 499: 0.11584449081034788,
                  749: 0.008444830490127344, 999: 0.00014230397519201778}
# iDDPM cosine, s = 0.008, betas clipped at 0.999 (the last one is clipped).
COSINE_GOLDEN = {0: 0.999958715775178, 499: 0.4938435904406382, 999: 2.4287669070348567e-09}


@pytest.mark.parametrize("beta_start, beta_end, golden", [
    (0.00085, 0.012, LDM_T2I_GOLDEN), (0.0015, 0.0195, LDM_VQ4_GOLDEN)])
def test_linear_schedule_golden_values(beta_start, beta_end, golden):
    schedule = NoiseSchedule.from_config(ScheduleConfig("linear", beta_start, beta_end, 1000))
    assert schedule.num_timesteps == 1000
    assert schedule.betas.dtype == torch.float64
    assert schedule.betas[0].item() == pytest.approx(beta_start, rel=1e-12)
    assert schedule.betas[-1].item() == pytest.approx(beta_end, rel=1e-12)
    for t, alpha_bar in golden.items():
        assert schedule.alpha_bar[t].item() == pytest.approx(alpha_bar, rel=1e-12), t
    assert torch.all(schedule.betas[1:] > schedule.betas[:-1])  # linear in sqrt(beta): increasing


def test_cosine_schedule_golden_values():
    schedule = NoiseSchedule.from_config(ScheduleConfig(kind="cosine"))
    assert schedule.betas[0].item() == pytest.approx(4.128422482196914e-05, rel=1e-12)
    assert schedule.betas[-1].item() == 0.999
    for t, alpha_bar in COSINE_GOLDEN.items():
        assert schedule.alpha_bar[t].item() == pytest.approx(alpha_bar, rel=1e-10), t


@pytest.mark.parametrize("kind, beta_start, beta_end, diffusers_name", [
    ("linear", 0.00085, 0.012, "scaled_linear"), ("linear", 0.0015, 0.0195, "scaled_linear"),
    ("cosine", 0.00085, 0.012, "squaredcos_cap_v2")])
def test_parity_with_diffusers(kind, beta_start, beta_end, diffusers_name):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end,
                                  beta_schedule=diffusers_name)
    ours = NoiseSchedule.from_config(ScheduleConfig(kind, beta_start, beta_end, 1000))
    # diffusers keeps float32 tables: agreement is to float32 rounding.
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alpha_bar.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, field", [
    ({"kind": "sigmoid"}, "kind"), ({"num_timesteps": 0}, "num_timesteps"),
    ({"beta_start": 0.0}, "beta_start"), ({"beta_end": 1.5}, "beta_end"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "beta_end")])
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(**overrides)


def test_schedule_rejects_bad_betas_and_timesteps():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(torch.tensor([0.1, 1.0]))
    schedule = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=10))
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="0-based"):
        schedule.q_sample(x0, torch.tensor([0, 10]), x0)
    with pytest.raises(ValueError, match="integer"):
        schedule.snr(torch.tensor([0.5]))


def test_q_sample_and_snr():
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 499, 999])
    x_t = schedule.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        ab = LDM_T2I_GOLDEN[ti]
        torch.testing.assert_close(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i])
    snr = schedule.snr(t)
    assert snr.dtype == torch.float32 and snr.shape == (3,)
    expected = torch.tensor([LDM_T2I_GOLDEN[i] / (1 - LDM_T2I_GOLDEN[i]) for i in (0, 499, 999)])
    torch.testing.assert_close(snr, expected)


def test_gather_casts_after_float64_math():
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    like = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    coef = gather(schedule.sqrt_one_minus_alpha_bar, torch.tensor([0, 999]), like)
    assert coef.shape == (2, 1, 1, 1) and coef.dtype == torch.bfloat16
    # sqrt(1 - 0.99915) = 0.02915: taken in float64 first, so bf16 keeps it (1 - bf16(ab) would be 0).
    assert coef[0].item() == pytest.approx(math.sqrt(1 - 0.99915), rel=1e-2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_target_and_predict_invert_each_other(objective):
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    x0, eps = torch.randn(6, 4, 8, 8, dtype=torch.float64), torch.randn(6, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 900, 998])  # not 999: x0 from eps divides by sqrt(ab)=0.07
    x_t = schedule.q_sample(x0, t, eps)
    x0_hat, eps_hat = predict_x0_eps(objective, target(objective, x0, eps, schedule, t), x_t, schedule, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_v_target_matches_its_definition():
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    x0, eps, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([10, 700])
    ab = schedule.alpha_bar[t].float()[:, None]
    torch.testing.assert_close(target("v", x0, eps, schedule, t), ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.25, 1.0, 5.0, 20.0])
    gamma = 5.0
    # eps: min(snr, 5) / snr;  v: min(snr, 5) / (snr + 1);  x0: min(snr, 5)
    torch.testing.assert_close(min_snr_weight("eps", snr, gamma), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weight("v", snr, gamma), torch.tensor([0.2, 0.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(min_snr_weight("x0", snr, gamma), torch.tensor([0.25, 1.0, 5.0, 5.0]))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_is_the_same_weighting_in_every_parameterisation(objective):
    """Weighted errors of one wrong prediction, expressed in each space, must agree (Hang et al. 2023)."""
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    x0, eps, t = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), \
        torch.tensor([5, 100, 500, 990])
    x_t = schedule.q_sample(x0, t, eps)
    x0_wrong = x0 + 0.3 * torch.randn_like(x0)
    eps_wrong = (x_t - schedule.sqrt_alpha_bar[t][:, None] * x0_wrong) / schedule.sqrt_one_minus_alpha_bar[t][:, None]
    snr = schedule.alpha_bar[t] / (1 - schedule.alpha_bar[t])
    x0_space = min_snr_weight("x0", snr, 5.0) * (x0_wrong - x0).square().mean(1)
    err = target(objective, x0_wrong, eps_wrong, schedule, t) - target(objective, x0, eps, schedule, t)
    torch.testing.assert_close(min_snr_weight(objective, snr, 5.0) * err.square().mean(1), x0_space)


def test_offset_noise_changes_per_channel_mean():
    x0 = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, 0.5, torch.Generator().manual_seed(0))
    # Mean of 256 N(0,1) values has std 1/16; offset noise adds 0.5 N(0,1): std ~ 0.5.
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 16, rel=0.2)
    assert offset.mean(dim=(2, 3)).std().item() == pytest.approx(math.sqrt(0.25 + 1 / 256), rel=0.2)
    torch.testing.assert_close(offset - offset.mean(dim=(2, 3), keepdim=True),
                               plain - plain.mean(dim=(2, 3), keepdim=True))


def test_diffusion_loss_values_match_a_hand_computation():
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    x0 = torch.randn(5, 4, 8, 8)
    seen = {}

    def model(x_t, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    loss = diffusion_loss(model, x0, schedule, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # replay the draws: t first, then eps
    t = torch.randint(0, 1000, (5,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], schedule.q_sample(x0, t, eps))
    torch.testing.assert_close(loss, eps.square().flatten(1).mean(1))  # zero prediction: loss = |eps|^2
    l1 = diffusion_loss(model, x0, schedule, loss_type="l1", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(l1, eps.abs().flatten(1).mean(1))
    weighted = diffusion_loss(model, x0, schedule, min_snr_gamma=5.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(weighted, loss * min_snr_weight("eps", schedule.snr(t), 5.0))


def test_diffusion_loss_is_float32_per_sample_and_differentiable():
    schedule = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=50))
    layer = torch.nn.Conv2d(4, 4, 1)
    loss = diffusion_loss(lambda x, t: layer(x).bfloat16(), torch.randn(3, 4, 4, 4), schedule, objective="v")
    assert loss.shape == (3,) and loss.dtype == torch.float32
    loss.mean().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "score"}, "objective"), ({"loss_type": "huber"}, "loss_type"),
    ({"min_snr_gamma": 0.0}, "min_snr_gamma"), ({"min_snr_gamma": 5.0, "loss_type": "l1"}, "l2"),
    ({"offset_noise": -0.1}, "offset_noise")])
def test_diffusion_loss_rejects_bad_arguments(kwargs, match):
    schedule = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=10))
    with pytest.raises(ValueError, match=match):
        diffusion_loss(lambda x, t: x, torch.zeros(2, 3), schedule, **kwargs)
