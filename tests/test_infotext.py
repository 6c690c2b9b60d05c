"""A1111 infotext read back: the texts A1111 writes for an empty prompt, every field this project writes, and the
request it stands for (ldm.infotext), which makes the same image again."""

import numpy as np
import pytest
from PIL import Image

from ldm.errors import UserError
from ldm.infotext import request_settings
from ldm.outputs import format_parameters, parse_parameters
from ldm.request import GenerationRequest

FIELDS = {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1", "Size": "512x512"}
LINE = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"


@pytest.mark.parametrize(
    "text, prompt, negative",
    [
        (LINE, "", ""),  # A1111 strips the text, so an empty prompt leaves the parameters line alone
        ("\n" + LINE, "", ""),  # this project's writer keeps the empty first line
        ("Negative prompt: blurry\n" + LINE, "", "blurry"),
        ("a fox\n" + LINE, "a fox", ""),
    ],
)
def test_an_empty_prompt_is_read_as_empty(text, prompt, negative):
    assert parse_parameters(text) == {"Prompt": prompt, "Negative prompt": negative, **FIELDS}


def test_a_one_line_prompt_with_fewer_than_three_fields_stays_a_prompt():
    # A1111's rule: a last line is the parameters line when it holds at least three of them.
    assert parse_parameters("style: oil, mood: calm") == {"Prompt": "style: oil, mood: calm", "Negative prompt": ""}


def test_a_prompt_alone_that_looks_like_parameters_round_trips():
    text = format_parameters("a: 1, b: 2, c: 3", None, {})
    assert parse_parameters(text) == {"Prompt": "a: 1, b: 2, c: 3", "Negative prompt": ""}


def test_empty_prompt_round_trips_with_and_without_negative():
    for negative in ("", "ugly"):
        text = format_parameters("", negative, {"Steps": 4, "Seed": 3, "Size": "16x16"})
        assert parse_parameters(text) == {
            "Prompt": "", "Negative prompt": negative, "Steps": "4", "Seed": "3", "Size": "16x16",
        }  # fmt: skip


def _round_trip(pipe, **settings):
    """The first image, and the image its parsed infotext makes again (with the same init image and mask)."""
    images = {k: settings[k] for k in ("init_image", "mask") if k in settings}
    result = pipe.generate(**settings)
    fields = parse_parameters(result.parameters(0))
    written = {key: str(value) for key, value in result.fields(0).items() if value is not None}
    assert {k: v for k, v in fields.items() if k not in ("Prompt", "Negative prompt")} == written
    again, unread = request_settings(fields)
    assert unread == ["Model hash", "Model"]
    return result.images[0], pipe.run(GenerationRequest(**again, **images), progress=False).images[0]


def test_infotext_reproduces_a_hires_variation_image(pipe):
    first, again = _round_trip(
        pipe, prompt="", negative_prompt="dark", steps=2, seed=3, subseed=8, subseed_strength=0.3, height=8,
        width=12, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=3, hr_upscaler="Lanczos",
        denoising_strength=0.6, sampler="DPM++ 2M Karras", clip_skip=2, scale=5.5,
    )  # fmt: skip
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_infotext_reproduces_an_only_masked_inpainting(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 24))
    mask.paste(255, (20, 4, 28, 12))
    first, again = _round_trip(
        pipe, prompt="a fox", steps=2, seed=1, init_image=image, mask=mask, strength=0.8, mask_blur=2,
        inpaint_full_res=True, inpaint_full_res_padding=4, height=16, width=16, eta=0.5,
    )  # fmt: skip
    assert np.array_equal(np.asarray(first), np.asarray(again))


def test_a_value_that_does_not_read_names_its_key():
    with pytest.raises(UserError, match="'Steps: many' does not read"):
        request_settings({"Prompt": "a", "Steps": "many"})
