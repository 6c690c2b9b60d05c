"""The diffusion process: ``DDPM`` (schedule, forward noising, parameterizations, the training objective) and
``LatentDiffusion`` on top of it.

``apply_model`` is the one entry to the UNet, used by every sampler and by training alike. The Lightning hooks
(``training_step``, ``configure_optimizers`` ...) come from :class:`DiffusionTrainingMixin`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ldm.models.diffusion.compvis_sampler import to_sigma_view
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample as run_sampler
from ldm.models.diffusion.sampling import sample_ddpm
from ldm.models.diffusion.schedules import ddim_sigmas, zero_terminal_snr_betas
from ldm.models.diffusion.training import DiffusionTrainingMixin, check_ucg_training
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, instantiate_from_config

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2")
CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replaces ``.train`` on frozen stages so that Lightning switching the model to train mode leaves them in eval."""
    return self


class DiffusionWrapper(nn.Module):
    """Routes conditioning into the UNet as ``conditioning_key`` says.

    ``concat``: channel-concatenated to ``x`` (inpainting masks, depth); ``crossattn``: the UNet's ``context``;
    ``hybrid``: both; ``adm``: the UNet's class/vector input ``y``; ``hybrid-adm`` / ``crossattn-adm``: combinations.
    The UNet is ``self.diffusion_model`` so checkpoint keys read ``model.diffusion_model.*``.
    """

    def __init__(self, diff_model_config: Any, conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ConfigError(f"conditioning_key '{conditioning_key}' is not one of {CONDITIONING_KEYS}.")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
        c_adm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,), c_concat: [(B, C', H, W)], c_crossattn: [(B, L, D)] -> (B, C_out, H, W)."""
        key = self.conditioning_key
        if key in ("concat", "hybrid", "hybrid-adm") and c_concat:
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(c_crossattn, dim=1) if key not in (None, "concat", "adm") and c_crossattn else None
        y = None
        if key == "adm":
            y = c_crossattn[0] if c_crossattn else c_adm
        elif key in ("hybrid-adm", "crossattn-adm"):
            y = c_adm
        return self.diffusion_model(x, t, context=context, y=y)


def _take(value: Any, n: int) -> Any:
    """The first ``n`` entries of a batch value (tensor, list, or dict of them); other values unchanged."""
    if isinstance(value, Mapping):
        return {k: _take(v, n) for k, v in value.items()}
    return value[:n] if isinstance(value, torch.Tensor | list | tuple) else value


class DDPM(DiffusionTrainingMixin, pl.LightningModule):
    """Gaussian diffusion in pixel space with a UNet denoiser.

    Holds the noise schedule as buffers (the state-dict keys SD checkpoints have), the forward process ``q_sample``,
    the conversions between the eps / x0 / v parameterizations and the training loss (:meth:`p_losses`).
    Constructor arguments mirror the YAML ``model.params``. Training options beyond CompVis:
    ``offset_noise_strength`` adds per-channel constant noise (offset noise) and ``snr_gamma`` turns on min-SNR-gamma
    loss weighting (Hang et al. 2023; 5.0 is the usual value). ``zero_terminal_snr`` rescales the schedule so that
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
        from ldm.checkpoint import read_checkpoint

        state_dict, _ = read_checkpoint(path)
        if only_model:
            state_dict = {f"model.{k}": v for k, v in state_dict.items() if not k.startswith("model.")} | {
                k: v for k, v in state_dict.items() if k.startswith("model.")
            }
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
        self, model_output: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss for one prediction, and the CompVis log dict (``{train|val}/loss_simple``, ...).

        ``loss_simple`` is the per-sample mean error (B,), min-SNR weighted with ``snr_gamma``. Each sample's loss is
        ``loss_simple / exp(logvar_t) + logvar_t`` (``logvar`` is 0 unless learned), averaged and scaled by
        ``l_simple_weight``, plus ``original_elbo_weight`` times the vlb term ``mean(lvlb_weights[t] * loss_simple)``.
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
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        log[f"{prefix}/loss_vlb"] = loss_vlb.detach()
        loss = loss + self.original_elbo_weight * loss_vlb
        log[f"{prefix}/loss"] = loss.detach()
        return loss, log

    def p_losses(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Noise ``x_start`` to ``t`` (with :meth:`draw_noise` unless ``noise`` is given), predict, and score."""
        noise = self.draw_noise(x_start) if noise is None else noise
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t)
        return self.diffusion_loss(model_output, x_start, noise, t)

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
            raise ValueError("p_sample_loop draws from the posterior of v_posterior = 0 (as every SD config sets).")
        noise = noise if noise is not None else Noise.from_seed(None, shape[0], self.betas.device)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        x = noise.randn(shape) if x_T is None else x_T
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x.shape)}, expected {tuple(shape)}.")
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


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen first stage (``AutoencoderKL``), conditioned by a cond stage.

    ``scale_factor`` maps latents to unit variance (0.18215 for the SD VAE); with ``scale_by_std`` it is instead
    estimated as 1 / std of the first training batch's latents (unless training resumes or starts from a checkpoint).
    The cond stage is a text encoder (``cond_stage_config``), a class embedder (``cond_stage_key: class_label``),
    ``__is_first_stage__`` (condition on the encoded image) or ``__is_unconditional__``. With
    ``cond_stage_trainable`` the cond stage is trained with the UNet (its parameters are unfrozen).

    Training batches hold images under ``first_stage_key``, (B, H, W, 3) in [-1, 1], and the conditioning under
    ``cond_stage_key`` (a list of captions for ``txt``).
    """

    def __init__(
        self,
        first_stage_config: Any,
        cond_stage_config: Any,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        force_null_conditioning: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.num_timesteps_cond = num_timesteps_cond or 1
        if self.num_timesteps_cond > 1:
            raise ConfigError(
                "num_timesteps_cond > 1 (noising the conditioning on a shortened schedule) is not supported; use 1."
            )
        self.scale_by_std = scale_by_std
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        self.force_null_conditioning = force_null_conditioning
        if scale_by_std:
            # Estimated from the first training batch, so it must travel with the checkpoint.
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def instantiate_first_stage(self, config: Any) -> None:
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = disabled_train.__get__(model)
        for p in self.first_stage_model.parameters():
            p.requires_grad = False

    def instantiate_cond_stage(self, config: Any) -> None:
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
            return
        if config == "__is_unconditional__":
            self.cond_stage_model = None
            return
        model = instantiate_from_config(config)
        if self.cond_stage_trainable:
            # Encoders such as FrozenCLIPEmbedder freeze themselves by default; training them overrides that.
            model.requires_grad_(True)
        else:
            model = model.eval()
            model.train = disabled_train.__get__(model)
            for p in model.parameters():
                p.requires_grad = False
        self.cond_stage_model = model

    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning (a list of prompts, class labels, ...) with the cond stage: e.g. -> (B, 77, D)."""
        if self.cond_stage_model is None:
            raise RuntimeError("this model is unconditional (__is_unconditional__); it takes no conditioning.")
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        encode = getattr(self.cond_stage_model, "encode", None)
        c = encode(c) if callable(encode) else self.cond_stage_model(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """Image x: (B, 3, H, W) in [-1, 1] -> the first stage's posterior over latents (B, 4, H/f, W/f)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(
        self, encoder_posterior: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A scaled latent: a sample of the posterior (or the tensor itself) times ``scale_factor``."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"cannot take a latent from a {type(encoder_posterior).__name__}.")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent z: (B, 4, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The UNet's prediction for latents x_noisy: (B, C, h, w) at timesteps t: (B,).

        ``cond`` is a dict with ``c_concat`` / ``c_crossattn`` / ``c_adm`` lists, or a tensor (or list of tensors)
        that goes where ``conditioning_key`` says: e.g. the text embedding (B, 77, D) for cross-attention.
        """
        if not isinstance(cond, Mapping):
            if cond is None:
                cond = {}
            else:
                cond = cond if isinstance(cond, list) else [cond]
                cond = {"c_concat" if self.model.conditioning_key == "concat" else "c_crossattn": cond}
        out = self.model(x_noisy, t, **cond)
        return out[0] if isinstance(out, tuple) else out

    # -- training --

    @torch.no_grad()
    def get_input(
        self,
        batch: Mapping[str, Any],
        k: str,
        return_first_stage_outputs: bool = False,
        force_c_encode: bool = False,
        cond_key: str | None = None,
        return_original_cond: bool = False,
        bs: int | None = None,
        return_x: bool = False,
    ) -> list[Any]:
        """``[z, c]`` for a batch: scaled latents z (B, 4, H/f, W/f) of the images ``batch[k]`` ((B, H, W, 3) in
        [-1, 1]) and the conditioning ``c``, encoded unless the cond stage is trainable (then it is encoded in
        :meth:`forward`, with gradients) and ``force_c_encode`` is off. ``c`` is None for unconditional models.

        Appended as asked (CompVis order): the images x and their reconstruction, x again, the raw conditioning.
        ``bs`` keeps the first ``bs`` samples.
        """
        x = DDPM.get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        # The model's dtype: float32 under mixed precision, bfloat16/float16 when Lightning runs it in "true" precision.
        x = x.to(self.device, self.dtype)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            cond_key = cond_key or self.cond_stage_key
            if cond_key == k:
                xc = x
            elif cond_key in ("caption", "coordinates_bbox", "txt"):
                xc = batch[cond_key]
            elif cond_key in ("class_label", "cls"):
                xc = batch
            else:
                xc = DDPM.get_input(batch, cond_key).to(self.device, self.dtype)
            if bs is not None:
                xc = _take(xc, bs)
            c = self.get_learned_conditioning(xc) if force_c_encode or not self.cond_stage_trainable else xc
        out = [z, c]
        if return_first_stage_outputs:
            out += [x, self.decode_first_stage(z)]
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = self.get_input(batch, self.first_stage_key)
        return self(z, c)

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss for latents x: (B, C, h, w) at uniformly drawn timesteps; ``c`` as :meth:`get_input` gives it."""
        if self.model.conditioning_key is not None and c is None:
            raise ValueError(f"this model is conditioned ({self.model.conditioning_key}); the batch gave no condition.")
        if self.cond_stage_trainable and c is not None:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, self.sample_timesteps(x.shape[0]), *args, **kwargs)

    def p_losses(
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`DDPM.p_losses` with the conditioning ``cond`` passed to :meth:`apply_model`."""
        noise = self.draw_noise(x_start) if noise is None else noise
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        return self.diffusion_loss(model_output, x_start, noise, t)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet, the cond stage if ``cond_stage_trainable``, and ``logvar`` if learned."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            params += list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """With ``scale_by_std``, set ``scale_factor`` to 1 / std of the first batch's latents (all ranks pooled)."""
        if not self.scale_by_std or self.global_step != 0 or batch_idx != 0 or self.restarted_from_ckpt:
            return
        x = DDPM.get_input(batch, self.first_stage_key).to(self.device, self.dtype)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)) / self.scale_factor
        std = self.all_gather(z.float()).flatten().std()
        self.scale_factor.copy_(1.0 / std)
        rank_zero_info(f"scale_by_std: scale_factor set to {float(self.scale_factor):.5f}")

    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None) -> Any:
        """The encoded "no condition" for classifier-free guidance: the cond stage's own (class embedders),
        ``null_label``, or the ``ucg_training`` replacement value (default the empty prompt)."""
        if null_label is None and hasattr(self.cond_stage_model, "get_unconditional_conditioning"):
            return self.get_learned_conditioning(self.cond_stage_model.get_unconditional_conditioning(batch_size))
        if null_label is None:
            null_label = (self.ucg_training.get(self.cond_stage_key) or {}).get("val") or ""
        return self.get_learned_conditioning([null_label] * batch_size)

    @torch.no_grad()
    def log_images(
        self,
        batch: Mapping[str, Any],
        N: int = 8,
        sample: bool = True,
        ddim_steps: int = 20,
        ddim_eta: float = 0.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_guidance_label: Any = None,
        use_ema_scope: bool = True,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Images for the ImageLogger, each (N, 3, H, W) clamped to [-1, 1]: ``inputs``, ``reconstruction``
        (through the first stage) and, with ``sample``, DDIM ``samples`` for the batch's conditioning; with
        ``unconditional_guidance_scale > 1`` also ``samples_cfg`` (classifier-free guidance). Sampling uses the EMA
        weights (``use_ema_scope``) and eval mode.
        """
        was_training = self.training
        self.eval()
        try:
            z, c, x, xrec = self.get_input(
                {key: _take(value, N) for key, value in batch.items()},
                self.first_stage_key,
                return_first_stage_outputs=True,
                force_c_encode=True,
            )
            log = {"inputs": x, "reconstruction": xrec}
            guided = unconditional_guidance_scale > 1.0 and c is not None
            with self.ema_scope() if use_ema_scope else nullcontext():
                settings = {"shape": tuple(z.shape), "eta": ddim_eta, "progress": False}
                if sample:
                    log["samples"] = self.decode_first_stage(run_sampler(self, "ddim", ddim_steps, c, **settings))
                if guided:
                    uc = self.get_unconditional_conditioning(len(z), unconditional_guidance_label)
                    latents = run_sampler(self, "ddim", ddim_steps, c, uc, unconditional_guidance_scale, **settings)
                    log["samples_cfg"] = self.decode_first_stage(latents)
        finally:
            self.train(was_training)
        return {k: v.float().clamp(-1.0, 1.0) for k, v in log.items()}


class LatentInpaintDiffusion(LatentDiffusion):
    """SD inpainting models: the UNet sees the noisy latent plus the mask and the masked image's latent.

    With ``conditioning_key: hybrid`` the 9 UNet input channels are the latent (4), the mask (1, 1 = repaint) and
    the latent of the image with the masked region blanked (4), concatenated in ``concat_keys`` order; the text
    embedding goes to cross-attention as usual.

    ``finetune_keys`` (with ``ckpt_path``) start an inpainting model from an ordinary checkpoint: those weights keep
    their first ``keep_finetune_dims`` input channels from the checkpoint and start the new ones at zero.
    """

    def __init__(
        self,
        *args: Any,
        concat_keys: tuple[str, ...] | list[str] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        finetune_keys: tuple[str, ...] | list[str] | None = None,
        keep_finetune_dims: int = 4,
        **kwargs: Any,
    ) -> None:
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if masked_image_key not in concat_keys:
            raise ConfigError(f"masked_image_key '{masked_image_key}' must be one of concat_keys {list(concat_keys)}.")
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key
        self.finetune_keys = tuple(finetune_keys or ())
        self.keep_finetune_dims = keep_finetune_dims
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(
        self, path: str, ignore_keys: list[str] | tuple[str, ...] = (), only_model: bool = False
    ) -> None:
        from ldm.checkpoint import read_checkpoint

        state_dict, _ = read_checkpoint(path)
        own = self.state_dict()
        for key in self.finetune_keys:
            if key in state_dict and state_dict[key].shape != own[key].shape:
                widened = torch.zeros_like(own[key], device="cpu")
                widened[:, : self.keep_finetune_dims] = state_dict[key][:, : self.keep_finetune_dims]
                state_dict[key] = widened
        self.load_checkpoint_state(state_dict, tuple(ignore_keys))

    @torch.no_grad()
    def inpainting_conditioning(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The UNet's extra input channels for inpainting ``image`` where ``mask`` is 1.

        image: (B, 3, H, W) in [-1, 1]; mask: (B, 1, H, W) in {0, 1}, 1 = repaint -> (B, 1 + 4, H/f, W/f).
        The masked image is encoded with the posterior mode, so the result does not depend on a random draw.
        """
        mask = (mask >= 0.5).to(image.dtype)
        parts = {self.masked_image_key: self.scale_factor * self.encode_first_stage(image * (1.0 - mask)).mode()}
        size = parts[self.masked_image_key].shape[-2:]
        parts.update({k: F.interpolate(mask, size=size) for k in self.concat_keys if k != self.masked_image_key})
        return torch.cat([parts[k] for k in self.concat_keys], dim=1)
