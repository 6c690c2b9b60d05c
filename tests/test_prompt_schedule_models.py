"""Prompt editing, alternation and AND on the tiny models: SD 1.x-shaped (tiny_model), SDXL, the refiner hand-off,
the Pipeline and a script run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm import cli
from ldm.geometry import LatentGeometry
from ldm.inference import Pipeline
from ldm.models.diffusion.guidance import StepConditioning
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.outputs import parse_parameters, read_parameters
from ldm.prompt_schedule import encode_scheduled
from ldm.prompts import encode_prompts
from ldm.request import RuntimeOptions
from ldm.util import instantiate_from_config
from tests.sdxl_model import tiny_config as sdxl_config
from tests.test_scripts import hash_cache, tiny_args, tiny_files  # noqa: F401 - fixtures

SETTINGS = {"steps": 4, "scale": 5.0, "seed": 3, "height": 16, "width": 16, "progress": False}
SDXL = {**SETTINGS, "height": 16, "width": 16}


# Its own: this module uses test_scripts' function-scoped hash_cache, which the shared module-scoped pipe cannot.
@pytest.fixture(scope="module")
def pipe(tiny_config, tiny_dir) -> Pipeline:
    return Pipeline.from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu", precision="full")


@pytest.fixture(scope="module")
def sdxl() -> Pipeline:
    torch.manual_seed(0)
    model = instantiate_from_config(sdxl_config().model).eval()
    with torch.no_grad():  # the UNet's zero-initialised output layers would make every model predict eps = 0
        for parameter in model.model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return Pipeline(model, LatentGeometry.from_config(sdxl_config()), RuntimeOptions("cpu", "full"))


def counting(model) -> list[int]:
    calls, apply = [0], model.apply_model

    def counted(*args, **kwargs):
        calls[0] += 1
        return apply(*args, **kwargs)

    model.apply_model = counted
    return calls


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def latents(pipe: Pipeline, prompt, negative="", sampler="euler", **settings) -> torch.Tensor:
    """The run's last x0 estimate (B, C, h, w), from the pipeline's callback."""
    seen = []
    pipe.generate(prompt, negative_prompt=negative, sampler=sampler, callback=lambda i, d: seen.append(d),
                  **{**SETTINGS, **settings})  # fmt: skip
    return seen[-1]


def test_a_plain_prompt_is_the_unchanged_path_with_no_extra_model_calls(pipe, monkeypatch):
    model = pipe.model
    monkeypatch.setattr(model, "apply_model", model.apply_model)  # restored after the test
    calls = counting(model)
    ours = latents(pipe, "a red (circle:1.2)", "blue", sampler="dpmpp_2m")
    assert calls[0] == SETTINGS["steps"]
    with torch.no_grad():
        cond, uncond = encode_prompts(model, ["a red (circle:1.2)"], ["blue"])
    seen = []
    sample(model, "dpmpp_2m", 4, cond, uncond, 5.0, shape=(1, 4, 8, 8), noise=Noise([3]), progress=False,
           callback=lambda i, d: seen.append(d))  # fmt: skip
    torch.testing.assert_close(ours, seen[-1], rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_prompt_editing_equals_the_hand_split_run(pipe, sampler):
    model = pipe.model
    with torch.no_grad():
        cond, uncond = encode_scheduled(lambda p, n: encode_prompts(model, p, n), ["a [red:blue:0.5] circle"], [""], 4)
    assert isinstance(cond, StepConditioning)
    kwargs = {"shape": (1, 4, 8, 8), "progress": False}
    full = sample(model, sampler, 4, cond, uncond, 5.0, noise=Noise([3]), **kwargs)
    # int(0.5 * 4) = 2: "red" for steps 0..2, "blue" for step 3.
    noise = Noise([3])
    red, blue, empty = cond.at(0), cond.at(3), uncond.at(0)
    first = sample(model, sampler, 4, red, empty, 5.0, noise=noise, end=3 / 4, **kwargs)
    second = sample(model, sampler, 4, blue, empty, 5.0, noise=noise, start=3 / 4, x_T=first, **kwargs)
    # The split hands over the model's x_t (divided by sqrt(1 + sigma^2) and back): float32 rounding only.
    torch.testing.assert_close(full, second, rtol=1e-5, atol=1e-5)
    all_red = sample(model, sampler, 4, red, empty, 5.0, noise=Noise([3]), **kwargs)
    assert (all_red - full).abs().max() > 1e-3
    with torch.no_grad():  # the encoded segments are the prompts' own encodings
        alone = encode_prompts(model, ["a blue circle"], [""])[0]
    torch.testing.assert_close(blue, alone)


def test_a_weight_of_1_is_the_plain_prompt_exactly(pipe):
    plain = pipe.generate("a red circle", negative_prompt="blue", **SETTINGS)
    weighted = pipe.generate("a red circle :1", negative_prompt="blue", **SETTINGS)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(weighted), strict=True))


def test_and_and_editing_change_the_image_and_infotext_keeps_the_prompt(pipe):
    prompt = "a [red:blue:0.5] circle :1.2 AND a (square:1.1) :0.4"
    plain = pipe.generate("a red circle", **SETTINGS)
    result = pipe.generate(prompt, negative_prompt="[dark:bright:2]", **SETTINGS)
    assert not np.array_equal(pixels(plain)[0], pixels(result)[0])
    assert result.prompts == [prompt] and result.negative_prompts == ["[dark:bright:2]"]
    assert result.parameters(0).startswith(f"{prompt}\nNegative prompt: [dark:bright:2]\nSteps: 4,")


def test_a_batch_with_different_schedules_is_its_single_runs(pipe):
    prompts, negatives = ["a [red|blue] circle", "a square AND [a:the:2] circle :0.5"], ["", "[dark::3]"]
    batch = pipe.generate(prompts, negative_prompts=negatives, sampler="euler_ancestral", **SETTINGS)
    singles = [
        pipe.generate(p, negative_prompt=n, sampler="euler_ancestral", **{**SETTINGS, "seed": 3 + i})
        for i, (p, n) in enumerate(zip(prompts, negatives, strict=True))
    ]
    for ours, single in zip(pixels(batch), [pixels(s)[0] for s in singles], strict=True):
        assert np.abs(ours - single).max() <= 1  # the text encoder's batch may move the last float bits


def test_img2img_runs_with_a_schedule(pipe):
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    result = pipe.generate("a [red:blue:2] circle", init_image=image, strength=0.5, **SETTINGS)
    assert result.images[0].size == (16, 16)


def test_sdxl_schedules_and_and_in_one_call_per_step(sdxl, monkeypatch):
    model = sdxl.model
    monkeypatch.setattr(model, "apply_model", model.apply_model)
    calls = counting(model)
    settings = {**SDXL, "sampler": "dpmpp_2m"}
    plain = sdxl.generate("a red circle", **settings)
    assert calls[0] == 4
    result = sdxl.generate("a [red:blue:0.5] circle AND a square :0.5", negative_prompt="[dark:2]", **settings)
    assert calls[0] == 8 and not np.array_equal(pixels(plain)[0], pixels(result)[0])
    weighted = sdxl.generate("a red circle :1", **settings)
    assert np.array_equal(pixels(plain)[0], pixels(weighted)[0])


def test_sdxl_editing_equals_the_hand_split_run(sdxl):
    from ldm.sdxl_conditioning import encode_sdxl_prompts

    model = sdxl.model
    with torch.no_grad():
        cond, uncond = encode_scheduled(
            lambda p, n: encode_sdxl_prompts(model, p, n, 1, {}, 16, 16), ["a [red:blue:0.5] circle"], [""], 4
        )
    kwargs = {"shape": (1, 4, 8, 8), "progress": False}
    full = sample(model, "euler", 4, cond, uncond, 5.0, noise=Noise([0]), **kwargs)
    first = sample(model, "euler", 4, cond.at(0), uncond.at(0), 5.0, noise=Noise([0]), end=3 / 4, **kwargs)
    second = sample(model, "euler", 4, cond.at(3), uncond.at(0), 5.0, start=3 / 4, x_T=first, **kwargs)
    torch.testing.assert_close(full, second, rtol=1e-5, atol=1e-5)
    assert torch.all(uncond.at(0)["c_crossattn"][0] == 0)  # an empty negative is still SDXL's zeroed uncond


def test_the_refiner_encodes_the_schedule_with_its_own_conditioner(sdxl):
    from ldm.refiner import attach_refiner
    from tests.test_refiner import _pipeline

    base, refiner = sdxl, _pipeline(True, 1)
    attach_refiner(base, refiner)
    try:
        settings = {**SDXL, "sampler": "euler", "refiner_switch": 0.5}
        edited = base.generate("[a red circle:a blue square:1]", **settings)
        # The switch (after step 1) is where the refiner takes over (steps 2 and 3): the base's half is the plain
        # prompt's, the refiner's the second text, which it encodes with its own conditioner.
        plain = base.generate("a red circle", **settings)
        assert not np.array_equal(pixels(plain)[0], pixels(edited)[0])
        late = base.generate("[a red circle:a blue square:4]", **settings)
        assert np.array_equal(pixels(plain)[0], pixels(late)[0])
    finally:
        attach_refiner(base, None)


def test_models_that_take_an_image_refuse_schedules(pipe, monkeypatch):
    from ldm.errors import UserError
    from ldm.request import GenerationRequest
    from ldm.request_conditioning import encode_request

    monkeypatch.setattr(type(pipe.model), "conditions_on_image", True)
    request = GenerationRequest("[a:b:2]", steps=4).for_model(pipe.geometry)
    with pytest.raises(UserError, match=r"prompt editing \(\[a:b:when\], \[a\|b\]\) and AND"):
        encode_request(pipe.model, request, ["[a:b:2]"], [""], torch.device("cpu"))


def test_txt2img_script_writes_the_prompt_as_given(tiny_files, tmp_path):  # noqa: F811 - the fixture
    out = tmp_path / "out"
    prompt = "a [red:blue:0.5] circle AND a square :0.5"
    args = tiny_args(tiny_files, "--prompt", prompt, "--n_samples", "1", "--n_iter", "1", "--H", "16", "--W", "16",
                     "--sampler", "Euler", "--outdir", str(out))  # fmt: skip
    assert cli.main("txt2img", args) == 0
    assert parse_parameters(read_parameters(out / "samples" / "00000.png"))["Prompt"] == prompt
