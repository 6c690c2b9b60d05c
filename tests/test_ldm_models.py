"""CompVis latent-diffusion's pretrained model family: ``models/ldm/<name>/config.yaml`` build with the project's
classes, on the meta device (no memory, no weights).

Each config's model is checked for the state-dict prefixes a CompVis ``model.ckpt`` has, for the UNet's input and
output channels against the first stage and the conditioning (a forward pass on the meta device, with conditioning
of the shape the model's data gives), and for the UNet parameter counts the LDM paper states (Rombach et al. 2022,
appendix tables: 274M for the CelebA-HQ, FFHQ and LSUN-Bedrooms LDM-4, 294M for the LSUN-Churches LDM-8, 391-395M
for the ImageNet LDM-8 of the compression study).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ldm.model_folder import find_model
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import ConfigError, count_params, instantiate_from_config, load_config

MODELS = Path(__file__).resolve().parents[1] / "models" / "ldm"
NAMES = [
    "bsr_sr",
    "celeba256",
    "cin256",
    "ffhq256",
    "inpainting_big",
    "layout2img-openimages256",
    "lsun_beds256",
    "lsun_churches256",
    "semantic_synthesis256",
    "semantic_synthesis512",
    "text2img256",
]
B = 2


def _bsr_lr_image(model: LatentDiffusion, size: int) -> dict:
    # The super-resolution model sees the 4x smaller image itself (torch.nn.Identity), at the latent's size.
    return {"c_concat": [model.get_learned_conditioning(torch.zeros(B, 3, size // 4, size // 4))]}


def _masked_image_and_mask(model: LatentDiffusion, size: int) -> dict:
    # As CompVis's scripts/inpaint.py: the encoded masked image and the mask resized to the latent.
    c = model.get_learned_conditioning(torch.zeros(B, 3, size, size))
    return {"c_concat": [c, torch.zeros(B, 1, *c.shape[-2:])]}


def _segmentation(model: LatentDiffusion, size: int) -> dict:
    # COCO-Stuff / landscapes one-hot maps: 182 channels at the image's size.
    return {"c_concat": [model.get_learned_conditioning(torch.zeros(B, 182, size, size))]}


def _class_label(model: LatentDiffusion, size: int) -> dict:
    return {"c_crossattn": [model.get_learned_conditioning({"class_label": torch.zeros(B, dtype=torch.long)})]}


def _bbox_tokens(model: LatentDiffusion, size: int) -> dict:
    # use_tokenizer: false: the layout builder's token ids go straight in.
    return {"c_crossattn": [model.get_learned_conditioning(torch.zeros(B, 92, dtype=torch.long))]}


def _caption_tokens(model: LatentDiffusion, size: int) -> dict:
    # Prompts need BERT's vocabulary file, which no repository ships; the transformer takes token ids alike.
    tokens = torch.zeros(B, 77, dtype=torch.long)
    return {"c_crossattn": [model.cond_stage_model.transformer(tokens, return_embeddings=True)]}


# name: (image side, conditioning of a batch of B, or None for unconditional models)
CONDITIONING: dict[str, tuple[int, Callable[[LatentDiffusion, int], dict] | None]] = {
    "bsr_sr": (256, _bsr_lr_image),
    "celeba256": (256, None),
    "cin256": (256, _class_label),
    "ffhq256": (256, None),
    "inpainting_big": (256, _masked_image_and_mask),
    "layout2img-openimages256": (256, _bbox_tokens),
    "lsun_beds256": (256, None),
    "lsun_churches256": (256, None),
    "semantic_synthesis256": (256, _segmentation),
    "semantic_synthesis512": (512, _segmentation),
    "text2img256": (256, _caption_tokens),
}

CONDITIONING_KEYS = {
    "bsr_sr": "concat",
    "cin256": "crossattn",
    "inpainting_big": "concat",
    "layout2img-openimages256": "crossattn",
    "semantic_synthesis256": "concat",
    "semantic_synthesis512": "concat",
    "text2img256": "crossattn",
}

# UNet parameters stated in the LDM paper, with the relative tolerance of its rounding.
PAPER_UNET_PARAMS = {
    "celeba256": (274e6, 0.005),
    "ffhq256": (274e6, 0.005),
    "lsun_beds256": (274e6, 0.005),
    "lsun_churches256": (294e6, 0.005),
    "cin256": (393e6, 0.006),
}


def build(name: str) -> LatentDiffusion:
    config = load_config(MODELS / name / "config.yaml")
    with torch.device("meta"):
        return instantiate_from_config(config.model, path="model")


def test_every_model_folder_is_listed():
    folders = sorted(p.parent.name for p in MODELS.glob("*/config.yaml") if p.parent.name != "shapes")
    assert folders == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_with_the_checkpoints_key_prefixes(name):
    model = build(name)
    assert type(model) is LatentDiffusion
    assert model.model.conditioning_key == CONDITIONING_KEYS.get(name)
    prefixes = {key.split(".")[0] for key in model.state_dict() if "." in key}
    expected = {"model", "model_ema", "first_stage_model"}
    # bsr_sr's cond stage is torch.nn.Identity (no weights); inpainting_big's is the first stage again, which a
    # CompVis checkpoint stores under both names.
    if CONDITIONING[name][1] is not None and name != "bsr_sr":
        expected.add("cond_stage_model")
    assert prefixes == expected
    assert all(k.startswith("model.diffusion_model.") for k in model.state_dict() if k.startswith("model."))
    if name == "inpainting_big":
        assert model.cond_stage_model is model.first_stage_model
    if name.startswith("semantic_synthesis"):
        rescaler = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("cond_stage_model.")}
        assert rescaler == {"cond_stage_model.channel_mapper.weight": (3, 182, 1, 1)}


@pytest.mark.parametrize("name", NAMES)
def test_unet_channels_fit_the_first_stage_and_the_conditioning(name):
    """A forward pass on the meta device: the first stage's latent plus the conditioning is what the UNet takes,
    and the UNet gives back a latent of the first stage's shape."""
    model = build(name)
    size, conditioning = CONDITIONING[name]
    with torch.device("meta"):
        z = model.get_first_stage_encoding(model.encode_first_stage(torch.zeros(B, 3, size, size)))
        assert z.shape[1] == model.channels and z.shape[-1] == model.image_size
        cond = conditioning(model, size) if conditioning is not None else None
        out = model.apply_model(z, torch.zeros(B, dtype=torch.long), cond)
    assert out.shape == z.shape
    unet = model.model.diffusion_model
    concat = sum(c.shape[1] for c in (cond or {}).get("c_concat", []))
    assert unet.in_channels == z.shape[1] + concat
    assert unet.out_channels == z.shape[1]
    if cond is not None and "c_crossattn" in cond:
        unet_params = load_config(MODELS / name / "config.yaml").model.params.unet_config.params
        assert cond["c_crossattn"][0].shape[-1] == unet_params.context_dim


@pytest.mark.parametrize("name", sorted(PAPER_UNET_PARAMS))
def test_unet_parameter_count_is_the_papers(name):
    stated, tolerance = PAPER_UNET_PARAMS[name]
    assert count_params(build(name).model) == pytest.approx(stated, rel=tolerance)


def test_a_missing_first_stage_checkpoint_is_a_one_line_config_error():
    # Model folders ship the whole model in model.ckpt; a first-stage ckpt_path that is given must exist.
    config = load_config(
        MODELS / "celeba256" / "config.yaml", ["model.params.first_stage_config.params.ckpt_path=missing/vq-f4.ckpt"]
    )
    with torch.device("meta"), pytest.raises(ConfigError) as err:
        instantiate_from_config(config.model, path="model")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.params.first_stage_config.params.ckpt_path: ")
    assert "'missing/vq-f4.ckpt' does not exist" in message


@pytest.mark.parametrize("name", ["lsun_churches256", "cin256"])
def test_a_checkpoint_beside_a_model_folders_config_finds_it(name, tmp_path):
    # CompVis's layout: sample_diffusion.py -r models/ldm/<name>/model.ckpt reads the config.yaml beside it.
    folder = tmp_path / "models" / "ldm" / name
    folder.mkdir(parents=True)
    shutil.copy(MODELS / name / "config.yaml", folder / "config.yaml")
    (folder / "model.ckpt").write_bytes(b"")
    assert find_model(str(folder / "model.ckpt")) == (folder, folder / "config.yaml", folder / "model.ckpt")
    assert find_model(str(folder)) == (folder, folder / "config.yaml", folder / "model.ckpt")
