"""The interface every conditioning encoder of the project shares (``ldm.modules.encoders.modules`` re-exports it)."""

from typing import Any

import torch
from torch import nn


class AbstractEncoder(nn.Module):
    """A conditioning encoder: ``encode(inputs)`` is its forward; ``freeze()`` makes it a fixed feature extractor."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self(*args, **kwargs)

    def place(self, device: str | torch.device | None, freeze: bool) -> None:
        """Finish construction: move to ``device`` (None leaves it where it was built) and freeze if asked."""
        if device is not None:
            self.to(device)
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        """Eval mode and no gradients: a frozen encoder is not trained with the diffusion model."""
        self.eval()
        for param in self.parameters():
            param.requires_grad = False
