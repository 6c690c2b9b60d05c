"""The sampler registry: every sampler users know, described declaratively, and how their names resolve.

Names resolve case- and punctuation-insensitively: A1111 labels ("Euler a", "DPM++ SDE Karras") and their ``k_*``
aliases ("k_dpmpp_2m_ka"), ComfyUI names ("dpmpp_2m", "uni_pc_bh2"), snake_case ids and CompVis script names
("plms"). A name may end in a schedule, in A1111's or ComfyUI's words ("DPM++ 2M Karras", "Euler a SGM Uniform",
"dpmpp_2m_kl_optimal"; see :data:`SCHEDULE_NAMES` and :data:`~ldm.models.diffusion.schedules.SIGMA_SCHEDULES`);
without one each sampler runs on its default: the model's discrete sigmas for the k-diffusion family, the CompVis
DDIM grid for DDIM, PLMS and DDPM, the original's grid for DPM-Solver++ and UniPC.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ldm.errors import UserError
from ldm.models.diffusion import sampling
from ldm.models.diffusion.schedules import SIGMA_SCHEDULES


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
        automatic: A1111's "Automatic" schedule type for it (Karras for most DPM++ samplers, A1111 1.6 on), which
            ``schedule="automatic"`` picks; None: the same as ``schedule``.
        discard_penultimate_sigma: as A1111 for DPM2, DPM2 a and DPM++ 3M SDE: compute ``steps + 1`` sigmas and drop
            the next-to-last.
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
    automatic: str | None = None
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
            "dpm_2",
            "DPM2",
            sampling.sample_dpm_2,
            discard_penultimate_sigma=True,
            aliases=("k_dpm_2", "dpm2"),
            automatic="karras",
        ),
        SamplerSpec(
            "dpm_2_ancestral",
            "DPM2 a",
            sampling.sample_dpm_2_ancestral,
            stochastic=True,
            eta=1.0,
            discard_penultimate_sigma=True,
            aliases=("dpm_2_a", "k_dpm_2_a", "k_dpm_2_ancestral", "dpm2_a"),
            automatic="karras",
        ),
        SamplerSpec("lms", "LMS", sampling.sample_lms, aliases=("k_lms",)),
        SamplerSpec(
            "dpmpp_2s_ancestral",
            "DPM++ 2S a",
            sampling.sample_dpmpp_2s_ancestral,
            stochastic=True,
            eta=1.0,
            aliases=("dpmpp_2s_a", "k_dpmpp_2s_a"),
            automatic="karras",
        ),
        SamplerSpec(
            "dpmpp_sde",
            "DPM++ SDE",
            sampling.sample_dpmpp_sde,
            stochastic=True,
            eta=1.0,
            aliases=("k_dpmpp_sde", "dpmpp_sde_gpu"),
            automatic="karras",
        ),
        SamplerSpec("dpmpp_2m", "DPM++ 2M", sampling.sample_dpmpp_2m, aliases=("k_dpmpp_2m",), automatic="karras"),
        SamplerSpec(
            "dpmpp_2m_sde",
            "DPM++ 2M SDE",
            sampling.sample_dpmpp_2m_sde,
            stochastic=True,
            eta=1.0,
            aliases=("k_dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
            automatic="exponential",
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
            automatic="exponential",
        ),
        SamplerSpec(
            "dpmpp_3m_sde",
            "DPM++ 3M SDE",
            sampling.sample_dpmpp_3m_sde,
            stochastic=True,
            eta=1.0,
            aliases=("k_dpmpp_3m_sde", "dpmpp_3m_sde_gpu"),
            automatic="exponential",
            discard_penultimate_sigma=True,
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
    if schedule is not None and _normalise(schedule) in ("automatic", "default"):
        suffix = suffix or spec.automatic
    elif schedule is not None and _normalise(schedule) != "":
        if _normalise(schedule) not in SCHEDULE_NAMES:
            known = ", ".join(schedule_names())
            raise UserError(f"unknown schedule '{schedule}'. Known schedules: {known} (or automatic).")
        suffix = SCHEDULE_NAMES[_normalise(schedule)]
    chosen = suffix or spec.schedule
    if chosen != spec.schedule and not spec.schedules:
        raise UserError(f"sampler '{spec.label}' runs on its own grid ({spec.schedule}); it has no {chosen} schedule.")
    return spec, chosen
