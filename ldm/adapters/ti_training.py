"""Textual-inversion training with main.py: a frozen latent diffusion model in which only an embedding's vectors
learn (``configs/textual-inversion/``).

The model is a ``LatentDiffusion`` with a per-token text encoder (SD 1.x's CLIP, SD 2.x's OpenCLIP). The new
embedding has ``num_vectors_per_token`` vectors, initialised as A1111 does from the token embeddings of
``init_text`` (vector i is the init text's token ``i * k // n`` of its first k <= n tokens). Each training caption is
one of ``templates`` (picked at random per sample, from torch's global generator, so seeded runs repeat) with
``[name]`` replaced by the embedding's name and ``[filewords]`` by the data's caption (A1111's template syntax); the
name then becomes the vectors exactly as it does when generating (:mod:`ldm.adapters.embeddings`), so the
embedding is trained through the same code path it is used with.

The embedding is written to ``<logdir>/embeddings/``: ``<name>-<step>.<ext>`` with every checkpoint and
``<name>.<ext>`` when training ends, ``ext`` being ``embedding_format`` (``pt``: A1111's layout; ``safetensors``:
``emb_params``). Either file works with ``--embeddings_dir`` and in A1111. The Lightning checkpoints keep the whole
model, so that main.py resumes a run as any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.adapters.embeddings import MAX_VECTORS, TokenTable, prompt_encoders, save_embedding
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
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


class TextualInversionDiffusion(LatentDiffusion):
    """``LatentDiffusion`` training one textual-inversion embedding (module docstring); every other weight frozen.

    Args:
        embedding_name: the embedding's name: the word its captions and later prompts use, and its file stem.
        init_text: the word(s) whose token embeddings start the vectors (A1111's "initialization text").
        num_vectors_per_token: n, the number of vectors (token positions) the embedding takes, 1 to 75.
        templates: captions with ``[name]`` and optionally ``[filewords]`` (default ``"a photo of [name]"``).
        embedding_format: ``pt`` (A1111's layout) or ``safetensors`` (``emb_params``).
        *args, **kwargs: ``LatentDiffusion``'s (``ckpt_path`` loads the model to invert into).
    """

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
        encoders = prompt_encoders(self)
        if len(encoders) != 1 or self.cond_stage_forward is not None:
            raise ConfigError(
                "textual inversion here needs a model with one per-token text encoder (SD 1.x CLIP or SD 2.x "
                f"OpenCLIP) as its cond stage; {type(self.cond_stage_model).__name__} is not one."
            )
        self.requires_grad_(False)
        self.embedding_name = embedding_name
        self.embedding_format = embedding_format
        self.embedding_vectors = nn.Parameter(initial_vectors(encoders[0][1], init_text, num_vectors_per_token))
        # The captions reach forward() as text and are encoded there, with gradients to the vectors (the encoder
        # itself stays frozen: trainable_parameters is the vectors alone).
        self.cond_stage_trainable = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.embedding_vectors]

    def caption(self, filewords: str) -> str:
        """A training caption: a random template with ``[name]`` and ``[filewords]`` filled in."""
        template = self.templates[int(torch.randint(len(self.templates), (1,)))]
        return template.replace("[name]", self.embedding_name).replace("[filewords]", filewords)

    def get_input(self, batch: Mapping[str, Any], k: str, *args: Any, **kwargs: Any) -> list[Any]:
        """:meth:`LatentDiffusion.get_input` with the captions made from the templates (training, validation and
        the logged images all see them)."""
        key = kwargs.get("cond_key") or self.cond_stage_key
        if key in batch and all(isinstance(text, str) for text in batch[key]):
            batch = {**batch, key: [self.caption(text) for text in batch[key]]}
        return super().get_input(batch, k, *args, **kwargs)

    def get_learned_conditioning(self, c: Any) -> Any:
        """Prompts (B strings) -> (B, 77 * k, D) through the prompt path (:mod:`ldm.prompts`), the embedding's name
        replaced by its vectors as they are now; anything else as ``LatentDiffusion`` encodes it."""
        if not isinstance(c, list | tuple) or not all(isinstance(text, str) for text in c):
            return super().get_learned_conditioning(c)
        # Set per call: the parameter is the one the optimizer updates, wherever Lightning has moved it.
        self.cond_stage_model.textual_inversion = TokenTable(
            self.cond_stage_model.tokenizer, {self.embedding_name: self.vectors()}
        )
        try:
            chunks = prompt_chunks(self.cond_stage_model, list(c))
            return encode_chunks(self.cond_stage_model, chunks, max(len(x) for x in chunks), 1)
        finally:
            self.cond_stage_model.textual_inversion = None

    def vectors(self) -> torch.Tensor:
        """The embedding's vectors (n, D) in the encoder's dtype."""
        return self.embedding_vectors.to(self.cond_stage_model.token_embedding.weight.dtype)

    # -- files --------------------------------------------------------------------------------------------------------

    def embedding_path(self, step: int | None = None) -> Path:
        """``<logdir>/embeddings/<name>[-<step>].<ext>``."""
        stem = self.embedding_name if step is None else f"{self.embedding_name}-{step}"
        return Path(self.trainer.default_root_dir) / "embeddings" / f"{stem}.{self.embedding_format}"

    def save_embedding(self, path: str | Path) -> None:
        save_embedding(path, {None: self.embedding_vectors}, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.trainer.is_global_zero:
            self.save_embedding(self.embedding_path(self.global_step))

    def on_train_end(self) -> None:
        super().on_train_end()
        if self.trainer.is_global_zero:
            self.save_embedding(self.embedding_path())
