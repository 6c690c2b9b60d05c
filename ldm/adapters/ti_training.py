"""Textual-inversion training with main.py: a frozen latent diffusion model in which only an embedding's vectors
learn (``configs/textual-inversion/``).

The model is a ``LatentDiffusion`` with a per-token text encoder (SD 1.x's CLIP, SD 2.x's OpenCLIP:
:class:`TextualInversionDiffusion`) or an SDXL model (:class:`TextualInversionSDXL`: one set of vectors for each of
its text encoders, written as A1111's ``clip_l`` / ``clip_g`` safetensors). The new embedding has
``num_vectors_per_token`` vectors, initialised as A1111 does from the token embeddings of ``init_text`` (vector i is
the init text's token ``i * k // n`` of its first k <= n tokens). Each training caption is one of ``templates``
(picked at random per sample, from torch's global generator, so seeded runs repeat) with ``[name]`` replaced by the
embedding's name and ``[filewords]`` by the data's caption (A1111's template syntax); the name then becomes the
vectors exactly as it does when generating (:mod:`ldm.adapters.embeddings`), so the embedding is trained through the
same code path it is used with.

The embedding is written to ``<logdir>/embeddings/``: ``<name>-<step>.<ext>`` with every checkpoint and
``<name>.<ext>`` when training ends, ``ext`` being ``embedding_format`` (``pt``: A1111's layout; ``safetensors``:
``emb_params``; SDXL embeddings are always safetensors). Either file works with ``--embeddings_dir`` and in A1111.
The Lightning checkpoints keep the whole model, so that main.py resumes a run as any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.adapters.embeddings import MAX_VECTORS, TokenTable, prompt_encoders, save_embedding
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.models.diffusion.sdxl import SDXLDiffusion
from ldm.prompts import encode_chunks, prompt_chunks
from ldm.util import ConfigError

FORMATS = ("pt", "safetensors")
DEFAULT_TEMPLATES = ("a photo of [name]",)


def initial_vectors(encoder: Any, init_text: str, num_vectors: int) -> torch.Tensor:
    """A1111's start for ``num_vectors`` vectors: (n, D) copied from ``init_text``'s token embeddings in ``encoder``."""
    ids = encoder.tokenizer.encode(init_text)[:num_vectors]
    if not ids:
        raise ConfigError(f"init_text {init_text!r} has no tokens; give a word close to the concept, e.g. 'cat'.")
    table = encoder.token_embedding.weight.detach()
    return torch.stack([table[ids[i * len(ids) // num_vectors]] for i in range(num_vectors)]).float().clone()


class TextualInversionMixin:
    """What textual-inversion training adds to a diffusion model class (module docstring); see
    :class:`TextualInversionDiffusion` for the arguments."""

    def __init__(
        self,
        *args: Any,
        embedding_name: str,
        init_text: str = "*",
        num_vectors_per_token: int = 1,
        templates: Sequence[str] | None = None,
        embedding_format: str = "pt",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("cond_stage_trainable"):
            raise ConfigError("textual inversion trains the embedding only: set cond_stage_trainable: false.")
        if kwargs.get("use_ema", True):
            raise ConfigError("textual inversion leaves the UNet unchanged, so it has no EMA: set use_ema: false.")
        if kwargs.get("ucg_training"):
            raise ConfigError(
                "ucg_training is not used by textual inversion (the templates put the name in every caption): drop it."
            )
        if not 1 <= num_vectors_per_token <= MAX_VECTORS:
            raise ConfigError(f"num_vectors_per_token must be 1 to {MAX_VECTORS}, got {num_vectors_per_token}.")
        if embedding_format not in FORMATS:
            raise ConfigError(f"embedding_format must be one of {FORMATS}, got {embedding_format!r}.")
        self.templates = list(templates or DEFAULT_TEMPLATES)
        if not self.templates or any("[name]" not in t for t in self.templates):
            raise ConfigError(f"every template needs [name] (where the embedding goes); got {self.templates}.")
        if not embedding_name or any(c in embedding_name for c in "/\\:") or embedding_name.startswith("."):
            raise ConfigError(f"embedding_name {embedding_name!r} must be a plain word: it is also the file name.")
        super().__init__(*args, **kwargs)
        self.requires_grad_(False)
        self.embedding_name = embedding_name
        self.embedding_format = embedding_format
        self.make_vectors(init_text, num_vectors_per_token)
        # The captions reach forward() as text and are encoded there, with gradients to the vectors (the encoders
        # themselves stay frozen: trainable_parameters is the vectors alone).
        self.cond_stage_trainable = True

    def make_vectors(self, init_text: str, num_vectors: int) -> None:
        """Register ``embedding_vectors``, the trained parameter(s)."""
        raise NotImplementedError

    def vectors_by_key(self) -> dict[str | None, torch.Tensor]:
        """The embedding's vectors by file key (see :func:`ldm.adapters.embeddings.save_embedding`)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return (
            list(self.embedding_vectors.parameters())
            if isinstance(self.embedding_vectors, nn.Module)
            else [self.embedding_vectors]
        )

    def caption(self, filewords: str) -> str:
        """A training caption: a random template with ``[name]`` and ``[filewords]`` filled in."""
        template = self.templates[int(torch.randint(len(self.templates), (1,)))]
        return template.replace("[name]", self.embedding_name).replace("[filewords]", filewords)

    def get_input(self, batch: Mapping[str, Any], k: str, *args: Any, **kwargs: Any) -> list[Any]:
        """The model's ``get_input`` with the captions made from the templates (training, validation and the logged
        images all see them)."""
        key = kwargs.get("cond_key") or self.cond_stage_key
        if key in batch and all(isinstance(text, str) for text in batch[key]):
            batch = {**batch, key: [self.caption(text) for text in batch[key]]}
        return super().get_input(batch, k, *args, **kwargs)

    def encode_texts(self, encoder: Any, texts: Sequence[str], vectors: torch.Tensor, pooled: bool = False) -> Any:
        """``texts`` through the prompt path (:mod:`ldm.prompts`) of one encoder, the embedding's name replaced by
        ``vectors`` (n, D) as they are now: (B, 77 * k, D), or ``(z, pooled)``."""
        # Set per call: the parameter is the one the optimizer updates, wherever Lightning has moved it.
        vectors = vectors.to(encoder.token_embedding.weight.dtype)
        encoder.textual_inversion = TokenTable(encoder.tokenizer, {self.embedding_name: vectors})
        try:
            chunks = prompt_chunks(encoder, list(texts))
            return encode_chunks(encoder, chunks, max(len(x) for x in chunks), 1, return_pooled=pooled)
        finally:
            encoder.textual_inversion = None

    # -- files --------------------------------------------------------------------------------------------------------

    def embedding_path(self, step: int | None = None) -> Path:
        """``<logdir>/embeddings/<name>[-<step>].<ext>``."""
        stem = self.embedding_name if step is None else f"{self.embedding_name}-{step}"
        return Path(self.trainer.default_root_dir) / "embeddings" / f"{stem}.{self.embedding_format}"

    def save_embedding(self, path: str | Path) -> None:
        save_embedding(path, self.vectors_by_key(), step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.trainer.is_global_zero:
            self.save_embedding(self.embedding_path(self.global_step))

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.trainer.is_global_zero:
            self.save_embedding(self.embedding_path())


class TextualInversionDiffusion(TextualInversionMixin, LatentDiffusion):
    """``LatentDiffusion`` training one textual-inversion embedding (module docstring); every other weight frozen.

    Args:
        embedding_name: the embedding's name: the word its captions and later prompts use, and its file stem.
        init_text: the word(s) whose token embeddings start the vectors (A1111's "initialization text").
        num_vectors_per_token: n, the number of vectors (token positions) the embedding takes, 1 to 75.
        templates: captions with ``[name]`` and optionally ``[filewords]`` (default ``"a photo of [name]"``).
        embedding_format: ``pt`` (A1111's layout) or ``safetensors`` (``emb_params``).
        *args, **kwargs: ``LatentDiffusion``'s (``ckpt_path`` loads the model to invert into).
    """

    def make_vectors(self, init_text: str, num_vectors: int) -> None:
        encoders = prompt_encoders(self)
        if len(encoders) != 1 or self.cond_stage_forward is not None:
            raise ConfigError(
                "textual inversion here needs a model with one per-token text encoder (SD 1.x CLIP or SD 2.x "
                f"OpenCLIP) as its cond stage; {type(self.cond_stage_model).__name__} is not one."
            )
        self.embedding_vectors = nn.Parameter(initial_vectors(encoders[0][1], init_text, num_vectors))

    def vectors_by_key(self) -> dict[str | None, torch.Tensor]:
        return {None: self.embedding_vectors}

    def get_learned_conditioning(self, c: Any) -> Any:
        """Prompts (B strings) -> (B, 77 * k, D) with the embedding's vectors (:meth:`encode_texts`); anything else
        as ``LatentDiffusion`` encodes it."""
        if not isinstance(c, list | tuple) or not all(isinstance(text, str) for text in c):
            return super().get_learned_conditioning(c)
        return self.encode_texts(self.cond_stage_model, c, self.embedding_vectors)


class TextualInversionSDXL(TextualInversionMixin, SDXLDiffusion):
    """``SDXLDiffusion`` training one textual-inversion embedding: vectors for CLIP ViT-L (``clip_l``) and for
    OpenCLIP bigG (``clip_g``), each from ``init_text`` in its own encoder; arguments as
    :class:`TextualInversionDiffusion`'s, saved as safetensors whatever ``embedding_format`` says."""

    def make_vectors(self, init_text: str, num_vectors: int) -> None:
        encoders = prompt_encoders(self)
        if not encoders:
            raise ConfigError("textual inversion needs the conditioner's CLIP text encoders; this SDXL model has none.")
        self.embedding_format = "safetensors"
        self.embedding_vectors = nn.ParameterDict(
            {key: nn.Parameter(initial_vectors(encoder, init_text, num_vectors)) for key, encoder in encoders}
        )

    def vectors_by_key(self) -> dict[str | None, torch.Tensor]:
        return dict(self.embedding_vectors.items())

    def get_learned_conditioning(self, c: Any) -> dict[str, Any]:
        """:meth:`SDXLDiffusion.get_learned_conditioning`, the text encoders' outputs made with the embedding's
        vectors (:meth:`encode_texts`); the pooled vector is bigG's of the first chunk, as when generating."""
        if not isinstance(c, Mapping):
            c = {self.cond_stage_key: [c] if isinstance(c, str) else list(c)}
        c = self.size_conditioning(c, *self.output_size)
        texts = c[self.cond_stage_key]
        embeddings = {
            index: self.encode_texts(e, texts, self.embedding_vectors[key], pooled=e.return_pooled)
            for index, e in enumerate(self.conditioner.embedders)
            for key, encoder in prompt_encoders(self)
            if encoder is e
        }
        return self.to_unet_conditioning(self.conditioner(c, embeddings=embeddings))
