"""Textual-inversion embeddings: A1111 and diffusers files, used by name in prompts as A1111 does.

Files (``.pt`` / ``.bin`` / ``.safetensors``, told apart by content and read without running anything,
:func:`ldm.serialization.read_file`):

- A1111 / the original textual-inversion layout: ``{"string_to_param": {"*": (n, D)}, "string_to_token": ...,
  "name", "step", "sd_checkpoint", "sd_checkpoint_name"}``.
- diffusers' ``learned_embeds.bin``: ``{token: (D,)}``, or ``(n, D)``; a safetensors ``{"emb_params": (n, D)}`` is
  the same one-entry layout.
- SDXL: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one set of vectors for each text encoder.

An embedding's name is its file stem (A1111's rule; the ``name`` stored inside is ignored). A prompt uses it by that
name: its BPE tokens, wherever they appear in a fragment of the tokenised prompt, are replaced by its n vectors
(longest name first where names share a start); the fragment's weight applies to every vector. The vectors go in at
the token embeddings, before the position embeddings, as the text encoder's input.

An embedding is used with a model only when every prompt encoder of the model gets vectors of its width: an
unkeyed file's vectors for a model with one text encoder (SD 1.x's CLIP ViT-L, SD 2.x's OpenCLIP ViT-H), the
``clip_l`` / ``clip_g`` entries for SDXL's two (the refiner's one takes ``clip_g``). Any other file is skipped with
one warning naming it and the widths, as A1111 skips it (so an SD 1.x embedding is not used with SDXL).
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.errors import UserError
from ldm.serialization import CheckpointError, read_file

EXTENSIONS = (".pt", ".bin", ".safetensors")
DEFAULT_DIR = "embeddings"
SDXL_KEYS = ("clip_l", "clip_g")
# The vectors of one embedding must fit one 75-token chunk.
MAX_VECTORS = 75


@dataclass
class Embedding:
    """One textual-inversion embedding.

    ``vectors``: float32 (n, D) tensors by the text encoder they are for: ``"clip_l"`` / ``"clip_g"`` for SDXL files,
    ``None`` for single-encoder files. ``step`` / ``sd_checkpoint_name``: the training metadata, where the file has it.
    """

    name: str
    vectors: dict[str | None, torch.Tensor]
    path: Path | None = None
    step: int | None = None
    sd_checkpoint_name: str | None = None
    widths: dict[str | None, int] = field(init=False)

    def __post_init__(self) -> None:
        self.widths = {key: v.shape[-1] for key, v in self.vectors.items()}

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @functools.cached_property
    def shorthash(self) -> str | None:
        """A1111's hash of the file for ``TI hashes``: its sha256, first 12 hex digits; None without a file."""
        if self.path is None:
            return None
        digest = hashlib.sha256()
        with open(self.path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:12]

    def describe_widths(self) -> str:
        return " + ".join(f"{key} {w}" if key else str(w) for key, w in self.widths.items())


def read_embedding(path: str | os.PathLike) -> Embedding:
    """The embedding in a file of any layout of the module docstring; CheckpointError naming the file otherwise."""
    path = Path(path)
    data = read_file(path)[1]
    vectors = embedding_vectors(data, path)
    step = data.get("step") if isinstance(data.get("step"), int) else None
    checkpoint_name = data.get("sd_checkpoint_name")
    return Embedding(path.stem, vectors, path, step, checkpoint_name if isinstance(checkpoint_name, str) else None)


def embedding_vectors(data: Any, path: Path) -> dict[str | None, torch.Tensor]:
    """The vectors of a file's contents, float32 (n, D) by encoder key (see :class:`Embedding`)."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"'{path}' is not a textual-inversion embedding (it holds a {type(data).__name__}).")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping):
            raise CheckpointError(
                f"'{path}': its string_to_param is a pickled {type(params).__name__} object, not a dict of tensors "
                "(the original textual-inversion code saved an nn.ParameterDict); load it in a trusted environment "
                "and save {'string_to_param': {'*': tensor}} again."
            )
        if len(params) != 1:
            raise CheckpointError(f"'{path}' holds {len(params)} embeddings in string_to_param; one file, one name.")
        return {None: _matrix(next(iter(params.values())), path, "string_to_param")}
    if all(key in data for key in SDXL_KEYS):
        vectors = {key: _matrix(data[key], path, key) for key in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise CheckpointError(f"'{path}': clip_l and clip_g hold different numbers of vectors.")
        return vectors
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(data) == 1 and len(tensors) == 1:  # diffusers {token: (D,)}, or safetensors {"emb_params": (n, D)}
        key, value = next(iter(tensors.items()))
        return {None: _matrix(value, path, key)}
    raise CheckpointError(
        f"'{path}' is not a textual-inversion embedding: expected string_to_param, clip_l + clip_g, or a single "
        f"tensor; it has {', '.join(map(str, list(data)[:8])) or 'nothing'}."
    )


def _matrix(value: Any, path: Path, key: str) -> torch.Tensor:
    """A file's vectors as float32 (n, D), checked."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (1, 2):
        raise CheckpointError(f"'{path}': {key} should be a float tensor (n, D) or (D,); got {_describe(value)}.")
    matrix = value.detach().float().reshape(-1, value.shape[-1])
    if matrix.numel() == 0 or not torch.isfinite(matrix).all():
        raise CheckpointError(f"'{path}': {key} is empty or holds NaN / inf.")
    return matrix


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def embedding_files(directory: str | os.PathLike) -> list[Path]:
    """The embedding files under ``directory`` (recursively, as A1111; hidden ones skipped), sorted."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"embeddings directory '{root}' does not exist; give a folder of .pt / .safetensors files.")
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def embeddings_folder(directory: str | os.PathLike | None) -> Path | None:
    """The scripts' ``--embeddings_dir``: the folder given (UserError unless it is one), else ``embeddings/`` in the
    working directory where there is one (A1111's folder), else None."""
    if directory is None:
        return Path(DEFAULT_DIR) if Path(DEFAULT_DIR).is_dir() else None
    if not Path(directory).is_dir():
        raise UserError(f"--embeddings_dir '{directory}' is not a folder; give the folder of embedding files.")
    return Path(directory)


def load_embeddings(directory: str | os.PathLike) -> list[Embedding]:
    """Every embedding under ``directory``. A file that cannot be read is skipped with a warning naming it (one
    broken download does not stop generation, as in A1111); of two files with the same stem the first is kept."""
    embeddings: dict[str, Embedding] = {}
    for path in embedding_files(directory):
        try:
            embedding = read_embedding(path)
        except CheckpointError as err:
            warnings.warn(f"embedding skipped: {err}", stacklevel=2)
            continue
        if embedding.name in embeddings:
            warnings.warn(
                f"embedding '{path}' skipped: '{embeddings[embedding.name].path}' has the same name.", stacklevel=2
            )
            continue
        embeddings[embedding.name] = embedding
    return list(embeddings.values())


def save_embedding(
    path: str | os.PathLike,
    vectors: Mapping[str | None, torch.Tensor],
    step: int | None = None,
    sd_checkpoint_name: str | None = None,
) -> None:
    """Write an embedding that A1111 and :func:`read_embedding` read, atomically; the name is the file stem.

    ``vectors``: ``{None: (n, D)}`` for a single-encoder model, ``{"clip_l": ..., "clip_g": ...}`` for SDXL.
    ``.pt``: A1111's layout (``string_to_param``, ``string_to_token``, ``name``, ``step``, ...), plain tensors and
    dicts only, so a ``weights_only`` reader takes it; ``.safetensors``: ``emb_params`` (or ``clip_l`` / ``clip_g``)
    with the step and checkpoint name as metadata. SDXL embeddings are written as safetensors only, as A1111 reads
    them.
    """
    from ldm.files import atomic_path

    path = Path(path)
    tensors = {key: v.detach().float().cpu().contiguous() for key, v in vectors.items()}
    keyed = None not in tensors
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            metadata = {"name": path.stem, "step": str(step), "sd_checkpoint_name": str(sd_checkpoint_name)}
            save_file(tensors if keyed else {"emb_params": tensors[None]}, tmp, metadata=metadata)
        elif keyed:
            raise UserError(f"'{path}': SDXL embeddings (clip_l + clip_g) are saved as .safetensors; use that suffix.")
        else:
            data = {
                "string_to_token": {"*": 265},  # A1111 writes this id (the token "*"); readers ignore it
                "string_to_param": {"*": tensors[None]},
                "name": path.stem,
                "step": step,
                "sd_checkpoint": None,
                "sd_checkpoint_name": sd_checkpoint_name,
            }
            torch.save(data, tmp)


# ---------------------------------------------------------------------------------------------------------------------
# Using embeddings in prompts


@dataclass(frozen=True, eq=False)
class EmbeddingRun:
    """An embedding's place in a tokenised prompt: its name and its vectors for this encoder, (n, D)."""

    name: str
    vectors: torch.Tensor

    def __len__(self) -> int:
        """The token positions it takes."""
        return self.vectors.shape[0]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Its positions' vectors, (D,) each."""
        return iter(self.vectors.unbind(0))


class TokenTable:
    """The embeddings one text encoder uses, found by their names' BPE ids (A1111's ``ids_lookup``).

    Args:
        tokenizer: the encoder's tokenizer (``encode(text) -> ids``).
        vectors: name -> (n, D) vectors in the encoder's token-embedding width.
    """

    def __init__(self, tokenizer: Any, vectors: Mapping[str, torch.Tensor]) -> None:
        self.vectors = dict(vectors)
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in self.vectors:
            ids = tuple(tokenizer.encode(name))
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for candidates in self._by_first.values():
            candidates.sort(key=lambda entry: -len(entry[0]))

    def substitute(self, ids: Sequence[int]) -> list[int | EmbeddingRun]:
        """``ids`` with each embedding name's token sequence replaced by an :class:`EmbeddingRun`."""
        out: list[int | EmbeddingRun] = []
        position = 0
        while position < len(ids):
            match = next(
                (
                    (names_ids, name)
                    for names_ids, name in self._by_first.get(ids[position], ())
                    if tuple(ids[position : position + len(names_ids)]) == names_ids
                ),
                None,
            )
            if match is None:
                out.append(ids[position])
                position += 1
            else:
                out.append(EmbeddingRun(match[1], self.vectors[match[1]]))
                position += len(match[0])
        return out

    def used(self, ids: Sequence[int]) -> list[str]:
        """The names of the embeddings ``ids`` uses, in order of first use."""
        return list(dict.fromkeys(item.name for item in self.substitute(ids) if isinstance(item, EmbeddingRun)))


def prompt_encoders(model: Any) -> list[tuple[str | None, Any]]:
    """The per-token text encoders reading a model's prompts, with the file key each takes (see the module
    docstring): SDXL's conditioner embedders (``clip_l`` for CLIP, ``clip_g`` for OpenCLIP), else the cond stage."""
    conditioner = getattr(model, "conditioner", None)
    if getattr(model, "conditions_on_batch", False) and conditioner is not None:
        from ldm.modules.encoders.modules import FrozenCLIPEmbedder

        return [
            ("clip_l" if isinstance(e, FrozenCLIPEmbedder) else "clip_g", e)
            for e in conditioner.embedders
            if e.input_keys == [model.cond_stage_key] and getattr(e, "per_token", False)
        ]
    encoder = getattr(model, "cond_stage_model", None)
    if getattr(encoder, "per_token", False) and hasattr(encoder, "token_embedding"):
        return [(None, encoder)]
    return []


def encoder_vectors(embedding: Embedding, encoders: Sequence[tuple[str | None, Any]]) -> list[torch.Tensor] | None:
    """The embedding's vectors for each encoder, or None when some encoder gets none of its width."""
    chosen = []
    for key, encoder in encoders:
        keyed = len(encoders) > 1 or None not in embedding.vectors
        vectors = embedding.vectors.get(key if keyed else None)
        if vectors is None or vectors.shape[-1] != encoder.token_embedding.embedding_dim:
            return None
        chosen.append(vectors)
    return chosen if encoders else None


def attach_embeddings(model: Any, embeddings: Iterable[Embedding]) -> list[Embedding]:
    """Make a model's prompts use ``embeddings`` (replacing any attached before): each prompt encoder gets a
    :class:`TokenTable` as ``textual_inversion``, which :func:`ldm.prompts.prompt_chunks` consults.

    Returns the embeddings in use; the others are skipped with one warning each (module docstring), all of them
    with one warning for a model without a per-token text encoder.
    """
    embeddings = list(embeddings)
    encoders = prompt_encoders(model)
    if not encoders:
        if embeddings:
            warnings.warn(
                f"textual-inversion embeddings need a CLIP text encoder; this {type(model).__name__} has none, so "
                f"the {len(embeddings)} embedding(s) are not used.",
                stacklevel=2,
            )
        return []
    dims = [(key, encoder.token_embedding.embedding_dim) for key, encoder in encoders]
    widths = " + ".join(f"{key} {dim}" if key else str(dim) for key, dim in dims)
    used, tables = [], [{} for _ in encoders]
    for embedding in embeddings:
        chosen = encoder_vectors(embedding, encoders)
        if chosen is None or embedding.num_vectors > MAX_VECTORS:
            why = f"{embedding.num_vectors} vectors, more than a chunk's {MAX_VECTORS}" if chosen else "its width"
            warnings.warn(
                f"embedding '{embedding.name}' ({embedding.path or 'in memory'}) skipped: {why} "
                f"({embedding.describe_widths()} wide) does not fit this model's text encoders ({widths}).",
                stacklevel=2,
            )
            continue
        used.append(embedding)
        for table, (_, encoder), vectors in zip(tables, encoders, chosen, strict=True):
            table[embedding.name] = vectors.to(encoder.token_embedding.weight.device)
    for (_, encoder), table in zip(encoders, tables, strict=True):
        encoder.textual_inversion = TokenTable(encoder.tokenizer, table) if table else None
    model.textual_inversions = {embedding.name: embedding for embedding in used}
    return used


def used_embeddings(model: Any, texts: Iterable[str]) -> list[Embedding]:
    """The attached embeddings that ``texts`` (prompts and negative prompts) use, in order of first use."""
    from ldm.prompts import BREAK, parse_prompt_attention

    attached = getattr(model, "textual_inversions", None) or {}
    encoders = prompt_encoders(model)
    table = getattr(encoders[0][1], "textual_inversion", None) if encoders else None
    if not attached or table is None:
        return []
    names: dict[str, None] = {}
    for text in texts:
        with warnings.catch_warnings():  # the prompt's own encoding has warned about its weights already
            warnings.simplefilter("ignore")
            fragments = parse_prompt_attention(text)
        for fragment in fragments:
            if fragment is not BREAK:
                names.update(dict.fromkeys(table.used(encoders[0][1].tokenizer.encode(fragment[0]))))
    return [attached[name] for name in names]


def ti_hashes_field(model: Any, texts: Iterable[str]) -> dict[str, str]:
    """A1111's infotext entry for the embeddings ``texts`` use: ``{"TI hashes": "name: hash, ..."}`` (names without
    ``:`` and ``,``), or nothing."""
    entries = [
        f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}"
        for e in used_embeddings(model, texts)
        if e.shorthash
    ]
    return {"TI hashes": ", ".join(entries)} if entries else {}
