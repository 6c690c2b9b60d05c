"""The request objects: checked once when made, frozen, and the same for the scripts and the Python API."""

import dataclasses

import pytest
import torch
from PIL import Image

from ldm import cli, devices
from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.request import IMG2IMG_STRENGTH, GenerationRequest, RuntimeOptions

SD = LatentGeometry(channels=4, factor=8, multiple=64, default_size=512, timesteps=1000)


def test_a_request_is_checked_when_made_and_frozen():
    request = GenerationRequest(["a", "b"], negative_prompts="blurry", n=2, seed=7)
    assert request.negative_prompts == ("blurry", "blurry")
    assert request.seeds == (7, 8, 9, 10) and request.batch == 4
    assert request.image_prompts == (("a", "a", "b", "b"), ("blurry",) * 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.steps = 3
    with pytest.raises(UserError, match="got 2 negative prompts for 1 prompts"):
        dataclasses.replace(request, prompts=["a"])


def test_a_drawn_seed_is_kept_so_a_copy_makes_the_same_images():
    request = GenerationRequest("a", n=3)
    assert dataclasses.replace(request, steps=10).seeds == request.seeds
    assert request.seeds == tuple(range(request.seed, request.seed + 3))


def test_img2img_strength_defaults_agree_between_the_api_and_the_scripts(tmp_path):
    init = Image.new("RGB", (64, 64))
    assert GenerationRequest("a", init_image=init).strength == IMG2IMG_STRENGTH == 0.75
    assert GenerationRequest("a", init_image=init, mask=Image.new("L", (64, 64))).strength == 1.0
    assert GenerationRequest("a").strength is None
    args = cli.build_parser("img2img").parse_args(["--init-img", "x.png"])
    assert args.strength == IMG2IMG_STRENGTH


def test_for_model_fills_in_sizes_and_is_idempotent():
    request = GenerationRequest("a", init_image=Image.new("RGB", (200, 130)))
    checked = request.for_model(SD)
    assert (checked.width, checked.height) == (192, 128) and checked.init_image.size == (192, 128)
    assert checked.for_model(SD) == checked
    assert GenerationRequest("a").for_model(SD).height == 512


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompts": []}, "give at least one prompt"),
        ({"prompts": [1]}, "prompts must be strings"),
        ({"n": 0}, "the number of images per prompt must be an integer of at least 1"),
        ({"clip_skip": 0}, "clip_skip"),
        ({"mask": Image.new("L", (8, 8))}, "a mask needs an init image"),
        ({"strength": 0.5}, "strength is for img2img"),
        ({"sampler": "Eular a"}, "unknown sampler 'Eular a'"),
        ({"schedule": "karas"}, "unknown schedule 'karas'"),
        ({"scale": "7"}, "the guidance scale must be a number"),
        ({"eta": float("nan")}, "eta must be a number"),
        ({"seed": -1}, "seed -1 is out of range"),
        ({"seed": [1, 2]}, "got 2 seeds for 1 images"),
        ({"sampler": "euler", "sampler_options": {"churn": 1}}, "sampler 'Euler' has no option 'churn'"),
    ],
)
def test_bad_requests_are_user_errors_naming_the_fix(fields, message):
    with pytest.raises(UserError, match=message):
        GenerationRequest(**{"prompts": "a", **fields})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 1001}, r"steps must be an integer in 1..1000"),
        ({"height": 500}, "height 500 is not a multiple of 64"),
        ({"sampler": "plms", "eta": 0.5}, "'PLMS' only works with eta = 0"),
    ],
)
def test_model_dependent_checks_are_user_errors(fields, message):
    with pytest.raises(UserError, match=message):
        GenerationRequest(**{"prompts": "a", **fields}).for_model(SD)


def test_runtime_options_are_checked_once_when_made():
    options = RuntimeOptions("cpu", precision="full", idle_device="cpu")
    assert options.device == torch.device("cpu") and options.idle_device == torch.device("cpu")
    assert not options.half
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        RuntimeOptions("cpu", precision="fp16")
    with pytest.raises(UserError, match="attention slice size"):
        RuntimeOptions("cpu", attention_slicing=0)
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        RuntimeOptions("gpu")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_arithmetic_warns_to_use_full_precision(monkeypatch, recwarn, native):
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: native)
    RuntimeOptions("cpu", precision="bf16")
    RuntimeOptions("cpu", precision="full")
    devices.warn_about_slow_precision("bf16", torch.device("cpu"), "openvino")  # OpenVINO computes in float32 there
    warned = [str(w.message) for w in recwarn.list if "bfloat16" in str(w.message)]
    assert len(warned) == (0 if native else 1) and all("use precision full" in m for m in warned)
