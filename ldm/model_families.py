"""The model families :mod:`ldm.model_detection` recognises: their structure, size and config(s)."""

from __future__ import annotations

from dataclasses import dataclass

SD = "configs/stable-diffusion/"
LDM = "models/ldm/"

# Conditioning models: (kind, a key only it has, what it is). A model without any is unconditional, or conditioned
# on its own first stage or on the low-resolution image itself.
TEXT_ENCODERS = (
    ("sdxl", "conditioner.embedders.1.model.ln_final.weight", "CLIP ViT-L + OpenCLIP ViT-bigG text encoders"),
    ("sdxl-refiner", "conditioner.embedders.0.model.ln_final.weight", "OpenCLIP ViT-bigG text encoder"),
    ("openclip", "cond_stage_model.model.ln_final.weight", "OpenCLIP ViT-H/14 text encoder"),
    ("clip", "cond_stage_model.transformer.text_model.final_layer_norm.weight", "CLIP ViT-L/14 text encoder"),
    ("bert", "cond_stage_model.transformer.token_emb.weight", "BERT text encoder"),
    ("class", "cond_stage_model.embedding.weight", "class embedder"),
    ("rescaler", "cond_stage_model.channel_mapper.weight", "spatial rescaler of a segmentation map"),
)
TEXT_NAMES = {kind: what for kind, _, what in TEXT_ENCODERS} | {None: "no conditioning model"}
# Extra models some families carry, by the prefix of their keys.
EXTRAS = {"depth_model.": "MiDaS depth model", "embedder.model.visual.": "CLIP image encoder"}


@dataclass(frozen=True)
class Family:
    """A model family a bundled config builds: its structure, its size, and its config(s)."""

    name: str
    config: str
    text: str | None
    unet_in: int
    unet_channels: int
    context: int | None
    extra: str | None = None
    first_stage: str = "kl"  # "kl" (AutoencoderKL) or "vq" (VQModel, ``first_stage_model.quantize.*``)
    unet_out: int | None = None  # checked where it tells families apart (CompVis's LDMs)
    # Families whose architecture several configs share: (a word of the file name, config, name); the first is the
    # default. Any of them builds the same model, so the choice only names the data set.
    variants: tuple[tuple[str, str, str], ...] = ()
    image_width: int | None = None  # unCLIP: the image encoder's width (ViT-H 1280, ViT-L 1024)
    v_config: str | None = None  # where eps and v-prediction models share a layout: the v config
    parameterization: str = "eps"  # what ``config`` predicts

    def describe(self) -> str:
        extra = f" + {EXTRAS[self.extra]} ({self.extra}*)" if self.extra else ""
        if self.image_width:
            extra = extra.replace("CLIP image", f"{self.image_width}-wide CLIP image")
        stage = "VQ first stage, " if self.first_stage == "vq" else ""
        return f"{self.name} ({stage}{TEXT_NAMES[self.text]}, UNet of {self.unet_in} input channels{extra})"


def _ldm(
    name: str,
    folder: str,
    text: str | None,
    unet: tuple[int, int, int],
    context: int | None = None,
    first_stage: str = "vq",
    variants: tuple[tuple[str, str, str], ...] = (),
) -> Family:
    """A CompVis latent-diffusion pretrained model (``models/ldm/<folder>/config.yaml``); ``unet``: (input
    channels, output channels, width)."""
    unet_in, unet_out, width = unet
    return Family(
        name, LDM + folder + "/config.yaml", text, unet_in, width, context, first_stage=first_stage, unet_out=unet_out,
        variants=variants,
    )  # fmt: skip


# CompVis latent-diffusion's pretrained models. CelebA-HQ, FFHQ and LSUN bedrooms share one architecture (VQ-f4,
# a 224-wide UNet, no conditioning), as do the 256 and 512 semantic synthesis models (their configs differ only in
# the latent size they sample at): the file name picks among them.
UNCONDITIONAL_VQ4 = (("celeba", LDM + "celeba256/config.yaml", "CelebA-HQ"),
                     ("ffhq", LDM + "ffhq256/config.yaml", "FFHQ"),
                     ("bed", LDM + "lsun_beds256/config.yaml", "LSUN bedrooms"))  # fmt: skip
SEMANTIC = (("256", LDM + "semantic_synthesis256/config.yaml", "256"),
            ("512", LDM + "semantic_synthesis512/config.yaml", "512"))  # fmt: skip
LDM_FAMILIES = (
    _ldm("LDM class-conditional ImageNet (cin256)", "cin256", "class", (4, 4, 256), context=512),
    _ldm("LDM unconditional VQ-f4", "celeba256", None, (3, 3, 224), variants=UNCONDITIONAL_VQ4),
    _ldm("LDM unconditional LSUN churches (KL-f8)", "lsun_churches256", None, (4, 4, 192), first_stage="kl"),
    _ldm("LDM super-resolution (bsr_sr)", "bsr_sr", None, (6, 3, 160)),
    _ldm("LDM inpainting (inpainting_big)", "inpainting_big", None, (7, 3, 256)),
    _ldm("LDM semantic synthesis", "semantic_synthesis256", "rescaler", (6, 3, 128), variants=SEMANTIC),
    _ldm("LDM layout-to-image (OpenImages)", "layout2img-openimages256", "bert", (3, 3, 128), context=512),
    _ldm("LDM text-to-image 256 (text2img256)", "text2img256", "bert", (3, 3, 192), context=640),
)


FAMILIES = (
    Family("SD 1.x", SD + "v1-inference.yaml", "clip", 4, 320, 768),
    Family("SD 1.x inpainting", SD + "v1-inpainting-inference.yaml", "clip", 9, 320, 768),
    Family("SD 2.x", SD + "v2-inference.yaml", "openclip", 4, 320, 1024, v_config=SD + "v2-inference-v.yaml"),
    Family("SD 2.x inpainting", SD + "v2-inpainting-inference.yaml", "openclip", 9, 320, 1024),
    Family("SD 2 depth-to-image", SD + "v2-midas-inference.yaml", "openclip", 5, 320, 1024, extra="depth_model."),
    Family("SD 2.x x4 upscaler", SD + "x4-upscaling.yaml", "openclip", 7, 256, 1024, parameterization="v"),
    Family(
        "SD 2.1 unCLIP ViT-H",
        SD + "v2-1-stable-unclip-h-inference.yaml",
        "openclip",
        4,
        320,
        1024,
        extra="embedder.model.visual.",
        image_width=1280,
        parameterization="v",
    ),
    Family(
        "SD 2.1 unCLIP ViT-L",
        SD + "v2-1-stable-unclip-l-inference.yaml",
        "openclip",
        4,
        320,
        1024,
        extra="embedder.model.visual.",
        image_width=1024,
        parameterization="v",
    ),
    Family("LDM text-to-image (BERT)", "configs/latent-diffusion/txt2img-1p4B-eval.yaml", "bert", 4, 320, 1280),
    Family("SDXL base", SD + "sdxl-base-inference.yaml", "sdxl", 4, 320, 2048),
    Family("SDXL refiner", SD + "sdxl-refiner-inference.yaml", "sdxl-refiner", 4, 384, 1280),
    *LDM_FAMILIES,
)
