"""``DPMSolverSampler``: DPM-Solver++ (multistep, order 2) behind the CompVis sampler API.

A thin adapter: the solver is :func:`~ldm.models.diffusion.sampling.sample_dpmpp_2m` over ``S`` timesteps evenly
spaced from the last to the first (the original's ``skip_type="time_uniform"``), on the classifier-free guided
denoiser of :mod:`ldm.models.diffusion.guidance`, which also handles v-prediction models. The last step jumps to the
denoised estimate at sigma 0, so the result is a clean latent after exactly ``S`` model evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling import get_sigmas_discrete, sample_dpmpp_2m


def _reject_unsupported(
    quantize_x0: bool, temperature: float, noise_dropout: float, score_corrector: Any, extra: dict[str, Any]
) -> None:
    """The legacy DDIM options that would change the result have no DPM-Solver meaning: refuse them loudly."""
    if score_corrector is not None:
        raise ValueError("DPMSolverSampler does not support score_corrector.")
    if quantize_x0:
        raise ValueError("DPMSolverSampler does not support quantize_x0=True.")
    if temperature != 1.0:
        raise ValueError(f"DPMSolverSampler supports only temperature=1, got {temperature}.")
    if noise_dropout != 0.0:
        raise ValueError(f"DPMSolverSampler supports only noise_dropout=0, got {noise_dropout}.")
    unknown = sorted(key for key, value in extra.items() if value is not None)
    if unknown:
        raise ValueError(f"DPMSolverSampler.sample got unsupported arguments: {', '.join(unknown)}.")


class DPMSolverSampler:
    """DPM-Solver++(2M) sampling of a ``LatentDiffusion`` (or anything with ``apply_model`` and ``alphas_cumprod``).

    Args:
        model: the diffusion model; eps- and v-prediction are both supported.
        device: where the initial noise is made; defaults to the device of ``model.alphas_cumprod``. Other keyword
            arguments (e.g. the DDIM ``schedule="linear"``) are accepted, as by the original, and have no effect.
    """

    def __init__(self, model: Any, device: torch.device | str | None = None, **kwargs: Any) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else model.alphas_cumprod.device

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, ...],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        noise: Noise | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Sample ``batch_size`` latents of ``shape`` = (C, H, W) in ``S`` steps; returns ``(samples, None)``.

        ``samples``: (B, C, H, W) clean latents (decode with ``model.decode_first_stage``). ``x_T``: optional
        (B, C, H, W) start noise in the model's x_t space at the last timestep; otherwise drawn from ``noise`` (a
        :class:`Noise`, one seed per sample) or torch's global generator. ``mask`` and ``x0`` (mask 1 = keep ``x0``)
        inpaint. ``callback(i)`` and ``img_callback(pred_x0, i)`` run once per step. As in the original, ``eta``,
        ``normals_sequence`` and ``log_every_t`` have no effect (the solver is deterministic and keeps no
        intermediates); options that would change the result and have no meaning here raise a ValueError.
        """
        _reject_unsupported(quantize_x0, temperature, noise_dropout, score_corrector, kwargs)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        guided = GuidedEps(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        denoiser = Denoiser(guided, mask=mask, x0=x0)
        num_timesteps = denoiser.schedule.num_timesteps
        if not 1 <= S <= num_timesteps:
            raise ValueError(f"S (number of steps) must be in 1..{num_timesteps}, got {S}.")
        size = (batch_size, *shape)
        if x_T is None:
            x_T = noise.randn(size).to(self.device) if noise is not None else torch.randn(size, device=self.device)
        elif tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected (batch_size, *shape) = {size}.")

        sigmas = get_sigmas_discrete(S, denoiser.schedule)
        # x_T is the model's x_t at the last timestep; the sigma view divides by sqrt(alpha_cumprod).
        x = x_T * math.sqrt(1.0 + float(sigmas[0]) ** 2)

        def report(step: dict[str, Any]) -> None:
            if callback is not None:
                callback(step["i"])
            if img_callback is not None:
                img_callback(step["denoised"], step["i"])

        samples = sample_dpmpp_2m(denoiser, x, sigmas, callback=report, progress=verbose)
        return samples, None
