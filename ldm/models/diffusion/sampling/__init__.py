"""Every sampler as a small pure function over ``denoiser(x, sigma)``, k-diffusion style (the protocol: :mod:`.core`).

``sample_x(denoiser, x, sigmas, *, noise=None, callback=None, progress=True, **options)`` takes ``x`` at
``sigmas[0]`` (CPU float64, decreasing) to ``sigmas[-1]``; schedules come from
:mod:`ldm.models.diffusion.schedules`, denoisers from :class:`ldm.models.diffusion.guidance.Denoiser`, and the names
users know from :mod:`ldm.models.diffusion.samplers`.
"""

from ldm.models.diffusion.sampling.adaptive import AdaptiveInfo, dpm_adaptive, sample_dpm_adaptive
from ldm.models.diffusion.sampling.cfg_pp import (
    sample_dpmpp_2m_cfg_pp,
    sample_euler_ancestral_cfg_pp,
    sample_euler_cfg_pp,
)
from ldm.models.diffusion.sampling.classic import (
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_plms,
)
from ldm.models.diffusion.sampling.dpmpp import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
)
from ldm.models.diffusion.sampling.lcm import sample_lcm
from ldm.models.diffusion.sampling.multistep import (
    sample_deis,
    sample_ipndm,
    sample_ipndm_v,
    sample_uni_pc,
    sample_uni_pc_bh2,
)
from ldm.models.diffusion.sampling.restart import a1111_plan, sample_restart
from ldm.models.diffusion.sampling.singlestep import sample_dpm_fast, sample_dpmpp_2s, sample_dpmpp_3s
from ldm.models.diffusion.schedules_named import get_sigmas_discrete, get_sigmas_exponential, get_sigmas_karras

__all__ = [
    "a1111_plan",
    "AdaptiveInfo",
    "dpm_adaptive",
    "get_sigmas_discrete",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "sample_ddim",
    "sample_ddpm",
    "sample_deis",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_cfg_pp",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2s",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_3s",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_euler_ancestral_cfg_pp",
    "sample_euler_cfg_pp",
    "sample_heun",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_lcm",
    "sample_lms",
    "sample_plms",
    "sample_restart",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
]
