"""The PatchGAN discriminator of the autoencoder's adversarial loss (pix2pix / taming-transformers layout)."""

from __future__ import annotations

import torch
from torch import nn


class ActNorm(nn.Module):
    """Per-channel affine normalisation ``scale * (x + loc)``, initialised from the first training batch so that
    its output has zero mean and unit variance per channel. x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(dim=1).view_as(self.loc))
        self.scale.copy_(1.0 / (flat.std(dim=1).view_as(self.scale) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        return self.scale * (x + self.loc)


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02) with zero shifts."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4x4 convolutions then two stride-1 ones, giving one real/fake logit per
    overlapping patch. x: (B, input_nc, H, W) -> logits (B, 1, ~H / 2**n_layers, ~W / 2**n_layers).

    Layers sit in ``self.main`` (keys ``main.0.weight`` ...), as in the CompVis autoencoder checkpoints. Normalisation
    is batch norm (convolutions before it have no bias) or, with ``use_actnorm``, :class:`ActNorm`.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev_mult, mult = mult, min(2**n, 8)
            # The last of these keeps the resolution: it widens the receptive field without shrinking the patch grid.
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev_mult, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
