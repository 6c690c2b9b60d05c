"""One front end that runs any sampler for txt2img, img2img and inpainting, checking its settings once.

    latents = sample(model, "DPM++ 2M Karras", steps=20, cond=c, uncond=uc, scale=7.5, shape=(1, 4, 64, 64),
                     noise=Noise.from_seed(42, 1))

The names it takes and the samplers they name are in :mod:`ldm.models.diffusion.sampler_registry` (re-exported
here: ``SAMPLERS``, ``resolve_sampler``, ``sampler_names`` ...).

Where conventions differ, this follows A1111 for the k-diffusion family (start noise ``x_T * sigma_0``, DPM2
dropping the next-to-last sigma, ``int(strength * steps) + 1`` img2img steps) and CompVis for the samplers on its
grids (start noise the model's ``x_T``, ``int(strength * steps)`` img2img steps).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion.guidance import Denoiser, GuidedEps, check_guidance_rescale
from ldm.models.diffusion.handoff import Handoff, SwitchedDenoiser
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampler_registry import (
    SAMPLERS,
    SCHEDULE_LABELS,
    SCHEDULE_NAMES,
    SamplerSpec,
    resolve_sampler,
    sampler_names,
    schedule_names,
)
from ldm.models.diffusion.schedules import COMPVIS_GRIDS, get_sigmas, model_timesteps
from ldm.models.diffusion.step_clock import step_clock

__all__ = [
    "MAX_SCALE",
    "SAMPLERS",
    "SCHEDULE_LABELS",
    "SCHEDULE_NAMES",
    "SamplerSpec",
    "StopSampling",
    "check_sampler_options",
    "check_sampling_arguments",
    "img2img_start",
    "resolve_sampler",
    "sample",
    "sampler_names",
    "sampler_options",
    "schedule_names",
    "split_index",
]

# The largest guidance scale accepted. A1111 offers 1..30; far beyond, eps_u + scale * (eps_c - eps_u) only
# saturates the image, and a float16 UNet output overflows once scale * |eps_c - eps_u| passes 65504 (scale 1e308
# gave black images). 100 keeps that product far from the float16 limit for any eps of the order of one.
MAX_SCALE = 100


class StopSampling(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a ``callback`` to end sampling after that step: :func:`sample` then returns the step's x0 estimate
    (A1111's Interrupt, which keeps the image so far; the server's ``/sdapi/v1/interrupt``)."""


def check_sampling_arguments(
    sampler: str,
    steps: int,
    num_timesteps: int,
    strength: float = 1.0,
    eta: float | None = None,
    img2img: bool = False,
    scale: float = 1.0,
    schedule: str | None = None,
    guidance_rescale: float = 0.0,
    options: Mapping[str, float] | None = None,
) -> tuple[SamplerSpec, str]:
    """Validate sampling settings before any work is done; returns :func:`resolve_sampler`'s answer.

    Raises UserError naming the setting and its valid range. Entry points call this before loading a model.
    The guidance scale must lie within +-MAX_SCALE (see there), ``guidance_rescale`` in [0, 1]; ``options`` are
    :func:`sampler_options` of this sampler.
    """
    spec, schedule = resolve_sampler(sampler, schedule)
    check_guidance_rescale(guidance_rescale)
    check_sampler_options(spec, options or {})
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise UserError(f"steps must be an integer in 1..{num_timesteps}, got {steps!r}.")
    if spec.discard_penultimate_sigma and steps == num_timesteps:
        raise UserError(f"{spec.label} computes steps + 1 sigmas: steps must be at most {num_timesteps - 1}.")
    if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise UserError(f"the guidance scale must be in -{MAX_SCALE}..{MAX_SCALE} (7.5 is usual), got {scale}.")
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be in [0, 1] (0 keeps the input, 1 replaces it), got {strength}.")
    if eta is not None:
        if not math.isfinite(eta) or eta < 0:
            raise UserError(f"eta must be >= 0, got {eta}.")
        implied = 1.0 if spec.stochastic else 0.0
        if spec.eta is None and eta != implied:
            hint = "use DDIM or an ancestral sampler for another eta" if spec.stochastic else "it is deterministic"
            raise UserError(f"sampler '{spec.label}' only works with eta = {implied:g} ({hint}), got {eta:g}.")
    if not img2img and strength != 1.0:
        raise UserError("strength is for img2img: give init_latent too.")
    return spec, schedule


# What the front end passes itself; every other keyword of a sampling function is an option users may set.
_PROTOCOL = {"denoiser", "x", "sigmas", "noise", "callback", "progress", "eta"}


def sampler_options(spec: SamplerSpec) -> dict[str, Any]:
    """The numeric options of a sampler's function and their defaults, e.g. Euler's ``s_churn``, ``s_tmin``,
    ``s_tmax`` and ``s_noise`` (Karras et al.'s churn), DDIM's ``noise_dropout``, LMS's ``order``."""
    parameters = inspect.signature(spec.loop).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.name not in _PROTOCOL and isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }


def check_sampler_options(spec: SamplerSpec, options: Mapping[str, float]) -> None:
    """UserError unless every option is one of :func:`sampler_options` and a finite number."""
    known = sampler_options(spec)
    for name, value in options.items():
        if name not in known:
            listed = ", ".join(known) or "none"
            raise UserError(f"sampler '{spec.label}' has no option '{name}'; its options: {listed}.")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"sampler option {name} must be a finite number, got {value!r}.")


def _grid(spec: SamplerSpec, schedule: str, steps: int, denoiser_schedule: Any) -> torch.Tensor:
    if not spec.discard_penultimate_sigma:
        return get_sigmas(schedule, steps, denoiser_schedule)
    sigmas = get_sigmas(schedule, steps + 1, denoiser_schedule)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def img2img_start(sigmas: torch.Tensor, strength: float, compvis: bool, sigma_top: float) -> tuple[torch.Tensor, float]:
    """The tail of ``sigmas`` an img2img run of this ``strength`` takes, and the sigma to noise the input to.

    CompVis (and A1111's DDIM) run ``int(strength * S)`` steps, from an input noised to one step above the first
    (``stochastic_encode(t_enc)`` then ``decode(t_start=t_enc)``; at strength 1 to the model's ``sigma_top``);
    A1111's k-diffusion samplers run ``int(min(strength, 0.999) * S) + 1`` steps from an input noised to their
    first sigma. Strength 0 runs none.
    """
    steps = len(sigmas) - 1
    if strength == 0:
        return sigmas[-1:], float(sigmas[-1])
    if compvis:
        run = int(strength * steps)
        return sigmas[steps - run :], float(sigmas[steps - run - 1]) if run < steps else sigma_top
    run = min(int(min(strength, 0.999) * steps) + 1, steps)
    return sigmas[steps - run :], float(sigmas[steps - run])


def split_index(fraction: float, steps: int) -> int:
    """The grid index a run of ``steps`` steps is split at for ``fraction`` of it: ``ceil(fraction * steps)``.

    A1111 hands over to its refiner at the first step ``i >= switch_at * steps``; diffusers' ``denoising_end`` keeps
    the timesteps above ``(1 - end) * 1000``, the same steps where ``fraction * steps`` is whole.
    """
    return min(steps, math.ceil(fraction * steps - 1e-9))


def _check_split(start: float, end: float, x_T: torch.Tensor | None, init_latent: torch.Tensor | None) -> None:
    if not (isinstance(start, int | float) and isinstance(end, int | float) and 0.0 <= start < end <= 1.0):
        raise UserError(f"the schedule share to run must satisfy 0 <= start < end <= 1, got start={start}, end={end}.")
    if start > 0 and (x_T is None or init_latent is not None):
        raise UserError("start > 0 continues a run: give x_T, the latent the run up to start returned.")


@torch.no_grad()
def sample(
    model: Any,
    sampler: str = "ddim",
    steps: int = 50,
    cond: Any = None,
    uncond: Any = None,
    scale: float = 1.0,
    *,
    shape: tuple[int, ...] | None = None,
    noise: Noise | None = None,
    x_T: torch.Tensor | None = None,
    init_latent: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    eta: float | None = None,
    schedule: str | None = None,
    guidance_rescale: float = 0.0,
    options: Mapping[str, float] | None = None,
    start: float = 0.0,
    end: float = 1.0,
    handoff: Handoff | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample latents with any sampler; returns (B, C, h, w) in the model's (scaled) latent space.

    Args:
        model: a ``LatentDiffusion`` (or anything with ``apply_model``, ``alphas_cumprod``, ``parameterization``).
        sampler: a name :func:`resolve_sampler` knows.
        steps: number of steps S in 1..num_timesteps (img2img runs a share of them, see :func:`img2img_start`);
            a sampler without ``fixed_steps`` (DPM adaptive) chooses its own, and S only sets where img2img starts.
        cond, uncond, scale: conditioning, unconditional/negative conditioning and guidance scale.
        shape: (B, C, h, w) for txt2img; taken from ``x_T`` or ``init_latent`` when those are given.
        noise: per-sample seeded noise (:class:`Noise`); by default seeds drawn from torch's global generator.
        x_T: (B, C, h, w) standard normal start for txt2img instead of drawing it from ``noise``.
        init_latent: (B, C, h, w) scaled latent for img2img / inpainting; ``strength`` in [0, 1] says how much of the
            schedule to run: 0 returns it unchanged, 1 starts from (almost) pure noise.
        mask: (B or 1, 1, h, w), 1 = keep ``init_latent`` there, 0 = generate (CompVis convention).
        eta: noise of DDIM (default 0) and of the ancestral/SDE samplers (default 1).
        schedule: a schedule name overriding the sampler name's (A1111's "Schedule type"; see :data:`SCHEDULE_NAMES`).
        guidance_rescale: Lin et al.'s guidance rescale ``phi`` in [0, 1] (diffusers' ``guidance_rescale``); 0 is
            off, 0.7 their suggestion (see :func:`~ldm.models.diffusion.guidance.rescale_guidance`).
        options: the sampler's own options (:func:`sampler_options`), e.g. ``{"s_churn": 1.0}`` for Euler.
        start, end: run only this share of the sigma grid, steps ``split_index(start) .. split_index(end)`` (see
            :func:`split_index`), to split one run between models (SDXL base then refiner, A1111's
            ``--refiner_switch``, diffusers' ``denoising_end`` / ``denoising_start``). ``end < 1`` returns the
            still noisy latent (model x_t at that sigma); ``start > 0`` continues from it, given as ``x_T``. Passing
            the same ``noise`` object on makes the ancestral noise that of one run; a memoryless sampler (Euler, DDIM,
            Heun ...) then gives one run's result, a multistep one (DPM++ 2M, LMS, PLMS ...) restarts its history
            at ``start`` (first step of lower order, as diffusers does).
        handoff: a second model that takes over inside the same loop from step ``split_index(handoff.switch)``
            of the steps this run takes on (A1111's refiner; :mod:`~ldm.models.diffusion.handoff`): one schedule,
            for every sampler.
        callback: ``callback(i, denoised)`` after each step with the current x0 estimate; it may raise
            :class:`StopSampling` to end the run there, with that estimate as the result.
        progress: show a progress bar.
    """
    spec, schedule = check_sampling_arguments(
        sampler, steps, len(model.alphas_cumprod), strength, eta, init_latent is not None, scale, schedule,
        guidance_rescale, options,
    )  # fmt: skip
    _check_split(start, end, x_T, init_latent)
    if handoff is not None:
        handoff.check(model)
    reference = init_latent if init_latent is not None else x_T
    if shape is None:
        if reference is None:
            raise UserError("give shape=(B, C, h, w), x_T or init_latent.")
        shape = tuple(reference.shape)
    shape = tuple(int(s) for s in shape)
    if reference is not None and tuple(reference.shape) != shape:
        raise UserError(
            f"{'init_latent' if init_latent is not None else 'x_T'} has shape "
            f"{tuple(reference.shape)}, expected {shape}."
        )
    if mask is not None:
        if init_latent is None:
            raise UserError("a mask needs init_latent (the latent whose mask-1 region is kept).")
        if mask.dim() != 4 or mask.shape[-2:] != init_latent.shape[-2:] or mask.shape[0] not in (1, shape[0]):
            raise UserError(f"mask has shape {tuple(mask.shape)}; expected (B or 1, 1, {shape[2]}, {shape[3]}).")
    if noise is None:
        noise = Noise.from_seed(None, shape[0], model.alphas_cumprod.device)
    elif len(noise) != shape[0]:
        raise UserError(f"noise has {len(noise)} seeds for a batch of {shape[0]}.")

    eps = GuidedEps(model, cond, uncond, scale, guidance_rescale)
    timestep = model_timesteps(schedule, steps, eps.schedule)
    denoiser = Denoiser(eps, mask, init_latent if mask is not None else None, timestep=timestep)
    sigmas = _grid(spec, schedule, steps, eps.schedule)
    compvis = schedule in COMPVIS_GRIDS
    n = len(sigmas) - 1
    # Prompt schedules count steps from the run's first (img2img: the first it runs, as A1111), a continuation on.
    offset = split_index(start, n) if start > 0 else 0
    if start > 0:
        sigmas = sigmas[split_index(start, n) : split_index(end, n) + 1]
        if len(sigmas) == 1:
            return x_T
        # x_T is the model's x_t at sigmas[0], as the run up to here returned it (the inverse of the last line).
        x = x_T * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    elif init_latent is None:
        x_T = x_T if x_T is not None else noise.randn(shape)
        # x_T is standard normal. Exactly, the model's x_t is sqrt(a) * x in the sigma view, so x = x_T *
        # sqrt(1 + sigma^2) (CompVis); A1111 and k-diffusion start from x_T * sigma_0 instead.
        x = x_T * (math.sqrt(1.0 + float(sigmas[0]) ** 2) if compvis else float(sigmas[0]))
    else:
        sigmas, sigma_noised = img2img_start(sigmas, strength, compvis, eps.schedule.sigma_max)
        if len(sigmas) == 1:
            return init_latent
        noised = init_latent + noise.randn_like(init_latent) * sigma_noised
        # CompVis noises one step above the first and takes that x_t as the first step's: the ratio rescales it so.
        # For A1111 the two sigmas are the same and the ratio is 1.
        x = noised * math.sqrt((1.0 + float(sigmas[0]) ** 2) / (1.0 + sigma_noised**2))
    if end < 1 and start == 0:
        sigmas = sigmas[: split_index(end, len(sigmas) - 1) + 1]
        if len(sigmas) == 1:
            return x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)
    guided = [eps]
    if handoff is not None and split_index(handoff.switch, len(sigmas) - 1) < len(sigmas) - 1:
        # A share of the steps this run takes (img2img's tail), as A1111 counts its refiner switch.
        second = GuidedEps(handoff.model, handoff.cond, handoff.uncond, scale, guidance_rescale)
        known = init_latent if mask is not None else None
        sigma_switch = float(sigmas[split_index(handoff.switch, len(sigmas) - 1)])
        guided.append(second)
        second_denoiser = Denoiser(second, mask, known, timestep=timestep)
        denoiser = SwitchedDenoiser(denoiser, second_denoiser, sigma_switch, handoff.on_change)
    options = dict(options or {})
    if spec.eta is not None:
        options["eta"] = spec.eta if eta is None else eta

    if any(g.scheduled for g in guided):
        to_t = timestep if timestep is not None else eps.schedule.sigma_to_t
        clock = step_clock(spec.loop, spec.fixed_steps, sigmas, options, offset, to_t)
        for g in guided:
            g.count_steps(clock)

    last: list[torch.Tensor] = []

    def report(step: dict[str, Any]) -> None:
        last[:] = [step["denoised"]]
        if callback is not None:
            callback(step["i"], step["denoised"])

    try:
        x = spec.loop(denoiser, x, sigmas, noise=noise, callback=report, progress=progress, **options)
    except StopSampling:
        return last[0]
    finally:
        if isinstance(denoiser, SwitchedDenoiser):
            denoiser.finish()
    # Back to the model's x_t: the same unless the schedule ends above sigma 0 (the CompVis grids do).
    return x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)
