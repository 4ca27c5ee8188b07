"""Reconstruction metrics of the first stages (Tab. 8's PSNR and SSIM columns), per image.

Inputs are batches [B, C, H, W] in the autoencoder's range [-1, 1]. Both metrics
first map them to [0, 1] and clamp there (what saving the image would do), then
use a data range of 1, i.e. the usual 8-bit definitions scaled by 1/255. The
range matters for SSIM: its constants C1, C2 and luminance term are not
invariant to a shift of the pixel values.
"""
import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004; scikit-image's gaussian_weights=True
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit_range(x_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, in at least float32."""
    return ((x_BCHW.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor, min_side: int = 1) -> None:
    if x_BCHW.shape != y_BCHW.shape or x_BCHW.ndim != 4:
        raise ValueError(f"need two image batches [B, C, H, W] of one shape, got "
                         f"{list(x_BCHW.shape)} and {list(y_BCHW.shape)}")
    if min(x_BCHW.shape[-2:]) < min_side:
        raise ValueError(f"images of {x_BCHW.shape[-2]}x{x_BCHW.shape[-1]} are too small: "
                         f"SSIM needs sides >= {min_side} (its Gaussian window)")


def psnr(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image [B]: 10 log10(1 / MSE); inf if identical."""
    _check_pair(x_BCHW, y_BCHW)
    mse_B = (to_unit_range(x_BCHW) - to_unit_range(y_BCHW)).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse_B)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian [size], centred (scipy.ndimage's kernel at radius size // 2)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _blur(x_BCHW: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Depthwise separable Gaussian filter, 'valid' region only (no padding)."""
    channels = x_BCHW.shape[1]
    w = window.to(x_BCHW)
    x_BCHW = F.conv2d(x_BCHW, w.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(x_BCHW, w.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def ssim(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image [B] (Wang et al. 2004, Eq. 13), 1.0 if identical.

    Gaussian window 11, sigma 1.5, population (not sample) covariances, K1 = 0.01,
    K2 = 0.03, data range 1; the SSIM map is averaged over the positions where the
    window fits entirely and over channels. Matches skimage.metrics.structural_similarity
    (gaussian_weights=True, use_sample_covariance=False, data_range=1, channel_axis=0).
    """
    _check_pair(x_BCHW, y_BCHW, min_side=SSIM_WINDOW)
    x, y = to_unit_range(x_BCHW), to_unit_range(y_BCHW)
    channels = x.shape[1]
    moments = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), gaussian_window())
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.split(channels, dim=1)
    var_x, var_y = e_xx - mu_x.square(), e_yy - mu_y.square()
    cov_xy = e_xy - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # (K * data_range)^2 with data_range = 1
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3))

