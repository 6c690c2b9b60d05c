"""Building blocks shared by the diffusion models: noise schedules, timestep embeddings and layer helpers.

The DDPM wrapper imports its training betas from here; the DDIM helpers under CompVis's names are thin functions over
:mod:`ldm.models.diffusion.schedules`, where the samplers' grids are defined.
"""

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ldm.models.diffusion.schedules import ddim_coefficients
from ldm.models.diffusion.schedules import make_ddim_timesteps as _ddim_timesteps
from ldm.modules.distributions.distributions import normal_kl as normal_kl

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt", "squaredcos_cap_v2")


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Return the ``(n_timestep,)`` float64 array of betas for a named schedule.

    "linear" (the Stable Diffusion one) spaces the betas linearly in sqrt space; "sqrt_linear" is linear in beta
    itself and "sqrt" the square root of that; "cosine" is the Nichol & Dhariwal schedule with offset ``cosine_s``.
    "squaredcos_cap_v2" is the GLIDE / Karlo cosine schedule (offset 0.008, each beta capped at 0.999), which
    unCLIP models use to noise-augment CLIP image embeddings; the linear/cosine arguments do not apply to it.
    """
    if schedule == "linear":
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas_cumprod = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        # The last step would otherwise have beta = 1, i.e. a singular posterior.
        return np.clip(betas, 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    if schedule == "squaredcos_cap_v2":
        t = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep
        alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"schedule {schedule!r} unknown; valid schedules are {', '.join(BETA_SCHEDULES)}")


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = False
) -> np.ndarray:
    """The ``(S,)`` ascending training timesteps of an S-step DDIM run, as CompVis's function of this name gives them.

    ``ddim_discr_method`` is "uniform" or "quad". The grid is the project's one definition,
    :func:`ldm.models.diffusion.schedules.make_ddim_timesteps`: the original's "uniform" grid where S divides T, and
    exactly S steps for every other S; "quad" without the original's repeated timesteps. ``verbose`` prints it.
    """
    timesteps = np.asarray(_ddim_timesteps(num_ddim_timesteps, num_ddpm_timesteps, ddim_discr_method))
    if verbose:
        print(f"Selected timesteps for ddim sampler: {timesteps}")
    return timesteps


def make_ddim_sampling_parameters(
    alphacums: torch.Tensor | np.ndarray, ddim_timesteps: Sequence[int], eta: float, verbose: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sigmas, alphas, alphas_prev)`` of a DDIM run over ``ddim_timesteps``, as CompVis's function of this name.

    alphacums: (T,) the model's ``alphas_cumprod``. Each result is (S,) float64: ``alphas = alphacums[timesteps]``,
    ``alphas_prev`` the level each step goes to (``alphacums[0]`` for the lowest timestep, the run's last step),
    ``sigmas`` the std of the noise each step adds,
    ``eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``. Computed by
    :func:`ldm.models.diffusion.schedules.ddim_coefficients`; ``verbose`` prints them, as the original did.
    """
    table = ddim_coefficients(torch.as_tensor(alphacums), [int(t) for t in ddim_timesteps], eta)
    sigmas, alphas, alphas_prev = (x.numpy() for x in (table.sigmas, table.alphas, table.alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule: {sigmas}")
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Pick ``a[t]`` per batch element, shaped ``(B, 1, ..., 1)`` to broadcast against a tensor of ``x_shape``.

    a: (T,); t: (B,) integer timesteps.
    """
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def noise_like(shape: Sequence[int], device: torch.device | str, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of ``shape``; with ``repeat`` every batch element gets the same sample."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``(B,) -> (B, dim)``, cosines first then sines.

    Frequencies run geometrically from 1 down to ``1 / max_period``; an odd ``dim`` is zero-padded.
    ``repeat_only`` instead copies the raw timestep into every channel.
    """
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Timestep(nn.Module):
    """The sinusoidal embedding of integer levels as a module: t (B,) -> (B, dim); no parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it (residual branches then start as the identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply all parameters of ``module`` by ``scale`` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one: ``(B, ...) -> (B,)``."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 for float16 inputs, so their statistics do not overflow.

    bfloat16 has float32's range and the kernels accumulate in float32, so it runs as is, without two extra passes
    over every activation (and with diffusers' numerics). The affine parameters are upcast with the input: not
    every backend accepts float32 input with half-precision weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: 32-group GroupNorm over ``channels``."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution, with ``nn.Conv*d`` arguments."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return convs[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    """``nn.Linear``, under the original helper name so code importing it keeps working."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling, with ``nn.AvgPool*d`` arguments."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return pools[dims](*args, **kwargs)


def checkpoint(func: Callable, inputs: Sequence, params: Iterable[nn.Parameter], flag: bool):
    """Evaluate ``func(*inputs)``, recomputing its activations in the backward pass when ``flag`` is set.

    ``params`` is accepted for the original call signature only: non-reentrant checkpointing finds the parameters
    that need gradients by itself. Without autograd there is nothing to save memory on, so it just runs ``func``.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
