"""Layouts as token sequences: the conditioning of LDM's layout-to-image model (``cond_stage_key: coordinates_bbox``).

A layout is a list of objects, each a category and a bounding box relative to the image. It becomes one flat
sequence of integer tokens, the layout of taming-transformers' ``ObjectsBoundingBoxConditionalBuilder`` that the
CompVis model was trained on:

- each object is a triple ``(representation, top-left token, bottom-right token)``; ``representation`` is the
  category number plus ``no_object_classes`` times a bit field of the object's flags (1: group of, 2: occluded,
  4: depiction, 8: inside), each bit used only where the builder is told to;
- a corner ``(x, y)`` in [0, 1] is one token on a grid of ``s = int(sqrt(no_tokens))`` sections per side:
  ``round(y * (s - 1)) * s + round(x * (s - 1))``;
- the sequence holds ``no_max_objects`` triples, the missing ones padded with the no-object token
  ``no_tokens - 1`` (all three entries), then, with ``encode_crop``, the crop's two corner tokens.

For ``layout2img-openimages256`` (vocab_size 8192, max_seq_len 92): 30 objects, 8192 tokens (90 sections a side),
crop encoded: 30 * 3 + 2 = 92 tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import cycle

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.errors import UserError

BoundingBox = tuple[float, float, float, float]  # (x0, y0, width, height), relative to the image
FULL_CROP: BoundingBox = (0.0, 0.0, 1.0, 1.0)
# matplotlib's tab10 colours, one per object in turn.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
CROP_OUTLINE = (63, 63, 63)


@dataclass(frozen=True)
class LayoutObject:
    """One object of a layout: a category number and its bounding box ``(x0, y0, w, h)`` in [0, 1], with the flags
    of OpenImages' annotations."""

    category: int
    bbox: BoundingBox
    is_group_of: bool = False
    is_occluded: bool = False
    is_depiction: bool = False
    is_inside: bool = False


def _overlap(a: BoundingBox, b: BoundingBox) -> float:
    """Area of the intersection of two (x0, y0, w, h) boxes."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def _clamp(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def _to_crop(bbox: BoundingBox, crop: BoundingBox, flip: bool) -> BoundingBox:
    """``bbox`` relative to ``crop`` (clipped to it), mirrored left-right with ``flip``."""
    x0 = _clamp((bbox[0] - crop[0]) / crop[2])
    y0 = _clamp((bbox[1] - crop[1]) / crop[3])
    width = min(bbox[2] / crop[2], 1.0 - x0)
    height = min(bbox[3] / crop[3], 1.0 - y0)
    return (1.0 - (x0 + width) if flip else x0), y0, width, height


class ObjectsBoundingBoxConditionalBuilder:
    """Layouts <-> token sequences (see the module docstring for the layout).

    Args:
        no_object_classes: number of object categories; an object's category is in ``[0, no_object_classes)``.
        no_max_objects: objects per sequence; more are dropped, fewer padded with the no-object token.
        no_tokens: size of the token vocabulary (the cond stage's ``vocab_size``).
        encode_crop: append the crop's corner tokens; boxes then stay relative to the full image.
        use_group_parameter: encode the "group of" flag in the representation.
        use_additional_parameters: encode the occluded / depiction / inside flags too.
    """

    def __init__(
        self,
        no_object_classes: int,
        no_max_objects: int = 30,
        no_tokens: int = 8192,
        encode_crop: bool = True,
        use_group_parameter: bool = True,
        use_additional_parameters: bool = False,
    ) -> None:
        for name, value in (("no_object_classes", no_object_classes), ("no_max_objects", no_max_objects)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(no_tokens, bool) or not isinstance(no_tokens, int) or no_tokens < 5:
            raise UserError(
                f"no_tokens must be an integer of at least 5 (a 2x2 grid and a no-object token), got {no_tokens!r}."
            )
        self.no_object_classes = no_object_classes
        self.no_max_objects = no_max_objects
        self.no_tokens = no_tokens
        self.encode_crop = encode_crop
        self.use_group_parameter = use_group_parameter
        self.use_additional_parameters = use_additional_parameters
        self.no_sections = math.isqrt(no_tokens)

    @property
    def none(self) -> int:
        """The no-object (padding) token."""
        return self.no_tokens - 1

    @property
    def embedding_dim(self) -> int:
        """Length of a token sequence: 3 per object, plus 2 for the crop."""
        return 3 * self.no_max_objects + (2 if self.encode_crop else 0)

    # -- coordinates --

    def tokenize_coordinates(self, x: float, y: float) -> int:
        """The grid token nearest to the point (x, y) in [0, 1]^2, rows top to bottom."""
        last = self.no_sections - 1
        return int(round(y * last)) * self.no_sections + int(round(x * last))

    def coordinates_from_token(self, token: int) -> tuple[float, float]:
        """The point (x, y) in [0, 1]^2 of a grid token."""
        last = self.no_sections - 1
        return (token % self.no_sections) / last, (token // self.no_sections) / last

    def token_pair_from_bbox(self, bbox: BoundingBox) -> tuple[int, int]:
        """Tokens of a box's top-left and bottom-right corners."""
        return self.tokenize_coordinates(bbox[0], bbox[1]), self.tokenize_coordinates(
            bbox[0] + bbox[2], bbox[1] + bbox[3]
        )

    def bbox_from_token_pair(self, top_left: int, bottom_right: int) -> BoundingBox:
        x0, y0 = self.coordinates_from_token(top_left)
        x1, y1 = self.coordinates_from_token(bottom_right)
        return x0, y0, x1 - x0, y1 - y0

    # -- objects --

    def object_representation(self, obj: LayoutObject) -> int:
        """The object's first token: its category plus ``no_object_classes`` times its flag bits."""
        if not 0 <= obj.category < self.no_object_classes:
            raise UserError(
                f"object category {obj.category} is not in [0, {self.no_object_classes}); give a category number."
            )
        flags = 0
        if self.use_group_parameter:
            flags |= 1 * obj.is_group_of
        if self.use_additional_parameters:
            flags |= 2 * obj.is_occluded | 4 * obj.is_depiction | 8 * obj.is_inside
        representation = obj.category + self.no_object_classes * flags
        if representation >= self.none:
            raise UserError(
                f"object {obj} needs the token {representation}, past the vocabulary of {self.no_tokens} tokens; "
                "use fewer categories or leave out its flags."
            )
        return representation

    def representation_to_object(self, representation: int, bbox: BoundingBox) -> LayoutObject:
        flags = representation // self.no_object_classes
        return LayoutObject(
            category=representation % self.no_object_classes,
            bbox=bbox,
            is_group_of=bool(flags & 1) and self.use_group_parameter,
            is_occluded=bool(flags & 2) and self.use_additional_parameters,
            is_depiction=bool(flags & 4) and self.use_additional_parameters,
            is_inside=bool(flags & 8) and self.use_additional_parameters,
        )

    def build(
        self,
        objects: Sequence[LayoutObject],
        crop_coordinates: BoundingBox | None = None,
        horizontal_flip: bool = False,
        rng: random.Random | None = None,
    ) -> torch.Tensor:
        """The token sequence of a layout: (embedding_dim,) int64.

        Objects past ``no_max_objects`` are dropped, then (with ``rng``, as in training) the rest are shuffled;
        objects outside ``crop_coordinates`` (default: the whole image) are left out, the others clipped to it.
        Without ``encode_crop`` boxes are made relative to the crop; ``horizontal_flip`` mirrors them (and the crop).
        """
        objects = list(objects)[: self.no_max_objects]
        if rng is not None:
            rng.shuffle(objects)
        crop = tuple(crop_coordinates) if crop_coordinates else FULL_CROP
        objects = [o for o in objects if _overlap(o.bbox, crop) > 0.0]
        if self.encode_crop:
            objects = [replace(o, bbox=_to_crop(o.bbox, FULL_CROP, horizontal_flip)) for o in objects]
            if horizontal_flip:
                crop = (1.0 - (crop[0] + crop[2]), crop[1], crop[2], crop[3])
            extra = list(self.token_pair_from_bbox(crop))
        else:
            objects = [replace(o, bbox=_to_crop(o.bbox, crop, horizontal_flip)) for o in objects]
            extra = []
        tokens = [(self.object_representation(o), *self.token_pair_from_bbox(o.bbox)) for o in objects]
        tokens += [(self.none,) * 3] * (self.no_max_objects - len(tokens))
        return torch.tensor([t for triple in tokens for t in triple] + extra, dtype=torch.long)

    def inverse_build(self, tokens: torch.Tensor | Sequence[int]) -> tuple[list[LayoutObject], BoundingBox | None]:
        """The objects of a token sequence (embedding_dim,) and its crop (None without ``encode_crop``); boxes are
        the grid's, so within half a grid cell of those built."""
        values = [int(t) for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)]
        if len(values) != self.embedding_dim:
            raise UserError(f"a layout has {self.embedding_dim} tokens for this builder, got {len(values)}.")
        crop = None
        if self.encode_crop:
            crop = self.bbox_from_token_pair(values[-2], values[-1])
            values = values[:-2]
        triples = [values[i : i + 3] for i in range(0, len(values), 3)]
        objects = [
            self.representation_to_object(r, self.bbox_from_token_pair(a, b)) for r, a, b in triples if r != self.none
        ]
        return objects, crop

    # -- pictures --

    def plot(
        self,
        tokens: torch.Tensor,
        label_for_category_no: Callable[[int], str] = str,
        figure_size: tuple[int, int] = (256, 256),
        line_width: int = 3,
        font_size: int | None = None,
    ) -> torch.Tensor:
        """A picture of a layout: each box outlined in its colour and labelled, on white, the crop in grey.

        figure_size: (W, H). Returns (3, H, W) float32 in [-1, 1], as logged images are.
        """
        width, height = figure_size
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(
            size=font_size or (10 if max(figure_size) < 256 else 12 if max(figure_size) < 512 else 15)
        )
        objects, crop = self.inverse_build(tokens)
        for obj, color in zip(objects, cycle(PALETTE)):
            box = _absolute(obj.bbox, width, height)
            draw.rectangle(box, outline=color, width=line_width)
            flags = [letter for letter, on in zip("godi", _flags(obj), strict=True) if on]
            label = label_for_category_no(obj.category) + (f" ({','.join(flags)})" if flags else "")
            draw.text((box[0] + line_width, box[1] + line_width), label, fill="black", font=font)
        if crop is not None:
            draw.rectangle(_absolute(crop, width, height), outline=CROP_OUTLINE, width=line_width)
        return torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)


def _flags(obj: LayoutObject) -> tuple[bool, bool, bool, bool]:
    """An object's flags in the order of their bits: group of, occluded, depiction, inside."""
    return obj.is_group_of, obj.is_occluded, obj.is_depiction, obj.is_inside


def _absolute(bbox: BoundingBox, width: int, height: int) -> tuple[int, int, int, int]:
    """A relative (x0, y0, w, h) box as pixel corners (x0, y0, x1, y1)."""
    x1, y1 = bbox[0] + bbox[2], bbox[1] + bbox[3]
    return int(bbox[0] * width), int(bbox[1] * height), int(x1 * width), int(y1 * height)


def builder_for_cond_stage(
    cond_stage: torch.nn.Module, no_object_classes: int | None = None
) -> ObjectsBoundingBoxConditionalBuilder:
    """The builder whose sequences fit a layout model's ``BERTEmbedder`` (``use_tokenizer: false``): its vocabulary
    and sequence length give ``no_tokens`` and, with the crop encoded, ``no_max_objects``.

    Without ``no_object_classes`` (a dataset's, not the model's) every representation reads as a category with no
    flags, which is what a plot of the tokens can show.
    """
    transformer = cond_stage.transformer
    no_tokens, length = transformer.num_tokens, transformer.max_seq_len
    if (length - 2) % 3 or length < 5:
        raise UserError(f"a layout model's sequence length is 3 per object + 2 for the crop; this one has {length}.")
    return ObjectsBoundingBoxConditionalBuilder(
        no_object_classes=no_object_classes or no_tokens - 1,
        no_max_objects=(length - 2) // 3,
        no_tokens=no_tokens,
        encode_crop=True,
        use_group_parameter=no_object_classes is not None,
    )


def plot_layouts(cond_stage: torch.nn.Module, tokens: torch.Tensor, figure_size: tuple[int, int]) -> torch.Tensor:
    """Pictures of a batch of layouts (B, L) for a layout model's cond stage: (B, 3, H, W) in [-1, 1], for
    ``log_images``; figure_size is (W, H)."""
    builder = builder_for_cond_stage(cond_stage)
    return torch.stack([builder.plot(row, figure_size=figure_size) for row in tokens.cpu()])
