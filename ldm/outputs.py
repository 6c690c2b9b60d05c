"""Everything between generated pixels and files: loading inputs, numbered outputs, grids, PNG metadata and model
hashes (the safety checker and watermark are in :mod:`ldm.postprocess`).

Output files follow CompVis: ``outdir/samples/00000.png, 00001.png, ...`` numbered after the highest existing file,
and ``outdir/grid-0000.png``. Each PNG carries a ``parameters`` text chunk in AUTOMATIC1111's format, so A1111's
"PNG Info" tab and other tools read the prompt and settings back::

    a painting of a fox
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: model
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ldm.devices import available_memory, gib
from ldm.errors import UserError
from ldm.files import atomic_path

SAMPLE_NAME = re.compile(r"^(\d+)\.png$")
GRID_NAME = re.compile(r"^grid-(\d+)\.png$")
PARAMETERS_KEY = "parameters"

# ---------------------------------------------------------------------------------------------------------------------
# Reading inputs


def load_image(path: str | os.PathLike, what: str = "image", mode: str = "RGB") -> Image.Image:
    """Open an image file fully (so a truncated file fails here, not later) and convert it to ``mode``.

    Raises FileNotFoundError for a missing file and ValueError for one PIL cannot decode or that would not fit in
    memory decoded, all naming ``what`` (e.g. ``"init image"``) and the path.
    """
    path = Path(path)
    with _open_image(path, what) as image:
        # PIL's RGB takes 4 bytes a pixel, as do its other multi-band and 32-bit modes.
        needed = image.width * image.height * sum(1 if m in ("1", "L", "P") else 4 for m in (image.mode, mode))
        available = available_memory(torch.device("cpu"))
        if available is not None and needed > available:
            raise UserError(
                f"{what} '{path}' is {image.width}x{image.height}: decoding it needs about {gib(needed)} of memory "
                f"but {gib(available)} is available; give a smaller image."
            )
        try:
            image.load()
            return image.convert(mode)
        except (OSError, SyntaxError, ValueError) as err:
            raise _unreadable(what, path, err) from None


def image_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(width, height) of an image file, read from its header: nothing is decoded. Errors as :func:`load_image`."""
    with _open_image(Path(path), what) as image:
        return image.size


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist; check the path.")
    try:
        with warnings.catch_warnings():
            # PIL warns of images past 89M pixels; load_image checks what decoding needs against the memory there is.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _unreadable(what, path, err) from None


def _unreadable(what: str, path: Path, err: Exception) -> UserError:
    reason = "not an image file PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
    return UserError(f"cannot read {what} '{path}': {reason}. Give a PNG or JPEG image.")


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a ``--from-file`` text file, one per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file '{path}' does not exist; check the path.")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read prompt file '{path}': {err}. Give a UTF-8 text file.") from None
    if not prompts:
        raise UserError(f"prompt file '{path}' has no prompts; write one prompt a line.")
    return prompts


# ---------------------------------------------------------------------------------------------------------------------
# Numbered files


def next_number(folder: str | os.PathLike, pattern: re.Pattern[str] = SAMPLE_NAME) -> int:
    """One more than the highest number among ``folder``'s files matching ``pattern`` (0 for none or no folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := pattern.match(name))]
    return max(numbers, default=-1) + 1


def save_numbered(
    image: Image.Image, folder: str | os.PathLike, parameters: str | None = None, grid: bool = False
) -> Path:
    """Save ``image`` as the next ``NNNNN.png`` (or ``grid-NNNN.png``) in ``folder`` and return its path.

    Written with :func:`~ldm.files.atomic_path`, so a run killed mid-write leaves no partial image under a sample's
    name (the temporary file stays; its name matches no pattern). Names are claimed without replacing any file, so
    two runs writing to the same folder at once never overwrite each other: whoever loses the race for a number
    writes its image again under the next free one.
    """
    folder = Path(folder)
    pattern, template = (GRID_NAME, "grid-{:04d}.png") if grid else (SAMPLE_NAME, "{:05d}.png")
    number = next_number(folder, pattern)
    while True:
        path = folder / template.format(number)
        try:
            with atomic_path(path, overwrite=False) as tmp, open(tmp, "wb") as handle:
                image.save(handle, format="PNG", pnginfo=png_info(parameters))
            return path
        except FileExistsError:
            number += 1


def make_grid(images: Sequence[Image.Image], images_per_row: int, padding: int = 2) -> Image.Image:
    """Tile equally sized images row by row, ``images_per_row`` to a row, with ``padding`` black pixels around each
    (the layout of CompVis's grids, made with torchvision's ``make_grid(nrow=n_rows)``)."""
    if not images:
        raise ValueError("a grid needs at least one image.")
    columns = max(1, min(images_per_row, len(images)))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding))
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid.paste(image, (padding + column * (width + padding), padding + row * (height + padding)))
    return grid


# ---------------------------------------------------------------------------------------------------------------------
# A1111 "parameters" metadata


NEGATIVE_MARKER = "Negative prompt:"
# Line breaks that both the attention syntax and the CLIP tokenizers read as a space. The other characters
# str.splitlines() breaks at (\v, \x1c-\x1e, \x85) stay: the tokenizer's ftfy drops them or makes \x85 an ellipsis,
# while the attention syntax reads \v as whitespace, so no replacement would keep the prompt's meaning.
_LINE_BREAK = re.compile("[\n\r\f\u2028\u2029]")
# The characters str.splitlines() breaks at that json.dumps leaves unescaped.
_RAW_IN_JSON = re.compile("[\x85\u2028\u2029]")
# A prompt line that would read as the negative prompt, or as an escaped one.
_MARKER_LOOKALIKE = re.compile(r"(?:\(\))*" + re.escape(NEGATIVE_MARKER))


def _quote(value: Any) -> str:
    """A1111 quotes values that would break its ``key: value, ...`` line as JSON strings; so are values with edge
    whitespace (which the reader strips) or any line break, which is escaped."""
    text = str(value)
    if text == text.strip() and len(text.splitlines()) <= 1 and not any(c in text for c in ',:"'):
        return text
    return _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(text, ensure_ascii=False))


def _one_line(text: str) -> str:
    """``text`` with its line breaks (``_LINE_BREAK``) as spaces: the same prompt to the tokenizer and the syntax."""
    return _LINE_BREAK.sub(" ", text)


def format_parameters(prompt: str, negative_prompt: str | None, fields: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, ``Negative prompt: ...`` (when there is one), then ``Key: value, ...``.

    Fields whose value is None are left out. The reader tells the parts apart by line, so that no prompt can pose as
    another part (a prompt containing ``"\\nNegative prompt: ..."`` or ending in ``"\\nSteps: 1, Seed: 2"``):

    - line breaks (``\\n``, ``\\r``, ``\\f``, U+2028, U+2029) in the prompt and the negative prompt become spaces;
    - a prompt that starts with ``Negative prompt:`` (after any number of ``()``) gets one more ``()`` in front, which
      :func:`parse_parameters` removes; empty brackets weight nothing, so A1111 reads the same prompt;
    - field values are quoted as JSON strings, line breaks escaped, where they contain ``,``, ``:``, ``"``, a line break
      or edge whitespace.

    ``parse_parameters(format_parameters(prompt, negative, fields))`` gives back the prompts (on one line as above, a
    None negative as ``""``) and ``str()`` of each field value.
    """
    prompt = _one_line(prompt)
    if _MARKER_LOOKALIKE.match(prompt):
        prompt = "()" + prompt
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_MARKER} {_one_line(negative_prompt)}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _parse_fields(line: str) -> dict[str, str] | None:
    """``Key: value, ...`` -> dict, or None when the line is not such a list (then it is part of the prompt)."""
    fields, position = {}, 0
    while position < len(line):
        match = _FIELD.match(line, position)
        if match is None or match.end() == position:
            return None
        value = match.group(2).strip()
        fields[match.group(1).strip()] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return fields or None


def parse_parameters(text: str) -> dict[str, str]:
    """Read an A1111 ``parameters`` text back: ``{"Prompt": ..., "Negative prompt": ..., "Steps": "50", ...}``.

    Values stay strings, as A1111 writes them (``"Size": "512x512"``). Multi-line prompts (which A1111 writes) are
    read back with their line breaks; see :func:`format_parameters` for what this package writes. A text of one
    line with three or more ``Key: value`` fields is A1111's for an empty prompt.
    """
    # Only trailing line breaks go: an empty prompt is an empty first line.
    lines = text.rstrip("\n").split("\n")
    last = lines[-1]
    fields = _parse_fields(last) if not last.startswith(NEGATIVE_MARKER) else None
    if len(lines) == 1 and fields is not None and (text.endswith("\n") or len(fields) < 3):
        # A1111 strips its text, so an empty prompt leaves the parameters line alone; its reader takes a single line
        # for parameters when it holds three or more. A prompt alone, as format_parameters writes it, ends in "\n".
        fields = None
    if fields is not None:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for i, line in enumerate(lines):
        if i == 0 and line.startswith("()") and _MARKER_LOOKALIKE.match(line):
            line = line[2:]  # the prompt, escaped by format_parameters
        elif not in_negative and line.startswith(NEGATIVE_MARKER):
            in_negative = True
            line = line.removeprefix(NEGATIVE_MARKER).removeprefix(" ")
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **(fields or {})}


def png_info(parameters: str | None) -> PngImagePlugin.PngInfo | None:
    """A PNG text chunk ``parameters`` (UTF-8, so any prompt survives), or None for no metadata."""
    if parameters is None:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_KEY, parameters)
    return info


def read_parameters(path: str | os.PathLike) -> str | None:
    """The ``parameters`` text of a PNG written by this package or A1111; None when it has none."""
    with Image.open(path) as image:
        image.load()
        return image.info.get(PARAMETERS_KEY)


# ---------------------------------------------------------------------------------------------------------------------
# Model hash


_hashes: dict[tuple[str, int, int], str] = {}


def _hash_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm" / "model-hashes.json"


def model_hash(path: str | os.PathLike) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256.

    Hashing a 4 GB checkpoint takes seconds, so results are cached by (path, size, mtime), in memory and in
    ``$XDG_CACHE_HOME/ldm/model-hashes.json`` (best effort: an unwritable cache only costs time).
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _hashes:
        return _hashes[key]
    cache_file = _hash_cache_file()
    disk_key = f"{key[0]}|{key[1]}|{key[2]}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(disk_key), str):
        _hashes[key] = cache[disk_key]
        return cache[disk_key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    _hashes[key] = digest.hexdigest()[:10]
    cache[disk_key] = _hashes[key]
    try:
        with atomic_path(cache_file) as tmp:
            tmp.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass
    return _hashes[key]
