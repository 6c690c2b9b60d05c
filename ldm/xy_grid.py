"""An X/Y grid over any two settings of a request, as A1111's "X/Y/Z plot" script: ``--xy_x "steps:10,20,30"
--xy_y "cfg:5,7.5"`` on txt2img, img2img or inpaint.

An axis is ``name:value,value,...`` (values split as CSV, so ``"a, b"`` quotes a comma). Whole-number and number
axes also take A1111's ranges: ``1-5`` (every integer), ``1-9 (+2)`` (a step) and ``0-1 [5]`` (a count, ends
included). The axes and their A1111 labels are in :data:`AXES`; ``Prompt S/R`` replaces its first value, which must
occur in a prompt, by each value in turn (the first cell keeps the prompt as it is).

Every cell's request is made and checked against the model before anything is generated, so a bad axis name or
value ends the run in one line naming the valid ones. Each cell is one image: the run's first prompt with its
``--seed``; it is saved as a sample with its own infotext, and the grid, with column labels above and row labels
to the left drawn with PIL, as ``grid-NNNN.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.outputs import save_numbered


@dataclass(frozen=True)
class Axis:
    """One kind of axis: its A1111 label, how its values read and what they change in a request."""

    label: str
    parse: Callable[[str], Any]
    changes: Callable[[Any, Any], dict[str, Any]]  # (request, value) -> GenerationRequest fields

    @property
    def kind(self) -> str:
        """What its values are, for error messages."""
        if self.label == "Size":
            return "sizes WIDTHxHEIGHT"
        if self.parse is str:
            return "names or words"
        if isinstance(self.parse("1"), int):
            return "whole numbers or ranges such as 1-5 (+2)"
        return "numbers or ranges such as 0.5-1 [3]"


def _number(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"'{text}' is not {'a whole number' if kind is int else 'a number'}") from None

    return parse


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", text)
    if match is None:
        raise ValueError(f"'{text}' is not a size WIDTHxHEIGHT such as 512x768")
    return int(match[1]), int(match[2])


def _field(name: str) -> Callable[[Any, Any], dict[str, Any]]:
    return lambda request, value: {name: value}


def _denoising(request: Any, value: float) -> dict[str, Any]:
    return {"strength": value} if request.init_image is not None else {"denoising_strength": value}


def _prompt_sr(search: str) -> Callable[[Any, str], dict[str, Any]]:
    def changes(request: Any, value: str) -> dict[str, Any]:
        return {
            "prompts": [p.replace(search, value) for p in request.prompts],
            "negative_prompts": [p.replace(search, value) for p in request.negative_prompts],
        }

    return changes


AXES = {
    "seed": Axis("Seed", _number(int), _field("seed")),
    "var seed": Axis("Var. seed", _number(int), _field("subseed")),
    "var strength": Axis("Var. strength", _number(float), _field("subseed_strength")),
    "steps": Axis("Steps", _number(int), _field("steps")),
    "hires steps": Axis("Hires steps", _number(int), _field("hr_second_pass_steps")),
    "cfg scale": Axis("CFG Scale", _number(float), _field("scale")),
    "prompt s/r": Axis("Prompt S/R", str, _prompt_sr("")),  # the search term is filled in per axis
    "sampler": Axis("Sampler", str, _field("sampler")),
    "schedule type": Axis("Schedule type", str, _field("schedule")),
    "denoising": Axis("Denoising", _number(float), _denoising),
    "clip skip": Axis("Clip skip", _number(int), _field("clip_skip")),
    "eta": Axis("Eta", _number(float), _field("eta")),
    "size": Axis("Size", _size, lambda request, wh: {"width": wh[0], "height": wh[1]}),
    "hires upscaler": Axis("Hires upscaler", str, _field("hr_upscaler")),
    "mask blur": Axis("Mask blur", _number(int), _field("mask_blur")),
}
ALIASES = {
    "cfg": "cfg scale", "scale": "cfg scale", "sr": "prompt s/r", "prompt sr": "prompt s/r", "subseed": "var seed",
    "variation seed": "var seed", "subseed strength": "var strength", "schedule": "schedule type",
    "strength": "denoising", "denoising strength": "denoising", "hr second pass steps": "hires steps",
    "hr upscaler": "hires upscaler",
}  # fmt: skip
_RANGE = re.compile(r"\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*(?:\(\s*\+\s*([\d.]+)\s*\)|\[\s*(\d+)\s*\])?\s*")


@dataclass(frozen=True)
class AxisValues:
    """A parsed axis: its kind, its search term (Prompt S/R) and its values, as given and as read."""

    axis: Axis
    texts: tuple[str, ...]
    values: tuple[Any, ...]
    search: str | None = None

    def changes(self, request: Any, value: Any) -> dict[str, Any]:
        if self.search is not None:
            return _prompt_sr(self.search)(request, value)
        return self.axis.changes(request, value)

    def label(self, k: int) -> str:
        return f"{self.axis.label}: {self.texts[k]}"


def _expand(text: str, axis: Axis) -> list[str]:
    """A1111's ranges of a number axis's value; any other value as it is."""
    match = _RANGE.fullmatch(text)
    if axis.parse is str or axis.label == "Size" or match is None:
        return [text]
    start, end = float(match[1]), float(match[2])
    whole = isinstance(axis.parse("1"), int)
    if match[4] is not None:  # [count]
        count = int(match[4])
        values = [start + (end - start) * i / max(count - 1, 1) for i in range(count)]
    else:
        step = float(match[3]) if match[3] is not None else 1.0
        if step <= 0:
            raise ValueError(f"the range '{text}' needs a step above 0")
        values = [start + step * i for i in range(int((end - start) / step + 1e-9) + 1)]
    return [str(int(v)) if whole else f"{v:g}" for v in values]


def parse_axis(spec: str, flag: str) -> AxisValues:
    """``name:v1,v2,...`` -> AxisValues; UserError naming the valid axes or the bad value."""
    name, sep, rest = spec.partition(":")
    key = " ".join(name.lower().replace("_", " ").replace(".", " ").split())
    key = ALIASES.get(key, key)
    if not sep or key not in AXES:
        valid = ", ".join(a.label for a in AXES.values())
        raise UserError(
            f"{flag} '{spec}': unknown axis '{name.strip()}'; give NAME:V1,V2,... with NAME one of: {valid}."
        )
    axis = AXES[key]
    texts = [t.strip() for row in csv.reader([rest], skipinitialspace=True) for t in row if t.strip()]
    try:
        texts = [v for t in texts for v in _expand(t, axis)]
        values = [axis.parse(t) for t in texts]
    except ValueError as err:
        raise UserError(f"{flag} '{spec}': {err}; {axis.label} takes {axis.kind}.") from None
    if not values:
        raise UserError(f"{flag} '{spec}' has no values; list them after the colon, e.g. '{name.strip()}:1,2'.")
    return AxisValues(axis, tuple(texts), tuple(values), search=values[0] if axis.label == "Prompt S/R" else None)


@dataclass(frozen=True)
class GridPlan:
    """Every cell's checked request, row by row (Y), column by column (X)."""

    x: AxisValues | None
    y: AxisValues | None
    cells: tuple[tuple[Any, ...], ...]  # cells[row][column]: a GenerationRequest checked against the model

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        return len(self.cells), len(self.cells[0])


def plan_grid(x_spec: str | None, y_spec: str | None, base: Any, geometry: LatentGeometry) -> GridPlan | None:
    """The grid of ``--xy_x`` / ``--xy_y`` over ``base`` (one image: its first prompt and seed), every cell made and
    checked; None when neither is given. One axis alone makes a single row (X) or column (Y)."""
    if x_spec is None and y_spec is None:
        return None
    x = parse_axis(x_spec, "--xy_x") if x_spec is not None else None
    y = parse_axis(y_spec, "--xy_y") if y_spec is not None else None
    first = dataclasses.replace(
        base, prompts=base.prompts[:1], negative_prompts=base.negative_prompts[:1], seed=base.seeds[0], n=1
    )
    for axis in (x, y):
        if axis is not None and axis.search is not None:
            if not any(axis.search in p for p in (*first.prompts, *first.negative_prompts)):
                raise UserError(
                    f"Prompt S/R: '{axis.search}' is not in the prompt or the negative prompt; the first value is "
                    "the text to replace."
                )
    rows = []
    for y_value in y.values if y is not None else (None,):
        row = []
        for x_value in x.values if x is not None else (None,):
            changes = x.changes(first, x_value) if x is not None else {}
            if y is not None:
                changes.update(y.changes(dataclasses.replace(first, **changes), y_value))
            row.append(_checked(first, changes, geometry))
        rows.append(tuple(row))
    return GridPlan(x=x, y=y, cells=tuple(rows))


def _checked(first: Any, changes: dict[str, Any], geometry: LatentGeometry) -> Any:
    """The cell's request checked against the model (an img2img cell's init image is sized to it)."""
    try:
        return dataclasses.replace(first, **changes).for_model(geometry)
    except UserError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in changes.items() if k not in ("prompts", "negative_prompts"))
        raise UserError(f"X/Y grid cell {shown or 'Prompt S/R'}: {err}") from None


def run_grid(plan: GridPlan, run: Callable[[Any], Any]) -> Iterator[tuple[int, Any]]:
    """(row, result) of every cell, generated with ``run(request)`` row by row, left to right."""
    for r, row in enumerate(plan.cells):
        for request in row:
            yield r, run(request)


def draw_grid(images: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str],
              padding: int = 4) -> Image.Image:  # fmt: skip
    """The cells (rows of PIL images, any sizes: each slot is the largest) on white, labelled: column labels
    centred above the columns, row labels left of the rows (empty labels draw nothing and take no room)."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    slot_w = max(im.width for row in images for im in row)
    slot_h = max(im.height for row in images for im in row)
    label_h = max((text_size(t)[1] for t in column_labels if t), default=0)
    label_w = max((text_size(t)[0] for t in row_labels if t), default=0)
    top = label_h + 2 * padding if label_h else 0
    left = label_w + 2 * padding if label_w else 0
    columns = max(len(row) for row in images)
    grid = Image.new("RGB", (left + columns * (slot_w + padding) + padding, top + len(images) * (slot_h + padding)
                             + padding), "white")  # fmt: skip
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(column_labels):
        if text:
            x = left + padding + c * (slot_w + padding) + (slot_w - text_size(text)[0]) // 2
            draw.text((x, padding), text, fill="black", font=font)
    for r, row in enumerate(images):
        y = top + padding + r * (slot_h + padding)
        if r < len(row_labels) and row_labels[r]:
            draw.text(
                (padding, y + (slot_h - text_size(row_labels[r])[1]) // 2), row_labels[r], fill="black", font=font
            )
        for c, image in enumerate(row):
            grid.paste(image, (left + padding + c * (slot_w + padding), y))
    return grid


def grid_labels(plan: GridPlan) -> tuple[list[str], list[str]]:
    """(column labels, row labels) of a plan, A1111's ``Label: value``."""
    columns = [plan.x.label(k) for k in range(len(plan.x.texts))] if plan.x is not None else [""]
    rows = [plan.y.label(k) for k in range(len(plan.y.texts))] if plan.y is not None else [""]
    return columns, rows


def write_grid(plan: GridPlan, pipe: Any, step: Any) -> Iterator[Path]:
    """Generate every cell with ``pipe``, save each through ``step`` (an :class:`~ldm.postprocess.OutputStep`: safety
    check, watermark, a numbered sample with its infotext) and then the labelled grid with the first cell's
    infotext; yields each file as it is written."""
    rows: list[list[Image.Image]] = []
    first = None
    with tqdm(total=sum(len(r) for r in plan.cells), desc="X/Y grid", unit="image") as bar:
        for r, result in run_grid(plan, lambda request: pipe.run(request, progress=False)):
            image = step.process(result.images[:1], result.seeds[:1])[0]
            first = first or result.parameters(0)
            if step.save_samples:
                yield save_numbered(image, step.outdir / "samples", result.parameters(0))
            rows.extend([] for _ in range(r + 1 - len(rows)))
            rows[r].append(image)
            bar.update(1)
    yield save_numbered(draw_grid(rows, *grid_labels(plan)), step.outdir, first, grid=True)
