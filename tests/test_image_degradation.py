"""The BSR degradations (ldm.modules.image_degradation): shapes, ranges, seeds, and what each step does."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import UserError
from ldm.modules.image_degradation import bsrgan, bsrgan_light, degradation_fn_bsr, degradation_fn_bsr_light
from ldm.modules.image_degradation.pipeline import DOWNSAMPLE, FINAL_RESIZE, step_order
from ldm.modules.image_degradation.steps import (
    add_blur,
    add_gaussian_noise,
    add_jpeg_noise,
    anisotropic_gaussian,
    convolve,
    downsample_random,
    isotropic_gaussian,
    jpeg_round_trip,
    shift_pixel,
)
from ldm.modules.image_degradation.utils_image import cv_resize, imresize_np, single2uint, uint2single

DEGRADATIONS = {"bsrgan": degradation_fn_bsr, "bsrgan_light": degradation_fn_bsr_light}


def photo(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """A uint8 (H, W, 3) image with smooth regions and edges, like a photo."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic")[0].permute(1, 2, 0).numpy()
    edges = (np.add.outer(np.arange(height), np.arange(width)) // 8 % 2)[..., None] * 0.3
    return single2uint(0.6 * smooth + edges)


def high_frequency_energy(image: np.ndarray) -> float:
    """Mean squared difference between neighbouring pixels."""
    return float(np.mean(np.diff(image, axis=0) ** 2) + np.mean(np.diff(image, axis=1) ** 2))


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
@pytest.mark.parametrize(
    "sf, size, expected", [(4, (64, 48), (16, 12)), (2, (40, 64), (20, 32)), (4, (66, 70), (16, 17))]
)
def test_output_is_uint8_and_sf_times_smaller(name, sf, size, expected):
    image = photo(*size)
    for seed in range(6):  # different draws take different branches (halving first, resize or blur-and-subsample)
        out = DEGRADATIONS[name](image, sf=sf, rng=np.random.default_rng(seed))
        assert set(out) == {"image"}
        assert out["image"].dtype == np.uint8 and out["image"].shape == (*expected, 3)


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_a_seed_fixes_the_result_and_other_seeds_differ(name):
    image = photo()
    degrade = DEGRADATIONS[name]
    first = degrade(image, rng=np.random.default_rng(7))["image"]
    assert np.array_equal(first, degrade(image, rng=np.random.default_rng(7))["image"])
    others = [degrade(image, rng=np.random.default_rng(s))["image"] for s in range(8, 12)]
    assert any(not np.array_equal(first, other) for other in others)
    torch.manual_seed(3)
    default = degrade(image)["image"]
    torch.manual_seed(3)
    assert np.array_equal(default, degrade(image)["image"])  # without rng, seeded from torch's generator


def test_the_light_version_stays_closer_to_a_plain_downscale():
    image = photo(64, 64)
    reference = uint2single(np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.BOX)))

    def mean_error(degrade) -> float:
        return np.mean(
            [
                np.abs(uint2single(degrade(image, rng=np.random.default_rng(s))["image"]) - reference).mean()
                for s in range(12)
            ]
        )

    assert mean_error(degradation_fn_bsr_light) < mean_error(degradation_fn_bsr)


def test_settings_follow_the_originals():
    assert (bsrgan.SETTINGS.noise_levels, bsrgan.SETTINGS.min_jpeg_quality) == ((2, 25), 30)
    assert (bsrgan_light.SETTINGS.noise_levels, bsrgan_light.SETTINGS.min_jpeg_quality) == ((1, 2), 80)
    assert (bsrgan.SETTINGS.downsample_resize_p, bsrgan_light.SETTINGS.downsample_resize_p) == (0.75, 0.8)
    for seed in range(50):
        order = step_order(np.random.default_rng(seed))
        assert sorted(order) == list(range(7)) and order.index(DOWNSAMPLE) < order.index(FINAL_RESIZE)


@pytest.mark.parametrize("name, blurs, blur_subsample_p", [("bsrgan", 2, 0.25), ("bsrgan_light", 1, 0.2)])
def test_steps_are_taken_with_the_originals_probabilities(monkeypatch, name, blurs, blur_subsample_p):
    from ldm.modules.image_degradation import pipeline, steps

    calls = {"blur": 0, "jpeg": 0, "matlab_halving": 0, "blur_subsample": 0}

    def counting(module, attribute, key):
        original = getattr(module, attribute)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, wrapper)

    counting(pipeline, "add_blur", "blur")
    counting(pipeline, "add_jpeg_noise", "jpeg")
    counting(pipeline, "imresize_np", "matlab_halving")  # half of the halvings, which come with probability 1/4
    counting(steps, "shift_pixel", "blur_subsample")  # the intermediate downsampling's other branch
    runs, image = 150, photo(32, 32)  # fixed seeds: the counts are deterministic, the tolerances about 3 sigma
    for seed in range(runs):
        DEGRADATIONS[name](image, sf=4, rng=np.random.default_rng(seed))
    assert calls["blur"] == blurs * runs
    assert calls["jpeg"] / runs == pytest.approx(1.9, abs=0.08)  # the last one, and one more with p = 0.9
    assert calls["matlab_halving"] / runs == pytest.approx(0.125, abs=0.08)
    assert calls["blur_subsample"] / runs == pytest.approx(blur_subsample_p, abs=0.1)


@pytest.mark.parametrize(
    "bad", [np.zeros((16, 16, 3), np.float32), np.zeros((16, 16), np.uint8), np.zeros((2, 2, 3), np.uint8)]
)
def test_bad_images_are_user_errors(bad):
    with pytest.raises(UserError):
        degradation_fn_bsr(bad, sf=4)


# ---------------------------------------------------------------------------------------------------------------------
# The steps


def test_kernels_sum_to_one_and_an_isotropic_anisotropic_one_is_fspecial():
    for kernel in (isotropic_gaussian(7, 1.3), anisotropic_gaussian(9, 0.4, 3.0, 0.5)):
        assert kernel.sum() == pytest.approx(1.0)
    # Eigenvalues are variances: l1 = l2 = s^2 is fspecial's Gaussian of sigma s.
    np.testing.assert_allclose(anisotropic_gaussian(7, 1.1, 2.25, 2.25), isotropic_gaussian(7, 1.5), atol=1e-12)
    stretched = anisotropic_gaussian(15, 0.0, 8.0, 0.5)  # theta 0: the long axis is x
    assert stretched[7, 7 + 4] > 10 * stretched[7 + 4, 7]
    even = isotropic_gaussian(6, 1.0)
    np.testing.assert_allclose(even, even[::-1, ::-1])  # centred between pixels


def test_convolve_is_a_true_convolution_with_mirrored_borders():
    image = uint2single(photo(12, 10))
    delta = np.zeros((5, 5))
    delta[2, 2] = 1
    np.testing.assert_allclose(convolve(image, delta), image, atol=1e-6)
    offset = np.zeros((5, 5))
    offset[2, 3] = 1  # convolution with a delta right of centre moves the image right
    np.testing.assert_allclose(convolve(image, offset)[:, 1:], image[:, :-1], atol=1e-6)
    np.testing.assert_allclose(convolve(image, offset)[:, 0], image[:, 1], atol=1e-6)  # mirrored about the edge
    assert convolve(image, isotropic_gaussian(25, 2.0)).shape == image.shape  # kernel larger than the image


def test_blur_lowers_high_frequency_energy():
    image = uint2single(photo())
    rng = np.random.default_rng(0)
    before = high_frequency_energy(image)
    for light in (False, True):
        after = [high_frequency_energy(add_blur(image, 4, rng, light)) for _ in range(10)]
        # A draw can give a spread so small that the kernel is a delta (as in the original): never more energy.
        assert max(after) <= before + 1e-7
        assert sum(a < 0.9 * before for a in after) >= 6


def test_shift_pixel_moves_the_kernel_up_left_by_half_sf_minus_one():
    kernel = isotropic_gaussian(25, 1.5)
    shifted = shift_pixel(kernel, 4)
    grid = np.arange(25)
    centre = [(shifted.sum(axis=1) * grid).sum() / shifted.sum(), (shifted.sum(axis=0) * grid).sum() / shifted.sum()]
    np.testing.assert_allclose(centre, [12 - 1.5, 12 - 1.5], atol=1e-6)  # each value is read 1.5 px further on


def test_resizes_give_the_asked_sizes_and_keep_constants():
    image = np.full((24, 36, 3), 0.25, np.float32)
    for code in (0, 1, 2, 3):
        out = cv_resize(image, (9, 6), code)
        assert out.shape == (6, 9, 3) and np.allclose(out, 0.25)
    assert imresize_np(image, 0.5).shape == (12, 18, 3) and np.allclose(imresize_np(image, 0.5), 0.25)
    ramp = np.tile(np.arange(32, dtype=np.float32)[None, :, None], (4, 1, 1))
    half = imresize_np(ramp, 0.5)[0, 4:-4, 0]  # away from the borders, bicubic keeps a linear ramp linear
    np.testing.assert_allclose(half, 2 * np.arange(4, 12) + 0.5, atol=1e-4)
    area = cv_resize(ramp, (8, 4), 3)[0, :, 0]
    np.testing.assert_allclose(area, 4 * np.arange(8) + 1.5)  # area: the mean of each 4 pixels


def test_cv_area_and_nearest_use_opencvs_weights_and_indices():
    x = np.array([[0.0, 0.3, 0.9, 0.6, 0.2]], np.float32)[..., None]  # one row, five pixels
    shrunk = cv_resize(x[:, :3], (2, 1), 3)[0, :, 0]  # 3 -> 2: each output covers 1.5 pixels
    np.testing.assert_allclose(shrunk, [(0.0 + 0.5 * 0.3) / 1.5, (0.5 * 0.3 + 0.9) / 1.5], atol=1e-6)
    grown = cv_resize(x[:, :2], (3, 1), 3)[0, :, 0]  # 2 -> 3: OpenCV's blend, not a box
    np.testing.assert_allclose(grown, [0.0, 0.15, 0.3], atol=1e-6)
    np.testing.assert_array_equal(cv_resize(x, (3, 1), 0)[0, :, 0], x[0, [0, 1, 3], 0])  # floor(i * 5 / 3)


def test_downsampling_step_shrinks_by_up_to_twice_sf():
    image = uint2single(photo(64, 64))
    rng = np.random.default_rng(0)
    sizes = {downsample_random(image, 4, rng, resize_p=1.0).shape[0] for _ in range(10)}
    assert all(64 // 8 <= s <= 64 for s in sizes) and len(sizes) > 1
    blurred = downsample_random(image, 4, rng, resize_p=0.0)
    assert blurred.shape == (16, 16, 3)  # blur with the shifted kernel, then every 4th pixel


def test_gaussian_noise_stays_in_range_and_at_its_level():
    image = np.full((32, 32, 3), 0.5, np.float32)
    rng = np.random.default_rng(0)
    for _ in range(10):
        noisy = add_gaussian_noise(image, rng, 2, 25)
        assert noisy.dtype == np.float32 and 0.0 <= noisy.min() and noisy.max() <= 1.0
        assert 0 < np.std(noisy - image) < 3 * 25 / 255


def test_jpeg_noise_at_quality_q_is_pils_encode_decode():
    image = uint2single(photo(32, 48))
    for quality in (30, 80, 95):
        buffer = io.BytesIO()
        Image.fromarray(single2uint(image)).save(buffer, format="JPEG", quality=quality)
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(single2uint(jpeg_round_trip(image, quality)), expected)
    noisy = add_jpeg_noise(image, np.random.default_rng(0), 80)
    assert any(np.array_equal(noisy, jpeg_round_trip(image, q)) for q in range(80, 96))
    assert not np.array_equal(noisy, image)
