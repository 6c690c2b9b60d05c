"""Builders with the constructor arguments of Stability's ``sgm`` classes, so that SDXL's original configs
(``sd_xl_base.yaml``, ``sd_xl_refiner.yaml``) build this project's classes; :data:`ldm.util.FOREIGN_TARGETS` maps the
``sgm.*`` targets here and to the classes that take sgm's arguments as they are.

``sgm``'s ``DiffusionEngine`` takes its noise schedule as a denoiser config (``DiscreteDenoiser`` with a scaling and
a discretization); of those, the combination SDXL uses, the legacy DDPM discretization with eps (or v) scaling, is
the discrete schedule :class:`~ldm.models.diffusion.sdxl.SDXLDiffusion` already has, so it is translated to its
``linear_start`` / ``linear_end`` / ``timesteps`` / ``parameterization``. Other denoisers (EDM, continuous sigmas) are
a ConfigError. Samplers are chosen when sampling, so ``sampler_config`` is accepted and not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.sdxl import SDXLDiffusion
from ldm.modules.diffusionmodules.openaimodel import UNetModel as _UNetModel
from ldm.util import ConfigError

SGM_DENOISER = "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser"
SGM_DISCRETIZATION = "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"
SGM_SCALINGS = {
    "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling": "eps",
    "sgm.modules.diffusionmodules.denoiser_scaling.VScaling": "v",
}
# sgm's LegacyDDPMDiscretization defaults.
LEGACY_DDPM = {"linear_start": 0.00085, "linear_end": 0.012, "num_timesteps": 1000}
# SDXL's native resolution, 1024 px, in latents; sgm configs do not state one.
SDXL_LATENT_SIZE = 128


def _params(node: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict((node or {}).get("params") or {})


def schedule_from_denoiser(denoiser_config: Mapping[str, Any]) -> dict[str, Any]:
    """SDXLDiffusion's schedule arguments for an sgm ``denoiser_config`` of the legacy DDPM kind."""
    if denoiser_config.get("target") != SGM_DENOISER:
        raise ConfigError(
            f"denoiser_config.target: only {SGM_DENOISER} is supported, got {denoiser_config.get('target')}"
        )
    params = _params(denoiser_config)
    scaling = (params.get("scaling_config") or {}).get("target")
    if scaling not in SGM_SCALINGS:
        raise ConfigError(f"denoiser_config: scaling {scaling!r} is not one of {sorted(SGM_SCALINGS)}")
    discretization = params.get("discretization_config") or {}
    if discretization.get("target") != SGM_DISCRETIZATION:
        raise ConfigError(f"denoiser_config: only the discretization {SGM_DISCRETIZATION} is supported")
    schedule = {**LEGACY_DDPM, **_params(discretization)}
    num_idx = params.get("num_idx", schedule["num_timesteps"])
    if num_idx != schedule["num_timesteps"]:
        raise ConfigError(
            f"denoiser_config: num_idx {num_idx} differs from the discretization's {schedule['num_timesteps']}"
        )
    return {
        "linear_start": schedule["linear_start"],
        "linear_end": schedule["linear_end"],
        "timesteps": schedule["num_timesteps"],
        "parameterization": SGM_SCALINGS[scaling],
    }


def DiffusionEngine(  # noqa: N802 - sgm's class name, as configs spell it
    network_config: Mapping[str, Any],
    denoiser_config: Mapping[str, Any],
    first_stage_config: Mapping[str, Any],
    conditioner_config: Mapping[str, Any],
    sampler_config: Mapping[str, Any] | None = None,
    scale_factor: float = 1.0,
    disable_first_stage_autocast: bool = False,
    input_key: str = "jpg",
    use_ema: bool = False,
    ckpt_path: str | None = None,
    loss_fn_config: Mapping[str, Any] | None = None,
) -> SDXLDiffusion:
    """Build :class:`SDXLDiffusion` from sgm ``DiffusionEngine`` arguments.

    ``disable_first_stage_autocast`` is accepted: SDXL's VAE must decode in float32, which the caller arranges.
    ``loss_fn_config`` is accepted only when absent (training uses the project's own loss: write a project config).
    """
    del sampler_config, disable_first_stage_autocast
    if loss_fn_config is not None:
        raise ConfigError(
            "loss_fn_config: sgm training losses are not supported; train with a project config such as "
            "configs/stable-diffusion/sdxl-base-inference.yaml (DDPM's loss on the same schedule)."
        )
    unet_params = _params(network_config)
    return SDXLDiffusion(
        **schedule_from_denoiser(denoiser_config),
        unet_config=network_config,
        first_stage_config=first_stage_config,
        cond_stage_config=conditioner_config,
        scale_factor=scale_factor,
        first_stage_key=input_key,
        use_ema=use_ema,
        ckpt_path=ckpt_path,
        image_size=SDXL_LATENT_SIZE,
        channels=unet_params.get("in_channels", 4),
    )


def UNetModel(**params: Any) -> _UNetModel:  # noqa: N802 - sgm's class name
    """The project's UNet from sgm's arguments: sgm's UNet always uses spatial transformers, and has no
    ``image_size``."""
    return _UNetModel(image_size=params.pop("image_size", None), use_spatial_transformer=True, **params)


def AutoencoderKLInferenceWrapper(**params: Any) -> AutoencoderKL:  # noqa: N802 - sgm's class name
    """sgm's loss-less KL autoencoder: the project's AutoencoderKL with an identity loss."""
    params.setdefault("lossconfig", {"target": "torch.nn.Identity"})
    return AutoencoderKL(**params)
