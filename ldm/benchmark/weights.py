"""The weights both engines load: ``--ckpt``, or seeded random ones under which every UNet block matters."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ldm.benchmark.settings import Plan
from ldm.checkpoint import load_model_from_config, save_checkpoint


def random_weights(config: DictConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of the config's model, in the original checkpoint layout.

    PyTorch's (and transformers') default initialisation, then every layer that starts at zero (the UNet's output
    convolution, each ResBlock's last convolution, each transformer's ``proj_out``) gets the default initialisation
    of its shape too, so the UNet's output depends on every block.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model_from_config(config, None, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() >= 2 and not weight.any():
                _fill_default(module, generator)
    return model.state_dict()


def _fill_default(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Uniform in +-1/sqrt(fan_in), the bound of PyTorch's default Linear/Conv initialisation, for weight and bias."""
    bound = module.weight[0].numel() ** -0.5
    for tensor in (module.weight, getattr(module, "bias", None)):
        if isinstance(tensor, torch.Tensor):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * (2 * bound) - bound)


def write_weights(plan: Plan, folder: Path) -> Path:
    """The file both engines load: ``--ckpt`` itself, or the random weights written once to ``folder``."""
    if plan.ckpt is not None:
        return plan.ckpt
    path = folder / "random-weights.safetensors"
    save_checkpoint(random_weights(plan.config, plan.settings.seed), path)
    return path
