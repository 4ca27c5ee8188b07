"""Guiding by a gradient (App. C): the sign of Eq. 16 against the exact conditional noise of a Gaussian toy
problem, the chain sampling the posterior, and the image guider of Eq. 17 raising the target's likelihood."""
import math

import pytest
import torch

from ldm.diffusion.guidance import downsample, gradient_guidance, image_guide
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedules import NoiseSchedule, ScheduleConfig, gather

# The class-conditional models' schedule (PAPER_TASKS.md 0): linear 0.0015 -> 0.0195.
SCHEDULE = NoiseSchedule.from_config(ScheduleConfig(kind="linear", beta_start=0.0015, beta_end=0.0195))
NOISE_STD = 0.5  # y = z_0 + N(0, NOISE_STD^2), z_0 ~ N(0, I)


def _exact_model(objective: str):
    """The exact network of data z_0 ~ N(0, I): z_t ~ N(0, I) at every t, so eps(z_t) = sigma_t z_t."""
    def model(z_t, t_B):
        sqrt_ab = gather(SCHEDULE.sqrt_alpha_bar, t_B, z_t)
        sigma = gather(SCHEDULE.sqrt_one_minus_alpha_bar, t_B, z_t)
        eps = sigma * z_t
        x0 = sqrt_ab * z_t  # E[z_0 | z_t]
        return {"eps": eps, "x0": x0, "v": sqrt_ab * eps - sigma * x0}[objective]
    return model


def _log_p_y_given_z_t(y):
    """Exact log p(y | z_t) up to a constant: y | z_t ~ N(sqrt(ab) z_t, 1 - ab + s^2)."""
    def log_p(z_t, t_B, z0_hat):
        sqrt_ab = gather(SCHEDULE.sqrt_alpha_bar, t_B, z_t)
        var = 1 - sqrt_ab.square() + NOISE_STD**2
        return (-0.5 * (y - sqrt_ab * z_t).square() / var).flatten(1).sum(1)
    return log_p


def _exact_conditional_eps(z_t, t_B, y):
    """-sigma_t grad log p(z_t | y) with z_0 | y ~ N(m, v): z_t | y ~ N(sqrt(ab) m, ab v + 1 - ab)."""
    sqrt_ab = gather(SCHEDULE.sqrt_alpha_bar, t_B, z_t)
    sigma = gather(SCHEDULE.sqrt_one_minus_alpha_bar, t_B, z_t)
    m, v = y / (1 + NOISE_STD**2), NOISE_STD**2 / (1 + NOISE_STD**2)
    ab = sqrt_ab.square()
    return sigma * (z_t - sqrt_ab * m) / (ab * v + 1 - ab)


def _eps(objective, out, z_t, t_B):
    sqrt_ab = gather(SCHEDULE.sqrt_alpha_bar, t_B, z_t)
    sigma = gather(SCHEDULE.sqrt_one_minus_alpha_bar, t_B, z_t)
    if objective == "eps":
        return out
    if objective == "x0":
        return (z_t - sqrt_ab * out) / sigma
    return sigma * z_t + sqrt_ab * out


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_classifier_guidance_gives_the_exact_conditional_noise(objective):
    """Eq. 16 with the exact log p(y | z_t) and scale 1 is the score of p(z_t | y): subtracting sigma_t grad
    log p is right, and the printed "+" is not (it lands as far on the other side)."""
    generator = torch.Generator().manual_seed(0)
    z_t, y = torch.randn(6, 2, 3, 3, generator=generator), torch.randn(6, 2, 3, 3, generator=generator)
    t_B = torch.tensor([0, 10, 200, 500, 800, 999])
    exact = _exact_conditional_eps(z_t, t_B, y)
    guided = gradient_guidance(_exact_model(objective), _log_p_y_given_z_t(y), SCHEDULE, 1.0, objective=objective,
                               through_model=False)
    torch.testing.assert_close(_eps(objective, guided(z_t, t_B), z_t, t_B), exact, rtol=1e-4, atol=1e-5)
    flipped = gradient_guidance(_exact_model(objective), _log_p_y_given_z_t(y), SCHEDULE, -1.0, objective=objective,
                                through_model=False)
    unguided = _eps(objective, _exact_model(objective)(z_t, t_B), z_t, t_B)
    wrong = _eps(objective, flipped(z_t, t_B), z_t, t_B)
    torch.testing.assert_close(wrong - unguided, unguided - exact, rtol=1e-4, atol=1e-5)
    assert (wrong - exact).abs().max() > 0.1


def test_guided_ddpm_chain_samples_the_posterior():
    """Sampling with the guided exact model draws from p(z_0 | y) = N(y / (1 + s^2), s^2 / (1 + s^2)): the
    mean and variance of 4000 samples match it within a few standard errors; unguided ones do not."""
    y = torch.tensor([1.5, -1.0]).view(1, 2, 1, 1)
    generator = torch.Generator().manual_seed(1)
    z_T = torch.randn(4000, 2, 1, 1, generator=generator)
    guided = gradient_guidance(_exact_model("eps"), _log_p_y_given_z_t(y), SCHEDULE, 1.0, through_model=False)
    z_0 = sample_ddim(guided, z_T, SCHEDULE, num_steps=250, eta=1.0, generator=generator)
    m, v = y.flatten() / (1 + NOISE_STD**2), NOISE_STD**2 / (1 + NOISE_STD**2)
    stderr = math.sqrt(v / len(z_T))
    assert (z_0.mean(dim=(0, 2, 3)) - m).abs().max() < 5 * stderr + 0.02
    assert (z_0.var(dim=(0, 2, 3)) - v).abs().max() < 0.05
    plain = sample_ddim(_exact_model("eps"), z_T, SCHEDULE, num_steps=250, eta=1.0,
                        generator=torch.Generator().manual_seed(1))
    assert (plain.mean(dim=(0, 2, 3)) - m).abs().max() > 0.5


def test_image_guide_raises_the_targets_likelihood_and_the_flipped_sign_lowers_it():
    """Eq. 17 through z0_hat(z_t) of the exact model, decoder = identity, T = 2x downsampling: the guided
    samples' downsampled images lie closer to the target than unguided ones, which lie closer than the
    samples of the opposite sign; stronger guidance, closer still."""
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(1, 3, 4, 4, generator=generator).expand(64, -1, -1, -1)
    z_T = torch.randn(64, 3, 8, 8, generator=generator)
    log_p = image_guide(lambda z: z, target, downsample_factor=2)

    def distance(scale):
        model = gradient_guidance(_exact_model("eps"), log_p, SCHEDULE, scale)
        z_0 = sample_ddim(model, z_T, SCHEDULE, num_steps=50)
        return (downsample(z_0, 2) - target).square().mean().item()

    flipped, unguided, guided, stronger = distance(-1.0), distance(0.0), distance(1.0), distance(3.0)
    assert flipped > unguided > guided > stronger
    assert stronger < 0.5 * unguided


def test_image_guide_log_likelihood_and_wrong_target_size():
    x = torch.randn(2, 3, 8, 8)
    target = torch.randn(2, 3, 4, 4)
    log_p = image_guide(lambda z: z, target, downsample_factor=2)
    expected = -0.5 * (target - torch.nn.functional.interpolate(
        x, size=(4, 4), mode="bicubic", antialias=True)).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(log_p(x, torch.zeros(2, dtype=torch.long), x), expected)
    lpips_like = image_guide(lambda z: z, target, downsample_factor=2, distance=lambda a, b: (a - b).abs().mean((1, 2, 3)))
    assert lpips_like(x, None, x).shape == (2,)
    with pytest.raises(ValueError, match=r"guide target \(2, 3, 4, 4\) differs .* \(2, 3, 8, 8\).*8x8 px"):
        image_guide(lambda z: z, target)(x, None, x)


def test_guidance_scale_zero_is_the_model_and_bad_log_likelihood_shape():
    model = _exact_model("eps")
    assert gradient_guidance(model, lambda *a: None, SCHEDULE, 0.0) is model
    bad = gradient_guidance(model, lambda z_t, t, x0: x0.sum(), SCHEDULE, 1.0)
    with pytest.raises(ValueError, match=r"one value per sample, \[2\]"):
        bad(torch.randn(2, 1, 2, 2), torch.tensor([5, 5]))
