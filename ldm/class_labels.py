"""Class labels as conditioning: LDM's class-conditional ImageNet models (``cin256``, ``cin256-v2``), whose cond
stage is a :class:`~ldm.modules.encoders.modules.ClassEmbedder`.

Classifier-free guidance needs a label that means "no class". cin256-v2 has one: its embedder has 1001 classes,
ImageNet's 1000 and the unconditional class 1000 (CompVis's notebook guides with it). The project's ``ClassEmbedder``
takes its last class as unconditional (its ``ucg_rate`` dropout, when set, trains it so), so every embedder has
one, except one of exactly ImageNet's 1000 classes: cin256, trained without such a class, samples without guidance only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ldm.errors import UserError
from ldm.modules.encoders.modules import ClassEmbedder

IMAGENET_CLASSES = 1000


def class_embedder(model: Any) -> ClassEmbedder | None:
    """The model's cond stage if it is a class embedder, else None."""
    cond_stage = getattr(model, "cond_stage_model", None)
    return cond_stage if isinstance(cond_stage, ClassEmbedder) else None


def unconditional_class(embedder: ClassEmbedder) -> int | None:
    """The "no class" label of an embedder (its last class), None for one of exactly ImageNet's classes."""
    return None if embedder.n_classes == IMAGENET_CLASSES else embedder.n_classes - 1


def class_count(embedder: ClassEmbedder) -> int:
    """How many real classes the embedder has: labels ``0 .. class_count - 1`` (the unconditional one left out)."""
    return embedder.n_classes - (unconditional_class(embedder) is not None)


def check_class_labels(embedder: ClassEmbedder, labels: Sequence[int], scale: float) -> None:
    """UserError unless every label is a real class and guidance (``scale != 1``) has an unconditional class."""
    count = class_count(embedder)
    bad = [label for label in labels if not 0 <= label < count]
    if bad:
        raise UserError(f"class labels {bad} are not classes of this model; give labels from 0 to {count - 1}.")
    if scale != 1.0 and unconditional_class(embedder) is None:
        raise UserError(
            f"this model's {embedder.n_classes} classes are all real ones, with no unconditional class to guide with; "
            "use --scale 1 (cin256-v2's config has the 1001st, unconditional class)."
        )


def encode_class_labels(
    model: Any, labels: Sequence[int], scale: float, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cond (B, 1, D) for ``labels`` and, when guided (``scale != 1``), uncond (B, 1, D) of the unconditional class.

    Raises UserError for a model without a class embedder or for labels :func:`check_class_labels` refuses.
    """
    embedder = class_embedder(model)
    if embedder is None:
        raise UserError("class labels are for class-conditional models (a ClassEmbedder cond stage); this one is not.")
    check_class_labels(embedder, labels, scale)
    batch = {embedder.key: torch.tensor(list(labels), dtype=torch.long, device=device)}
    cond = model.get_learned_conditioning(batch)
    if scale == 1.0:
        return cond, None
    null = torch.full((len(labels),), unconditional_class(embedder), dtype=torch.long, device=device)
    return cond, model.get_learned_conditioning({embedder.key: null})


def draw_class_labels(embedder: ClassEmbedder, count: int, seed: int) -> list[int]:
    """``count`` real classes drawn uniformly, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, class_count(embedder), (count,), generator=generator).tolist()


def parse_classes(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]; UserError naming the bad entry."""
    labels = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UserError(f"--classes takes class numbers separated by commas, such as 25,187,448; got '{part}'.")
        labels.append(int(part))
    return labels
