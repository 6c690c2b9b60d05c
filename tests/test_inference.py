"""The generation API (ldm.inference) and the output helpers (ldm.outputs) on the tiny reference model.

The tiny model's VAE has f = 2 and its UNet two levels, so images are multiples of 4 pixels; 16x16 or 32x32 keep
each generation well under a second.
"""

import hashlib

import numpy as np
import pytest
import torch
from feature_helpers import pixels, random_image
from PIL import Image

from ldm.devices import check_precision
from ldm.errors import UserError
from ldm.geometry import LatentGeometry, prepare_init_image
from ldm.inference import Pipeline, image_to_tensor
from ldm.models.diffusion.ddpm import LatentInpaintDiffusion
from ldm.outputs import (
    format_parameters,
    load_image,
    make_grid,
    model_hash,
    next_number,
    parse_parameters,
    read_parameters,
    save_numbered,
)
from ldm.request import RuntimeOptions
from ldm.util import apply_overrides

INPAINT_OVERRIDES = [
    "model.target=ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
    "model.params.conditioning_key=hybrid",
    "model.params.unet_config.params.in_channels=9",
]


def center_mask(size=(32, 32)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# txt2img


def test_generate_returns_images_seeds_and_a1111_parameters(pipe, tiny_dir):
    result = pipe.generate("a red circle", negative_prompt="blue", steps=4, seed=5, height=16, width=32, n=2)
    assert [im.size for im in result.images] == [(32, 16), (32, 16)]
    assert all(im.mode == "RGB" for im in result.images)
    assert result.seeds == [5, 6]
    expected_hash = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()[:10]
    assert parse_parameters(result.parameters(1)) == {
        "Prompt": "a red circle",
        "Negative prompt": "blue",
        "Steps": "4",
        "Sampler": "DDIM",
        "CFG scale": "7.5",
        "Seed": "6",
        "Size": "32x16",
        "Model hash": expected_hash,
        "Model": "model",
    }


def test_same_seed_same_image_and_a_batch_equals_single_runs(pipe):
    batch = pipe.generate("a red circle", steps=5, seed=10, height=16, width=16, n=3, sampler="Euler a")
    singles = [
        pipe.generate("a red circle", steps=5, seed=10 + i, height=16, width=16, sampler="Euler a") for i in range(3)
    ]
    for i, single in enumerate(singles):
        assert single.seeds == [10 + i]
        # Batched convolutions may round differently in the last bit; one grey level is the most that shows.
        assert np.abs(pixels(batch.images[i]) - pixels(single.images[0])).max() <= 1
    again = pipe.generate("a red circle", steps=5, seed=10, height=16, width=16, sampler="Euler a")
    assert np.array_equal(pixels(again.images[0]), pixels(singles[0].images[0]))
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).max() > 10, "different seeds, different images"


def test_prompt_lists_repeat_each_prompt_n_times_with_consecutive_seeds(pipe):
    result = pipe.generate(["a", "b"], negative_prompt=["x", "y"], steps=2, seed=0, height=16, width=16, n=2)
    assert result.prompts == ["a", "a", "b", "b"]
    assert result.negative_prompts == ["x", "x", "y", "y"]
    assert result.seeds == [0, 1, 2, 3]
    explicit = pipe.generate("a", steps=2, seed=[7, 3], height=16, width=16, n=2)
    assert explicit.seeds == [7, 3]
    assert "Seed: 3," in explicit.parameters(1)


def test_default_size_is_the_models_native_size(pipe):
    assert pipe.geometry == LatentGeometry(channels=4, factor=2, multiple=4, default_size=128, timesteps=1000)


def test_bad_settings_are_value_errors_naming_the_fix(pipe):
    with pytest.raises(ValueError, match="height 30 is not a multiple of 4.*use 28 or 32"):
        pipe.generate("a", steps=2, height=30, width=32)
    with pytest.raises(ValueError, match="at least 1"):
        pipe.generate("a", steps=2, height=16, width=16, n=0)
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        pipe.generate("a", steps=2, height=16, width=16, sampler="nope")
    with pytest.raises(ValueError, match="steps must be an integer in 1..1000"):
        pipe.generate("a", steps=0, height=16, width=16)
    with pytest.raises(ValueError, match="a mask needs an init image"):
        pipe.generate("a", mask=center_mask())
    with pytest.raises(ValueError, match="the guidance scale must be in -100..100"):
        pipe.generate("a", steps=2, height=16, width=16, scale=1e308)
    for seed, n, message in (
        (-1, 1, "seed -1 is out of range"),
        (2**64 - 1, 2, f"would give the last of 2 images the seed {2**64}, past the largest seed {2**64 - 1}"),
        ([1, 2**64], 2, f"seed {2**64} is out of range"),
    ):
        with pytest.raises(UserError, match=message):
            pipe.generate("a", steps=2, height=16, width=16, seed=seed, n=n)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("half", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------------
# img2img and inpainting


def test_img2img_at_strength_zero_reconstructs_the_init_image_through_the_vae(pipe):
    init = random_image()
    result = pipe.generate("a", init_image=init, strength=0.0, steps=10, seed=1)
    model = pipe.model
    z = model.scale_factor * model.encode_first_stage(image_to_tensor(init)).mode()
    expected = ((model.decode_first_stage(z).clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert result.images[0].size == (32, 32)
    assert np.abs(pixels(result.images[0]) - expected).max() <= 1
    assert result.strength == 0.0 and "Denoising strength: 0.0" in result.parameters(0)
    changed = pipe.generate("a", init_image=init, strength=0.6, steps=10, seed=1)
    assert np.abs(pixels(changed.images[0]) - pixels(result.images[0])).mean() > 1


def test_img2img_default_strength_is_compvis_075_as_in_the_scripts(pipe):
    from ldm import cli

    result = pipe.generate("a", init_image=random_image(), steps=4, seed=1)
    assert result.strength == 0.75 == cli.build_parser("img2img").get_default("strength")


def test_init_images_keep_their_size_rounded_down_or_take_the_given_one(pipe, tmp_path):
    geometry = pipe.geometry
    image, mask = prepare_init_image(random_image((35, 38)), None, geometry)
    assert image.size == (32, 36) and mask is None
    image, mask = prepare_init_image(random_image((35, 38)), Image.new("L", (35, 38), 200), geometry, 16, 24)
    assert image.size == mask.size == (24, 16)
    assert set(np.unique(np.asarray(mask))) == {255}, "the mask is made binary"
    assert prepare_init_image(random_image((40, 20)), None, geometry, height=8)[0].size == (16, 8), "aspect kept"
    with pytest.raises(ValueError, match="the mask is 16x16 but the init image is 32x32"):
        prepare_init_image(random_image(), Image.new("L", (16, 16)), geometry)
    with pytest.raises(ValueError, match="smaller than this model's minimum 4x4"):
        prepare_init_image(random_image((3, 3)), None, geometry)
    with pytest.raises(FileNotFoundError, match="init image '.*missing.png' does not exist"):
        prepare_init_image(tmp_path / "missing.png", None, geometry)


def test_inpainting_with_an_ordinary_model_keeps_the_unmasked_latent(pipe, monkeypatch):
    init, mask = random_image(), center_mask()
    decoded, denoised = [], []
    decode = pipe.model.decode_first_stage
    monkeypatch.setattr(pipe.model, "decode_first_stage", lambda z: decoded.append(z) or decode(z))
    result = pipe.generate(
        "a", init_image=init, mask=mask, steps=4, seed=3, sampler="Euler", callback=lambda i, x: denoised.append(x)
    )
    assert result.strength == 1.0, "inpainting runs the whole schedule by default"
    init_latent = pipe.model.scale_factor * pipe.model.encode_first_stage(image_to_tensor(init)).mode()
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[4:12, 4:12] = False
    for x in [*denoised, decoded[0]]:
        torch.testing.assert_close(x[..., keep], init_latent[..., keep], atol=1e-5, rtol=0)
    assert (decoded[0] - init_latent)[..., ~keep].abs().mean() > 1, "the masked region is generated"
    out, original, repaint = pixels(result.images[0]), pixels(init), np.asarray(mask) > 0
    assert np.array_equal(out[~repaint], original[~repaint]), "unmasked pixels are pasted back"
    assert np.abs(out[repaint] - original[repaint]).mean() > 5


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_config, hash_cache):
    config = apply_overrides(tiny_config, INPAINT_OVERRIDES)
    return Pipeline.from_config(config, None, device="cpu", precision="full")


def test_nine_channel_inpainting_models_get_mask_and_masked_image_as_conditioning(inpaint_pipe, monkeypatch):
    assert isinstance(inpaint_pipe.model, LatentInpaintDiffusion) and inpaint_pipe.model.inpaints_by_conditioning
    seen = []
    apply_model = inpaint_pipe.model.apply_model
    monkeypatch.setattr(
        inpaint_pipe.model, "apply_model", lambda x, t, cond: seen.append(cond) or apply_model(x, t, cond)
    )
    init, mask = random_image(), center_mask()
    result = inpaint_pipe.generate("a", init_image=init, mask=mask, steps=3, seed=0, n=2)
    c_concat = seen[0]["c_concat"][0]
    assert c_concat.shape == (4, 5, 16, 16), "uncond and cond halves of two images: mask (1) + masked latent (4)"
    expected_mask = torch.zeros(16, 16)
    expected_mask[4:12, 4:12] = 1
    assert torch.equal(c_concat[:, 0], expected_mask.expand(4, 16, 16))
    out, original, repaint = pixels(result.images[1]), pixels(init), np.asarray(mask) > 0
    assert np.array_equal(out[~repaint], original[~repaint])
    assert result.model_hash is None and "Model hash" not in result.parameters(0)
    seen.clear()
    txt2img = inpaint_pipe.generate("a", steps=2, seed=0, height=16, width=16)
    assert txt2img.images[0].size == (16, 16)
    assert torch.equal(seen[0]["c_concat"][0][:, 0], torch.ones(2, 8, 8)), "txt2img repaints everything"


# ---------------------------------------------------------------------------------------------------------------------
# Precision and devices


def test_bf16_weights_run_on_the_cpu_and_stay_close_to_full_precision(tiny_config, tiny_dir, pipe):
    bf16 = Pipeline.from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu", precision="bf16")
    assert next(bf16.model.model.parameters()).dtype == torch.bfloat16
    assert bf16.model.alphas_cumprod.dtype == torch.float32, "the schedule stays float32"
    low = bf16.generate("a red circle", steps=4, seed=0, height=16, width=16)
    full = pipe.generate("a red circle", steps=4, seed=0, height=16, width=16)
    assert np.abs(pixels(low.images[0]) - pixels(full.images[0])).mean() < 8


def test_idle_device_stages_move_in_only_while_used(pipe, monkeypatch):
    idle = Pipeline(pipe.model, pipe.geometry, RuntimeOptions("cpu", precision="full", idle_device="cpu"))
    moves = []
    for stage in (pipe.model.first_stage_model, pipe.model.cond_stage_model):
        to = stage.to
        monkeypatch.setattr(
            stage, "to", lambda device, _to=to, _s=stage: moves.append((_s, str(device))) or _to(device)
        )
    result = idle.generate("a", steps=2, seed=4, height=16, width=16)
    text_encoder, vae = pipe.model.cond_stage_model, pipe.model.first_stage_model
    assert moves == [(text_encoder, "cpu"), (text_encoder, "cpu"), (vae, "cpu"), (vae, "cpu")], "in, out; in, out"
    monkeypatch.undo()
    plain = pipe.generate("a", steps=2, seed=4, height=16, width=16)
    assert np.array_equal(pixels(result.images[0]), pixels(plain.images[0]))


# ---------------------------------------------------------------------------------------------------------------------
# ldm.outputs


def test_numbered_files_continue_after_the_highest_and_never_overwrite(tmp_path):
    image = Image.new("RGB", (4, 4), "red")
    (tmp_path / "00007.png").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("x")
    assert next_number(tmp_path) == 8
    (tmp_path / "00008.png").write_bytes(b"taken by a concurrent run")
    path = save_numbered(image, tmp_path, "a prompt\nSteps: 1, Sampler: DDIM, Seed: 1")
    assert path.name == "00009.png"
    assert (tmp_path / "00008.png").read_bytes() == b"taken by a concurrent run"
    assert save_numbered(image, tmp_path, grid=True).name == "grid-0000.png"
    assert save_numbered(image, tmp_path, grid=True).name == "grid-0001.png"
    assert read_parameters(path) == "a prompt\nSteps: 1, Sampler: DDIM, Seed: 1"
    assert read_parameters(tmp_path / "grid-0000.png") is None


def test_a1111_parameters_round_trip_with_quoting_and_multiline_prompts():
    fields = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.0, "Seed": 1, "Model": "a, b: c", "Eta": None}
    text = format_parameters("line one\nline (two:1.2)", "bad, ugly", fields)
    assert text.splitlines()[-1] == 'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 1, Model: "a, b: c"'
    assert parse_parameters(text) == {
        "Prompt": "line one line (two:1.2)",
        "Negative prompt": "bad, ugly",
        "Steps": "20",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "7.0",
        "Seed": "1",
        "Model": "a, b: c",
    }
    assert parse_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_grid_tiles_images_per_row_with_padding():
    images = [Image.new("RGB", (8, 6), c) for c in ("red", "green", "blue")]
    grid = make_grid(images, 2)
    assert grid.size == (2 * 10 + 2, 2 * 8 + 2)
    assert grid.getpixel((2, 2)) == (255, 0, 0) and grid.getpixel((12, 2)) == (0, 128, 0)
    assert grid.getpixel((2, 10)) == (0, 0, 255) and grid.getpixel((12, 10)) == (0, 0, 0)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask '.*nope.png' does not exist"):
        load_image(tmp_path / "nope.png", "mask")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read init image '.*text.png': not an image file"):
        load_image(tmp_path / "text.png", "init image")
    Image.new("RGBA", (3, 2)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").mode == "RGB"


def test_model_hash_is_sha256_prefix_cached_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"weights")
    assert model_hash(ckpt) == hashlib.sha256(b"weights").hexdigest()[:10]
    assert (tmp_path / "cache" / "ldm" / "model-hashes.json").is_file()
    ckpt.write_bytes(b"other weights!")
    assert model_hash(ckpt) == hashlib.sha256(b"other weights!").hexdigest()[:10], "a changed file is hashed again"


def write_safety_checker(folder, concept_threshold: float) -> None:
    """A tiny random checker in the layout of the CompVis/stable-diffusion-safety-checker files."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPVisionModel

    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    config = CLIPConfig(vision_config=vision, projection_dim=8)
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    tower = CLIPVisionModel(config.vision_config).state_dict()
    weights = {f"vision_model.vision_model.{k}": v for k, v in tower.items()}
    weights |= {
        "visual_projection.weight": torch.randn(8, 16),
        "concept_embeds": torch.randn(17, 8),
        "concept_embeds_weights": torch.full((17,), concept_threshold),
        "special_care_embeds": torch.randn(3, 8),
        "special_care_embeds_weights": torch.full((3,), 2.0),
    }
    save_file(weights, str(folder / "model.safetensors"))


def test_safety_checker_runs_from_local_files_and_blacks_out_flagged_images(tmp_path):
    from ldm.postprocess import load_post_processing

    images = [random_image((48, 40), seed=i) for i in range(2)]
    # Cosine similarities lie in [-1, 1]: a threshold of -2 flags every image, one of 2 none.
    write_safety_checker(tmp_path / "strict", -2.0)
    write_safety_checker(tmp_path / "lenient", 2.0)
    strict, _, notices = load_post_processing(tmp_path / "strict")
    assert not any("safety checker" in n for n in notices)
    checked, flagged = strict(images)
    assert flagged == [True, True] and all(im.getextrema() == ((0, 0),) * 3 for im in checked)
    lenient, _, _ = load_post_processing(tmp_path / "lenient")
    checked, flagged = lenient(images)
    assert flagged == [False, False] and checked == images
    absent, _, notices = load_post_processing(tmp_path / "absent")
    assert absent is None and any(n.startswith("safety checker off") for n in notices)
