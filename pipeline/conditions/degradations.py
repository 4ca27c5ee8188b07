"""Low-resolution inputs of the x4 super-resolution models (Sec. 4.4, App. D.6.1), made from HR images.

- `bicubic`: the LDM-SR set of Tab. 5 (SR3's pipeline): anti-aliased bicubic downsampling by 4.
  PIL's BICUBIC widens its kernel by the downsampling factor, which is the anti-aliasing.
- `bsr`: the authors' light variant of BSRGAN's degradation (LDM-BSR): blur, two downsamplings,
  Gaussian noise and JPEG in random order, then a final JPEG (PAPER_TASKS.md 1.2, step by step).

Both map a uint8 HR image [H, W, 3] (H, W multiples of 4) to uint8 [H/4, W/4, 3]. Every random
choice comes from the `numpy.random.Generator` passed in, so one seed gives one degradation: the
loader seeds it per (run seed, epoch, sample), and a resumed run degrades exactly as an
uninterrupted one. Choices the description leaves open, and ours: MATLAB's anti-aliased bicubic
(the pre-downscale's second option) is PIL's BICUBIC; an anisotropic kernel's eigenvalues are
floored at 0.05 and an isotropic sigma at 0.1 px (a zero variance has no Gaussian); the correlated
colour noise's covariance is (2/255)^2 |U^T D U| as described.
"""
import cv2
import numpy as np
from PIL import Image

SCALE = 4
DEGRADATIONS = ("bicubic", "bsr")
_INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA)


def degrade(hr_HW3: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The LR image (uint8 [H/4, W/4, 3]) of `kind` for a uint8 HR image [H, W, 3]."""
    if hr_HW3.dtype != np.uint8 or hr_HW3.ndim != 3 or hr_HW3.shape[2] != 3:
        raise ValueError(f"HR image must be uint8 [H, W, 3], got {hr_HW3.dtype} {list(hr_HW3.shape)}")
    if hr_HW3.shape[0] % SCALE or hr_HW3.shape[1] % SCALE:
        raise ValueError(f"HR image size {list(hr_HW3.shape[:2])} is not a multiple of {SCALE}")
    if kind == "bicubic":
        return bicubic(hr_HW3)
    if kind == "bsr":
        return bsr_light(hr_HW3, rng)
    raise ValueError(f"degradation {kind!r}: use one of {DEGRADATIONS}")


def bicubic(hr_HW3: np.ndarray, factor: int = SCALE) -> np.ndarray:
    height, width = hr_HW3.shape[:2]
    image = Image.fromarray(hr_HW3).resize((width // factor, height // factor), Image.Resampling.BICUBIC)
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------- BSR light


def bsr_light(hr_HW3: np.ndarray, rng: np.random.Generator, sf: int = SCALE) -> np.ndarray:
    img = hr_HW3.astype(np.float32) / 255.0
    if sf == 4 and rng.random() < 0.25:  # optional pre-downscale by 2; the ops then take the rest
        img = _halve(img, rng)
        sf = 2
    height, width = img.shape[:2]
    order = list(rng.permutation(7))
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:  # downsample-A always before downsample-B
        order[i2], order[i3] = 3, 2
    for op in order:
        if op == 0:
            img = _blur(img, rng, sf)
        elif op == 2:
            img = _downsample_a(img, rng, sf)
        elif op == 3:
            img = np.clip(cv2.resize(img, (width // sf, height // sf), interpolation=_interpolation(rng)), 0, 1)
        elif op == 4:
            img = _gaussian_noise(img, rng)
        elif op == 5 and rng.random() < 0.9:
            img = _jpeg(img, rng)
        # 1 (second blur) and 6 (camera ISP noise) are off in the light variant
    img = _jpeg(img, rng)
    return (img * 255.0).round().clip(0, 255).astype(np.uint8)


def _interpolation(rng: np.random.Generator) -> int:
    return _INTERPOLATIONS[int(rng.integers(3))]


def _halve(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = img.shape[:2]
    size = (width // 2, height // 2)
    if rng.random() < 0.5:
        out = cv2.resize(img, size, interpolation=_interpolation(rng))
    else:
        u8 = (img * 255.0).round().clip(0, 255).astype(np.uint8)
        out = np.asarray(Image.fromarray(u8).resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return np.clip(out, 0, 1)


def gaussian_kernel(size: int, cov_22: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """A size x size Gaussian of covariance `cov_22` (px^2), centred `shift` px right and down of
    the kernel's centre, summing to 1."""
    centre = (size - 1) / 2.0 + shift
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) - centre
    offsets = np.stack([xs, ys], axis=-1)
    inverse = np.linalg.inv(cov_22)
    kernel = np.exp(-0.5 * np.einsum("...i,ij,...j->...", offsets, inverse, offsets))
    return (kernel / kernel.sum()).astype(np.float32)


def _blur(img: np.ndarray, rng: np.random.Generator, sf: int) -> np.ndarray:
    wd2, wd = (4.0 + sf) / 4.0, (2.0 + 0.2 * sf) / 4.0
    if rng.random() < 0.5:  # anisotropic
        size = int(rng.integers(5, 15))
        theta = rng.random() * np.pi
        eigen = np.maximum(rng.random(2) * wd2, 0.05)
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        kernel = gaussian_kernel(size, rotation @ np.diag(eigen) @ rotation.T)
    else:  # isotropic
        size = int(rng.integers(5, 8))
        sigma = max(wd * rng.random(), 0.1)
        kernel = gaussian_kernel(size, np.eye(2) * sigma ** 2)
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _downsample_a(img: np.ndarray, rng: np.random.Generator, sf: int) -> np.ndarray:
    height, width = img.shape[:2]
    if rng.random() < 0.8:
        s1 = rng.uniform(1.0, 2.0 * sf)
        size = (max(1, int(width / s1)), max(1, int(height / s1)))
        return np.clip(cv2.resize(img, size, interpolation=_interpolation(rng)), 0, 1)
    sigma = rng.uniform(0.1, 0.6 * sf)
    kernel = gaussian_kernel(25, np.eye(2) * sigma ** 2, shift=(sf - 1) / 2.0)
    blurred = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return np.clip(blurred[0::sf, 0::sf], 0, 1)


def _gaussian_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    level = int(rng.integers(1, 3)) / 255.0
    draw = rng.random()
    if draw < 0.4:  # per channel
        noise = rng.normal(0.0, level, img.shape)
    elif draw < 0.8:  # one map for all channels
        noise = rng.normal(0.0, level, (*img.shape[:2], 1))
    else:  # correlated across channels
        d = np.diag(rng.random(3))
        u, _ = np.linalg.qr(rng.random((3, 3)))
        cov = np.abs((2.0 / 255.0) ** 2 * (u.T @ d @ u))
        noise = rng.multivariate_normal(np.zeros(3), cov, img.shape[:2])
    return np.clip(img + noise.astype(np.float32), 0, 1)


def _jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    quality = int(rng.integers(80, 96))
    bgr = cv2.cvtColor((img * 255.0).round().clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    assert ok, "OpenCV could not encode a JPEG"
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
