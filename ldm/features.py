"""Where A1111's generation features meet :meth:`ldm.inference.Pipeline.run`: which requests run in passes (the
hires fix, "inpaint only masked") and the infotext entries of the others (mask blur, variation seeds)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ldm.hires import run_hires
from ldm.masking import masking_fields, run_only_masked


def feature_runner(request: Any) -> Callable[[Any, Any, Callable[..., Any]], Any] | None:
    """``runner(pipe, request, run)`` for a request made in passes, each pass by ``run(request, start=...)``; None
    for a request made in one."""
    if request.enable_hr:
        return run_hires
    if request.inpaint_full_res and request.mask is not None:
        return run_only_masked
    return None


def request_fields(request: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A1111 infotext entries of a one-pass request: those of every image, and each image's own (its subseed)."""
    per_image = []
    if request.subseeds is not None:
        strength = request.subseed_strength
        per_image = [{"Variation seed": s, "Variation seed strength": strength} for s in request.subseeds]
    return masking_fields(request), per_image
