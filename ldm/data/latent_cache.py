"""Latent caching: each training image is encoded once by the model's first stage (the VAE) before training, and the
training step reads the stored encoding instead of running the VAE.

An entry is one image at one size, crop and orientation, a ``.safetensors`` file in the cache folder named by a
hash of (image path, resized size, bucket, crop corner, flip, interpolation), so that several resolutions can share a
folder. Its metadata holds the entry's *key*, a hash of everything the encoding depends on: the image file's bytes,
that placement, the first stage's weights and dtype, and the format version; and a checksum of the tensor. An entry
whose key differs (the image was edited, the VAE or its dtype changed) is stale, and one that does not parse or
fails its checksum is corrupt: both are encoded again and overwritten, never used.

What is stored is the first stage's own output, before scaling: for a KL autoencoder the posterior's moments (mean
and log-variance, ``(2C, h, w)``), so that training still draws a fresh latent from the posterior every step exactly
as :meth:`LatentDiffusion.get_first_stage_encoding` does; for a deterministic first stage (VQ) the latent itself.
Batches carry it under :data:`MOMENTS_KEY` or :data:`LATENT_KEY`; :func:`cached_first_stage` gives the model what
``encode_first_stage`` would have. ``scale_factor`` is applied in the model, so ``scale_by_std`` works unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_info
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.data.base import INTERPOLATIONS
from ldm.errors import UserError
from ldm.files import atomic_path
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

FORMAT = 1
MOMENTS_KEY = "first_stage_moments"  # (B, 2C, h, w): a KL posterior's mean and log-variance, sampled every step
LATENT_KEY = "first_stage_latent"  # (B, C, h, w): a deterministic first stage's latent


@dataclass(frozen=True)
class Placement:
    """One cached image: ``path`` resized to ``resized`` (width, height) with ``interpolation``, cropped to
    ``bucket`` (width, height) at ``crop`` (left, top), flipped left-right when ``flip``."""

    path: str
    resized: tuple[int, int]
    bucket: tuple[int, int]
    crop: tuple[int, int]
    flip: bool
    interpolation: str

    def pixels(self) -> np.ndarray:
        """The placed image: float32 (height, width, 3) in [-1, 1]."""
        with Image.open(self.path) as image:
            image = image.convert("RGB")
            if image.size != self.resized:
                image = image.resize(self.resized, resample=INTERPOLATIONS[self.interpolation])
            left, top = self.crop
            image = image.crop((left, top, left + self.bucket[0], top + self.bucket[1]))
            if self.flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's state dict (names, dtypes, shapes and values), e.g. to know a VAE again."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def first_stage_output(output: Any) -> tuple[str, torch.Tensor]:
    """``(batch key, tensor)`` to store for what a first stage's ``encode`` returned (see the module docstring)."""
    if isinstance(output, DiagonalGaussianDistribution):
        return MOMENTS_KEY, output.parameters
    if isinstance(output, tuple) and isinstance(output[0], torch.Tensor):  # a plain VQModel: (quantized, loss, info)
        return LATENT_KEY, output[0]
    if isinstance(output, torch.Tensor):
        return LATENT_KEY, output
    raise TypeError(f"cannot cache a first-stage output of type {type(output).__name__}.")


def cached_first_stage(
    batch: Mapping[str, Any],
    count: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """What ``encode_first_stage`` would give for a batch that carries cached encodings (the first ``count``, on
    ``device`` in ``dtype``): a :class:`DiagonalGaussianDistribution` or a latent tensor; None when it has none."""
    if MOMENTS_KEY in batch:
        return DiagonalGaussianDistribution(batch[MOMENTS_KEY][:count].to(device, dtype))
    if LATENT_KEY in batch:
        return batch[LATENT_KEY][:count].to(device, dtype)
    return None


class LatentCache:
    """The entries of one cache ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, placement: Placement) -> Path:
        name = hashlib.sha256(json.dumps(asdict(placement), sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{name}.safetensors"

    @staticmethod
    def key(placement: Placement, image_digest: str, encoder: str) -> str:
        """The key an entry must carry: the placement, the image's bytes and the encoder (weights and dtype)."""
        fields = {"format": FORMAT, "placement": asdict(placement), "image": image_digest, "encoder": encoder}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def read(self, placement: Placement, key: str) -> tuple[str, torch.Tensor] | None:
        """``(batch key, tensor)`` of the entry for ``placement`` if it exists with ``key`` and intact, else None."""
        try:
            with safe_open(str(self.path(placement)), framework="pt") as handle:
                metadata = handle.metadata() or {}
                kind = metadata.get("kind")
                if metadata.get("key") != key or list(handle.keys()) != [kind]:
                    return None  # stale, or not an entry of this format
                tensor = handle.get_tensor(kind)
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None  # corrupt: it is encoded again
        if tensor_checksum(tensor) != metadata.get("checksum"):
            return None
        return kind, tensor

    def write(self, placement: Placement, key: str, kind: str, tensor: torch.Tensor) -> None:
        """Store an entry, atomically: a reader sees the old file or the new one, never a part."""
        tensor = tensor.detach().float().cpu().contiguous()
        metadata = {"key": key, "kind": kind, "checksum": tensor_checksum(tensor), "image": placement.path}
        with atomic_path(self.path(placement)) as partial:
            save_file({kind: tensor}, str(partial), metadata=metadata)


Encoder = Callable[[torch.Tensor], Any]


def build_entries(
    cache: LatentCache,
    wanted: Sequence[tuple[Placement, str]],
    encode: Encoder,
    batch_size: int = 4,
) -> int:
    """Encode and store every ``(placement, key)`` of ``wanted`` whose entry is missing, stale or corrupt, in
    batches of up to ``batch_size`` images of one size; ``encode`` maps images (B, 3, H, W) in [-1, 1] to the first
    stage's output. Returns how many were built."""
    missing = [(p, k) for p, k in wanted if cache.read(p, k) is None]
    by_size: dict[tuple[int, int], list[tuple[Placement, str]]] = {}
    for placement, key in missing:
        by_size.setdefault(placement.bucket, []).append((placement, key))
    for group in by_size.values():
        for begin in range(0, len(group), batch_size):
            chunk = group[begin : begin + batch_size]
            images = torch.from_numpy(np.stack([p.pixels() for p, _ in chunk])).permute(0, 3, 1, 2)
            with torch.no_grad():
                kind, tensors = first_stage_output(encode(images))
            for (placement, key), tensor in zip(chunk, tensors, strict=True):
                cache.write(placement, key, kind, tensor)
    return len(missing)


def prepare(
    cache: LatentCache,
    placements: Sequence[Placement],
    encode: Encoder,
    encoder_id: str,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    batch_size: int = 4,
) -> tuple[dict[Placement, str], int]:
    """Make sure every placement has an intact, current entry: ``(key of each placement, how many this rank
    encoded)``. With several processes each encodes its share (every ``world_size``-th placement), then all wait at
    ``barrier`` and check every entry, so no process trains on an entry another one is still writing."""
    digests: dict[str, str] = {}
    for placement in placements:
        if placement.path not in digests:
            digests[placement.path] = file_digest(placement.path)
    keys = {p: LatentCache.key(p, digests[p.path], encoder_id) for p in placements}
    built = build_entries(cache, list(keys.items())[rank::world_size], encode, batch_size)
    if barrier is not None:
        barrier()
    broken = [p.path for p, k in keys.items() if cache.read(p, k) is None]
    if broken:
        raise UserError(
            f"{len(broken)} cached latent(s) in '{cache.folder}' could not be written or read back "
            f"(e.g. for '{broken[0]}'); check that the folder is writable and not shared with another run."
        )
    return keys, built


def model_encoder(model: Any) -> tuple[Encoder, str]:
    """``(encode, encoder id)`` for a LatentDiffusion: images (B, 3, H, W) in [-1, 1] through its first stage, on
    its device and in its dtype; the id hashes the first stage's weights and that dtype (the cache key's part)."""
    first_stage = model.first_stage_model
    dtype = next(first_stage.parameters()).dtype

    def encode(images: torch.Tensor) -> Any:
        return model.encode_first_stage(images.to(model.device, dtype))

    return encode, f"{module_fingerprint(first_stage)}|{dtype}"


def load_entry(cache: LatentCache, placement: Placement, key: str) -> tuple[str, torch.Tensor]:
    """The entry for ``placement`` during training: it was checked when caching, so a miss now is an error."""
    entry = cache.read(placement, key)
    if entry is None:
        raise UserError(
            f"the cached latent of '{placement.path}' in '{cache.folder}' changed or vanished after caching; "
            "start the run again to encode it anew."
        )
    return entry


class CacheLatents(pl.Callback):
    """Caches the latents of every dataset of the datamodule that asks for it (``cache_latents: true``) when
    fitting starts: on the model's device, after Lightning has set up the processes, before any batch is drawn.
    main.py adds it to every run; without such a dataset it does nothing."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        datasets = [d for d in getattr(datamodule, "datasets", {}).values() if getattr(d, "caches_latents", False)]
        if not datasets:
            return
        encode, encoder_id = model_encoder(pl_module)
        for dataset in datasets:
            built = dataset.prepare_latents(
                encode, encoder_id, trainer.global_rank, trainer.world_size, trainer.strategy.barrier
            )
            if built:
                rank_zero_info(f"cache_latents: rank {trainer.global_rank} encoded {built} image(s)")
