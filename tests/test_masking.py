"""Inpainting's mask blur and "inpaint only masked" (ldm.masking) on the tiny model."""

import numpy as np
import pytest
from PIL import Image

from ldm.errors import UserError
from ldm.infotext import request_settings
from ldm.masking import blur_mask, crop_region, fill_masked, repaint_mask
from ldm.outputs import parse_parameters
from ldm.request import GenerationRequest
from tests.feature_helpers import box_mask, pixels, random_image

SETTINGS = {"steps": 3, "seed": 2, "strength": 1.0}


def test_blur_is_a_normalised_symmetric_gaussian_and_0_is_none():
    mask = box_mask((40, 30), (8, 5, 32, 25))
    assert blur_mask(mask, 0) is mask
    blurred = np.asarray(blur_mask(mask, 2)).astype(int)
    assert blurred[15, 20] == 255 and blurred[0, 0] == 0 and 0 < blurred[15, 8] < 255
    assert np.array_equal(blurred, blurred[:, ::-1]) and np.array_equal(blurred, blurred[::-1, :])
    assert abs(blurred.sum() - np.asarray(mask).astype(int).sum()) < 0.01 * blurred.sum()  # mass kept


def test_blur_matches_opencv_where_installed():
    cv2 = pytest.importorskip(
        "cv2", reason="opencv-python is optional (requirements-compare.txt); A1111 blurs with cv2.GaussianBlur"
    )
    mask = box_mask((33, 21), (5, 4, 20, 15))
    for sigma in (1, 4):
        size = 2 * int(2.5 * sigma + 0.5) + 1
        expected = cv2.GaussianBlur(cv2.GaussianBlur(np.asarray(mask), (size, 1), sigma), (1, size), sigma)
        # OpenCV computes 8-bit blurs in fixed point: within 2 grey levels (measured: 1 at sigma 1-2, 2 at 4-7).
        assert np.abs(np.asarray(blur_mask(mask, sigma)).astype(int) - expected).max() <= 2


def test_crop_region_pads_keeps_the_aspect_and_stays_inside():
    mask = box_mask((100, 80), (40, 30, 50, 40))
    assert crop_region(mask, 0, 1.0) == (40, 30, 50, 40)
    assert crop_region(mask, 8, 1.0) == (32, 22, 58, 48)
    assert crop_region(mask, 8, 2.0) == (19, 22, 71, 48)  # widened to 2:1 about its centre
    corner = box_mask((100, 80), (0, 0, 10, 10))
    assert crop_region(corner, 16, 0.5) == (0, 0, 26, 52)  # shifted in, not cut
    assert crop_region(Image.new("L", (20, 10)), 4, 1.0) == (0, 0, 20, 10)  # nothing masked: the whole image


def test_blur_0_is_the_plain_paste_back_and_blur_feathers_it(pipe):
    image, mask = random_image((32, 32)), box_mask((32, 32), (8, 8, 24, 24))
    plain = pipe.generate("a", init_image=image, mask=mask, **SETTINGS)
    zero = pipe.generate("a", init_image=image, mask=mask, mask_blur=0, **SETTINGS)
    assert np.array_equal(pixels(plain.images[0]), pixels(zero.images[0]))
    outside = np.asarray(mask) == 0
    assert np.array_equal(pixels(plain.images[0])[outside], pixels(image)[outside])
    blurred = pipe.generate("a", init_image=image, mask=mask, mask_blur=2, **SETTINGS)
    alpha = np.asarray(blur_mask(mask, 2))
    assert np.array_equal(pixels(blurred.images[0])[alpha == 0], pixels(image)[alpha == 0])
    seam = (alpha > 0) & (alpha < 255)
    assert np.abs(pixels(blurred.images[0])[seam] - pixels(plain.images[0])[seam]).max() > 0
    assert parse_parameters(blurred.parameters(0))["Mask blur"] == "2"
    assert "Mask blur" not in parse_parameters(plain.parameters(0))


def test_only_masked_pastes_into_the_full_image_and_keeps_the_rest_bit_exact(pipe):
    image, mask = random_image((64, 48)), box_mask((64, 48), (40, 8, 52, 20))
    result = pipe.generate(
        "a", init_image=image, mask=mask, inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur=1,
        height=16, width=16, **SETTINGS,
    )  # fmt: skip
    out = result.images[0]
    assert out.size == (64, 48)
    alpha = np.asarray(blur_mask(mask, 1))
    assert np.array_equal(pixels(out)[alpha == 0], pixels(image)[alpha == 0])
    assert np.abs(pixels(out)[alpha == 255] - pixels(image)[alpha == 255]).max() > 0
    fields = parse_parameters(result.parameters(0))
    assert fields["Inpaint area"] == "Only masked" and fields["Masked area padding"] == "4"
    assert fields["Mask blur"] == "1" and fields["Size"] == "16x16"


def test_only_masked_without_a_size_works_at_the_regions_own(pipe):
    image, mask = random_image((64, 48)), box_mask((64, 48), (40, 8, 52, 20))
    only_masked = {"inpaint_full_res": True, "inpaint_full_res_padding": 2}
    result = pipe.generate("a", init_image=image, mask=mask, **only_masked, **SETTINGS)
    assert result.images[0].size == (64, 48) and parse_parameters(result.parameters(0))["Size"] == "16x16"


def test_inverting_twice_is_not_inverting():
    mask = box_mask((32, 32), (8, 8, 24, 24))
    assert repaint_mask(mask, False) is mask and repaint_mask(None, True) is None
    inverted = repaint_mask(mask, True)
    assert np.array_equal(np.asarray(inverted), 255 - np.asarray(mask))
    assert np.array_equal(np.asarray(repaint_mask(inverted, True)), np.asarray(mask))


def test_an_inverted_mask_repaints_the_complement_and_round_trips_through_infotext(pipe):
    image, mask = random_image((32, 32)), box_mask((32, 32), (8, 8, 24, 24))
    white = np.asarray(mask) == 255
    inverted = pipe.generate("a", init_image=image, mask=mask, inpainting_mask_invert=True, **SETTINGS)
    out = pixels(inverted.images[0])
    assert np.array_equal(out[white], pixels(image)[white])  # the box is kept, bit for bit ...
    assert np.abs(out[~white] - pixels(image)[~white]).max() > 0  # ... and the rest repainted
    # The same as giving the inverted mask: the run (which checks the request again) inverts once.
    given = pipe.generate("a", init_image=image, mask=repaint_mask(mask, True), **SETTINGS)
    assert np.array_equal(out, pixels(given.images[0]))
    twice = pipe.generate("a", init_image=image, mask=repaint_mask(mask, True), inpainting_mask_invert=True, **SETTINGS)
    plain = pipe.generate("a", init_image=image, mask=mask, **SETTINGS)
    assert np.array_equal(pixels(twice.images[0]), pixels(plain.images[0]))
    fields = parse_parameters(inverted.parameters(0))
    assert fields["Mask mode"] == "Inpaint not masked" and "Mask mode" not in parse_parameters(plain.parameters(0))
    settings, unread = request_settings(fields)
    assert settings["inpainting_mask_invert"] is True and "Mask mode" not in unread
    again = pipe.run(GenerationRequest(**settings, init_image=image, mask=mask))
    assert np.array_equal(pixels(again.images[0]), out)


def test_only_masked_with_an_inverted_mask_works_on_the_complement(pipe):
    image, mask = random_image((64, 48)), box_mask((64, 48), (40, 8, 52, 20))
    settings = {"inpaint_full_res": True, "inpaint_full_res_padding": 4, "height": 16, "width": 16, **SETTINGS}
    result = pipe.generate("a", init_image=image, mask=mask, inpainting_mask_invert=True, **settings)
    given = pipe.generate("a", init_image=image, mask=repaint_mask(mask, True), **settings)
    white = np.asarray(mask) == 255
    out = pixels(result.images[0])
    assert np.array_equal(out, pixels(given.images[0])) and np.array_equal(out[white], pixels(image)[white])
    assert parse_parameters(result.parameters(0))["Mask mode"] == "Inpaint not masked"


def test_bad_mask_settings_are_user_errors():
    with pytest.raises(UserError, match="mask_blur is a number of pixels"):
        GenerationRequest("a", mask_blur=-1)
    with pytest.raises(UserError, match="inpaint_full_res_padding is a number of pixels"):
        GenerationRequest("a", inpaint_full_res_padding=2.5)
    with pytest.raises(UserError, match="inpainting_mask_invert is True or False"):
        GenerationRequest("a", inpainting_mask_invert="yes")


def test_fill_gives_the_masked_region_its_surroundings_colours():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32], pixels[:, 32:] = (255, 0, 0), (0, 0, 255)
    pixels[20:44, 20:44] = (0, 255, 0)  # what the mask covers: gone after the fill
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    filled = np.asarray(fill_masked(Image.fromarray(pixels), Image.fromarray(mask)))
    assert np.array_equal(filled[mask == 0], pixels[mask == 0])
    inside = filled[mask > 0].astype(int)
    assert inside[:, 1].max() < 16  # no green left
    assert filled[30, 17, 0] > 200 and filled[30, 46, 2] > 200  # each side takes its neighbour's colour
    nothing = fill_masked(Image.fromarray(pixels), Image.new("L", (64, 64)))  # a black mask repaints nothing
    assert np.array_equal(np.asarray(nothing), pixels)
