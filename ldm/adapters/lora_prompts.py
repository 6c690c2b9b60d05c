"""LoRAs named in prompts (``<lora:name:0.8>``) and on the command line, looked up in one folder.

A1111's syntax: ``<lora:NAME>`` (weight 1), ``<lora:NAME:TE>`` (one weight for both), ``<lora:NAME:TE:UNET>`` (the
text-encoder weight first, then the UNet's), and named ``te=`` / ``unet=`` (``<lora:NAME:unet=0.5>``); ``<lyco:...>``
is the same. Tags are removed from the text before it is encoded, wherever they stand. A tag only ever names a file in
the LoRA folder: a name with a path separator or a leading dot is refused, so a prompt cannot open other files.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ldm.adapters.lora import LoraFile, LoraMerger, read_lora
from ldm.errors import UserError

SUFFIXES = (".safetensors", ".pt", ".ckpt")
_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")


@dataclass(frozen=True)
class LoraTag:
    """One LoRA to apply: a name in the LoRA folder (or, from Python, a file path), and its two weights."""

    name: str | os.PathLike
    te: float = 1.0
    unet: float = 1.0


def _number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(
            f"{tag}: {text!r} is not a number; write <lora:name:0.8> or <lora:name:te=0.8:unet=0.5>."
        ) from None
    if not math.isfinite(value):
        raise UserError(f"{tag}: the weight {text!r} is not finite.")
    return value


def parse_tag(body: str) -> LoraTag:
    """The inside of ``<lora:...>`` -> LoraTag, A1111's way: positional te then unet (unet defaults to te)."""
    tag = f"<lora:{body}>"
    items = body.split(":")
    positional = [item for item in items if "=" not in item]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    if not positional or not positional[0].strip():
        raise UserError(f"{tag} names no LoRA; write <lora:name:weight>.")
    if len(positional) > 3 or set(named) - {"te", "unet"}:
        raise UserError(
            f"{tag}: takes a name, a text-encoder weight and a UNet weight (te=, unet=); DyLoRA's dyn is not supported."
        )
    te = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = _number(named.get("unet", positional[2] if len(positional) > 2 else str(te)), tag)
    return LoraTag(positional[0].strip(), te, unet)


def split_prompt(prompt: str) -> tuple[str, list[LoraTag]]:
    """``"a fox <lora:style:0.8>"`` -> ``("a fox ", [LoraTag("style", 0.8, 0.8)])``."""
    tags = [parse_tag(m[1]) for m in _TAG.finditer(prompt)]
    return _TAG.sub("", prompt), tags


def parse_cli_lora(text: str) -> LoraTag:
    """``--lora NAME[:WEIGHT[:UNET_WEIGHT]]`` -> LoraTag (the same order as the prompt tag)."""
    return parse_tag(text)


def find_lora(directory: str | os.PathLike | None, name: str) -> Path:
    """The file of a LoRA name in ``directory`` (``name.safetensors``, ``.pt``, ``.ckpt``, or the name as given
    when it ends in one of these). UserError, one line, listing the LoRAs there when it is missing."""
    if directory is None:
        raise UserError(
            f"LoRA {name!r} is named, but no LoRA folder is set: give --lora_dir DIR (lora_dir= in Python)."
        )
    folder = Path(directory)
    if not name or any(sep in name for sep in ("/", "\\", "\0")) or name.startswith(".") or ":" in name:
        raise UserError(f"LoRA name {name!r}: give a file name in {folder} without a path.")
    names = [name] if name.lower().endswith(SUFFIXES) else [name + suffix for suffix in SUFFIXES]
    for candidate in names:
        path = folder / candidate
        if path.is_file():
            return path
    there = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SUFFIXES) if folder.is_dir() else []
    listing = ", ".join(there) if there else "no LoRA files"
    raise UserError(f"LoRA {name!r} is not in {folder} (looked for {', '.join(names)}); there: {listing}.")


def check_loras(specs: Sequence[str], directory: str | os.PathLike | None) -> dict[str, Any]:
    """The scripts' ``--lora`` / ``--lora_dir``, checked before the model loads: ``{"loras": [...], "lora_dir"}``."""
    folder = Path(directory) if directory is not None else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"--lora_dir '{folder}' is not a folder.")
    tags = [parse_cli_lora(spec) for spec in specs]
    for tag in tags:
        find_lora(folder, str(tag.name))
    return {"loras": tags, "lora_dir": folder}


class Loras:
    """A pipeline's LoRAs: the folder names are looked up in, the files read so far, the set merged now.

    ``prepare(prompts, requested)`` merges the LoRAs of the prompts' tags plus ``requested`` (and unmerges the rest),
    and returns the prompts without their tags and A1111's ``Lora hashes`` infotext field.
    """

    def __init__(self, model: nn.Module, directory: str | os.PathLike | None = None) -> None:
        self.merger = LoraMerger(model)
        self.directory = Path(directory) if directory is not None else None
        self._files: dict[Path, tuple[tuple[int, int], LoraFile]] = {}

    def load(self, name: str | os.PathLike) -> LoraFile:
        """A LoRA by name in the folder (a str) or by path (a ``Path``, from Python only); read once while unchanged."""
        path = find_lora(self.directory, name) if isinstance(name, str) else Path(name)
        if not path.is_file():
            raise UserError(f"LoRA file '{path}' does not exist.")
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._files.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_lora(path, name if isinstance(name, str) else None))
            self._files[path] = cached
        return cached[1]

    def prepare(self, prompts: Sequence[str], requested: Iterable[Any] = ()) -> tuple[list[str], dict[str, str]]:
        """Merge the prompts' tags plus ``requested`` (LoraTag, ``(name, weight)`` or ``(name, te, unet)``).

        All prompts of one batch share the model, so their tags must agree (UserError otherwise). Returns the
        prompts with the tags removed, and ``{"Lora hashes": '"name: hash, ..."'}`` (empty without LoRAs).
        """
        split = [split_prompt(p) for p in prompts]
        tags = [tags for _, tags in split]
        if any(t != tags[0] for t in tags[1:]):
            raise UserError("the prompts of one batch name different LoRAs; run them in separate batches.")
        wanted = [_as_tag(item) for item in requested] + (tags[0] if tags else [])
        entries = [(self.load(tag.name), tag.te, tag.unet) for tag in wanted]
        self.merger.apply(entries)
        hashes = [f"{_alias(lora.name)}: {lora.short_hash}" for lora, _, _ in entries if lora.short_hash]
        return [text for text, _ in split], ({"Lora hashes": ", ".join(hashes)} if hashes else {})


def _alias(name: str) -> str:
    # A1111 drops the characters that would break its "name: hash, ..." list.
    return name.replace(":", "").replace(",", "")


def _as_tag(item: Any) -> LoraTag:
    if isinstance(item, LoraTag):
        return item
    if isinstance(item, str):
        return parse_cli_lora(item)
    if isinstance(item, tuple | list) and len(item) in (2, 3):
        te = float(item[1])
        return LoraTag(item[0], te, float(item[2]) if len(item) == 3 else te)
    raise UserError(f"a LoRA is a name with weights, e.g. ('style', 0.8) or ('style', 1.0, 0.5); got {item!r}.")
