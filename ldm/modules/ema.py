"""Exponential moving average of a model's parameters, stored in the checkpoint layout SD checkpoints use."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def ema_buffer_name(param_name: str) -> str:
    """``diffusion_model.out.2.weight`` -> ``diffusion_modelout2weight``: buffer names may not contain dots."""
    return param_name.replace(".", "")


class LitEma(nn.Module):
    """Shadow copies of ``model``'s trainable parameters, updated with ``ema(model)`` after each optimizer step.

    State dict keys: ``decay``, ``num_updates`` and one buffer per parameter named by :func:`ema_buffer_name`, which is
    what the ``model_ema.*`` entries of CompVis/SD checkpoints hold.

    Args:
        model: the module whose parameters are tracked.
        decay: the EMA decay in [0, 1].
        use_num_upates: warm up the decay as ``min(decay, (1 + n) / (10 + n))`` (the original's spelling of the name).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}.")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        self.param_to_buffer: dict[str, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                buffer_name = ema_buffer_name(name)
                self.param_to_buffer[name] = buffer_name
                self.register_buffer(buffer_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.param_to_buffer:
                s = shadow[self.param_to_buffer[name]]
                s.lerp_(p.detach().to(s.dtype), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s tracked parameters with the EMA weights."""
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.param_to_buffer:
                p.copy_(shadow[self.param_to_buffer[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` so :meth:`restore` can bring them back after evaluating with EMA weights."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        for stored, p in zip(self.collected_params, parameters, strict=True):
            p.copy_(stored)
        self.collected_params = []
