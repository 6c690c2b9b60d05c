"""Sampler names users know, and one front end that runs any of them for txt2img, img2img and inpainting.

    latents = sample(model, "DPM++ 2M Karras", steps=20, cond=c, uncond=uc, scale=7.5, shape=(1, 4, 64, 64),
                     noise=Noise.from_seed(42, 1))

Names resolve case- and punctuation-insensitively: A1111 labels ("Euler a", "DPM++ SDE Karras"), snake_case ids
("dpmpp_2m_karras"), CompVis/k-diffusion script names ("k_euler_ancestral", "plms"). A k-diffusion sampler takes a
schedule suffix: " Karras" or " Exponential" (default: the model's own discrete sigmas).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ldm.models.diffusion import sampling
from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.diffusion.dpm_solver import dpm_solver_denoiser
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.plms import sample_plms
from ldm.models.diffusion.timesteps import ddim_schedule, make_ddim_timesteps

SCHEDULES = ("discrete", "karras", "exponential")
# The largest guidance scale accepted. A1111 offers 1..30; far beyond, eps_u + scale * (eps_c - eps_u) only
# saturates the image, and a float16 UNet output overflows once scale * |eps_c - eps_u| passes 65504 (scale 1e308
# gave black images). 100 keeps that product far from the float16 limit for any eps of the order of one.
MAX_SCALE = 100


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its id, the label A1111 users know, the loop that runs it and whether it draws fresh noise."""

    id: str
    label: str
    loop: Callable[..., torch.Tensor]
    stochastic: bool
    k_diffusion: bool


SAMPLERS: dict[str, SamplerSpec] = {
    spec.id: spec
    for spec in (
        SamplerSpec("ddim", "DDIM", sample_ddim, False, False),
        SamplerSpec("plms", "PLMS", sample_plms, False, False),
        SamplerSpec("ddpm", "DDPM", sample_ddim, True, False),
        # The original DPM-Solver's grid ends above sigma 0 and its last step is first order below 15 steps.
        SamplerSpec(
            "dpm_solver", "DPM-Solver++", partial(sampling.sample_dpmpp_2m, lower_order_final=True), False, True
        ),
        SamplerSpec("euler", "Euler", sampling.sample_euler, False, True),
        SamplerSpec("euler_a", "Euler a", sampling.sample_euler_ancestral, True, True),
        SamplerSpec("heun", "Heun", sampling.sample_heun, False, True),
        SamplerSpec("dpm_2", "DPM2", sampling.sample_dpm_2, False, True),
        SamplerSpec("dpm_2_a", "DPM2 a", sampling.sample_dpm_2_ancestral, True, True),
        SamplerSpec("lms", "LMS", sampling.sample_lms, False, True),
        SamplerSpec("dpmpp_2s_a", "DPM++ 2S a", sampling.sample_dpmpp_2s_ancestral, True, True),
        SamplerSpec("dpmpp_sde", "DPM++ SDE", sampling.sample_dpmpp_sde, True, True),
        SamplerSpec("dpmpp_2m", "DPM++ 2M", sampling.sample_dpmpp_2m, False, True),
        SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", sampling.sample_dpmpp_2m_sde, True, True),
    )
}

# Other spellings in use: CompVis/k-diffusion script names and long forms.
ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "euler_ancestral": "euler_a",
    "k_heun": "heun",
    "k_dpm_2": "dpm_2",
    "dpm2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
    "k_dpm_2_ancestral": "dpm_2_a",
    "dpm_2_ancestral": "dpm_2_a",
    "dpm2_a": "dpm_2_a",
    "k_lms": "lms",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "dpm_solver_pp": "dpm_solver",
    "dpmsolver": "dpm_solver",
    "dpm_solverpp": "dpm_solver",
}


def _normalise(name: str) -> str:
    name = name.strip().lower().replace("++", "pp").replace("+", "p")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def sampler_names() -> list[str]:
    """Every name a user can give: labels, with their Karras/Exponential forms, and ids."""
    names = []
    for spec in SAMPLERS.values():
        names.append(spec.label)
        if spec.k_diffusion and spec.id != "dpm_solver":
            names += [f"{spec.label} Karras", f"{spec.label} Exponential"]
    return names + list(SAMPLERS)


def resolve_sampler(name: str) -> tuple[SamplerSpec, str]:
    """``"DPM++ 2M Karras"`` -> (the DPM++ 2M spec, ``"karras"``). Unknown names raise ValueError listing the known."""
    key = _normalise(name)
    if not key:
        raise ValueError(f"the sampler name {name!r} is empty; give one of {', '.join(sampler_names())}.")
    schedule = "discrete"
    for suffix in ("karras", "exponential"):
        if key.endswith("_" + suffix):
            key, schedule = key[: -len(suffix) - 1], suffix
    key = ALIASES.get(key, key)
    spec = SAMPLERS.get(key)
    if spec is None:
        raise ValueError(f"unknown sampler '{name}'. Known samplers: {', '.join(sampler_names())}.")
    if schedule != "discrete" and (not spec.k_diffusion or spec.id == "dpm_solver"):
        raise ValueError(f"sampler '{spec.label}' runs on the model's own timesteps; it has no {schedule} schedule.")
    return spec, schedule


def check_sampling_arguments(
    sampler: str,
    steps: int,
    num_timesteps: int,
    strength: float = 1.0,
    eta: float | None = None,
    img2img: bool = False,
    scale: float = 1.0,
) -> tuple[SamplerSpec, str]:
    """Validate sampling settings before any work is done; returns :func:`resolve_sampler`'s answer.

    Raises ValueError naming the setting and its valid range. Entry points call this before loading a model.
    The guidance scale must lie within +-MAX_SCALE (see there).
    """
    spec, schedule = resolve_sampler(sampler)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in 1..{num_timesteps}, got {steps!r}.")
    if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise ValueError(f"the guidance scale must be in -{MAX_SCALE}..{MAX_SCALE} (7.5 is usual), got {scale}.")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 keeps the input, 1 replaces it), got {strength}.")
    if eta is not None:
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        if spec.id == "plms" and eta != 0:
            raise ValueError("PLMS only works with eta = 0.")
        if spec.id == "ddpm" and eta != 1:
            raise ValueError(f"DDPM is DDIM with eta = 1, so eta {eta:g} would be ignored; use DDIM for another eta.")
        if eta != 0 and not spec.stochastic and spec.id != "ddim":
            raise ValueError(f"sampler '{spec.label}' is deterministic: eta applies to DDIM and ancestral/SDE ones.")
    if not img2img and strength != 1.0:
        raise ValueError("strength is for img2img: give init_latent too.")
    return spec, schedule


@dataclass
class _Run:
    """What a sampling run needs besides the sampler: the guided model, the start, and the img2img/inpainting inputs."""

    eps: GuidedEps
    steps: int
    x_start: torch.Tensor | None  # standard normal start for txt2img
    init: torch.Tensor | None  # img2img / inpainting latent
    strength: float
    eta: float | None
    noise: Noise
    mask: torch.Tensor | None
    report: Callable[[int, torch.Tensor], None]
    progress: bool

    @property
    def steps_to_run(self) -> int:
        return self.steps if self.init is None else int(self.strength * self.steps)


def _run_discrete(spec: SamplerSpec, run: _Run) -> torch.Tensor:
    """DDIM / PLMS / DDPM (DDIM with eta 1) over ``steps`` leading-spaced timesteps."""
    eta = 1.0 if spec.id == "ddpm" else (run.eta or 0.0)
    timesteps = make_ddim_timesteps(run.steps, run.eps.schedule.num_timesteps)
    table = ddim_schedule(run.eps.model.alphas_cumprod, timesteps, eta).truncated(run.steps_to_run)
    x = run.x_start
    if run.init is not None:
        # img2img runs the last int(strength * steps) steps, starting from init noised to the first of them.
        alpha = float(table.alphas[-1])
        x = math.sqrt(alpha) * run.init + math.sqrt(1.0 - alpha) * run.noise.randn_like(run.init)
    return spec.loop(
        run.eps,
        x,
        table,
        noise=run.noise,
        mask=run.mask,
        x0=run.init if run.mask is not None else None,
        callback=lambda i, x, pred_x0: run.report(i, pred_x0),
        progress=run.progress,
    )


def _sigmas(schedule: str, steps: int, denoiser: Denoiser) -> torch.Tensor:
    """The (steps + 1,) sigmas of a named schedule for this model, ending at 0."""
    if schedule == "karras":
        return sampling.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    if schedule == "exponential":
        return sampling.get_sigmas_exponential(steps, denoiser.sigma_min, denoiser.sigma_max)
    return sampling.get_sigmas_discrete(steps, denoiser.schedule)


def _run_k(spec: SamplerSpec, schedule: str, run: _Run) -> torch.Tensor:
    """A k-diffusion sampler on the sigma view of the model."""
    x0 = run.init if run.mask is not None else None
    if spec.id == "dpm_solver":
        denoiser, sigmas = dpm_solver_denoiser(run.eps, run.steps, run.mask, x0)
    else:
        denoiser = Denoiser(run.eps, run.mask, x0)
        sigmas = _sigmas(schedule, run.steps, denoiser)
    sigmas = sigmas[run.steps - run.steps_to_run :]
    if run.init is None:
        # x_T is standard normal in the model's space, where x_t = sqrt(a) * x: so x = x_T * sqrt(1 + sigma^2).
        x = run.x_start * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    else:
        x = run.init + run.noise.randn_like(run.init) * float(sigmas[0])
    extra = {"noise": run.noise, "eta": 1.0 if run.eta is None else run.eta} if spec.stochastic else {}
    x = spec.loop(
        denoiser, x, sigmas, callback=lambda d: run.report(d["i"], d["denoised"]), progress=run.progress, **extra
    )
    # Back to the model's x_t: the same unless the schedule ends above sigma 0 (DPM-Solver's does).
    return x / math.sqrt(1.0 + float(sigmas[-1]) ** 2)


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
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Sample latents with any sampler; returns (B, C, h, w) in the model's (scaled) latent space.

    Args:
        model: a ``LatentDiffusion`` (or anything with ``apply_model``, ``alphas_cumprod``, ``parameterization``).
        sampler: a name :func:`resolve_sampler` knows.
        steps: number of steps S in 1..num_timesteps (img2img runs ``int(strength * S)`` of them).
        cond, uncond, scale: conditioning, unconditional/negative conditioning and guidance scale.
        shape: (B, C, h, w) for txt2img; taken from ``x_T`` or ``init_latent`` when those are given.
        noise: per-sample seeded noise (:class:`Noise`); by default seeds drawn from torch's global generator.
        x_T: (B, C, h, w) standard normal start for txt2img instead of drawing it from ``noise``.
        init_latent: (B, C, h, w) scaled latent for img2img / inpainting; ``strength`` in [0, 1] says how much of the
            schedule to run: 0 returns it unchanged, 1 starts from (almost) pure noise.
        mask: (B or 1, 1, h, w), 1 = keep ``init_latent`` there, 0 = generate (CompVis convention).
        eta: noise of DDIM (default 0) and of the ancestral/SDE samplers (default 1).
        callback: ``callback(i, denoised)`` after each step with the current x0 estimate.
        progress: show a progress bar.
    """
    spec, schedule = check_sampling_arguments(
        sampler, steps, len(model.alphas_cumprod), strength, eta, img2img=init_latent is not None, scale=scale
    )
    reference = init_latent if init_latent is not None else x_T
    if shape is None:
        if reference is None:
            raise ValueError("give shape=(B, C, h, w), x_T or init_latent.")
        shape = tuple(reference.shape)
    shape = tuple(int(s) for s in shape)
    if reference is not None and tuple(reference.shape) != shape:
        raise ValueError(
            f"{'init_latent' if init_latent is not None else 'x_T'} has shape "
            f"{tuple(reference.shape)}, expected {shape}."
        )
    if mask is not None:
        if init_latent is None:
            raise ValueError("a mask needs init_latent (the latent whose mask-1 region is kept).")
        if mask.dim() != 4 or mask.shape[-2:] != init_latent.shape[-2:] or mask.shape[0] not in (1, shape[0]):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (B or 1, 1, {shape[2]}, {shape[3]}).")
    if noise is None:
        noise = Noise.from_seed(None, shape[0], model.alphas_cumprod.device)
    elif len(noise) != shape[0]:
        raise ValueError(f"noise has {len(noise)} seeds for a batch of {shape[0]}.")
    run = _Run(
        eps=GuidedEps(model, cond, uncond, scale),
        steps=steps,
        x_start=None if init_latent is not None else (x_T if x_T is not None else noise.randn(shape)),
        init=init_latent,
        strength=strength,
        eta=eta,
        noise=noise,
        mask=mask,
        report=callback if callback is not None else (lambda i, denoised: None),
        progress=progress,
    )
    if init_latent is not None and run.steps_to_run == 0:
        return init_latent
    return _run_k(spec, schedule, run) if spec.k_diffusion else _run_discrete(spec, run)
