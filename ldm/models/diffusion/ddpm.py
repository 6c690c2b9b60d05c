"""The diffusion process: ``DDPM`` (schedule, forward noising, parameterizations) and ``LatentDiffusion`` on top of it.

``apply_model`` is the one entry to the UNet, used by every sampler and by training alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ldm.models.diffusion.guidance import GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, instantiate_from_config

PARAMETERIZATIONS = ("eps", "x0", "v")
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


class DDPM(pl.LightningModule):
    """Gaussian diffusion in pixel space with a UNet denoiser.

    Holds the noise schedule as buffers (the state-dict keys SD checkpoints have), the forward process ``q_sample``
    and the conversions between the eps / x0 / v parameterizations. Constructor arguments mirror the YAML
    ``model.params``; the training-only ones are kept for the training step.
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
    ) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"parameterization '{parameterization}' is not one of {PARAMETERIZATIONS}.")
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
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end

        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + self.v_posterior * betas
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
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
            lvlb = 0.5 * np.sqrt(alphas_cumprod) / (2.0 - 2.0 * alphas_cumprod)
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
        from ldm.checkpoint import load_state_dict_into, read_checkpoint

        state_dict, _ = read_checkpoint(path)
        if only_model:
            state_dict = {f"model.{k}": v for k, v in state_dict.items() if not k.startswith("model.")} | {
                k: v for k, v in state_dict.items() if k.startswith("model.")
            }
            ignore_keys = tuple(ignore_keys) + tuple({k.split(".")[0] + "." for k in self.state_dict()} - {"model."})
        load_state_dict_into(self, state_dict, ignore_prefixes=ignore_keys)

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
        """Ancestral sampling through all ``num_timesteps`` steps: ``x_{t-1} ~ q(x_{t-1} | x_t, x0_pred)``.

        shape: (B, C, H, W). ``mask``/``x0`` (mask 1 = keep ``x0``) inpaint by replacing the known region with
        ``x0`` noised to the current step. ``clip_denoised`` (default: the config's) clamps x0_pred to [-1, 1],
        as the original did. Returns x_0: (B, C, H, W).
        """
        eps_model = GuidedEps(self, cond, unconditional_conditioning, unconditional_guidance_scale)
        noise = noise if noise is not None else Noise.from_seed(None, shape[0], self.betas.device)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        x = noise.randn(shape) if x_T is None else x_T
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x.shape)}, expected {tuple(shape)}.")
        steps = reversed(range(self.num_timesteps))
        for i, t in enumerate(tqdm(steps, total=self.num_timesteps, desc="DDPM", disable=not progress)):
            ts = torch.full((shape[0],), t, device=x.device, dtype=torch.long)
            x0_pred = self.predict_start_from_noise(x, ts, eps_model(x, t))
            if clip:
                x0_pred = x0_pred.clamp(-1.0, 1.0)
            mean, _, log_variance = self.q_posterior(x0_pred, x, ts)
            x = mean + (0.5 * log_variance).exp() * noise.randn_like(x) if t > 0 else mean
            if mask is not None:
                known = self.q_sample(x0, (ts - 1).clamp(min=0), noise.randn_like(x)) if t > 0 else x0
                x = known * mask + (1.0 - mask) * x
            if callback is not None:
                callback(i, x0_pred)
        return x

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

    ``scale_factor`` maps latents to unit variance (0.18215 for the SD VAE). The cond stage is a text encoder
    (``cond_stage_config``), ``__is_first_stage__`` (condition on the encoded image) or ``__is_unconditional__``.
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
        if not self.cond_stage_trainable:
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
        from ldm.checkpoint import load_state_dict_into, read_checkpoint

        state_dict, _ = read_checkpoint(path)
        own = self.state_dict()
        for key in self.finetune_keys:
            if key in state_dict and state_dict[key].shape != own[key].shape:
                widened = torch.zeros_like(own[key], device="cpu")
                widened[:, : self.keep_finetune_dims] = state_dict[key][:, : self.keep_finetune_dims]
                state_dict[key] = widened
        load_state_dict_into(self, state_dict, ignore_prefixes=ignore_keys)

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
