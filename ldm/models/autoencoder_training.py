"""How the first stages (``AutoencoderKL``, ``VQModel``) train: an autoencoder step and a discriminator step per
batch, with the GAN losses of ``ldm.modules.losses``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.modules.ema import LitEma
from ldm.util import ConfigError, instantiate_from_config


class GANAutoencoder(pl.LightningModule):
    """Training loop shared by the first stages (Lightning 2.x, manual optimization).

    Each batch steps the autoencoder's Adam(0.5, 0.9) at ``lr_g_factor * learning_rate`` (``learning_rate`` is set
    by ``main.py``), then the discriminator's at ``learning_rate`` when the loss has one. Lightning counts both steps
    in ``global_step``, so the loss is given ``global_step // number of optimizers``: training batches, the unit of
    ``disc_start``. With ``scheduler_config`` both learning rates follow its schedule, stepped once per batch.
    An EMA (``model_ema.*``, see :meth:`_init_ema`) is updated after each batch; validation reports the trained
    weights as ``val/...`` and, with EMA, the EMA weights as ``val_ema/...``.

    Subclasses build ``encoder``, ``decoder``, ``loss`` and implement :meth:`_reconstruct`, :meth:`_loss` and
    :meth:`_autoencoder_parameters`.
    """

    lr_g_factor: float = 1.0
    scheduler_config: Any = None
    # The loss a config with ``lossconfig: torch.nn.Identity`` (inference only) should name to train.
    _training_loss_name = "ldm.modules.losses.LPIPSWithDiscriminator"

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.learning_rate: float | None = None
        self.use_ema = False

    def _init_ema(self, decay: float) -> None:
        """Track all trainable weights; call after loading ``ckpt_path`` so that the EMA starts from them."""
        self.use_ema = True
        self.model_ema = LitEma(self, decay=decay)

    # -- what a subclass provides --

    def _reconstruct(self, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """inputs (B, C, H, W) -> (reconstructions (B, C, H, W), what the loss needs besides them)."""
        raise NotImplementedError

    def _loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        extra: Any,
        optimizer_idx: int,
        step: int,
        split: str,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``self.loss`` called in its own argument order; ``step`` counts training batches."""
        raise NotImplementedError

    def _autoencoder_parameters(self) -> list[nn.Parameter]:
        """What the autoencoder's optimizer trains."""
        raise NotImplementedError

    # -- inputs --

    def get_input(self, batch: Mapping[str, torch.Tensor], k: str) -> torch.Tensor:
        """``batch[k]``, stored channels-last (B, H, W[, C]) by the data loader, as contiguous float (B, C, H, W)."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    # -- training --

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Run the block with the EMA weights (when EMA is on), restoring the trained ones afterwards."""
        if self.use_ema:
            self.model_ema.store(self.parameters())
            self.model_ema.copy_to(self)
        try:
            yield
        finally:
            if self.use_ema:
                self.model_ema.restore(self.parameters())

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the GAN weight is balanced against reconstruction."""
        return self.decoder.conv_out.weight

    def _has_discriminator(self) -> bool:
        return isinstance(getattr(self.loss, "discriminator", None), nn.Module)

    def _batches_seen(self) -> int:
        return self.global_step // (2 if self._has_discriminator() else 1)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One autoencoder step, then one discriminator step. batch[image_key]: (B, H, W, C) in [-1, 1]."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        inputs = self.get_input(batch, self.image_key).to(self.dtype)
        reconstructions, extra = self._reconstruct(inputs)
        step = self._batches_seen()
        aeloss, logs = self._loss(inputs, reconstructions, extra, 0, step, "train", last_layer=self.get_last_layer())
        optimizers[0].zero_grad()
        self.manual_backward(aeloss)
        optimizers[0].step()
        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(inputs))
        if len(optimizers) > 1:
            discloss, log_disc = self._loss(inputs, reconstructions, extra, 1, step, "train")
            optimizers[1].zero_grad()
            self.manual_backward(discloss)
            optimizers[1].step()
            self.log("discloss", discloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(inputs))
            logs = {**logs, **log_disc}
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(inputs))

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Log ``val/rec_loss``, ``val/total_loss``, ... and, with EMA, the same as ``val_ema/...``."""
        self._log_validation(batch, "val")
        if self.use_ema:
            with self.ema_scope():
                self._log_validation(batch, "val_ema")

    def _log_validation(self, batch: Mapping[str, Any], split: str) -> None:
        inputs = self.get_input(batch, self.image_key).to(self.dtype)
        reconstructions, extra = self._reconstruct(inputs)
        step = self._batches_seen()
        _, logs = self._loss(inputs, reconstructions, extra, 0, step, split, last_layer=self.get_last_layer())
        if self._has_discriminator():
            logs = {**logs, **self._loss(inputs, reconstructions, extra, 1, step, split)[1]}
        self.log_dict(logs, batch_size=len(inputs), sync_dist=True)

    def configure_optimizers(self) -> Any:
        """Adam(0.5, 0.9) for the autoencoder at ``lr_g_factor * learning_rate`` and, when the loss has one, for the
        discriminator at ``learning_rate``; with ``scheduler_config`` a ``LambdaLR`` on each."""
        if self.learning_rate is None:
            raise RuntimeError("set model.learning_rate before training (main.py sets it from base_learning_rate).")
        if isinstance(self.loss, nn.Identity):
            raise ConfigError(
                f"this {type(self).__name__} config has no training loss (lossconfig is torch.nn.Identity); use "
                f"{self._training_loss_name} to train it."
            )
        lr_g = self.lr_g_factor * self.learning_rate
        optimizers = [torch.optim.Adam(self._autoencoder_parameters(), lr=lr_g, betas=(0.5, 0.9))]
        if self._has_discriminator():
            discriminator = self.loss.discriminator.parameters()
            optimizers.append(torch.optim.Adam(discriminator, lr=self.learning_rate, betas=(0.5, 0.9)))
        if self.scheduler_config is None:
            return optimizers
        schedule = instantiate_from_config(self.scheduler_config, path="model.params.scheduler_config")
        schedule = getattr(schedule, "schedule", schedule)
        schedulers = [{"scheduler": LambdaLR(o, lr_lambda=schedule), "interval": "step"} for o in optimizers]
        return optimizers, schedulers

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Images to (B, 3, H, W) in [-1, 1]: clamped, or for label maps (C > 3) a fixed random colour projection."""
        if x.shape[1] <= 3:
            return x.float().clamp(-1.0, 1.0)
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1, device=x.device))
        x = F.conv2d(x.float(), weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0
