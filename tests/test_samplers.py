"""Samplers (ldm/diffusion/samplers.py) and classifier-free guidance (ldm/diffusion/guidance.py).

Most checks use toy data whose exact eps(x_t, t) = E[eps | x_t] is known in closed form, so a
sampler can be judged by the distribution it produces, independent of any training:
  * a 2-D Gaussian N(MU, SIGMA): q(x_t) = N(sqrt(ab) MU, ab SIGMA + (1 - ab) I) and
    eps = sqrt(1 - ab) C_t^-1 (x_t - sqrt(ab) MU);
  * a 2-component isotropic mixture: eps = -sqrt(1 - ab) * score of the diffused mixture.
x_T is drawn from the exact q(x_T), not N(0, I): with the LDM schedule alpha_bar_T = 0.0047,
so N(0, I) misses the mean sqrt(ab_T) MU and would shift samples by ~3% of |MU|, a property
of the schedule that would mask the sampler errors measured here.
"""
import math

import pytest
import torch
from torch import nn

from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.objectives import diffusion_loss, target
from ldm.diffusion.samplers import (
    SAMPLERS,
    sample_ddim,
    sample_ddpm,
    sample_plms,
    timesteps,
)
from ldm.diffusion.schedules import NoiseSchedule, ScheduleConfig

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())  # LDM text-to-image: 0.00085 -> 0.012, T = 1000
MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.30, 0.12], [0.12, 0.20]], dtype=torch.float64)
MIX_W = torch.tensor([0.3, 0.7], dtype=torch.float64)
MIX_MU = torch.tensor([[-1.5, 0.5], [1.0, -0.5]], dtype=torch.float64)
MIX_STD = torch.tensor([0.3, 0.5], dtype=torch.float64)
NUM_POINTS = 4000


pytestmark = pytest.mark.usefixtures("one_thread")


def _alpha_bar(t_B):
    return SCHEDULE.alpha_bar[t_B.cpu()][:, None]  # [B, 1] float64


def gaussian_eps(x_t, t_B):
    ab = _alpha_bar(t_B)
    cov_t = ab[:, :, None] * SIGMA + (1 - ab[:, :, None]) * torch.eye(2, dtype=torch.float64)
    centred = x_t.double() - ab.sqrt() * MU
    return ((1 - ab).sqrt() * torch.linalg.solve(cov_t, centred)).float()


def mixture_eps(x_t, t_B):
    ab = _alpha_bar(t_B)
    var_BK = ab * MIX_STD**2 + (1 - ab)
    diff_BK2 = x_t.double()[:, None] - ab.sqrt()[:, None] * MIX_MU
    log_r = MIX_W.log() - var_BK.log() - diff_BK2.square().sum(-1) / (2 * var_BK)  # 2-D: det = var^2
    score = -(log_r.softmax(-1)[..., None] * diff_BK2 / var_BK[..., None]).sum(1)
    return (-(1 - ab).sqrt() * score).float()


def gaussian_data(n, gen):
    return MU + torch.randn(n, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T


def mixture_data(n, gen):
    k = torch.multinomial(MIX_W, n, replacement=True, generator=gen)
    return MIX_MU[k] + MIX_STD[k, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def exact_x_T(x0, gen):
    t_B = torch.full((x0.shape[0],), SCHEDULE.num_timesteps - 1)
    return SCHEDULE.q_sample(x0, t_B, torch.randn(x0.shape, generator=gen, dtype=torch.float64)).float()


def mean_cov(x):
    return x.double().mean(0), torch.cov(x.double().T)


# --- timesteps ---------------------------------------------------------------------------------

def test_timesteps_descend_from_T_minus_1():
    assert timesteps(SCHEDULE, 50).tolist() == list(range(999, -1, -20))
    assert torch.equal(timesteps(SCHEDULE, 1000), torch.arange(999, -1, -1))
    assert timesteps(SCHEDULE, 1).tolist() == [999]
    ts = timesteps(SCHEDULE, 7)
    assert ts.dtype == torch.long and ts[0] == 999 and ts[-1] >= 0 and (ts[1:] < ts[:-1]).all()


@pytest.mark.parametrize("num_steps", [1, 7, 50, 333, 1000])
def test_timesteps_match_diffusers_trailing_spacing(num_steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ref.set_timesteps(num_steps)
    assert timesteps(SCHEDULE, num_steps).tolist() == ref.timesteps.tolist()


# --- argument checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, kwargs, match", [
    (sample_ddpm, {"eta": 0.0}, "eta"), (sample_plms, {"eta": 1.0}, "eta"), (sample_ddim, {"eta": -1.0}, "eta"),
    (sample_ddim, {"num_steps": 0}, "num_steps"), (sample_ddim, {"num_steps": 1001}, "num_steps"),
    (sample_plms, {"objective": "score"}, "objective"), (sample_ddpm, {"clip_x0": 0.0}, "clip_x0")])
def test_samplers_reject_bad_arguments(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler(gaussian_eps, torch.zeros(2, 2), SCHEDULE, **{"num_steps": 10, **kwargs})


# --- one generator per sample ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_one_generator_per_sample_makes_a_sample_independent_of_its_batch(name):
    """Sample i's noise at every stochastic step comes from generator i alone (jobs/sample/generate.py's
    determinism by global index): sample 4 of a batch of 6 equals sample 4 run alone."""
    x_T = exact_x_T(gaussian_data(6, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))

    def run(rows, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return SAMPLERS[name](gaussian_eps, x_T[rows], SCHEDULE, num_steps=20, eta=1.0, generator=generators)

    batch = run(list(range(6)), range(100, 106))
    torch.testing.assert_close(run([4, 1], [104, 101]), batch[[4, 1]], atol=1e-6, rtol=0)
    assert not torch.allclose(run([4], [99]), batch[[4]], atol=1e-3)  # the generator does drive the noise
    with pytest.raises(ValueError, match="2 generators for a batch of 6"):
        SAMPLERS[name](gaussian_eps, x_T, SCHEDULE, num_steps=20, eta=1.0, generator=[torch.Generator()] * 2)


# --- exactness on Gaussian data ----------------------------------------------------------------

def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    x_T = exact_x_T(gaussian_data(64, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7)
    gen_state, global_state = gen.get_state(), torch.get_rng_state()
    first = sample_ddim(gaussian_eps, x_T, SCHEDULE, num_steps=50, generator=gen)
    second = sample_ddim(gaussian_eps, x_T, SCHEDULE, num_steps=50)
    assert torch.equal(first, second)
    assert torch.equal(gen.get_state(), gen_state) and torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize("name, num_steps, tol", [
    ("ddim", 1000, 0.005), ("plms", 1000, 0.002), ("ddim", 50, 0.04), ("plms", 50, 0.012)])
def test_deterministic_samplers_map_q_T_onto_the_gaussian(name, num_steps, tol):
    """With exact eps, DDIM(eta=0) and PLMS are affine maps x_T -> x_0 on Gaussian data, so
    pushing the mean and two covariance columns of q(x_T) through them gives the exact output
    distribution, with no Monte-Carlo noise. Measured errors in the covariance: DDIM 0.0023
    (1000 steps) and 0.032 (50 steps, first-order); PLMS 0.0004 and 0.008 (higher order)."""
    ab_T = SCHEDULE.alpha_bar[-1].item()
    chol_T = torch.linalg.cholesky(ab_T * SIGMA + (1 - ab_T) * torch.eye(2, dtype=torch.float64))
    mean_T = math.sqrt(ab_T) * MU
    points = torch.stack([mean_T, mean_T + chol_T[:, 0], mean_T + chol_T[:, 1], mean_T + chol_T.sum(1)])
    out = SAMPLERS[name](gaussian_eps, points.float(), SCHEDULE, num_steps=num_steps).double()
    cols = torch.stack([out[1] - out[0], out[2] - out[0]], dim=1)
    torch.testing.assert_close(out[3] - out[0], cols.sum(1), rtol=0, atol=1e-4)  # the map is affine
    torch.testing.assert_close(out[0], MU, rtol=0, atol=1e-4)
    torch.testing.assert_close(cols @ cols.T, SIGMA, rtol=0, atol=tol)


def test_plms_is_more_accurate_than_ddim_at_equal_steps():
    x_T = exact_x_T(gaussian_data(64, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    reference = sample_ddim(gaussian_eps, x_T, SCHEDULE, num_steps=1000)
    ddim_err = (sample_ddim(gaussian_eps, x_T, SCHEDULE, num_steps=20) - reference).abs().mean()
    plms_err = (sample_plms(gaussian_eps, x_T, SCHEDULE, num_steps=20) - reference).abs().mean()
    assert plms_err < ddim_err / 2


def test_ddim_eta1_with_all_steps_matches_ddpm():
    """DDIM with eta = 1 is the DDPM posterior (Song et al. 2021, Eq. 16): same distribution,
    and even the same path when both draw the same noise in the same order."""
    x_T = exact_x_T(gaussian_data(NUM_POINTS, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    ddpm = sample_ddpm(gaussian_eps, x_T, SCHEDULE, num_steps=1000, generator=torch.Generator().manual_seed(2))
    ddim = sample_ddim(gaussian_eps, x_T, SCHEDULE, num_steps=1000, eta=1.0,
                       generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-3)
    ddim_other_noise = sample_ddim(gaussian_eps, x_T, SCHEDULE, num_steps=1000, eta=1.0,
                                   generator=torch.Generator().manual_seed(3))
    # 4000 points: the standard error of a mean is sqrt(0.3 / 4000) = 0.009 and of a (co)variance
    # about 0.3 * sqrt(2 / 4000) = 0.007; the tolerances are ~4-5 of them (measured 0.005 / 0.008).
    for samples in (ddpm, ddim_other_noise):
        mean, cov = mean_cov(samples)
        torch.testing.assert_close(mean, MU, rtol=0, atol=0.04)
        torch.testing.assert_close(cov, SIGMA, rtol=0, atol=0.035)
    (mean_a, cov_a), (mean_b, cov_b) = mean_cov(ddpm), mean_cov(ddim_other_noise)
    torch.testing.assert_close(mean_a, mean_b, rtol=0, atol=0.05)
    torch.testing.assert_close(cov_a, cov_b, rtol=0, atol=0.04)


# --- all samplers on a mixture -----------------------------------------------------------------

def _mixture_summary(x):
    """Occupancy, mean and std of each mode, assigning points to the nearest mode centre."""
    x = x.double()
    k = (x[:, None] - MIX_MU).norm(dim=-1).argmin(1)
    occupancy = torch.stack([(k == i).double().mean() for i in range(2)])
    return occupancy, torch.stack([x[k == i].mean(0) for i in range(2)]), torch.stack([x[k == i].std(0) for i in range(2)])


@pytest.mark.parametrize("name, num_steps, eta", [
    ("ddpm", 1000, 1.0), ("ddpm", 100, 1.0), ("ddim", 50, 0.0), ("plms", 50, 0.0)])
def test_samplers_draw_the_mixture(name, num_steps, eta):
    """Tolerances: occupancy SE 0.007 (tol 0.03); mode-mean SE <= 0.009 (tol 0.05); mode-std SE
    <= 2%, plus the few-step shrinkage of the variance the Gaussian test measures (std up to
    ~8% low at 50-100 steps), so the std tolerance is 15% (a wrong update is off by far more)."""
    gen = torch.Generator().manual_seed(0)
    x_T = exact_x_T(mixture_data(NUM_POINTS, gen), gen)
    samples = SAMPLERS[name](mixture_eps, x_T, SCHEDULE, num_steps=num_steps, eta=eta, generator=gen)
    occupancy, means, stds = _mixture_summary(samples)
    torch.testing.assert_close(occupancy, MIX_W, rtol=0, atol=0.03)
    torch.testing.assert_close(means, MIX_MU, rtol=0, atol=0.05)
    torch.testing.assert_close(stds, MIX_STD[:, None].expand(2, 2), rtol=0.15, atol=0)


# --- parameterisations, clipping, precision ----------------------------------------------------

def _as_objective(objective):
    """The exact Gaussian model re-expressed as a v- or x0-prediction."""
    def model(x_t, t_B):
        eps = gaussian_eps(x_t, t_B).double()
        ab = _alpha_bar(t_B)
        x0 = (x_t.double() - (1 - ab).sqrt() * eps) / ab.sqrt()
        return target(objective, x0, eps, SCHEDULE, t_B).float()
    return model


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("objective", ["v", "x0"])
def test_samplers_agree_across_parameterisations(name, objective):
    x_T = exact_x_T(gaussian_data(32, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    eta = 1.0 if name == "ddpm" else 0.0
    reference = SAMPLERS[name](gaussian_eps, x_T, SCHEDULE, num_steps=20, eta=eta,
                               generator=torch.Generator().manual_seed(2))
    other = SAMPLERS[name](_as_objective(objective), x_T, SCHEDULE, num_steps=20, objective=objective, eta=eta,
                           generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(other, reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_clip_x0_bounds_the_prediction(name):
    def far_away(x_t, t_B):
        return torch.full_like(x_t, 10.0)  # an x0-model that predicts far outside [-1, 1]
    x_T = torch.randn(8, 2, 4, 4)
    eta = 1.0 if name == "ddpm" else 0.0
    clipped = SAMPLERS[name](far_away, x_T, SCHEDULE, num_steps=10, objective="x0", clip_x0=1.0, eta=eta)
    free = SAMPLERS[name](far_away, x_T, SCHEDULE, num_steps=10, objective="x0", eta=eta)
    torch.testing.assert_close(clipped, torch.ones_like(clipped))  # the last step returns x0_hat
    torch.testing.assert_close(free, torch.full_like(free, 10.0))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_feed_the_model_x_T_dtype_and_return_it(name):
    seen = set()

    def bf16_model(x_t, t_B):
        seen.add(x_t.dtype)
        return gaussian_eps(x_t.float(), t_B).bfloat16()

    x_T = exact_x_T(gaussian_data(16, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    eta = 1.0 if name == "ddpm" else 0.0
    out = SAMPLERS[name](bf16_model, x_T.bfloat16(), SCHEDULE, num_steps=10, eta=eta)
    assert seen == {torch.bfloat16} and out.dtype == torch.bfloat16
    out32 = SAMPLERS[name](bf16_model, x_T, SCHEDULE, num_steps=10, eta=eta)
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()


# --- parity with diffusers ---------------------------------------------------------------------

def _diffusers_loop(scheduler, x_T, num_steps, **step_kwargs):
    scheduler.set_timesteps(num_steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        eps = gaussian_eps(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("name, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0), ("plms", 0.0)])
def test_parity_with_diffusers_schedulers(name, eta):
    """Same schedule, trailing spacing, alpha_bar_{-1} = 1; the noise is drawn in the same order."""
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  timestep_spacing="trailing")
    schedulers = {
        "ddim": lambda: diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True),
        "ddpm": lambda: diffusers.DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small"),
        "plms": lambda: diffusers.PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=True)}
    step_kwargs = {"ddim": {"eta": eta, "generator": torch.Generator().manual_seed(5)},
                   "ddpm": {"generator": torch.Generator().manual_seed(5)}, "plms": {}}[name]
    x_T = exact_x_T(gaussian_data(64, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    ref = _diffusers_loop(schedulers[name](), x_T, 50, **step_kwargs)
    ours = SAMPLERS[name](gaussian_eps, x_T, SCHEDULE, num_steps=50, eta=eta,
                          generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)  # float32 vs float64 tables: ~1e-6 measured


# Outputs of diffusers 0.42 (DDIM / PNDM skip_prk / DDPM fixed_small, trailing spacing, generator seed
# 0) with gaussian_eps, 10 steps, from GOLDEN_X_T; recorded once so the check runs without diffusers.
GOLDEN_X_T = [[0.5, -1.0], [-1.5, 0.25], [2.0, 1.0]]
SAMPLER_GOLDEN = {
    "ddim": [[1.0619777, -0.7520228], [0.3793462, -0.6026571], [1.9342866, 0.0634983]],
    "plms": [[1.0823787, -0.8101314], [0.2617416, -0.6050067], [2.0978205, 0.1580103]],
    "ddpm": [[1.1339319, -0.7482359], [0.5219327, -0.8387994], [1.0506802, -0.0916301]],
}


@pytest.mark.parametrize("name", sorted(SAMPLER_GOLDEN))
def test_sampler_golden_values(name):
    eta = 1.0 if name == "ddpm" else 0.0
    out = SAMPLERS[name](gaussian_eps, torch.tensor(GOLDEN_X_T), SCHEDULE, num_steps=10, eta=eta,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.tensor(SAMPLER_GOLDEN[name]), rtol=0, atol=1e-5)


# --- a trained model ---------------------------------------------------------------------------

FOUR_MODES = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
MODE_STD = 0.1


class TinyEpsMLP(nn.Module):
    """eps_theta(x_t, t) for 2-D points: an MLP on [x_t, sinusoidal features of t / T]."""

    def __init__(self, width: int = 128, num_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs))
        self.net = nn.Sequential(nn.Linear(2 + 2 * num_freqs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x_B2, t_B):
        phase_BF = (t_B.float() / SCHEDULE.num_timesteps)[:, None] * self.freqs
        return self.net(torch.cat([x_B2, phase_BF.sin(), phase_BF.cos()], dim=1))


def _near_fraction_and_occupancy(x):
    dist = (x[:, None] - FOUR_MODES).norm(dim=-1)
    near = dist.min(1).values < 4 * MODE_STD
    occupancy = torch.bincount(dist.argmin(1)[near], minlength=4) / max(int(near.sum()), 1)
    return near.float().mean().item(), occupancy


def test_trained_mlp_samples_the_four_modes():
    """~1200 Adam steps with diffusion_loss; then DDIM-50 from N(0, I). Measured over 5 seeds:
    97% of samples within 4 std of a mode, occupancy 0.22-0.27 each; untrained: 0%."""
    gen = torch.Generator().manual_seed(0)
    model = TinyEpsMLP()
    x_T = torch.randn(2000, 2, generator=gen)
    untrained_near, _ = _near_fraction_and_occupancy(sample_ddim(model, x_T, SCHEDULE, num_steps=50))
    assert untrained_near < 0.5  # the check can fail

    num_train_steps = 1200
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_train_steps)
    for _ in range(num_train_steps):
        x0 = FOUR_MODES[torch.randint(0, 4, (512,), generator=gen)] + MODE_STD * torch.randn(512, 2, generator=gen)
        loss = diffusion_loss(model, x0, SCHEDULE, generator=gen).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()

    near, occupancy = _near_fraction_and_occupancy(sample_ddim(model, x_T, SCHEDULE, num_steps=50))
    assert near > 0.9
    assert occupancy.min() > 0.18 and occupancy.max() < 0.32  # 4 balanced modes: 0.25 +- ~7 SE


@pytest.mark.gpu
def test_loss_and_samplers_run_on_cuda_under_bf16_autocast():
    gen = torch.Generator("cuda").manual_seed(0)
    model = TinyEpsMLP().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = diffusion_loss(model, torch.randn(64, 2, device="cuda"), SCHEDULE, min_snr_gamma=5.0,
                              offset_noise=0.1, generator=gen)
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    loss.mean().backward()
    for name, sampler in SAMPLERS.items():
        x_T = torch.randn(64, 2, device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sampler(model, x_T, SCHEDULE, num_steps=10, eta=1.0 if name == "ddpm" else 0.0, generator=gen)
        assert out.device.type == "cuda" and out.dtype == torch.float32 and torch.isfinite(out).all()


# --- classifier-free guidance ------------------------------------------------------------------

class CountingConditional:
    """model_c(x, t, cond) = x * cond + t / 1000, elementwise so it is batch-independent."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        return x * cond + t.float().reshape(-1, 1, 1, 1) / 1000


def test_guidance_scale_one_is_exactly_the_conditional_model():
    model_c = CountingConditional()
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 999])
    cond, uncond = torch.randn(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    guided = classifier_free_guidance(model_c, cond, uncond, 1.0)
    assert torch.equal(guided(x, t), model_c(x, t, cond))
    assert model_c.batch_sizes == [3, 3]  # scale 1 skips the unconditional half


def test_guidance_combines_in_one_batched_call():
    model_c = CountingConditional()
    x, t = torch.randn(3, 4, 2, 2), torch.tensor([10, 500, 999])
    cond, uncond = torch.randn(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    out = classifier_free_guidance(model_c, cond, uncond, 7.5)(x, t)
    assert model_c.batch_sizes == [6]
    out_c, out_u = model_c(x, t, cond), model_c(x, t, uncond)
    torch.testing.assert_close(out, out_u + 7.5 * (out_c - out_u))


def test_guidance_interval_t_max():
    model_c = CountingConditional()
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([100, 800])
    cond, uncond = torch.randn(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    out = classifier_free_guidance(model_c, cond, uncond, 3.0, t_max=500)(x, t)
    out_c, out_u = model_c(x, t, cond), model_c(x, t, uncond)
    torch.testing.assert_close(out[0], (out_u + 3.0 * (out_c - out_u))[0])  # t = 100 <= t_max: guided
    assert torch.equal(out[1], out_c[1])  # t = 800 > t_max: the conditional prediction
    model_c.batch_sizes.clear()
    classifier_free_guidance(model_c, cond, uncond, 3.0, t_max=50)(x, t)
    assert model_c.batch_sizes == [2]  # no sample is guided: no unconditional evaluation


def test_guidance_accepts_dicts_and_rejects_mismatched_conditions():
    def model_c(x, t, cond):
        return x * cond["context"]
    cond, uncond = {"context": torch.full((2, 1), 2.0)}, {"context": torch.ones(2, 1)}
    out = classifier_free_guidance(model_c, cond, uncond, 3.0)(torch.ones(2, 1), torch.tensor([1, 2]))
    torch.testing.assert_close(out, torch.full((2, 1), 1.0 + 3.0 * (2.0 - 1.0)))
    with pytest.raises(ValueError, match="expand"):
        classifier_free_guidance(model_c, torch.zeros(2, 3), torch.zeros(1, 3), 2.0)
