"""DDIM sampling (Song et al., 2021): the pure loop :func:`sample_ddim` and the CompVis ``DDIMSampler`` around it.

The loop sees the model only as an eps-predictor ``eps(x_t, t, alpha_cumprod)`` (a
:class:`~ldm.models.diffusion.guidance.GuidedEps`, which owns guidance and the eps/v conversion) and walks a
:class:`~ldm.models.diffusion.timesteps.DDIMSchedule` of CPU floats. :class:`CompVisSampler` holds what DDIM and PLMS
share: the CompVis ``make_schedule`` / ``sample`` arguments, their checks and the intermediates they return.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ldm.models.diffusion.guidance import GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.timesteps import DDIMSchedule, ddim_schedule, make_ddim_timesteps

EpsFn = Callable[[torch.Tensor, float, float], torch.Tensor]
"""``eps(x_t, t, alpha_cumprod)``: the eps prediction at ``x_t``: (B, C, H, W), timestep ``t``."""
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``callback(i, x, pred_x0)`` after step ``i`` (0 = the noisiest) with the new ``x`` and that step's x0 estimate."""


def gaussian_like(x: torch.Tensor, noise: Noise | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``: from the per-sample ``noise`` generators, else torch's global RNG."""
    return torch.randn_like(x) if noise is None else noise.randn_like(x)


def ddim_update(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha: float,
    alpha_prev: float,
    sigma: float = 0.0,
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from ``x`` at ``alpha_cumprod = alpha`` to ``alpha_prev``, given the eps prediction ``eps``.

    ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z``, ``x0 = (x - sqrt(1 - a) eps) / sqrt(a)``.
    x, eps, z: (B, C, H, W). Returns ``(x_prev, x0)``.
    """
    pred_x0 = (x - math.sqrt(1.0 - alpha) * eps) / math.sqrt(alpha)
    x_prev = math.sqrt(alpha_prev) * pred_x0 + math.sqrt(max(1.0 - alpha_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * z
    return x_prev, pred_x0


def blend_known(
    x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, alpha: float, noise: Noise | None
) -> torch.Tensor:
    """Replace the known region (``mask`` 1) of ``x`` by ``x0`` noised to ``alpha_cumprod = alpha``, as CompVis.

    x: (B, C, H, W); x0 and mask broadcast to it (mask typically (B, 1, H, W)).
    """
    known = math.sqrt(alpha) * x0 + math.sqrt(1.0 - alpha) * gaussian_like(x, noise)
    return mask * known + (1.0 - mask) * x


def _check_inpainting(mask: torch.Tensor | None, x0: torch.Tensor | None) -> None:
    if (mask is None) != (x0 is None):
        raise ValueError("inpainting needs both mask and x0 (the known latent), or neither.")


def _dropout(z: torch.Tensor, p: float, noise: Noise | None) -> torch.Tensor:
    """Inverted dropout of the step noise ``z`` with probability ``p``; with ``noise`` the mask is seeded per sample."""
    if noise is None:
        return F.dropout(z, p=p)
    # A normal draw through its own CDF is uniform, so the per-sample generators also drive the dropout mask.
    keep = torch.special.ndtr(noise.randn_like(z)) >= p
    return z * keep / (1.0 - p)


@torch.no_grad()
def sample_ddim(
    eps: EpsFn,
    x: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    noise: Noise | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run DDIM from ``x`` at the last (noisiest) step of ``schedule`` down to its ``alphas_prev[0]``.

    Args:
        eps: the eps-predictor, e.g. a :class:`GuidedEps`.
        x: (B, C, H, W) at ``alphas_cumprod = schedule.alphas[-1]``.
        schedule: from :func:`ddim_schedule`; its ``sigmas`` (eta) decide how stochastic the run is.
        noise: per-sample generators for the step noise (and inpainting noise); None uses torch's global RNG.
        mask, x0: inpainting: before each step the ``mask`` 1 region is replaced by ``x0`` noised to that step.
        temperature: scale of the step noise.
        noise_dropout: probability of dropping step-noise entries (inverted dropout, as CompVis).
        callback: ``callback(i, x, pred_x0)`` after each step.
        progress: show a tqdm bar.

    Returns:
        (B, C, H, W), the sample at ``schedule.alphas_prev[0]``.
    """
    _check_inpainting(mask, x0)
    if not 0.0 <= noise_dropout < 1.0:
        raise ValueError(f"noise_dropout must be in [0, 1), got {noise_dropout}.")
    timesteps = schedule.timesteps
    alphas, alphas_prev, sigmas = schedule.alphas.tolist(), schedule.alphas_prev.tolist(), schedule.sigmas.tolist()
    steps = range(len(timesteps) - 1, -1, -1)
    for i, index in enumerate(tqdm(steps, desc="DDIM Sampler", disable=not progress)):
        alpha, sigma = alphas[index], sigmas[index]
        if mask is not None:
            x = blend_known(x, x0, mask, alpha, noise)
        e_t = eps(x, timesteps[index], alpha)
        z = None
        if sigma > 0:
            z = temperature * gaussian_like(x, noise)
            if noise_dropout > 0:
                z = _dropout(z, noise_dropout, noise)
        x, pred_x0 = ddim_update(x, e_t, alpha, alphas_prev[index], sigma, z)
        if callback is not None:
            callback(i, x, pred_x0)
    return x


def _reject_unsupported(**arguments: Any) -> None:
    """Legacy arguments that would change the result but are not implemented: refuse them rather than ignore them."""
    given = [name for name, value in arguments.items() if value not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} not supported by this sampler (it would silently change the result).")


class CompVisSampler:
    """The CompVis sampler interface over a discrete-timestep loop; :class:`DDIMSampler` and ``PLMSSampler`` add theirs.

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
        self.table: DDIMSchedule | None = None
        self.ddim_eta = 0.0

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True
    ) -> None:
        """Choose ``ddim_num_steps`` timesteps and their coefficients (``ddim_timesteps``, ``ddim_alphas``, ...)."""
        if ddim_discretize != "uniform":
            raise ValueError(f"ddim_discretize '{ddim_discretize}' is not supported; use 'uniform'.")
        timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps)
        self.table = ddim_schedule(self.model.alphas_cumprod, timesteps, ddim_eta)
        self.ddim_eta = float(ddim_eta)
        self.ddim_timesteps = np.asarray(timesteps)
        self.ddim_alphas = self.table.alphas
        self.ddim_alphas_prev = self.table.alphas_prev
        self.ddim_sigmas = self.table.sigmas
        self.ddim_sqrt_one_minus_alphas = (1.0 - self.table.alphas).sqrt()
        if verbose:
            span = f"timesteps {timesteps[0]}..{timesteps[-1]}"
            print(f"{type(self).__name__}: {len(timesteps)} steps, {span}, eta {ddim_eta}")

    def _require_table(self) -> DDIMSchedule:
        if self.table is None:
            raise ValueError("no schedule yet: call make_schedule(ddim_num_steps, ...) first.")
        return self.table

    def _start(self, size: tuple[int, ...], x_T: torch.Tensor | None, noise: Noise | None) -> torch.Tensor:
        if x_T is None:
            start = torch.randn(size, device=self.device) if noise is None else noise.randn(size)
            return start.to(self.device)
        if tuple(x_T.shape) != size:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}; expected (batch_size, *shape) = {size}.")
        return x_T

    def _run(
        self,
        eps: GuidedEps,
        x: torch.Tensor,
        *,
        noise: Noise | None,
        mask: torch.Tensor | None,
        x0: torch.Tensor | None,
        temperature: float,
        noise_dropout: float,
        callback: StepCallback,
        progress: bool,
    ) -> torch.Tensor:
        raise NotImplementedError

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
        global RNG is used. ``normals_sequence`` and ``corrector_kwargs`` had no effect in the original and have
        none here; ``quantize_x0``, ``score_corrector``, ``dynamic_threshold`` and ``ucg_schedule`` are refused.

        Returns:
            ``samples``: (batch_size, C, H, W), and ``{"x_inter": [...], "pred_x0": [...]}``: the start and the
            state every ``log_every_t`` steps (and after the first step).
        """
        _reject_unsupported(
            quantize_x0=quantize_x0,
            score_corrector=score_corrector,
            dynamic_threshold=dynamic_threshold,
            ucg_schedule=ucg_schedule,
        )
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        size = (int(batch_size), *(int(s) for s in shape))
        x = self._start(size, x_T, noise)
        eps = GuidedEps(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
        total = len(self.ddim_timesteps)

        def on_step(i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            index = total - i - 1
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)

        samples = self._run(
            eps,
            x,
            noise=noise,
            mask=mask,
            x0=x0,
            temperature=temperature,
            noise_dropout=noise_dropout,
            callback=on_step,
            progress=verbose,
        )
        return samples, intermediates


def _as_indices(t: torch.Tensor | Sequence[int] | int, batch_size: int, limit: int) -> list[int]:
    """``t`` as one schedule index per sample, each checked to lie in 0..limit."""
    indices = torch.as_tensor(t).reshape(-1).tolist()
    if len(indices) == 1:
        indices = indices * batch_size
    if len(indices) != batch_size:
        raise ValueError(f"t has {len(indices)} entries for a batch of {batch_size}.")
    if any(not 0 <= i <= limit for i in indices):
        raise ValueError(f"t must be step indices in 0..{limit} (0..S, S = top of the schedule), got {indices}.")
    return [int(i) for i in indices]


class DDIMSampler(CompVisSampler):
    """DDIM with the CompVis API: ``make_schedule``, ``sample``, and ``stochastic_encode`` / ``decode`` for img2img."""

    def _run(self, eps: GuidedEps, x: torch.Tensor, **loop_arguments: Any) -> torch.Tensor:
        return sample_ddim(eps, x, self._require_table(), **loop_arguments)

    def _original_steps_table(self) -> DDIMSchedule:
        """Every training timestep, ending at the clean data (alphas_cumprod_prev = 1), as DDPM."""
        return ddim_schedule(self.model.alphas_cumprod, range(self.ddpm_num_timesteps), self.ddim_eta, final_alpha=1.0)

    @torch.no_grad()
    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | Sequence[int] | int,
        use_original_steps: bool = False,
        noise: torch.Tensor | Noise | None = None,
    ) -> torch.Tensor:
        """Noise ``x0``: (B, C, H, W) to DDIM step index ``t`` (per sample, or one for all), for :meth:`decode`.

        As in CompVis, index ``t`` is the noise level of ``ddim_timesteps[t]``, one step above where
        ``decode(..., t_start=t)`` starts. ``t = S`` (img2img strength 1) encodes at the top of the schedule,
        ``alphas_cumprod[-1]``. With ``use_original_steps``, ``t`` indexes the training timesteps instead.
        ``noise``: a tensor like ``x0``, a :class:`Noise`, or None for torch's global RNG.
        """
        table = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
        alphas = table if use_original_steps else self._require_table().alphas
        alphas = torch.cat([alphas, table[-1:]])
        index = _as_indices(t, x0.shape[0], len(alphas) - 1)
        a = alphas[index].to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        if not isinstance(noise, torch.Tensor):
            noise = gaussian_like(x0, noise)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Any,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        use_original_steps: bool = False,
        callback: Callable[[int], None] | None = None,
        noise: Noise | None = None,
        verbose: bool = True,
    ) -> torch.Tensor:
        """Denoise ``x_latent``: (B, C, H, W) through the ``t_start`` least noisy steps (img2img).

        ``t_start = 0`` returns ``x_latent`` unchanged; ``t_start = S`` runs every step. Eta is the one given to
        :meth:`make_schedule`. Returns (B, C, H, W).
        """
        table = self._original_steps_table() if use_original_steps else self._require_table()
        try:
            t_start = operator.index(t_start)
        except TypeError:
            raise ValueError(f"t_start must be an integer step count, got {t_start!r}.") from None
        if not 0 <= t_start <= len(table.timesteps):
            raise ValueError(f"t_start must be in 0..{len(table.timesteps)} (the number of steps), got {t_start}.")
        eps = GuidedEps(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)

        def on_step(i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if callback is not None:
                callback(i)

        return sample_ddim(eps, x_latent, table.truncated(t_start), noise=noise, callback=on_step, progress=verbose)
