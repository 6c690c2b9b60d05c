"""A1111's prompt editing, alternation and composable ``AND``: what text is active at each sampler step.

Syntax (AUTOMATIC1111's, so prompts written for it mean the same here):

- ``[from:to:when]``: ``from`` up to step ``when``, then ``to``; ``[to:when]`` adds ``to`` after ``when``,
  ``[from::when]`` removes ``from`` after it. ``when < 1`` is a share of the steps (``int(when * steps)``), otherwise a
  step number (A1111's documented reading, its "old scheduling"; A1111 1.6 on reads any number with a decimal point
  as a share, so that ``1.5`` means halfway through a hires pass, which differs only for numbers such as ``2.0``).
  Nested, and combined with attention brackets ``(x:1.2)``, ``[x]`` and BREAK, which stay in the text for
  :mod:`ldm.prompts`.
- ``[a|b|c]`` alternates: one option per step.
- ``a cat :1.2 AND a dog :0.8``: sub-prompts guided together (composable diffusion, Liu et al. 2022), each with its
  weight (1 when none is written; as in A1111 a trailing ``:number`` is a weight even without ``AND``). Negative
  prompts are not split at ``AND``: A1111 does not compose them, so there ``AND`` is text.

Steps count as A1111 counts them. Step ``i`` (0-based) is the ``i``-th sampler step of the run (img2img: of the steps
it runs, counted from the first), and a schedule of ``steps`` steps holds segments ``(end, text)``: the text of the
first segment with ``i <= end``. So ``[a:b:5]`` gives ``a`` for steps 0..5 and ``b`` from step 6 on, and ``[a|b]``
gives a, a, b, a, b ... (A1111's own off-by-ones, kept so that its images reproduce). ``steps`` is the requested
step count, also for img2img, which runs only a share of them (A1111 without its "img2img_fix_steps" option). Unlike
A1111, which counts model calls and doubles the steps of second-order samplers, a step here is a sampler step, and
every model call of it uses its text: Heun's correction, DPM2's midpoint, PLMS's Heun first step (see
:mod:`ldm.models.diffusion.step_clock`; DPM adaptive and DPM fast go by noise level).

Brackets that do not form one of these (``[x]``, ``[a:b]``, unbalanced ones) are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ldm.models.diffusion.guidance import StepConditioning

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_NUMBER = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*")


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``; ``when`` is the last step (0-based) of ``before``."""

    before: tuple
    after: tuple
    when: int


@dataclass(frozen=True)
class _Alternate:
    options: tuple


Node = str | _Edit | _Alternate


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A prompt's sub-prompts and their weights: ``"a cat :1.2 AND a dog"`` -> ``[("a cat", 1.2), (" a dog", 1.0)]``.

    As A1111: split at the word ``AND``; a sub-prompt's trailing ``:number`` is its weight, and its trailing spaces
    go. A prompt with neither gives ``[(prompt, 1.0)]`` unchanged.
    """
    parts = _AND.split(prompt)
    if len(parts) == 1:
        match = _WEIGHT.search(prompt)
        if match is None or match.group(2) is None:
            return [(prompt, 1.0)]
    out = []
    for part in parts:
        match = _WEIGHT.search(part)
        text, weight = match.groups() if match is not None else (part, None)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


def _when(number: str, steps: int) -> int:
    """The last step of ``before``: ``int(when * steps)`` for ``when < 1``, else ``int(when)``, within -1..steps
    (which a number of 400 digits, inf as a float, also is)."""
    value = float(number)
    return int(max(min(value * steps if value < 1 else value, steps), -1))


class _Parser:
    """Recursive descent over a prompt: text, and the ``[..]`` that schedule or alternate (kept nested)."""

    def __init__(self, text: str, steps: int) -> None:
        self.text, self.steps = text, steps

    def sequence(self, pos: int, stops: str) -> tuple[list[Node], int]:
        """Nodes from ``pos`` up to (not including) the first top-level character of ``stops`` or the end."""
        nodes: list[Node] = []
        text = self.text
        while pos < len(text) and text[pos] not in stops:
            char = text[pos]
            if char == "\\" and pos + 1 < len(text):
                nodes.append(text[pos : pos + 2])
                pos += 2
            elif char == "(":
                inner, end = self.sequence(pos + 1, ")")
                if end < len(text):
                    nodes += ["(", *inner, ")"]
                    pos = end + 1
                else:  # unclosed: a literal bracket
                    nodes.append(char)
                    pos += 1
            elif char == "[":
                node, pos = self.bracket(pos)
                nodes += node
            else:
                nodes.append(char)
                pos += 1
        return nodes, pos

    def bracket(self, start: int) -> tuple[list[Node], int]:
        """The nodes of the ``[`` at ``start`` and where parsing goes on: an edit, an alternation, an attention
        bracket with its content, or (no closing bracket, or a malformed edit) a literal ``[``."""
        parts, seps, pos = [], [], start + 1
        while True:
            inner, pos = self.sequence(pos, ":|]")
            parts.append(inner)
            if pos >= len(self.text):
                return ["["], start + 1
            if self.text[pos] == "]":
                break
            seps.append(self.text[pos])
            pos += 1
        end = pos + 1
        if not seps:
            return ["[", *parts[0], "]"], end
        if set(seps) == {"|"}:
            return [_Alternate(tuple(tuple(p) for p in parts))], end
        number = _NUMBER.fullmatch("".join(n for n in parts[-1] if isinstance(n, str)))
        plain_number = all(isinstance(n, str) for n in parts[-1])
        if set(seps) == {":"} and len(parts) in (2, 3) and number and plain_number:
            before = tuple(parts[0]) if len(parts) == 3 else ()
            return [_Edit(before, tuple(parts[-2]), _when(number.group(1), self.steps))], end
        return ["["], start + 1


def _ends(nodes: tuple | list, steps: int, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Edit):
            out.add(node.when)
            _ends(node.before, steps, out)
            _ends(node.after, steps, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _ends(option, steps, out)


def _text_at(nodes: tuple | list, end: int) -> str:
    pieces = []
    for node in nodes:
        if isinstance(node, _Edit):
            pieces.append(_text_at(node.before if end <= node.when else node.after, end))
        elif isinstance(node, _Alternate):
            pieces.append(_text_at(node.options[(end - 1) % len(node.options)], end))
        else:
            pieces.append(node)
    return "".join(pieces)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The segments ``(end, text)`` of one prompt (no ``AND``) over ``steps`` steps, ends increasing, the last
    ``steps``; step ``i`` has the text of the first segment with ``i <= end`` (see the module docstring).

    ``prompt_schedule("a [b:c:0.5] d", 10)`` -> ``[(5, "a b d"), (10, "a c d")]``; without editing or alternation
    ``[(steps, prompt)]``.
    """
    try:
        nodes, _ = _Parser(prompt, steps).sequence(0, "")
    except RecursionError:  # brackets nested thousands deep: text, as A1111 takes a prompt it cannot parse
        return [(steps, prompt)]
    ends: set[int] = {steps}
    _ends(nodes, steps, ends)
    # The nodes of text alone join back to the prompt, so a prompt without editing comes back unchanged.
    return [(end, _text_at(nodes, end)) for end in sorted(ends)]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text of ``schedule`` (:func:`prompt_schedule`) at 0-based step ``step``; past the end, the last."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


def is_plain(prompt: str, steps: int, compose: bool = True) -> bool:
    """Whether a prompt is just text: no editing or alternation, and (with ``compose``) no ``AND`` or weight."""
    if compose and split_and(prompt) != [(prompt, 1.0)]:
        return False
    return prompt_schedule(prompt, steps) == [(steps, prompt)]


def encode_scheduled(
    encode: Callable[[list[str], list[str]], tuple[Any, Any]],
    prompts: Sequence[str],
    negatives: Sequence[str],
    steps: int,
) -> tuple[Any, Any]:
    """(cond, uncond) of B prompts and B negative prompts with editing, alternation and ``AND``, over ``steps`` steps.

    ``encode(prompts, negatives) -> (cond, uncond)`` is the model's own encoder (:func:`ldm.prompts.encode_prompts`,
    :func:`ldm.sdxl_conditioning.encode_sdxl_prompts` ...), called once. Plain prompts go straight through it, so
    they give exactly what they gave before. Otherwise every distinct text of every segment is encoded once, in one
    call (negative texts on the unconditional side, as the encoder treats them), and the result is a pair of
    :class:`~ldm.models.diffusion.guidance.StepConditioning`: per step, the rows of each image's sub-prompts (cond,
    with their weights) and of its negative prompt (uncond).
    """
    prompts, negatives = list(prompts), list(negatives)
    if all(is_plain(p, steps) for p in prompts) and all(is_plain(n, steps, compose=False) for n in negatives):
        return encode(prompts, negatives)
    positive = [[(prompt_schedule(text, steps), weight) for text, weight in split_and(p)] for p in prompts]
    negative = [prompt_schedule(n, steps) for n in negatives]
    cond_texts = list(dict.fromkeys(text for subs in positive for schedule, _ in subs for _, text in schedule))
    uncond_texts = list(dict.fromkeys(text for schedule in negative for _, text in schedule))
    size = max(len(cond_texts), len(uncond_texts))
    # One call, so that the two sides share their number of 75-token chunks; the shorter list is padded by repeats.
    cond_table, uncond_table = encode(
        cond_texts + cond_texts[:1] * (size - len(cond_texts)),
        uncond_texts + uncond_texts[:1] * (size - len(uncond_texts)),
    )
    cond_row = {text: i for i, text in enumerate(cond_texts)}
    uncond_row = {text: i for i, text in enumerate(uncond_texts)}
    schedules = [schedule for subs in positive for schedule, _ in subs]
    cond = StepConditioning(
        cond_table,
        tuple(tuple(cond_row[text_at_step(sc, step)] for sc in schedules) for step in range(steps)),
        tuple(image for image, subs in enumerate(positive) for _ in subs),
        tuple(weight for subs in positive for _, weight in subs),
    )
    uncond = StepConditioning(
        uncond_table,
        tuple(tuple(uncond_row[text_at_step(sc, step)] for sc in negative) for step in range(steps)),
        tuple(range(len(negative))),
        (1.0,) * len(negative),
    )
    return cond, uncond
