"""Conditioning encoders: the frozen CLIP text encoders of SD 1.x / 2.x and a class-label embedding; the LDM
text-to-image models' BERT encoders live in :mod:`ldm.modules.encoders.bert`, the image-to-image models'
``SpatialRescaler`` in :mod:`ldm.modules.encoders.rescaler`, the unCLIP models' CLIP image encoders in
:mod:`ldm.modules.encoders.clip_image` and their embedding noise augmentation in
:mod:`ldm.modules.diffusionmodules.upscaling`; all are importable from here, the path their configs name.

Architectures are built from configs only (never from a model hub): the weights come from the checkpoint, whose
``cond_stage_model.*`` entries these modules' state dicts match key for key.
"""

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import _build_text_tower
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.errors import UserError
from ldm.modules.diffusionmodules.upscaling import CLIPEmbeddingNoiseAugmentation
from ldm.modules.encoders.base import AbstractEncoder
from ldm.modules.encoders.bert import BERTEmbedder, BERTTokenizer, TransformerEmbedder
from ldm.modules.encoders.clip_image import ClipImageEmbedder, FrozenOpenCLIPImageEmbedder
from ldm.modules.encoders.rescaler import SpatialRescaler
from ldm.modules.encoders.tokenizer import EOS_TOKEN_ID, CLIPTokenizer

# Configs and scripts name every encoder by this module's path, including those defined elsewhere.
__all__ = [
    "AbstractEncoder",
    "BERTEmbedder",
    "BERTTokenizer",
    "CLIPEmbeddingNoiseAugmentation",
    "ClassEmbedder",
    "ClipImageEmbedder",
    "FrozenCLIPEmbedder",
    "FrozenOpenCLIPEmbedder",
    "FrozenOpenCLIPEmbedder2",
    "FrozenOpenCLIPImageEmbedder",
    "SpatialRescaler",
    "TransformerEmbedder",
]

# Text tower of OpenAI CLIP ViT-L/14, the SD 1.x text encoder.
CLIP_VIT_L14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}


# Per batch row, ``(position, vector (D,))`` pairs standing in for the token embeddings at those positions.
TokenVectors = Sequence[Sequence[tuple[int, torch.Tensor]]]


def place_token_vectors(embedded: torch.Tensor, token_vectors: TokenVectors | None) -> torch.Tensor:
    """Token embeddings (B, L, D) with ``token_vectors`` in place; out of place, so gradients reach the vectors."""
    places = [(row, position, vector) for row, pairs in enumerate(token_vectors or ()) for position, vector in pairs]
    if not places:
        return embedded
    rows, positions, vectors = zip(*places, strict=True)
    index = (torch.tensor(rows, device=embedded.device), torch.tensor(positions, device=embedded.device))
    return embedded.index_put(index, torch.stack(vectors).to(embedded))


@contextlib.contextmanager
def _vectors_at_output(embedding: nn.Module, token_vectors: TokenVectors | None) -> Iterator[None]:
    """While the block runs, ``embedding``'s output (B, L, D) gets ``token_vectors`` placed in it."""
    if not token_vectors or not any(token_vectors):
        yield
        return
    handle = embedding.register_forward_hook(lambda module, args, out: place_token_vectors(out, token_vectors))
    try:
        yield
    finally:
        handle.remove()


class _NestedTextModel(nn.Module):
    """Holds a transformers ``CLIPTextModel`` under ``text_model``.

    SD 1.x checkpoints name the text encoder ``transformer.text_model.*`` because transformers < 5 nested a
    ``CLIPTextTransformer`` inside ``CLIPTextModel``; transformers 5 keeps the layers at the top level. This wrapper
    restores the nesting so checkpoint keys match whatever transformers is installed.
    """

    def __init__(self, text_model: CLIPTextModel) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, **kwargs: Any) -> Any:
        return self.text_model(**kwargs)


def _as_dict(config: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    """A config given as a mapping (dict, OmegaConf ``DictConfig``) or as the path of a JSON file."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    return json.loads(Path(config).read_text())


class FrozenCLIPEmbedder(AbstractEncoder):
    """SD 1.x text encoder: the transformers CLIP text model (ViT-L/14 by default).

    Args:
        version: kept for config compatibility. Only an existing local directory is used: its ``config.json`` +
            weights (transformers ``from_pretrained`` layout) and its tokenizer files, each where present. Hub
            names such as ``"openai/clip-vit-large-patch14"`` are ignored: nothing is downloaded.
        device: where to move the module after construction; ``None`` leaves it where it is built. Tokens always go
            to the device of the embedding weights, so the module follows ``.to(...)``.
        max_length: token context length.
        freeze: put the module in eval mode and stop gradients (see ``freeze``).
        layer: ``"last"`` (``last_hidden_state``, after the final layer norm), ``"pooled"`` (the EOS token's
            features, ``(B, 1, D)``) or ``"hidden"`` (``hidden_states[layer_idx]``, no final layer norm: "CLIP skip").
        layer_idx: index into ``hidden_states`` (0 is the embedding output, -1 the last layer) for ``"hidden"``.
        text_config: ``CLIPTextConfig`` fields (mapping, or path to a JSON file) overriding the ViT-L/14 defaults.
        always_return_pooled: ``forward`` returns ``(z, pooled)``, pooled the EOS token's final features (B, D)
            (Stability's ``sgm`` option; SDXL leaves it off for this encoder).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        text_config: Mapping[str, Any] | str | os.PathLike | None = None,
        always_return_pooled: bool = False,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        local_dir = Path(version) if os.path.isdir(version) else None
        if local_dir is not None and (local_dir / "config.json").is_file():
            model = CLIPTextModel.from_pretrained(local_dir, local_files_only=True)
        else:
            model = CLIPTextModel(CLIPTextConfig(**{**CLIP_VIT_L14_TEXT_CONFIG, **_as_dict(text_config)}))
        num_layers = model.config.num_hidden_layers
        if layer == "hidden" and (layer_idx is None or not -num_layers - 1 <= layer_idx <= num_layers):
            raise ValueError(f"layer='hidden' needs layer_idx in [{-num_layers - 1}, {num_layers}], got {layer_idx}")
        has_vocab = local_dir is not None and any((local_dir / f).is_file() for f in ("vocab.json", "tokenizer.json"))
        self.tokenizer = CLIPTokenizer(
            max_length, pad_token_id=EOS_TOKEN_ID, vocab_dir=local_dir if has_vocab else None
        )
        self.transformer = model if hasattr(model, "text_model") else _NestedTextModel(model)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = always_return_pooled
        self.place(device, freeze)

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    @device.setter
    def device(self, device: str | torch.device) -> None:
        # The originals kept a device attribute that their scripts assign (Stability's txt2img sets
        # ``cond_stage_model.device = "cpu"``); here the device is the weights', so assigning one moves them.
        self.to(device)

    @property
    def per_token(self) -> bool:
        """Whether the output has one feature vector per token (all layers but ``"pooled"``)."""
        return self.layer != "pooled"

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table, (vocab, D): textual-inversion vectors live in its space."""
        return self.transformer.text_model.embeddings.token_embedding

    def encode_token_ids(
        self,
        tokens: torch.Tensor,
        clip_skip: int = 1,
        return_pooled: bool = False,
        token_vectors: TokenVectors | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids, optionally stopping ``clip_skip - 1`` layers before the configured one.

        ``clip_skip`` counts back from ``layer``. With ``"last"``, ``clip_skip=2`` gives ``hidden_states[-2]`` followed
        by the final layer norm (A1111's "CLIP skip"); with ``"hidden"`` it gives ``hidden_states[layer_idx - 1]``,
        still without the final layer norm. ``"pooled"`` takes only ``clip_skip=1``.

        Args:
            tokens: (B, max_length) int64 token ids, e.g. from ``self.tokenizer``.
            token_vectors: per row, ``(position, vector (D,))`` pairs that replace the token embeddings at those
                positions (textual inversion, :mod:`ldm.adapters.embeddings`).
        Returns:
            z: (B, max_length, D) for ``"last"`` / ``"hidden"``, (B, 1, D) for ``"pooled"``; with ``return_pooled``
            the pair ``(z, pooled)``, pooled: (B, D) the EOS token's features after the last layer.
        """
        num_layers = self.transformer.text_model.config.num_hidden_layers
        top = self.layer_idx % (num_layers + 1) if self.layer == "hidden" else num_layers
        index = top - (clip_skip - 1)
        if clip_skip < 1 or index < 0 or (self.layer == "pooled" and clip_skip != 1):
            raise UserError(f"clip_skip={clip_skip} is out of range for layer={self.layer!r} of {num_layers} layers")
        # Explicit position ids: the model's own ``position_ids`` buffer is not in the state dict, so it would be
        # left uninitialised by a meta-device construction followed by ``load_state_dict(assign=True)``.
        position_ids = torch.arange(tokens.shape[1], device=tokens.device)[None]
        skipping = self.layer == "last" and clip_skip > 1
        # transformers' CLIPTextModel takes no input embeddings, so the vectors go in at its token embedding's output.
        with _vectors_at_output(self.token_embedding, token_vectors):
            outputs = self.transformer(
                input_ids=tokens, position_ids=position_ids, output_hidden_states=self.layer == "hidden" or skipping
            )
        if self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        elif self.layer == "hidden":
            z = outputs.hidden_states[index]
        elif skipping:
            z = self.transformer.text_model.final_layer_norm(outputs.hidden_states[index])
        else:
            z = outputs.last_hidden_state
        return (z, outputs.pooler_output) if return_pooled else z

    def forward(self, text: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts.

        Returns:
            z: (B, max_length, D) for ``"last"`` / ``"hidden"``, (B, 1, D) for ``"pooled"``; ``(z, pooled (B, D))``
            with ``always_return_pooled``.
        """
        return self.encode_token_ids(self.tokenizer(text).to(self.device), return_pooled=self.return_pooled)


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """SD 2.x text encoder: the text tower of an OpenCLIP model (ViT-H/14 by default), without its visual tower.

    Args:
        arch: open_clip model name; its bundled config gives the text tower's architecture.
        version: kept for config compatibility. Only the path of an existing local file is used: a state dict
            (safetensors, or a torch checkpoint) of the open_clip model, visual tower entries allowed. Pretrained tags
            such as ``"laion2b_s32b_b79k"`` are ignored: nothing is downloaded.
        device: where to move the module after construction; ``None`` leaves it where it is built.
        max_length: token context length.
        freeze: put the module in eval mode and stop gradients.
        layer: ``"last"`` (all residual blocks) or ``"penultimate"`` (stop one block early).
        text_cfg: open_clip ``CLIPTextCfg`` fields overriding the arch's text tower (width, heads, layers,
            context_length, vocab_size, ...), for small models.
        always_return_pooled: ``forward`` returns ``(z, pooled)``: pooled (B, embed_dim) is the EOS token's
            features after all blocks and ``ln_final``, times ``text_projection`` (CLIP's text embedding). Needs
            ``legacy=False``.
        legacy: SD 2.x's encoder (True): ``ln_final`` is applied to the chosen layer's output. SDXL's
            (``sgm``'s ``FrozenOpenCLIPEmbedder2`` with ``legacy: False``) returns the chosen layer's raw output.
        embed_dim: width of ``text_projection``'s output, overriding the arch's (for small models).
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str | None = None,
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        text_cfg: Mapping[str, Any] | None = None,
        always_return_pooled: bool = False,
        legacy: bool = True,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy=False (the pooled output is SDXL's, not SD 2.x's)")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        tower_cfg = {**model_cfg["text_cfg"], **_as_dict(text_cfg)}
        if tower_cfg["context_length"] < max_length:
            raise ValueError(f"max_length {max_length} exceeds the context length {tower_cfg['context_length']}")
        # Only the text tower is built (ViT-H's visual tower alone has ~630M parameters); open_clip's CLIP would
        # also own ``logit_scale``, which SD 2.x checkpoints store, so it is added here.
        self.model = _build_text_tower(
            embed_dim or model_cfg["embed_dim"], tower_cfg, quick_gelu=model_cfg.get("quick_gelu", False)
        )
        self.model.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        if version is not None and os.path.isfile(version):
            self.model.load_state_dict(_load_open_clip_text_weights(version))
        self.tokenizer = CLIPTokenizer(max_length, pad_token_id=0)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]
        self.return_pooled = always_return_pooled
        self.legacy = legacy
        self.place(device, freeze)

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @device.setter
    def device(self, device: str | torch.device) -> None:
        # The originals kept a device attribute that their scripts assign (Stability's txt2img sets
        # ``cond_stage_model.device = "cpu"``); here the device is the weights', so assigning one moves them.
        self.to(device)

    @property
    def per_token(self) -> bool:
        """Whether the output has one feature vector per token (always, for this encoder)."""
        return True

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the text tower up to ``self.layer``: tokens (B, L) int64 -> z (B, L, width) (``encode_token_ids``)."""
        return self.encode_token_ids(tokens, return_pooled=self.return_pooled)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table, (vocab, width): textual-inversion vectors live in its space."""
        return self.model.token_embedding

    def encode_token_ids(
        self,
        tokens: torch.Tensor,
        clip_skip: int = 1,
        return_pooled: bool = False,
        token_vectors: TokenVectors | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the text tower, stopping ``clip_skip - 1`` blocks before the configured ``layer``.

        ``clip_skip`` counts back from ``layer``, so an SD 2.x config (``"penultimate"``) with ``clip_skip=1`` is the
        encoder as trained; ``ln_final`` is applied to z when ``legacy``.

        Args:
            tokens: (B, L) int64 token ids, L <= context length.
            token_vectors: per row, ``(position, vector (width,))`` pairs that replace the token embeddings there.
        Returns:
            z: (B, L, width); with ``return_pooled`` the pair ``(z, pooled)``, pooled: (B, embed_dim), which always
            runs all blocks (CLIP skip does not change it, as in SDXL's training).
        """
        blocks = self.model.transformer.resblocks
        num_blocks = len(blocks) - self.layer_idx - (clip_skip - 1)
        if clip_skip < 1 or num_blocks < 0:
            raise UserError(f"clip_skip={clip_skip} is out of range for layer={self.layer!r} of {len(blocks)} blocks")
        x = place_token_vectors(self.model.token_embedding(tokens), token_vectors)
        x = x + self.model.positional_embedding[: tokens.shape[1]]
        # Built here rather than taken from the tower's ``attn_mask`` buffer, which is not in the state dict and would
        # stay uninitialised after a meta-device construction.
        seq_len = tokens.shape[1]
        causal_mask = torch.full((seq_len, seq_len), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        # Older open_clip releases (no `batch_first` attribute) run their blocks sequence-first.
        batch_first = getattr(self.model.transformer, "batch_first", False)
        x = x if batch_first else x.transpose(0, 1)
        z = None
        for index, block in enumerate(blocks[: len(blocks) if return_pooled else num_blocks]):
            if index == num_blocks:
                z = x
            x = block(x, attn_mask=causal_mask)
        z = x if z is None else z
        z = z if batch_first else z.transpose(0, 1)
        z = self.model.ln_final(z) if self.legacy else z
        if not return_pooled:
            return z
        last = self.model.ln_final(x if batch_first else x.transpose(0, 1))
        # The EOS token has the largest id, so argmax finds it (open_clip's "argmax" pooling).
        pooled = (
            last[torch.arange(len(tokens), device=tokens.device), tokens.argmax(dim=-1)] @ self.model.text_projection
        )
        return z, pooled

    def forward(self, text: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts: returns (B, max_length, width), or ``(z, pooled)`` with ``always_return_pooled``."""
        return self.encode_with_transformer(self.tokenizer(text).to(self.device))


# sgm's name for the OpenCLIP text encoder with the pooled output (SDXL's second text encoder); same class here.
FrozenOpenCLIPEmbedder2 = FrozenOpenCLIPEmbedder


def _load_open_clip_text_weights(path: str) -> dict[str, torch.Tensor]:
    """Text-tower entries of an open_clip checkpoint file (its ``visual.*`` entries are dropped)."""
    from ldm.checkpoint import read_checkpoint

    state_dict, _ = read_checkpoint(path)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith("visual.")}


class ClassEmbedder(AbstractEncoder):
    """Class-label conditioning with classifier-free-guidance dropout.

    The last class index (``n_classes - 1``) doubles as the "unconditional" label; during training a fraction
    ``ucg_rate`` of labels is replaced by it. The default is CompVis's class, which drops none: the class-conditional
    configs (``cin256``, ``cin256-v2``, ``cin-ldm-vq-f8``) name it, and for ``cin256``'s 1000 classes the last one
    is a real ImageNet class. (Stability's copy defaults to 0.1, but no Stability config uses it.)
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.0) -> None:
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.ucg_rate = ucg_rate
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(
        self, batch: Mapping[str, torch.Tensor], key: str | None = None, disable_dropout: bool = False
    ) -> torch.Tensor:
        """Embed ``batch[key]``, (B,) integer labels, into (B, 1, embed_dim).

        Labels are dropped to the unconditional class only in training mode (and unless ``disable_dropout``), so
        sampling with an eval-mode model is deterministic.
        """
        labels = batch[key or self.key].long()[:, None]
        if self.training and self.ucg_rate > 0 and not disable_dropout:
            drop = torch.rand(labels.shape, device=labels.device) < self.ucg_rate
            labels = torch.where(drop, self.n_classes - 1, labels)
        return self.embedding(labels)

    def get_unconditional_conditioning(
        self, bs: int, device: str | torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """A batch of ``bs`` unconditional labels, ``{key: (bs,) int64}``, on ``device`` (default: the weights')."""
        device = self.embedding.weight.device if device is None else device
        return {self.key: torch.full((bs,), self.n_classes - 1, dtype=torch.long, device=device)}
