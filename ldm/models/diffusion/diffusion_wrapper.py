"""``DiffusionWrapper``: the UNet behind ``DDPM.model``, with the conditioning routed in as ``conditioning_key``
says."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.util import ConfigError, instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


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
        self.control = None  # the ControlNets of a run, attached by ldm.control (a plain attribute, not a submodule)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
        c_adm: torch.Tensor | None = None,
        c_control: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,), c_concat: [(B, C', H, W)], c_crossattn: [(B, L, D)] -> (B, C_out, H, W).

        c_control: control images [(B, 3, 8H, 8W)], one per ControlNet of ``self.control`` (:mod:`ldm.control`)."""
        latent = x
        key = self.conditioning_key
        if key in ("concat", "hybrid", "hybrid-adm") and c_concat:
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(c_crossattn, dim=1) if key not in (None, "concat", "adm") and c_crossattn else None
        y = None
        if key == "adm":
            y = c_crossattn[0] if c_crossattn else c_adm
        elif key in ("hybrid-adm", "crossattn-adm"):
            y = c_adm
        control = self.control(latent, t, context, y, c_control) if c_control and self.control else None
        return self.diffusion_model(x, t, context=context, y=y, **({"control": control} if control else {}))
