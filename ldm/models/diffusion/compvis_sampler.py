"""What the CompVis sampler classes (``DDIMSampler``, ``PLMSSampler``, ``DPMSolverSampler``) share: their
``sample(...)`` signature, turned into a call of one sampling function of :mod:`ldm.models.diffusion.sampling`.

The CompVis classes think in the model's ``x_t`` (``x_T`` in, ``x_t`` at the last grid point out); the sampling
functions in the sigma view ``x = x_t / sqrt(alpha_cumprod)``. :func:`to_sigma_view` and :func:`to_xt` convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise


def to_sigma_view(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """The model's ``x_t`` at noise level ``sigma`` in the sigma view: ``x_t * sqrt(1 + sigma^2)``."""
    return x_t * math.sqrt(1.0 + sigma * sigma)


def to_xt(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Inverse of :func:`to_sigma_view`."""
    return x / math.sqrt(1.0 + sigma * sigma)


def reject_unsupported(**arguments: Any) -> None:
    """Legacy arguments that would change the result but are not implemented: refuse them rather than ignore them."""
    given = [name for name, value in arguments.items() if value not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)} not supported by this sampler (it would silently change the result).")


class CompVisSampler:
    """The CompVis sampler interface; a subclass says which sampling function runs on which grid (:meth:`_plan`).

    Args:
        model: a ``LatentDiffusion``/``DDPM`` (or anything with ``apply_model``, ``alphas_cumprod``,
            ``num_timesteps`` and ``parameterization``). Only :class:`GuidedEps` calls it.
        schedule: kept for compatibility; the schedule is the model's.
        device: where start noise is created; default the model's.
        **kwargs: accepted and ignored, as the original did.
    """

    def __init__(
        self, model: Any, schedule: str = "linear", device: torch.device | str | None = None, **kwargs: Any
    ) -> None:
        self.model = model
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule
        self.device = torch.device(device) if device is not None else model.alphas_cumprod.device

    def _plan(
        self, steps: int, eta: float, temperature: float, noise_dropout: float, verbose: bool
    ) -> tuple[Callable[..., torch.Tensor], torch.Tensor, Callable[[float], float] | None, dict[str, Any]]:
        """(sampling function, (S + 1,) sigmas, model timestep map or None, options) for a run of ``steps``."""
        raise NotImplementedError

    def _start(self, size: tuple[int, ...], x_T: torch.Tensor | None, noise: Noise | None) -> torch.Tensor:
        if x_T is None:
            start = torch.randn(size, device=self.device) if noise is None else noise.randn(size)
            return start.to(self.device)
        if tuple(x_T.shape) != size:
            raise UserError(f"x_T has shape {tuple(x_T.shape)}; expected (batch_size, *shape) = {size}.")
        return x_T

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
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
        dynamic_threshold: Any = None,
        ucg_schedule: Any = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` steps, as the CompVis samplers do.

        ``noise`` (a :class:`Noise`) seeds the start noise and every random step per sample; without it torch's
        global RNG is used. ``mask`` and ``x0`` (mask 1 = keep ``x0``) inpaint: the known region of every denoised
        estimate is ``x0``. ``normals_sequence`` and ``corrector_kwargs`` had no effect in the original and have
        none here; ``quantize_x0``, ``score_corrector``, ``dynamic_threshold`` and ``ucg_schedule`` are refused.

        Returns:
            ``samples``: (batch_size, C, H, W) at the last grid point, and ``{"x_inter": [...], "pred_x0": [...]}``:
            the start and the state every ``log_every_t`` steps (and after the first step).
        """
        reject_unsupported(
            quantize_x0=quantize_x0,
            score_corrector=score_corrector,
            dynamic_threshold=dynamic_threshold,
            ucg_schedule=ucg_schedule,
        )
        if (mask is None) != (x0 is None):
            raise UserError("inpainting needs both mask and x0 (the known latent), or neither.")
        loop, sigmas, timestep, options = self._plan(S, eta, temperature, noise_dropout, verbose)
        size = (int(batch_size), *(int(s) for s in shape))
        x_T = self._start(size, x_T, noise)
        guided = GuidedEps(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        denoiser = Denoiser(guided, mask, x0, timestep=timestep)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x_T], "pred_x0": [x_T]}
        total = len(sigmas) - 1
        logged: list[torch.Tensor] = []

        def logs(i: int) -> bool:
            index = total - i - 1
            return index % log_every_t == 0 or index == total - 1

        def on_step(step: dict[str, Any]) -> None:
            i = step["i"]
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(step["denoised"], i)
            if i > 0 and logs(i - 1):  # the state after step i - 1 is this step's input
                intermediates["x_inter"].append(to_xt(step["x"], step["sigma"]))
                intermediates["pred_x0"].append(logged.pop())
            if logs(i):
                logged.append(step["denoised"])

        x = loop(
            denoiser,
            to_sigma_view(x_T, float(sigmas[0])),
            sigmas,
            noise=noise,
            callback=on_step,
            progress=verbose,
            **options,
        )
        samples = to_xt(x, float(sigmas[-1]))
        if logged:
            intermediates["x_inter"].append(samples)
            intermediates["pred_x0"].append(logged.pop())
        return samples, intermediates
