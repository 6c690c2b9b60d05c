"""``DPMSolverSampler``: DPM-Solver++ (multistep, order 2) behind the CompVis sampler API, on the original's grid.

The solver is :func:`~ldm.models.diffusion.sampling.sample_dpmpp_2m` (the same update in the sigma view) on the time
discretisation of the original DPM-Solver that CompVis and Stability ship (``skip_type="time_uniform"``,
``method="multistep"``, ``order=2``, ``lower_order_final=True``, DPM-Solver++): its discrete noise schedule puts
training step n at continuous time ``(n + 1) / N`` and interpolates ``log sqrt(alpha_cumprod)`` linearly between
them; sampling visits ``S + 1`` times uniform from 1 down to ``1 / N``, where the model sees timestep
``(t - 1 / N) * 1000``. So the run ends at the model's smallest noise level, not at sigma 0, after exactly ``S``
model evaluations, and returns ``x_t`` there, as the original does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling import sample_dpmpp_2m


def dpm_solver_grid(alphas_cumprod: torch.Tensor, steps: int) -> tuple[list[float], list[float]]:
    """The original DPM-Solver's ``steps + 1`` points: (k-diffusion sigmas, the model's timesteps at them).

    sigma = sqrt(1 - alpha^2) / alpha, with log(alpha) interpolated as the original's ``NoiseScheduleVP("discrete")``.
    """
    log_alpha = (0.5 * alphas_cumprod.detach().to("cpu", torch.float64).log()).tolist()
    n = len(log_alpha)
    sigmas, timesteps = [], []
    for t in torch.linspace(1.0, 1.0 / n, steps + 1, dtype=torch.float64).tolist():
        position = t * n - 1  # the fractional training step at continuous time t
        low = min(max(math.floor(position), 0), n - 2)
        w = position - low
        alpha_sq = math.exp(2 * ((1 - w) * log_alpha[low] + w * log_alpha[low + 1]))
        sigmas.append(math.sqrt((1 - alpha_sq) / alpha_sq))
        timesteps.append((t - 1.0 / n) * 1000.0)
    return sigmas, timesteps


def dpm_solver_denoiser(
    eps: GuidedEps, steps: int, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None
) -> tuple[Denoiser, torch.Tensor]:
    """The denoiser that calls the model at the original's timesteps, and the (S + 1,) float64 sigmas to run it on."""
    sigmas, timesteps = dpm_solver_grid(eps.model.alphas_cumprod, steps)
    at = dict(zip(sigmas, timesteps, strict=True))
    return Denoiser(eps, mask=mask, x0=x0, timestep=at.__getitem__), torch.tensor(sigmas, dtype=torch.float64)


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

        ``samples``: (B, C, H, W) latents at the model's smallest noise level, as the original returns them (decode
        with ``model.decode_first_stage``). ``x_T``: optional
        (B, C, H, W) start noise in the model's x_t space at the last timestep; otherwise drawn from ``noise`` (a
        :class:`Noise`, one seed per sample) or torch's global generator. ``mask`` and ``x0`` (mask 1 = keep ``x0``)
        inpaint. ``callback(i)`` and ``img_callback(pred_x0, i)`` run once per step. As in the original, ``eta``,
        ``normals_sequence`` and ``log_every_t`` have no effect (the solver is deterministic and keeps no
        intermediates); options that would change the result and have no meaning here raise a ValueError.
        """
        _reject_unsupported(quantize_x0, temperature, noise_dropout, score_corrector, kwargs)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        num_timesteps = len(self.model.alphas_cumprod)
        if not 1 <= S <= num_timesteps:
            raise ValueError(f"S (number of steps) must be in 1..{num_timesteps}, got {S}.")
        guided = GuidedEps(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        denoiser, sigmas = dpm_solver_denoiser(guided, S, mask=mask, x0=x0)
        size = (batch_size, *shape)
        if x_T is None:
            x_T = noise.randn(size).to(self.device) if noise is not None else torch.randn(size, device=self.device)
        elif tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected (batch_size, *shape) = {size}.")

        # x_T is the model's x_t at the first point; the sigma view divides by sqrt(alpha_cumprod).
        x = x_T * math.sqrt(1.0 + float(sigmas[0]) ** 2)

        def report(step: dict[str, Any]) -> None:
            if callback is not None:
                callback(step["i"])
            if img_callback is not None:
                img_callback(step["denoised"], step["i"])

        samples = sample_dpmpp_2m(denoiser, x, sigmas, callback=report, progress=verbose, lower_order_final=True)
        return samples / math.sqrt(1.0 + float(sigmas[-1]) ** 2), None
