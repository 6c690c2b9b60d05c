"""``GeneralConditioner``: SDXL's conditioning, several embedders each reading one key of a batch.

Every embedder's outputs are sorted by their number of dimensions, as in Stability's ``sgm``: 2-D (B, D) outputs are
concatenated into ``"vector"`` (the UNet's ``y``), 3-D (B, L, D) ones along D into ``"crossattn"`` (its
``context``), 4-D/5-D ones along the channels into ``"concat"``. For SDXL base this gives crossattn (B, 77, 768 +
1280) from CLIP ViT-L and OpenCLIP ViT-bigG, and vector (B, 1280 + 3 * 512): bigG's pooled text embedding, then the
Fourier embeddings of the original size, the crop's top-left corner and the target size, in config order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.util import ConfigError, instantiate_from_config

OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}
# Keys of an embedder entry besides target/params; they configure how the conditioner uses the embedder.
ENTRY_KEYS = ("is_trainable", "input_key", "input_keys", "ucg_rate", "legacy_ucg_value")


def _keep_train_mode_off(self: nn.Module, mode: bool = True) -> nn.Module:
    return self


class GeneralConditioner(nn.Module):
    """Runs ``emb_models`` on a batch and sorts their outputs by dimensionality (see the module docstring).

    Each entry of ``emb_models`` is a ``target``/``params`` node plus: ``is_trainable`` (False freezes the embedder,
    which then also stays in eval mode; True unfreezes one that froze itself, where sgm would leave it frozen),
    ``input_key`` or ``input_keys`` (the batch entries it reads), ``ucg_rate`` (in training, the fraction of samples
    whose embedding is dropped for classifier-free guidance: zeroed, or with ``legacy_ucg_value`` the input replaced
    by that value). State-dict keys: ``embedders.<i>.*``.
    """

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        embedders = []
        for index, entry in enumerate(emb_models):
            params = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
            embedder = instantiate_from_config(params)
            if ("input_key" in entry) == ("input_keys" in entry):
                raise ConfigError(f"emb_models[{index}]: give exactly one of input_key and input_keys.")
            embedder.input_keys = [entry["input_key"]] if "input_key" in entry else list(entry["input_keys"])
            embedder.is_trainable = bool(entry.get("is_trainable", False))
            embedder.ucg_rate = float(entry.get("ucg_rate", 0.0))
            embedder.legacy_ucg_val = entry.get("legacy_ucg_value")
            if embedder.legacy_ucg_val is not None and len(embedder.input_keys) != 1:
                raise ConfigError(f"emb_models[{index}]: legacy_ucg_value needs a single input_key.")
            if embedder.is_trainable:
                # Text encoders freeze themselves by default (freeze: true); marking one trainable overrides that.
                embedder.requires_grad_(True)
            else:
                embedder.requires_grad_(False)
                embedder.eval()
                embedder.train = _keep_train_mode_off.__get__(embedder)
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    @property
    def input_keys(self) -> set[str]:
        """Every batch key some embedder reads."""
        return {key for embedder in self.embedders for key in embedder.input_keys}

    def _drop_inputs(self, embedder: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``legacy_ucg_value`` dropout: each sample's input replaced by that value with probability ``ucg_rate``."""
        key = embedder.input_keys[0]
        values = list(batch[key])
        for i in torch.nonzero(torch.rand(len(values)) < embedder.ucg_rate).flatten().tolist():
            values[i] = embedder.legacy_ucg_val
        return {**batch, key: values}

    def forward(
        self,
        batch: Mapping[str, Any],
        force_zero_embeddings: Iterable[str] | None = None,
        embeddings: Mapping[int, torch.Tensor | Sequence[torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"vector": (B, D_v), "crossattn": (B, L, D_c), ...}`` for a batch; each embedding whose input key is in
        ``force_zero_embeddings`` is zeros instead (SDXL's unconditional text).

        ``embeddings``: outputs of some embedders by index, used instead of running them on ``batch`` (the prompt
        encodings of :mod:`ldm.sdxl_conditioning`, with attention weights and 75-token chunks)."""
        zeroed = set(force_zero_embeddings or ())
        given = embeddings or {}
        dropping = self.training
        output: dict[str, torch.Tensor] = {}
        for index, embedder in enumerate(self.embedders):
            if index in given:
                out = given[index]
            else:
                if dropping and embedder.ucg_rate > 0 and embedder.legacy_ucg_val is not None:
                    # Kept for the embedders after this one that read the same key, as in sgm.
                    batch = self._drop_inputs(embedder, batch)
                out = self._embed(embedder, batch)
            for emb in out if isinstance(out, list | tuple) else [out]:
                if emb.dim() not in OUTPUT_DIM2KEYS:
                    raise ValueError(f"{type(embedder).__name__} gave a {emb.dim()}-D output; expected 2 to 5 dims")
                if dropping and embedder.ucg_rate > 0 and embedder.legacy_ucg_val is None:
                    keep = torch.rand(emb.shape[0], device=emb.device) >= embedder.ucg_rate
                    emb = emb * keep.to(emb.dtype).reshape(-1, *[1] * (emb.dim() - 1))
                if zeroed.intersection(embedder.input_keys):
                    emb = torch.zeros_like(emb)
                key = OUTPUT_DIM2KEYS[emb.dim()]
                output[key] = torch.cat([output[key], emb], KEY2CATDIM[key]) if key in output else emb
        return output

    @staticmethod
    def _embed(embedder: nn.Module, batch: Mapping[str, Any]) -> Any:
        """Run one embedder on its batch entries."""
        missing = [key for key in embedder.input_keys if key not in batch]
        if missing:
            raise KeyError(f"the conditioning batch lacks {missing} (has {sorted(batch)})")
        with torch.set_grad_enabled(embedder.is_trainable and torch.is_grad_enabled()):
            return embedder(*[batch[key] for key in embedder.input_keys])

    def get_unconditional_conditioning(
        self,
        batch_c: Mapping[str, Any],
        batch_uc: Mapping[str, Any] | None = None,
        force_uc_zero_embeddings: Iterable[str] | None = None,
        force_cond_zero_embeddings: Iterable[str] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(c, uc)``: the conditioning of ``batch_c`` and of ``batch_uc`` (default ``batch_c``), both without
        dropout; ``force_*_zero_embeddings`` as :meth:`forward`'s ``force_zero_embeddings``."""
        was_training = self.training
        self.train(False)
        try:
            c = self(batch_c, force_cond_zero_embeddings)
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        finally:
            self.train(was_training)
        return c, uc
