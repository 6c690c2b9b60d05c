"""Which config fits a checkpoint, told from its key layout, so that any checkpoint loads without ``--config``.

Only names and shapes are read (the safetensors header, or the pickle with every tensor on the meta device), plus,
for SD 2.x text-to-image models, one 320-value tensor (see below). A family is recognised by its *structure*:

- the text encoder, by the key its width is read from: CLIP ViT-L/14 (``cond_stage_model.transformer.text_model.*``,
  also without ``text_model.`` as newer transformers write it), OpenCLIP ViT-H/14 (``cond_stage_model.model.*``),
  LDM's BERT (``cond_stage_model.transformer.token_emb``), SDXL's two (``conditioner.embedders.1.model.*``) or the
  refiner's one (``conditioner.embedders.0.model.*``);
- the UNet's input channels (``input_blocks.0.0.weight``: 4 text-to-image, 9 inpainting, 5 depth, 7 x4 upscaler);
- the extra models a family carries (``depth_model.*``: MiDaS; ``embedder.model.visual.*``: unCLIP's image encoder,
  1280 wide for ViT-H, 1024 for ViT-L);
- for CompVis latent-diffusion's pretrained models (``models/ldm/*``): the first stage (VQ by its codebook
  ``first_stage_model.quantize.embedding.weight``, else KL), the UNet's output channels (``out.2.weight``) and the
  conditioning model (a class embedder ``cond_stage_model.embedding``, BERT, a spatial rescaler
  ``cond_stage_model.channel_mapper``, or none). Where several configs build one architecture (CelebA-HQ, FFHQ and
  LSUN bedrooms; semantic synthesis 256 and 512), a word of the file name picks one, else the first (any builds the
  model right; the line says which and why).

and then checked against its *size*, the UNet's width and its cross-attention context: a fine-tune, merge, fp16,
pruned or EMA-only file keeps both, so it detects the same; a model of the same structure but another size (a tiny
test model, the bundled demo) matches no bundled config, and the error names the family it resembles. EMA copies
(``model_ema.*``) and marker keys are ignored.

v-prediction, as the community tells it:

1. an explicit mark in the file: a ``v_pred`` key (ComfyUI's convention, with ``ztsnr`` for a zero-terminal-SNR
   schedule), or the safetensors metadata of Stability's ModelSpec (``modelspec.prediction_type`` ``v`` /
   ``epsilon``, or ``modelspec.architecture`` ``stable-diffusion-v2-768-v`` / ``-512``), which kohya's trainers write;
2. for SD 2.x text-to-image files without one, ComfyUI's test: the standard deviation of
   ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` is above 0.09 in the 768-v models and below it in the
   512-base ones. It is a heuristic, so the printed line says so and names the ``--config`` that undoes it; a file
   without that tensor is an error asking for ``--config``. (A1111 runs the UNet once instead, which needs all its
   weights loaded before the config is known.)

A config beside the checkpoint wins over the layout: ``NAME.yaml`` next to ``NAME.ckpt`` (A1111's convention), or
the ``config.yaml`` of a CompVis model folder / the ``configs/*-project.yaml`` of a training logdir
(:mod:`ldm.model_folder`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoint import EMA_PREFIX, read_checkpoint, to_original_layout
from ldm.errors import UserError
from ldm.lazy_checkpoint import read_tensor
from ldm.model_families import EXTRAS, FAMILIES, TEXT_ENCODERS, TEXT_NAMES, Family
from ldm.model_folder import find_model
from ldm.serialization import read_metadata

ROOT = Path(__file__).resolve().parents[1]
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
V_TEST_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_TEST_THRESHOLD = 0.09  # ComfyUI's value (comfy/supported_models.py, SD20.model_type)
UNET_OUT = "model.diffusion_model.out.2.weight"
IMAGE_EMBEDDER = "embedder.model.visual.class_embedding"
VQ_CODEBOOK = "first_stage_model.quantize.embedding.weight"


@dataclass(frozen=True)
class Detection:
    """The config chosen for a checkpoint, and why. ``config`` is relative to the project root (``ROOT``) for a
    bundled config (``bundled``), else as found; ``overrides`` are ``key=value`` settings to apply before the user's
    own."""

    family: str
    config: Path
    reason: str
    overrides: tuple[str, ...] = ()
    bundled: bool = True

    def line(self) -> str:
        """The one line the scripts print, e.g. ``detected SD 2.x v-prediction (768-v): configs/... (why)``."""
        settings = f" with {' '.join(self.overrides)}" if self.overrides else ""
        return f"detected {self.family}: {self.config}{settings} ({self.reason})"

    @property
    def path(self) -> Path:
        """The config file itself."""
        return ROOT / self.config if self.bundled else self.config


@dataclass(frozen=True)
class Signature:
    """What the detector reads from a layout."""

    text: str | None
    unet_in: int | None
    unet_channels: int | None
    context: int | None
    extras: frozenset[str]
    image_width: int | None
    first_stage: str = "kl"
    unet_out: int | None = None

    def structure(self) -> str:
        if self.unet_in is None:
            return "no UNet (model.diffusion_model.*)"
        text = TEXT_NAMES.get(self.text, "no known text encoder")
        extras = "".join(f" + {EXTRAS[e]}" for e in sorted(self.extras))
        stage = "a VQ first stage, " if self.first_stage == "vq" else ""
        return f"{stage}a UNet of {self.unet_in} input channels, {text}{extras}"


def signature(layout: Mapping[str, torch.Tensor]) -> Signature:
    """Read the structure and size of a state dict or layout (``{key: tensor}``, tensors may be on ``meta``)."""
    unet_in = layout.get(UNET_IN)
    text = next((kind for kind, key, _ in TEXT_ENCODERS if key in layout), None)
    context = next(
        (
            v.shape[1]
            for k, v in layout.items()
            if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")
        ),
        None,
    )
    embedder = layout.get(IMAGE_EMBEDDER)
    unet_out = layout.get(UNET_OUT)
    return Signature(
        text=text,
        unet_in=None if unet_in is None else unet_in.shape[1],
        unet_channels=None if unet_in is None else unet_in.shape[0],
        context=context,
        extras=frozenset(p for p in EXTRAS if any(k.startswith(p) for k in layout)),
        image_width=None if embedder is None else embedder.shape[0],
        first_stage="vq" if VQ_CODEBOOK in layout else "kl",
        unet_out=None if unet_out is None else unet_out.shape[0],
    )


def _same_structure(family: Family, sig: Signature) -> bool:
    return (
        family.text == sig.text
        and family.unet_in == sig.unet_in
        and sig.extras == frozenset([family.extra] if family.extra else [])
        and family.image_width in (None, sig.image_width)
        and family.first_stage == sig.first_stage
        and family.unet_out in (None, sig.unet_out)
    )


def _variant(family: Family, name: str) -> tuple[str, str, str]:
    """``(label, config, why)``: of a family whose architecture several configs share, the one the file name names."""
    if not family.variants:
        return family.name, family.config, ""
    lowered = name.lower()
    word, config, what = next((v for v in family.variants if v[0] in lowered), family.variants[0])
    others = ", ".join(v[2] for v in family.variants if v[1] != config)
    how = f"its name has '{word}'" if word in lowered else "the default; the file name names none"
    return f"{family.name} ({what})", config, f"{what} as {how} ({others}: same architecture, pass their --config)"


def _marked_prediction(layout: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """``("v" | "eps" | None, where the file says so)`` from the file's explicit marks."""
    if "v_pred" in layout:
        return "v", "its v_pred key"
    prediction = metadata.get("modelspec.prediction_type", "").strip().lower()
    if prediction in ("v", "v_prediction", "v-prediction"):
        return "v", f"its metadata modelspec.prediction_type={prediction}"
    if prediction in ("epsilon", "eps"):
        return "eps", f"its metadata modelspec.prediction_type={prediction}"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2-768-v"):
        return "v", f"its metadata modelspec.architecture={architecture}"
    if architecture.startswith("stable-diffusion-v2-512"):
        return "eps", f"its metadata modelspec.architecture={architecture}"
    return None, ""


def _sd2_prediction(
    layout: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor] | None, name: str, family: Family
) -> tuple[str, str]:
    """ComfyUI's test of an SD 2.x text-to-image model without a mark; UserError where it cannot be run."""
    if V_TEST_KEY not in layout or read is None:
        raise UserError(
            f"'{name}' is an SD 2.x model, and the file does not say whether it predicts eps (512-base) or v (768-v); "
            f"pass --config {family.config} (512, eps) or --config {family.v_config} (768, v-prediction)."
        )
    std = read(V_TEST_KEY).float().std(unbiased=False).item()
    kind = "v" if std > V_TEST_THRESHOLD else "eps"
    other = family.config if kind == "v" else family.v_config
    return kind, (
        f"guessed from its weights as ComfyUI does: std of {V_TEST_KEY.split('model.', 1)[1]} is {std:.3f}, "
        f"{'above' if kind == 'v' else 'at most'} {V_TEST_THRESHOLD}; if the images are noise, pass --config {other}"
    )


def detect(
    layout: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    read: Callable[[str], torch.Tensor] | None = None,
    name: str = "the checkpoint",
) -> Detection:
    """The bundled config that fits ``layout`` (a state dict, or its tensors on the meta device).

    ``metadata``: the file's safetensors metadata; ``read(key)``: the data of one tensor (for the SD 2.x v test);
    ``name``: the file, for messages. Raises UserError naming what it found and what it looked for.
    """
    metadata = metadata or {}
    layout = {k: v for k, v in to_original_layout(layout).items() if not k.startswith(EMA_PREFIX)}
    sig = signature(layout)
    candidates = [f for f in FAMILIES if _same_structure(f, sig)]
    family = next((f for f in candidates if (f.unet_channels, f.context) == (sig.unet_channels, sig.context)), None)
    family = family or (candidates[0] if candidates else None)
    if family is None:
        looked = "; ".join(f.describe() for f in FAMILIES)
        hint = " It is not a full model checkpoint (a VAE, LoRA, embedding or diffusers-format file?)." * (
            sig.unet_in is None
        )
        raise UserError(
            f"cannot tell which model '{name}' is: it holds {sig.structure()}.{hint} Looked for: {looked}. "
            "Pass its --config."
        )
    if (sig.unet_channels, sig.context) != (family.unet_channels, family.context):
        raise UserError(
            f"'{name}' is laid out like {family.name} ({sig.structure()}) but is of another size: UNet "
            f"{sig.unet_channels} channels wide with a {sig.context}-wide context, where {family.name} has "
            f"{family.unet_channels} and {family.context}. No bundled config builds it; pass its --config."
        )
    reason = sig.structure()
    prediction, why = _marked_prediction(layout, metadata)
    if family.v_config is not None and prediction is None:
        prediction, why = _sd2_prediction(layout, read, name, family)
    overrides: list[str] = []
    label, config, variant = _variant(family, name)
    if variant:
        why = f"{why}, {variant}" if why else variant
    if prediction == "v" and family.v_config is not None:
        label, config = f"{family.name} v-prediction (768-v)", family.v_config
    elif prediction == "eps" and family.v_config is not None:
        label = f"{family.name} eps-prediction (512-base)"
    elif prediction is not None and prediction != family.parameterization:
        if family.text.startswith("sdxl"):
            raise UserError(
                f"'{name}' is a v-prediction {family.name} ({why}), which the bundled SDXL config does not build; "
                "pass --config of a v-prediction SDXL config."
            )
        label = f"{family.name} {prediction}-prediction"
        overrides.append(f"model.params.parameterization={prediction}")
    if "ztsnr" in layout:
        overrides.append("model.params.zero_terminal_snr=true")
        why = f"{why}, its ztsnr key" if why else "its ztsnr key"
    return Detection(label, Path(config), f"{reason}; {why}" if why else reason, tuple(overrides))


def config_beside(ckpt: str | os.PathLike) -> Path | None:
    """A config the checkpoint comes with: ``NAME.yaml`` beside ``NAME.ckpt``, or its model folder's / logdir's."""
    ckpt = Path(ckpt)
    same_name = ckpt.with_suffix(".yaml")
    if same_name.is_file():
        return same_name
    try:
        return find_model(str(ckpt))[1]
    except UserError:
        return None


def detect_checkpoint(ckpt: str | os.PathLike) -> Detection:
    """The config for ``ckpt``: the one beside it (see :func:`config_beside`), else detected from its layout (reading
    names and shapes, not its weights). Raises UserError (CheckpointError for an unreadable file)."""
    beside = config_beside(ckpt)
    if beside is not None:
        return Detection("the checkpoint's own config", beside, "the config file beside it", bundled=False)
    layout, _ = read_checkpoint(ckpt, layout_only=True)
    name = Path(ckpt).name
    detection = detect(layout, read_metadata(ckpt), read=lambda key: read_tensor(ckpt, key), name=name)
    if not detection.path.is_file():
        raise UserError(f"'{name}' is {detection.family}, but {detection.config} is not in {ROOT}; pass its --config.")
    return detection
