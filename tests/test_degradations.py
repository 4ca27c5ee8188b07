"""The x4 super-resolution inputs (pipeline.conditions): shapes, determinism per seed, what each op does
to known images, and the spread of the BSR degradation over seeds."""
import numpy as np
import pytest

from pipeline.conditions import condition_rng, make_condition
from pipeline.conditions.degradations import bicubic, degrade, gaussian_kernel
from pipeline.precompute.shard import png_bytes


def _scene(seed: int = 0, size: int = 64) -> np.ndarray:
    """uint8 [size, size, 3]: a bright square with sharp edges on a dark, colour-graded background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([40 + 60 * xx, 30 + 50 * yy, 50 + 0 * xx], axis=-1)
    top, left = rng.integers(8, size // 2, size=2)
    image[top:top + size // 3, left:left + size // 3] = rng.integers(150, 255, size=3)
    return image.round().astype(np.uint8)


def _edge_energy(image: np.ndarray) -> float:
    x = image.astype(np.float64)
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


@pytest.mark.parametrize("kind", ["bicubic", "bsr"])
def test_shape_dtype_and_the_same_seed_gives_the_same_image(kind):
    hr = _scene()
    lr = degrade(hr, kind, np.random.default_rng(5))
    assert lr.shape == (16, 16, 3) and lr.dtype == np.uint8
    np.testing.assert_array_equal(lr, degrade(hr, kind, np.random.default_rng(5)))


def test_bicubic_is_antialiased_and_keeps_flat_colours():
    flat = np.full((64, 64, 3), (200, 100, 50), dtype=np.uint8)
    np.testing.assert_array_equal(bicubic(flat), np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8))
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, 1::2] = 255  # one-pixel stripes: plain subsampling would give all black or all white
    assert np.abs(bicubic(stripes)[:, 1:-1].astype(float) - 127.5).max() < 3  # the borders aside


def test_bsr_varies_with_the_seed_departs_from_bicubic_and_keeps_the_colours():
    """Over 40 seeds (measured on this scene: mean |BSR - bicubic| 4.1-15.4 grey levels; edge energy
    15.6-30.2 against bicubic's 16.3, the aliasing of unfiltered resizes, noise and JPEG outweighing
    the light variant's mild blur)."""
    hr = _scene(1)
    reference = bicubic(hr).astype(np.float64)
    draws = [degrade(hr, "bsr", np.random.default_rng(seed)).astype(np.float64) for seed in range(40)]
    assert len({d.tobytes() for d in draws}) == 40  # every seed its own degradation
    distances = [np.abs(d - reference).mean() for d in draws]
    assert min(distances) > 2 and max(distances) - min(distances) > 4  # degraded, by varying amounts
    energies = [_edge_energy(d) for d in draws]
    assert max(energies) - min(energies) > 5
    # Noise at 1-2/255 and JPEG at quality >= 80 keep the mean colour; where a sharp square's edges
    # fall in a subsampling moves it by up to 6 grey levels per draw (measured), not on average.
    means = np.array([d.mean(axis=(0, 1)) for d in draws])
    np.testing.assert_allclose(means, np.broadcast_to(reference.mean(axis=(0, 1)), means.shape), atol=10)
    np.testing.assert_allclose(means.mean(axis=0), reference.mean(axis=(0, 1)), atol=3)
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    for seed in range(10):
        assert np.abs(degrade(flat, "bsr", np.random.default_rng(seed)).astype(float) - 128).max() <= 12


def test_gaussian_kernel_has_the_asked_covariance_and_shift():
    cov = np.array([[4.0, 1.5], [1.5, 2.0]])
    kernel = gaussian_kernel(31, cov, shift=1.5).astype(np.float64)
    ys, xs = np.mgrid[0:31, 0:31] - 15.0
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    mean = np.array([(kernel * xs).sum(), (kernel * ys).sum()])
    np.testing.assert_allclose(mean, [1.5, 1.5], atol=1e-4)
    d = np.stack([xs - mean[0], ys - mean[1]])
    np.testing.assert_allclose(np.einsum("ihw,jhw,hw->ij", d, d, kernel), cov, atol=1e-3)


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        degrade(np.zeros((62, 64, 3), np.uint8), "bicubic", np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        degrade(np.zeros((64, 64, 3), np.float32), "bicubic", np.random.default_rng(0))
    with pytest.raises(ValueError, match="use one of"):
        degrade(np.zeros((64, 64, 3), np.uint8), "jpeg", np.random.default_rng(0))


def test_the_condition_of_a_stored_crop_is_a_function_of_seed_epoch_and_sample():
    files = {"image.png": png_bytes(_scene(2).transpose(2, 0, 1))}
    make = lambda seed, epoch, sample: make_condition("sr-bsr", files, condition_rng(seed, epoch, sample), "x")  # noqa: E731
    first = make(0, 0, 7)
    assert first.shape == (3, 16, 16) and first.dtype == np.float32 and -1 <= first.min() <= first.max() <= 1
    np.testing.assert_array_equal(first, make(0, 0, 7))
    assert not np.array_equal(first, make(0, 1, 7)) and not np.array_equal(first, make(0, 0, 8))
    assert not np.array_equal(first, make(1, 0, 7))
    bicubic_c = make_condition("sr-bicubic", files, condition_rng(0, 0, 7), "x")
    np.testing.assert_array_equal(bicubic_c, bicubic(_scene(2)).transpose(2, 0, 1) / np.float32(127.5) - 1)
    with pytest.raises(ValueError, match="does not decode"):
        make_condition("sr-bicubic", {"image.png": b"junk"}, condition_rng(0, 0, 0), "00000.tar: sample 'k'")
