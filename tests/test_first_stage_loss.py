"""First-stage training losses and metrics: LPIPS, patch discriminator, Eq. 25, PSNR/SSIM.

CPU, 16-32 px images (VGG's four pools leave 1x1 at 16 px), VGG16 with random weights;
nothing is downloaded.
"""
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ldm.autoencoder.discriminator import NLayerDiscriminator
from ldm.autoencoder.loss import (
    FirstStageLoss,
    FirstStageLossConfig,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.autoencoder.lpips import LPIPS
from ldm.autoencoder.model import AUTOENCODER_PRESETS, build_autoencoder
from ldm.image_metrics import psnr, ssim
from pipeline.models import weights


def _images(batch=2, size=32):
    return torch.rand(batch, 3, size, size) * 2 - 1


def _torchvision_keys(lpips_state_dict):
    """`net.sliceK.I.*` (LPIPS layout) -> `features.I.*` (torchvision's vgg16 layout)."""
    return {re.sub(r"^net\.slice\d\.", "features.", k): v
            for k, v in lpips_state_dict.items() if k.startswith("net.")}


def _random_heads():
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1)
            for k, c in enumerate((64, 128, 256, 512, 512))}


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(1)
    model = LPIPS()  # its own random VGG, reloaded through the torchvision-key path
    return model.load_state_dicts(_torchvision_keys(model.state_dict()), _random_heads())


# ---------------------------------------------------------------- LPIPS

def test_lpips_matches_reference_package(tmp_path, monkeypatch):
    """Same random VGG and the package's shipped heads: our LPIPS equals lpips.LPIPS."""
    lpips = pytest.importorskip("lpips")
    from torchvision.models import vgg

    # Random torchvision VGG16 trunk without the 120M-parameter classifier, which LPIPS drops.
    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16", lambda **_: SimpleNamespace(
        features=vgg.make_layers(vgg.cfgs["D"])))
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    vgg_file = tmp_path / "vgg16.pth"
    torch.save(_torchvision_keys(reference.state_dict()), vgg_file)
    ours = weights.load_lpips(vgg_path=str(vgg_file))  # heads found inside the lpips package
    x, y = _images(3, 16), _images(3, 16)
    y[0] = x[0]
    expected = reference(x, y).flatten()
    torch.testing.assert_close(ours(x, y), expected, atol=1e-5, rtol=0)
    assert expected[1:].min() > 0


def test_lpips_properties(lpips_model):
    x = _images(size=16)
    noise = torch.randn_like(x)
    assert torch.equal(lpips_model(x, x), torch.zeros(2))
    y = (x + 0.2 * noise).clamp(-1, 1)
    torch.testing.assert_close(lpips_model(x, y), lpips_model(y, x))
    levels = (0.05, 0.2, 0.8)  # one batch: x three times against growing distortions
    dists = lpips_model(x.repeat(3, 1, 1, 1),
                        torch.cat([(x + s * noise).clamp(-1, 1) for s in levels])).view(3, 2)
    assert bool((dists[0] < dists[1]).all() and (dists[1] < dists[2]).all())


def test_lpips_frozen_eval_and_differentiable(lpips_model):
    parent = nn.ModuleDict({"lpips": lpips_model}).train()
    assert not parent["lpips"].training and not any(m.training for m in lpips_model.modules())
    assert not any(p.requires_grad for p in lpips_model.parameters())
    x = _images(size=16).requires_grad_()
    y = _images(size=16)
    torch.testing.assert_close(lpips_model(x, y), lpips_model(x, y))  # dropout stays off
    lpips_model(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_model.parameters())


def test_lpips_state_dict_keys_and_bad_weights():
    model = LPIPS()
    keys = set(model.state_dict())
    assert {"scaling_layer.shift", "net.slice1.0.weight", "net.slice5.28.bias",
            "lin4.model.1.weight"} <= keys and len(keys) == 2 + 26 + 5
    with pytest.raises(ValueError, match="26 conv tensors"):
        model.load_state_dicts({"features.0.weight": torch.zeros(64, 3, 3, 3)}, _random_heads())
    with pytest.raises(ValueError, match="lin4"):
        model.load_state_dicts(_torchvision_keys(model.state_dict()),
                               {f"lin{k}.model.1.weight": torch.zeros(1) for k in range(4)})
    with pytest.raises(ValueError, match="one shape"):
        model(_images(size=16), _images(size=32))


# ---------------------------------------------------------------- pipeline/models/weights.py

def test_load_lpips_from_files_and_hub_cache(tmp_path, monkeypatch, lpips_model):
    from safetensors.torch import save_file

    vgg_sd = _torchvision_keys(lpips_model.state_dict())
    vgg_sd["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision file also has these
    heads_file = tmp_path / "heads.safetensors"
    save_file({k: v for k, v in lpips_model.state_dict().items() if k.startswith("lin")},
              heads_file)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="vgg16-397923af.pth"):
        weights.load_lpips(heads_path=str(heads_file))
    weights.default_vgg16_path().parent.mkdir(parents=True)
    torch.save(vgg_sd, weights.default_vgg16_path())
    loaded = weights.load_lpips(heads_path=str(heads_file))
    x, y = _images(size=16), _images(size=16)
    assert torch.equal(loaded(x, y), lpips_model(x, y))


def test_missing_weight_files_say_what_to_set(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="vgg_path="):
        weights.find_vgg16_weights(vgg_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="heads_path="):
        weights.find_lpips_heads(heads_path=str(tmp_path / "nope.pth"))
    monkeypatch.setattr(weights, "lpips_package_heads_path", lambda: None)
    with pytest.raises(ValueError, match="pip install lpips"):
        weights.find_lpips_heads()


# ---------------------------------------------------------------- discriminator

def test_discriminator_patch_map_shapes():
    assert NLayerDiscriminator()(_images(2, 64)).shape == (2, 1, 6, 6)
    with torch.device("meta"):
        assert NLayerDiscriminator()(torch.empty(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        two = NLayerDiscriminator(num_layers=2)
        assert two(torch.empty(1, 3, 256, 256)).shape == (1, 1, 62, 62)


def test_discriminator_matches_taming_layout():
    disc = NLayerDiscriminator()
    # 4x4 convs, 64 base channels: 3->64 (+bias), 64->128, 128->256, 256->512 (no bias, + BN),
    # 512->1 (+bias).
    convs = 16 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512 * 1) + 64 + 1
    norms = 2 * (128 + 256 + 512)
    assert sum(p.numel() for p in disc.parameters()) == convs + norms == 2_765_633
    params = {n for n, _ in disc.named_parameters()}
    assert params == {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight",
                      "main.3.bias", "main.5.weight", "main.6.weight", "main.6.bias",
                      "main.8.weight", "main.9.weight", "main.9.bias", "main.11.weight",
                      "main.11.bias"}
    assert abs(disc.main[8].weight.std().item() - 0.02) < 2e-3
    assert abs(disc.main[9].weight.mean().item() - 1.0) < 5e-3 and not disc.main[9].bias.any()


# ---------------------------------------------------------------- Eq. 25

class TinyDecoder(nn.Module):
    """x_rec = conv_out(tanh(conv_in(x))): enough to have a last layer."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.conv_out(torch.tanh(self.conv_in(x)))


def _loss(kind="kl", **overrides):
    cfg = FirstStageLossConfig(kind=kind, perceptual_weight=0.0, **overrides)
    return FirstStageLoss(cfg)


def test_adaptive_weight_equals_formula():
    loss_fn, decoder = _loss(disc_start=0, disc_weight=0.5, logvar_init=0.3), TinyDecoder()
    x = _images()
    x_rec = decoder(x)
    reg = torch.tensor(7.0)
    loss, logs = loss_fn.autoencoder_loss(x, x_rec, reg, global_step=0,
                                          last_layer=decoder.conv_out.weight)
    # Independent computation of Eq. 25's generator side.
    nll = ((x - x_rec).abs() / math.exp(0.3) + 0.3).sum() / 2
    g = -loss_fn.discriminator(x_rec).mean()
    grad_nll, = torch.autograd.grad(nll, decoder.conv_out.weight, retain_graph=True)
    grad_g, = torch.autograd.grad(g, decoder.conv_out.weight, retain_graph=True)
    lam = (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(logs["d_weight"], 0.5 * lam)
    torch.testing.assert_close(loss, nll + 1e-6 * reg + 0.5 * lam * g)
    assert not logs["d_weight"].requires_grad and logs["d_weight"] > 0


def test_adaptive_weight_clamped_and_unused_layer():
    w = torch.ones(3, requires_grad=True)
    huge = adaptive_weight((w * 1e3).sum(), (w * 0.0).sum(), w)  # ||g grad|| = 0
    assert huge.item() == 1e4
    with pytest.raises(ValueError, match="conv_out"):
        adaptive_weight(w.sum(), w.sum(), torch.ones(1, requires_grad=True))


def test_disc_start_gating():
    loss_fn, decoder = _loss(disc_start=100), TinyDecoder()
    x = _images()
    last = decoder.conv_out.weight
    x_rec = decoder(x)
    before, logs = loss_fn.autoencoder_loss(x, x_rec, torch.tensor(0.0), 99, last)
    assert logs["g_loss"] == 0 and logs["d_weight"] == 0 and logs["disc_factor"] == 0
    assert torch.equal(before, logs["nll_loss"])
    after, logs = loss_fn.autoencoder_loss(x, x_rec, torch.tensor(0.0), 100, last)
    assert logs["g_loss"] != 0 and logs["d_weight"] > 0 and logs["disc_factor"] == 1
    assert after != before
    d_before, _ = loss_fn.discriminator_loss(x, x_rec, 99)
    d_after, _ = loss_fn.discriminator_loss(x, x_rec, 100)
    assert d_before.item() == 0.0 and d_after.item() > 0


def test_no_gradients_gives_zero_adaptive_weight():
    loss_fn, decoder = _loss(kind="vq", disc_start=0), TinyDecoder()
    x = _images()
    with torch.no_grad():
        x_rec = decoder(x)
        loss, logs = loss_fn.autoencoder_loss(x, x_rec, torch.tensor(0.5), 10,
                                              decoder.conv_out.weight)
    assert logs["d_weight"] == 0 and logs["g_loss"] != 0
    torch.testing.assert_close(loss, (x - x_rec).abs().mean() + 0.5)


def test_hinge_and_vanilla_on_hand_inputs():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2]
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 1.0)))
    softplus = [math.log1p(math.exp(v)) for v in (-2.0, -0.5, 1.0, -2.0, 0.0, 1.0)]
    expected = 0.5 * (sum(softplus[:3]) / 3 + sum(softplus[3:]) / 3)  # -real, then fake
    torch.testing.assert_close(vanilla_d_loss(real, fake), torch.tensor(expected))
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)) == 0


def test_kl_and_vq_reductions():
    x, x_rec = _images(), _images()
    l1 = (x - x_rec).abs()
    kl = _loss(kind="kl", logvar_init=math.log(2.0))
    loss, logs = kl.autoencoder_loss(x, x_rec, torch.tensor(1000.0), 0)
    torch.testing.assert_close(loss, (l1 / 2 + math.log(2.0)).sum() / 2 + 1e-6 * 1000.0)
    assert {"kl_loss", "logvar"} <= set(logs) and "codebook_loss" not in logs
    vq = _loss(kind="vq", codebook_weight=2.0)
    loss, logs = vq.autoencoder_loss(x, x_rec, torch.tensor(0.25), 0)
    torch.testing.assert_close(loss, l1.mean() + 0.5)
    assert "codebook_loss" in logs and not hasattr(vq, "logvar")


def test_perceptual_term_is_broadcast_per_image(lpips_model):
    x, x_rec = _images(size=16), _images(size=16)
    cfg = FirstStageLossConfig(kind="vq", perceptual_weight=0.5)
    loss, logs = FirstStageLoss(cfg, lpips_model).autoencoder_loss(x, x_rec, torch.tensor(0.0), 0)
    p_loss = lpips_model(x, x_rec).mean()
    torch.testing.assert_close(loss, (x - x_rec).abs().mean() + 0.5 * p_loss)
    torch.testing.assert_close(logs["p_loss"], p_loss)


def test_config_errors():
    with pytest.raises(ValueError, match="kind"):
        FirstStageLossConfig(kind="vae")
    with pytest.raises(ValueError, match="disc_loss"):
        FirstStageLossConfig(disc_loss="wgan")
    with pytest.raises(ValueError, match="perceptual_weight"):
        FirstStageLoss(FirstStageLossConfig())  # LPIPS asked for, none given


def test_generator_and_discriminator_step_update_both(lpips_model):
    """One generator and one discriminator step of debug-kl, LPIPS and the GAN terms on."""
    torch.manual_seed(0)
    model = build_autoencoder(AUTOENCODER_PRESETS["debug-kl"])
    loss_fn = FirstStageLoss(FirstStageLossConfig(kind="kl", disc_start=0), lpips_model)
    ae_params = list(model.parameters()) + [loss_fn.logvar]
    opt_ae = torch.optim.Adam(ae_params, lr=1e-3, betas=(0.5, 0.9))
    opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.9))
    before_ae = [p.detach().clone() for p in ae_params]
    before_disc = [p.detach().clone() for p in loss_fn.discriminator.parameters()]
    x = _images(size=24)  # the smallest multiple of f=4 that leaves the discriminator a 1x1 map

    x_rec, reg = model(x)
    loss, logs = loss_fn.autoencoder_loss(x, x_rec, reg, 0, model.decoder.conv_out.weight)
    opt_ae.zero_grad()
    loss.backward()
    opt_ae.step()
    assert logs["d_weight"] > 0 and all(torch.isfinite(v) for v in logs.values())
    assert all(torch.equal(a, b) for a, b in zip(before_disc, loss_fn.discriminator.parameters()))

    d_loss, _ = loss_fn.discriminator_loss(x, x_rec, 0)
    opt_disc.zero_grad()  # also clears what the generator step left in the discriminator
    d_loss.backward()
    opt_disc.step()
    assert all(not torch.equal(a, b) for a, b in zip(before_ae, ae_params))
    # Every weight moves; the last bias gets exactly zero hinge gradient while all logits
    # lie inside the margin (-1, 1): d/db = 0.5 * (-1 + 1).
    moved = {n for (n, p), b in zip(loss_fn.discriminator.named_parameters(), before_disc)
             if not torch.equal(p, b)}
    assert {n for n, _ in loss_fn.discriminator.named_parameters() if n.endswith("weight")} <= moved


# ---------------------------------------------------------------- PSNR / SSIM

def test_psnr_hand_cases():
    x = _images()
    assert torch.isinf(psnr(x, x)).all()
    a = torch.zeros(2, 3, 16, 16)  # 0.5 in [0, 1]
    b = a + torch.tensor([0.2, 0.02]).view(2, 1, 1, 1)  # unit-range errors 0.1 and 0.01
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 40.0]))
    assert psnr(torch.full_like(a, 1.5), torch.ones_like(a)).eq(math.inf).all()  # clamped


def test_ssim_hand_cases():
    x = _images()
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # Constant images: no variance, SSIM is the luminance term alone.
    a, b = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), -0.5)  # 0.5 and 0.25
    c1 = 0.01 ** 2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    torch.testing.assert_close(ssim(a, b), torch.tensor([expected]))
    with pytest.raises(ValueError, match="too small"):
        ssim(_images(size=8), _images(size=8))


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x = _images(2, 40)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    ours = ssim(x, y)
    for i in range(2):
        ref = metrics.structural_similarity(
            ((x[i] + 1) / 2).numpy(), ((y[i] + 1) / 2).numpy(), channel_axis=0, data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(ours[i].item() - ref) < 1e-3
