"""Sampler names users know, and one front end that runs any of them for txt2img, img2img and inpainting.

    latents = sample(model, "DPM++ 2M Karras", steps=20, cond=c, uncond=uc, scale=7.5, shape=(1, 4, 64, 64),
                     noise=Noise.from_seed(42, 1))

Names resolve case- and punctuation-insensitively: A1111 labels ("Euler a", "DPM++ SDE Karras") and their ``k_*``
aliases ("k_dpmpp_2m_ka"), ComfyUI names ("dpmpp_2m", "uni_pc_bh2"), snake_case ids and CompVis script names
("plms"). A name may end in a schedule, in A1111's or ComfyUI's words ("DPM++ 2M Karras", "Euler a SGM Uniform",
"dpmpp_2m_kl_optimal"; see :data:`SCHEDULE_NAMES` and :data:`~ldm.models.diffusion.schedules.SIGMA_SCHEDULES`);
without one each sampler runs on its default: the model's discrete sigmas for the k-diffusion family, the CompVis
DDIM grid for DDIM, PLMS and DDPM, the original's grid for DPM-Solver.

Where conventions differ, this follows A1111 for the k-diffusion family (start noise ``x_T * sigma_0``, DPM2
dropping the next-to-last sigma, ``int(strength * steps) + 1`` img2img steps) and CompVis for the samplers on its
grids (start noise the model's ``x_T``, ``int(strength * steps)`` img2img steps).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion import sampling
from ldm.models.diffusion.guidance import Denoiser, GuidedEps, check_guidance_rescale
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.schedules import COMPVIS_GRIDS, SIGMA_SCHEDULES, get_sigmas, model_timesteps

# The largest guidance scale accepted. A1111 offers 1..30; far beyond, eps_u + scale * (eps_c - eps_u) only
# saturates the image, and a float16 UNet output overflows once scale * |eps_c - eps_u| passes 65504 (scale 1e308
# gave black images). 100 keeps that product far from the float16 limit for any eps of the order of one.
MAX_SCALE = 100


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler, described by what the front end needs to know to run it.

    Attributes:
        id: the snake_case id (ComfyUI's name where it has one).
        label: the name A1111 shows.
        loop: the sampling function (the protocol of :mod:`ldm.models.diffusion.sampling`).
        stochastic: draws fresh noise every step (so the seed matters beyond the start noise).
        eta: the default of the ``eta`` option where the user may set it; None where the sampler has no such option
            (then only the value it implies, 0 or 1 for stochastic ones, is accepted).
        schedule: the schedule it runs on when the name names none.
        schedules: whether it runs on any schedule (False: only on its own grid).
        discard_penultimate_sigma: as A1111 for DPM2: compute ``steps + 1`` sigmas and drop the next-to-last.
        fixed_steps: runs the steps asked for. False: it chooses its own from a tolerance (DPM adaptive), so the
            step count only sets where img2img starts, and the images of a batch share their steps, so they differ
            slightly (within the tolerance) from single runs.
        aliases: other names in use (A1111 ``k_*`` names, ComfyUI names, long forms).
    """

    id: str
    label: str
    loop: Callable[..., torch.Tensor]
    stochastic: bool = False
    eta: float | None = None
    schedule: str = "discrete"
    schedules: bool = True
    discard_penultimate_sigma: bool = False
    fixed_steps: bool = True
    aliases: tuple[str, ...] = ()


SAMPLERS: dict[str, SamplerSpec] = {
    spec.id: spec
    for spec in (
        SamplerSpec("ddim", "DDIM", sampling.sample_ddim, stochastic=True, eta=0.0, schedule="ddim"),
        # PLMS's fixed multistep weights assume evenly spaced timesteps.
        SamplerSpec("plms", "PLMS", sampling.sample_plms, schedule="ddim", schedules=False),
        SamplerSpec("ddpm", "DDPM", sampling.sample_ddpm, stochastic=True, schedule="ddim"),
        SamplerSpec(
            "dpm_solver",
            "DPM-Solver++",
            partial(sampling.sample_dpmpp_2m, lower_order_final=True),
            schedule="dpm_solver",
            schedules=False,
            aliases=("dpm_solver_pp", "dpmsolver", "dpm_solverpp"),
        ),
        SamplerSpec("euler", "Euler", sampling.sample_euler, aliases=("k_euler",)),
        SamplerSpec(
            "euler_ancestral",
            "Euler a",
            sampling.sample_euler_ancestral,
            stochastic=True,
            eta=1.0,
            aliases=("euler_a", "k_euler_a", "k_euler_ancestral"),
        ),
        SamplerSpec("heun", "Heun", sampling.sample_heun, aliases=("k_heun",)),
        SamplerSpec(
            "dpm_2", "DPM2", sampling.sample_dpm_2, discard_penultimate_sigma=True, aliases=("k_dpm_2", "dpm2")
        ),
        SamplerSpec(
            "dpm_2_ancestral",
            "DPM2 a",
            sampling.sample_dpm_2_ancestral,
            stochastic=True,
            eta=1.0,
            discard_penultimate_sigma=True,
            aliases=("dpm_2_a", "k_dpm_2_a", "k_dpm_2_ancestral", "dpm2_a"),
        ),
        SamplerSpec("lms", "LMS", sampling.sample_lms, aliases=("k_lms",)),
        SamplerSpec(
            "dpmpp_2s_ancestral",
            "DPM++ 2S a",
            sampling.sample_dpmpp_2s_ancestral,
            stochastic=True,
            eta=1.0,
            aliases=("dpmpp_2s_a", "k_dpmpp_2s_a"),
        ),
        SamplerSpec(
            "dpmpp_sde",
            "DPM++ SDE",
            sampling.sample_dpmpp_sde,
            stochastic=True,
            eta=1.0,
            aliases=("k_dpmpp_sde", "dpmpp_sde_gpu"),
        ),
        SamplerSpec("dpmpp_2m", "DPM++ 2M", sampling.sample_dpmpp_2m, aliases=("k_dpmpp_2m",)),
        SamplerSpec(
            "dpmpp_2m_sde",
            "DPM++ 2M SDE",
            sampling.sample_dpmpp_2m_sde,
            stochastic=True,
            eta=1.0,
            aliases=("k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
        ),
        # The single-step DPM-Solver++ of Lu et al. by the paper's names (A1111 and ComfyUI have only 2S a).
        SamplerSpec("dpmpp_2s", "DPM++ 2S", sampling.sample_dpmpp_2s, aliases=("dpm_solver_pp_2s", "DPM-Solver++(2S)")),
        SamplerSpec("dpmpp_3s", "DPM++ 3S", sampling.sample_dpmpp_3s, aliases=("dpm_solver_pp_3s", "DPM-Solver++(3S)")),
        # DPM fast and adaptive use only the ends of a schedule, and A1111 runs them with its ancestral eta (1).
        SamplerSpec(
            "dpm_fast",
            "DPM fast",
            sampling.sample_dpm_fast,
            stochastic=True,
            eta=1.0,
            schedules=False,
            aliases=("k_dpm_fast",),
        ),
        SamplerSpec(
            "dpm_adaptive",
            "DPM adaptive",
            sampling.sample_dpm_adaptive,
            stochastic=True,
            eta=1.0,
            schedules=False,
            fixed_steps=False,
            aliases=("k_dpm_ad", "k_dpm_adaptive"),
        ),
        # A1111's Restart: its default plan rebuilds a Karras schedule from 20 steps on.
        SamplerSpec("restart", "Restart", sampling.sample_restart, stochastic=True, schedule="karras", schedules=False),
        SamplerSpec("lcm", "LCM", sampling.sample_lcm, stochastic=True, aliases=("k_lcm",)),
        # CFG++ takes CFG++'s small scales (about 0.5 to 2), as ComfyUI; see sampling.cfg_pp.
        SamplerSpec("euler_cfg_pp", "Euler CFG++", sampling.sample_euler_cfg_pp),
        SamplerSpec(
            "euler_ancestral_cfg_pp",
            "Euler a CFG++",
            sampling.sample_euler_ancestral_cfg_pp,
            stochastic=True,
            eta=1.0,
            aliases=("euler_a_cfg_pp",),
        ),
        SamplerSpec("dpmpp_2m_cfg_pp", "DPM++ 2M CFG++", sampling.sample_dpmpp_2m_cfg_pp),
        SamplerSpec(
            "dpmpp_2m_sde_heun",
            "DPM++ 2M SDE Heun",
            sampling.sample_dpmpp_2m_sde_heun,
            stochastic=True,
            eta=1.0,
            aliases=("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"),
        ),
        SamplerSpec(
            "dpmpp_3m_sde",
            "DPM++ 3M SDE",
            sampling.sample_dpmpp_3m_sde,
            stochastic=True,
            eta=1.0,
            aliases=("k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"),
        ),
        # A1111 runs UniPC on the original's time-uniform grid, ComfyUI on any schedule.
        SamplerSpec("uni_pc", "UniPC", sampling.sample_uni_pc, schedule="dpm_solver", aliases=("uni_pc_bh1",)),
        SamplerSpec("uni_pc_bh2", "UniPC BH2", sampling.sample_uni_pc_bh2, schedule="dpm_solver"),
        SamplerSpec("deis", "DEIS", sampling.sample_deis),
        SamplerSpec("ipndm", "iPNDM", sampling.sample_ipndm),
        SamplerSpec("ipndm_v", "iPNDM_v", sampling.sample_ipndm_v),
    )
}


def _normalise(name: str) -> str:
    name = name.strip().lower().replace("++", "pp").replace("+", "p")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


SCHEDULE_LABELS = {
    "discrete": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "ays_sd15": "Align Your Steps",
    "ays_sdxl": "Align Your Steps SDXL",
    "simple": "Simple",
    "ddim": "DDIM",
    "beta": "Beta",
}
"""A1111's "Schedule type" labels (A1111 picks its Align Your Steps table by the model; here SDXL's is named)."""

# Every spelling a schedule goes by, normalised: the ids (ComfyUI's names), A1111's labels and aliases ("Uniform" and
# "Normal" are both the model's own grid, "SGMUniform"), A1111's short suffixes on k_* aliases ("k_lms_ka"), and
# Align Your Steps by model family.
SCHEDULE_NAMES = {
    **{s: s for s in SIGMA_SCHEDULES},
    **{_normalise(label): name for name, label in SCHEDULE_LABELS.items()},
    "ka": "karras",
    "exp": "exponential",
    "uniform": "discrete",
    "sgmuniform": "sgm_uniform",
    **{f"{ays}{model}": "ays_sd15" for ays in ("ays", "align_your_steps") for model in ("", "_sd1", "_sd15", "_sd1_5")},
    **{f"{ays}{model}": "ays_sdxl" for ays in ("ays", "align_your_steps") for model in ("_sdxl", "_xl")},
}


def schedule_names() -> list[str]:
    """Every schedule as A1111 labels it, then the ids (any of which ``schedule=`` and a name's suffix take)."""
    return [*SCHEDULE_LABELS.values(), *SIGMA_SCHEDULES]


def _split_schedule(key: str, specs: dict[str, SamplerSpec]) -> tuple[str, str | None]:
    """A normalised name as (sampler, schedule or None): ``"euler_a_sgm_uniform"`` -> ("euler_a", "sgm_uniform").

    Both parts may have several words, so every split is tried, the longest schedule suffix first.
    """
    if key in specs:
        return key, None
    for i, char in enumerate(key):
        if char == "_" and key[:i] in specs and key[i + 1 :] in SCHEDULE_NAMES:
            return key[:i], SCHEDULE_NAMES[key[i + 1 :]]
    return key, None


def _by_name() -> dict[str, SamplerSpec]:
    names = {}
    for spec in SAMPLERS.values():
        for name in (spec.id, spec.label, *spec.aliases):
            names[_normalise(name)] = spec
    return names


def sampler_names() -> list[str]:
    """Every sampler as A1111 labels it, the k-diffusion family with its Karras/Exponential forms, then the ids."""
    names = []
    for spec in SAMPLERS.values():
        names.append(spec.label)
        if spec.schedule == "discrete" and spec.schedules:
            names += [f"{spec.label} Karras", f"{spec.label} Exponential"]
    return names + list(SAMPLERS)


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[SamplerSpec, str]:
    """``"DPM++ 2M Karras"`` -> (the DPM++ 2M spec, ``"karras"``). Unknown names raise UserError listing the known.

    ``schedule`` (a name of :data:`SIGMA_SCHEDULES`, or A1111's "Automatic"/None) overrides the name's suffix.
    """
    key = _normalise(name)
    if not key:
        raise UserError(f"the sampler name {name!r} is empty; give one of {', '.join(sampler_names())}.")
    specs = _by_name()
    key, suffix = _split_schedule(key, specs)
    spec = specs.get(key)
    if spec is None:
        raise UserError(f"unknown sampler '{name}'. Known samplers: {', '.join(sampler_names())}.")
    if schedule is not None and _normalise(schedule) not in ("", "automatic", "default"):
        if _normalise(schedule) not in SCHEDULE_NAMES:
            known = ", ".join(schedule_names())
            raise UserError(f"unknown schedule '{schedule}'. Known schedules: {known} (or automatic).")
        suffix = SCHEDULE_NAMES[_normalise(schedule)]
    chosen = suffix or spec.schedule
    if chosen != spec.schedule and not spec.schedules:
        raise UserError(f"sampler '{spec.label}' runs on its own grid ({spec.schedule}); it has no {chosen} schedule.")
    return spec, chosen


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
        callback: ``callback(i, denoised)`` after each step with the current x0 estimate.
        progress: show a progress bar.
    """
    spec, schedule = check_sampling_arguments(
        sampler, steps, len(model.alphas_cumprod), strength, eta, init_latent is not None, scale, schedule,
        guidance_rescale, options,
    )  # fmt: skip
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
    if init_latent is None:
        x_T = x_T if x_T is not None else noise.randn(shape)
        # x_T is standard normal. Exactly, the model's x_t is sqrt(a) * x in the sigma view, so x = x_T *
        # sqrt(1 + sigma^2) (CompVis); A1111 and k-diffusion start from x_T * sigma_0 instead.
        x = x_T * (math.sqrt(1.0 + float(sigmas[0]) ** 2) if compvis else float(sigmas[0]))
    else:
        sigmas, sigma_noised = img2img_start(sigmas, strength, compvis, eps.schedule.sigma_max)
        if len(sigmas) == 1:
            return init_latent
        x_t = init_latent + noise.randn_like(init_latent) * sigma_noised
        # The input is noised to sigma_noised; the sampler takes it as x_t at its first step (CompVis's quirk).
        x = x_t * math.sqrt((1.0 + float(sigmas[0]) ** 2) / (1.0 + sigma_noised**2))
    options = {**(options or {}), **({"eta": spec.eta if eta is None else eta} if spec.eta is not None else {})}

    def report(step: dict[str, Any]) -> None:
        if callback is not None:
            callback(step["i"], step["denoised"])

    x = spec.loop(denoiser, x, sigmas, noise=noise, callback=report, progress=progress, **options)
    # Back to the model's x_t: the same unless the schedule ends above sigma 0 (the CompVis grids do).
    return x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)
