"""The diffusion process: ``DDPM`` (schedule, forward noising, parameterizations, the training objective).

``apply_model`` is the one entry to the UNet, used by every sampler and by training alike. The Lightning hooks
(``training_step``, ``configure_optimizers`` ...) come from :class:`DiffusionTrainingMixin`. ``LatentDiffusion``
(``latent_diffusion.py``), ``LatentInpaintDiffusion`` (``latent_inpainting.py``), ``LatentUpscaleDiffusion``
(``latent_upscale.py``), ``LatentDepth2ImageDiffusion`` (``latent_depth.py``) and
``ImageEmbeddingConditionedLatentDiffusion`` (``latent_unclip.py``) build on it and are importable from here, under
the names CompVis and Stability configs use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ldm.errors import UserError
from ldm.models.diffusion.compvis_sampler import to_sigma_view
from ldm.models.diffusion.diffusion_wrapper import DiffusionWrapper
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample as run_sampler
from ldm.models.diffusion.sampling import sample_ddpm
from ldm.models.diffusion.schedules import ddim_sigmas, zero_terminal_snr_betas
from ldm.models.diffusion.training import DiffusionTrainingMixin, check_ucg_training, prior_preservation_loss
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.ema import LitEma
from ldm.util import ConfigError

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2")
# The classes that build on DDPM live in their own modules, which import this one. Every CompVis config, script and
# checkpoint names them here, so they are imported when first asked for (PEP 562), which keeps imports acyclic.
MOVED = {
    "LatentDiffusion": "ldm.models.diffusion.latent_diffusion",
    "disabled_train": "ldm.models.diffusion.latent_diffusion",
    "LatentInpaintDiffusion": "ldm.models.diffusion.latent_inpainting",
    "LatentUpscaleDiffusion": "ldm.models.diffusion.latent_upscale",
    "LatentDepth2ImageDiffusion": "ldm.models.diffusion.latent_depth",
    "ImageEmbeddingConditionedLatentDiffusion": "ldm.models.diffusion.latent_unclip",
}


def __getattr__(name: str) -> Any:
    if name in MOVED:
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *MOVED])


class DDPM(DiffusionTrainingMixin, pl.LightningModule):
    """Gaussian diffusion in pixel space with a UNet denoiser.

    Holds the noise schedule as buffers (the state-dict keys SD checkpoints have), the forward process ``q_sample``,
    the conversions between the eps / x0 / v parameterizations and the training loss (:meth:`p_losses`).
    Constructor arguments mirror the YAML ``model.params``. Training options beyond CompVis:
    ``offset_noise_strength`` adds per-channel constant noise (offset noise) and ``snr_gamma`` turns on min-SNR-gamma
    loss weighting (Hang et al. 2023; 5.0 is the usual value); ``prior_loss_weight`` weighs the class images of
    prior-preservation batches (:mod:`ldm.data.prior`). ``zero_terminal_snr`` rescales the schedule so that
    the last timestep is pure noise (Lin et al. 2023, Algorithm 1; see
    :func:`~ldm.models.diffusion.schedules.rescale_zero_terminal_snr`), which needs v- (or x0-) prediction.
    """

    def __init__(
        self,
        unet_config: Any,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: list[str] | tuple[str, ...] = (),
        load_only_unet: bool = False,
        monitor: str = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: list[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Any = None,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        ucg_training: Mapping[str, Any] | None = None,
        offset_noise_strength: float = 0.0,
        snr_gamma: float | None = None,
        zero_terminal_snr: bool = False,
        prior_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if zero_terminal_snr and parameterization == "eps":
            raise ConfigError(
                "zero_terminal_snr needs parameterization 'v' (or 'x0'): at zero SNR an eps prediction says nothing "
                "about the image (Lin et al. 2023, section 3.2)."
            )
        self.zero_terminal_snr = zero_terminal_snr
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"parameterization '{parameterization}' is not one of {PARAMETERIZATIONS}.")
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type '{loss_type}' is not one of {LOSS_TYPES}.")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ConfigError(f"snr_gamma must be positive (or null to turn min-SNR weighting off), got {snr_gamma}.")
        check_ucg_training(ucg_training or {})
        self.restarted_from_ckpt = False
        self.learning_rate: float | None = None
        self.parameterization = parameterization
        self.cond_stage_model: nn.Module | None = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.ucg_training = ucg_training or {}
        self.offset_noise_strength = offset_noise_strength
        self.snr_gamma = snr_gamma
        self.prior_loss_weight = prior_loss_weight
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        # A learned logvar is a parameter (and a checkpoint key); a fixed one is a plain tensor, as in SD checkpoints.
        self.logvar = nn.Parameter(logvar) if learn_logvar else logvar
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    def register_schedule(
        self,
        given_betas: list[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Compute the schedule in float64 and store it as float32 buffers (the keys SD checkpoints carry)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(
                beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
            )
        if self.zero_terminal_snr:
            betas = zero_terminal_snr_betas(torch.from_numpy(betas)).numpy()
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end

        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + self.v_posterior * betas
        # With a zero terminal SNR, x0 is undetermined from x_t at the last step: 1 / alphas_cumprod is inf there.
        with np.errstate(divide="ignore"):
            recip_alphas_cumprod = 1.0 / alphas_cumprod
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(recip_alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(recip_alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at t = 0; clip before the log.
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

        # Weights of the variational bound per timestep; derived, so not part of checkpoints.
        if self.parameterization == "eps":
            lvlb = betas**2 / (2 * np.maximum(posterior_variance, 1e-20) * alphas * (1 - alphas_cumprod))
        elif self.parameterization == "x0":
            # The original's expression, ``2. * 1 - a``, kept so that x0 models train with the same vlb weights.
            lvlb = 0.5 * np.sqrt(alphas_cumprod) / (2.0 - alphas_cumprod)
        else:
            lvlb = np.ones_like(betas)
        lvlb[0] = lvlb[1]
        self.register_buffer("lvlb_weights", torch.tensor(lvlb, dtype=torch.float32), persistent=False)

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Run the block with the EMA weights in the model, restoring the trained weights afterwards."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
        try:
            yield
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())

    def init_from_ckpt(
        self, path: str, ignore_keys: list[str] | tuple[str, ...] = (), only_model: bool = False
    ) -> None:
        """Load weights from ``path``; keys starting with any of ``ignore_keys`` are skipped (fine-tuning)."""
        from ldm.checkpoint import read_ckpt_path

        state_dict = read_ckpt_path(path)
        if only_model:
            state_dict = state_dict.view({k if k.startswith("model.") else f"model.{k}": k for k in state_dict})
            ignore_keys = tuple(ignore_keys) + tuple({k.split(".")[0] + "." for k in self.state_dict()} - {"model."})
        self.load_checkpoint_state(state_dict, ignore_keys)

    def load_checkpoint_state(self, state_dict: Mapping[str, torch.Tensor], ignore_keys: tuple[str, ...] = ()) -> None:
        """Load a checkpoint's state dict (``ckpt_path``) strictly but for ``ignore_keys`` prefixes.

        A checkpoint without EMA weights (pruned SD files) restarts the EMA from the loaded weights, so fine-tuning
        with ``use_ema`` works from any checkpoint.
        """
        from ldm.checkpoint import EMA_PREFIX, load_state_dict_into

        restart_ema = self.use_ema and not any(k.startswith(EMA_PREFIX) for k in state_dict)
        if restart_ema:
            ignore_keys = (*ignore_keys, EMA_PREFIX)
        load_state_dict_into(self, state_dict, ignore_prefixes=ignore_keys)
        if restart_ema:
            self.model_ema = LitEma(self.model)
        self.restarted_from_ckpt = True

    # -- forward process and parameterizations. x: (B, C, H, W), t: (B,) integer timesteps. --

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise ``x_start`` to timestep ``t``: ``sqrt(a_t) x0 + sqrt(1 - a_t) eps``."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and log-variance of ``q(x_t | x_0)``."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = (
            extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        )

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v target: ``sqrt(a_t) eps - sqrt(1 - a_t) x0``."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x
        )

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The UNet's prediction (eps, x0 or v as ``parameterization`` says). x_noisy: (B, C, H, W), t: (B,)."""
        return self.model(x_noisy, t)

    # -- training objective. x_start: (B, C, H, W) clean data (latents for LatentDiffusion), t: (B,) timesteps. --

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """``loss_type`` (l1 / l2) between prediction and target, computed in float32; elementwise unless ``mean``."""
        error = pred.float() - target.float()
        loss = error.abs() if self.loss_type == "l1" else error.pow(2)
        return loss.mean() if mean else loss

    def draw_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        """Standard normal noise like ``x_start``, plus ``offset_noise_strength`` times a per-(sample, channel)
        constant: offset noise lets the model change an image's mean brightness and colour."""
        noise = torch.randn_like(x_start)
        if self.offset_noise_strength > 0:
            offset = torch.randn(*x_start.shape[:2], *([1] * (x_start.dim() - 2)), device=x_start.device)
            noise = noise + self.offset_noise_strength * offset.to(noise.dtype)
        return noise

    def training_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should output: ``noise`` (eps), ``x_start`` (x0) or the velocity (v)."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights (B,): ``min(SNR, gamma)`` over the SNR factor each parameterization's loss already
        carries (``SNR`` for eps, ``SNR + 1`` for v, 1 for x0), with ``SNR = a_t / (1 - a_t)``."""
        alphas_cumprod = self.alphas_cumprod[t]
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.parameterization == "eps":
            return clipped / snr
        if self.parameterization == "v":
            return clipped / (snr + 1.0)
        return clipped

    def diffusion_loss(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        class_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss for one prediction, and the CompVis log dict (``{train|val}/loss_simple``, ...).

        ``loss_simple`` is the per-sample mean error (B,), min-SNR weighted with ``snr_gamma``. Each sample's loss is
        ``loss_simple / exp(logvar_t) + logvar_t`` (``logvar`` is 0 unless learned), averaged (with a ``class_mask``
        (B,): DreamBooth's instance mean + ``prior_loss_weight`` * class mean) and scaled by ``l_simple_weight``,
        plus ``original_elbo_weight`` times the vlb term ``mean(lvlb_weights[t] * loss_simple)``.
        """
        prefix = "train" if self.training else "val"
        target = self.training_target(x_start, noise, t)
        loss_simple = self.get_loss(model_output, target, mean=False).mean(dim=tuple(range(1, target.dim())))
        log = {f"{prefix}/loss_simple": loss_simple.detach().mean()}
        weighted = loss_simple * self.snr_weights(t) if self.snr_gamma is not None else loss_simple
        logvar_t = self.logvar.to(t.device)[t]
        loss = weighted / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            log[f"{prefix}/loss_gamma"] = loss.detach().mean()
            log["logvar"] = self.logvar.detach().mean()
        loss = self.l_simple_weight * prior_preservation_loss(loss, class_mask, self.prior_loss_weight, log, prefix)
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        log[f"{prefix}/loss_vlb"] = loss_vlb.detach()
        loss = loss + self.original_elbo_weight * loss_vlb
        log[f"{prefix}/loss"] = loss.detach()
        return loss, log

    def p_losses(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        class_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Noise ``x_start`` to ``t`` (with :meth:`draw_noise` unless ``noise`` is given), predict, and score."""
        noise = self.draw_noise(x_start) if noise is None else noise
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t)
        return self.diffusion_loss(model_output, x_start, noise, t, class_mask)

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """Uniform training timesteps (B,) in [0, num_timesteps)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=self.device)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss at uniformly drawn timesteps for a batch x: (B, C, H, W)."""
        return self.p_losses(x, self.sample_timesteps(x.shape[0]), *args, **kwargs)

    @staticmethod
    def get_input(batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]``: (B, H, W[, C]) channels-last (the data loaders' layout) -> contiguous float (B, C, H, W)."""
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self(self.get_input(batch, self.first_stage_key).to(self.device, self.dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the UNet, and ``logvar`` when it is learned."""
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], N: int = 8, sample: bool = True, ddim_steps: int = 20, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """``inputs`` and (with ``sample``) DDIM ``samples`` of the EMA model, each (N, C, H, W) clamped to [-1, 1]."""
        x = self.get_input(batch, self.first_stage_key)[:N].to(self.device, self.dtype)
        log = {"inputs": x}
        if sample:
            with self.ema_scope():
                log["samples"] = run_sampler(self, "ddim", ddim_steps, shape=tuple(x.shape), progress=False)
        return {k: v.float().clamp(-1.0, 1.0) for k, v in log.items()}

    @torch.no_grad()
    def p_sample_loop(
        self,
        cond: Any,
        shape: tuple[int, ...],
        x_T: torch.Tensor | None = None,
        unconditional_conditioning: Any = None,
        unconditional_guidance_scale: float = 1.0,
        noise: Noise | None = None,
        clip_denoised: bool | None = None,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Ancestral sampling through all ``num_timesteps`` steps: ``x_{t-1} ~ q(x_{t-1} | x_t, x0_pred)``, which is
        :func:`~ldm.models.diffusion.sampling.sample_ddpm` on every training timestep.

        shape: (B, C, H, W). ``mask``/``x0`` (mask 1 = keep ``x0``) inpaint: the known region of every x0 estimate
        is ``x0``. ``clip_denoised`` (default: the config's) clamps x0_pred to [-1, 1], as the original did.
        Returns x_0: (B, C, H, W).
        """
        if self.v_posterior != 0:
            raise UserError("p_sample_loop draws from the posterior of v_posterior = 0 (as every SD config sets).")
        noise = noise if noise is not None else Noise.from_seed(None, shape[0], self.betas.device)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        x = noise.randn(shape) if x_T is None else x_T
        if tuple(x.shape) != tuple(shape):
            raise UserError(f"x_T has shape {tuple(x.shape)}, expected {tuple(shape)}.")
        eps = GuidedEps(self, cond, unconditional_conditioning, unconditional_guidance_scale)
        denoiser = Denoiser(eps, mask, x0)
        sigmas = ddim_sigmas(eps.schedule, self.num_timesteps)

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return denoiser(x, sigma).clamp(-1.0, 1.0) if clip else denoiser(x, sigma)

        def report(step: dict[str, Any]) -> None:
            if callback is not None:
                callback(step["i"], step["denoised"])

        x = to_sigma_view(x, float(sigmas[0]))
        return sample_ddpm(denoise, x, sigmas, noise=noise, callback=report, progress=progress)

    @torch.no_grad()
    def sample(
        self,
        cond: Any,
        batch_size: int = 16,
        x_T: torch.Tensor | None = None,
        shape: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """DDPM ancestral sampling of ``batch_size`` samples of the model's ``(channels, image_size, image_size)``."""
        shape = (
            (batch_size, *shape) if shape is not None else (batch_size, self.channels, self.image_size, self.image_size)
        )
        return self.p_sample_loop(cond, shape, x_T=x_T, **kwargs)
