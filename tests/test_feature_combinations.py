"""The issue-16 features in one run: ControlNet with prompt editing / AND, with the hires fix and variation seeds."""

import numpy as np
import pytest
from controlnet_model import tiny_controlnet, write_cldm
from PIL import Image

from ldm.control import ControlSpec

SETTINGS = {"steps": 4, "seed": 3, "sampler": "Euler", "height": 16, "width": 16, "progress": False}


@pytest.fixture(scope="module")
def control(tiny_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("combined")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "hint.png")
    return ControlSpec(write_cldm(folder / "control.safetensors", tiny_controlnet(tiny_config, 0), tiny_config),
                       folder / "hint.png")  # fmt: skip


@pytest.mark.parametrize("prompt", ["[a red circle:a blue square:0.5]", "a red circle :1.2 AND a blue square :0.8"])
def test_a_controlnet_runs_with_prompt_schedules_and_strength_zero_is_still_the_plain_run(pipe, control, prompt):
    plain = pipe.generate(prompt, **SETTINGS)
    off = pipe.generate(prompt, controls=[ControlSpec(control.model, control.image, strength=0.0)], **SETTINGS)
    on = pipe.generate(prompt, controls=[control], **SETTINGS)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(off.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(on.images[0]))


def test_hires_with_a_variation_seed_and_a_controlnet_keeps_both_in_the_second_pass(pipe, control):
    settings = {**SETTINGS, "enable_hr": True, "hr_scale": 2.0, "denoising_strength": 0.5}
    result = pipe.generate("a red circle", subseed=9, subseed_strength=0.5, controls=[control], **settings)
    assert result.images[0].size == (32, 32)
    fields = result.parameters(0)
    assert "Variation seed: 9" in fields and "ControlNet 0:" in fields and "Hires upscale: 2.0" in fields


def test_a_lora_stays_merged_for_the_hires_second_pass(pipe, tmp_path):
    """``loras`` is a request field: the hires fix's second pass (its own ``run``) keeps the LoRA merged."""
    from test_lora_prompts import lora_folder

    pipe.loras.directory = lora_folder(tmp_path)
    settings = {**SETTINGS, "enable_hr": True, "hr_scale": 2.0, "denoising_strength": 0.5}
    try:
        plain = pipe.generate("a red circle", **settings)
        styled = pipe.generate("a red circle", loras=[("style", 1.0)], **settings)
        tagged = pipe.generate("a red circle <lora:style:1>", **settings)
    finally:
        pipe.loras.merger.apply([])
        pipe.loras.directory = None
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(styled.images[0]))
    assert np.array_equal(np.asarray(styled.images[0]), np.asarray(tagged.images[0]))
    assert "Lora hashes" in styled.parameters(0)
