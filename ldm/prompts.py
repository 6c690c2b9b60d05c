"""Prompt handling shared by every entry point: A1111 attention syntax, 75-token chunks, CLIP skip.

Syntax (AUTOMATIC1111's, so prompts written for it mean the same here):

- ``(text)`` multiplies the attention to ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` sets the factor
  to 1.3; nested brackets multiply.
- ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters; a lone backslash is dropped.
- Unbalanced brackets are tolerated: an unclosed bracket weights everything to the end of the prompt, a stray closing
  bracket is literal text.
- ``BREAK`` (uppercase, a word of its own in the prompt as written) ends the current 75-token chunk; text that only
  reads ``BREAK`` once brackets or escapes are removed (``BRE()AK``) stays text.
- Weights are clamped to [-10, 10] (``WEIGHT_LIMIT``), with a warning. A1111 lets any float through, so that a
  400-digit weight, ``1e38`` written out or 10,000 nested brackets make the weighted features inf (a black image).
  Negative weights are kept, since some prompts use them to push a concept away; past about 3 an image is ruined
  anyway, and 10 keeps weighted features far from the float16 limit. The clamp applies bracket by bracket: a round
  bracket's weight is the enclosing round brackets' (clamped) weight times its factor, clamped again, so brackets
  inside ones already at the limit scale from the limit; square brackets then divide.

A prompt's tokens are split into chunks of 75 (a chunk that fills up ends after its last comma when that comma is among
its last 20 tokens, so a phrase is not cut in two); each chunk becomes ``BOS + tokens + EOS + padding`` (77 ids), is
encoded on its own, and the chunk outputs are concatenated along the sequence axis: (B, 77 * k, D). The cross-attention
of the UNet takes any context length, so no prompt is truncated.
"""

import enum
import itertools
import math
import re
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import torch

from ldm.errors import UserError

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
WEIGHT_LIMIT = 10.0
# A chunk that overflows ends after its last comma only if that comma is among its last this-many tokens (A1111's
# default "comma padding backtrack").
COMMA_BACKTRACK = 20


class _Break(enum.Enum):
    BREAK = "BREAK"


# Where a prompt has a BREAK: a value of its own type, so that no (text, weight) fragment can ever equal it.
BREAK = _Break.BREAK
Fragment = tuple[str, float] | _Break

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                # an escaped bracket or backslash
    | \\                          # a lone backslash
    | [(\[]                       # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)      # ":1.3)", closing a round bracket with an explicit weight
    | [)\]]                       # a closing bracket
    | [^\\()\[\]:]+               # plain text
    | :                           # a colon that is not part of a weight
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
_EXCERPT = 40


def parse_prompt_attention(text: str) -> list[Fragment]:
    """Split a prompt into (text, weight) fragments, A1111 style.

    Consecutive fragments of equal weight are merged, empty ones dropped; a BREAK is the marker :data:`BREAK`.
    An empty prompt gives ``[("", 1.0)]``. Unlike A1111, a BREAK inside brackets stays a BREAK. Weights are clamped to
    [-WEIGHT_LIMIT, WEIGHT_LIMIT], bracket by bracket, with one warning per prompt that needed it.

    Example: ``"a (red:1.5) [circle]"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("circle", 0.909...)]``.
    """
    fragments, clamp = _parse(text)
    if clamp is not None:
        fragment, wanted = clamp
        excerpt = fragment if len(fragment) <= _EXCERPT else fragment[:_EXCERPT] + "..."
        warnings.warn(
            f"prompt weights are limited to [-{WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}]: the brackets around {excerpt!r} "
            f"ask for {wanted:.4g}; clamped to {max(min(wanted, WEIGHT_LIMIT), -WEIGHT_LIMIT):g}.",
            stacklevel=2,
        )
    return fragments


def _parse(text: str) -> tuple[list[Fragment], tuple[str, float] | None]:
    """:func:`parse_prompt_attention` without the warning: (fragments, clamp), where clamp is None or (the first
    fragment inside a clamped bracket, that bracket's weight before the clamp)."""
    parents, factors, pieces = _brackets(text)
    weights, wanted, clamped_at = _node_weights(parents, factors)
    clamp = None
    weighted: list[Fragment] = []
    for piece in pieces:
        if piece is BREAK:
            weighted.append(BREAK)
        elif piece[0]:
            part, round_node, square_node = piece
            # Square brackets only divide, so this product stays within the limits.
            weighted.append((part, weights[round_node] * weights[square_node]))
            node = clamped_at[round_node] or clamped_at[square_node]
            if clamp is None and node:
                clamp = (part, wanted[node])
    return _merge(weighted) or [("", 1.0)], clamp


def _brackets(text: str) -> tuple[list[int], list[float], list[tuple[str, int, int] | _Break]]:
    """One pass over a prompt: its brackets as a forest of nodes, and its text tagged with where in it each piece is.

    Node 0 is the prompt itself; every bracket is a node whose parent is the innermost open bracket of its own kind
    (round and square brackets nest independently, as in A1111). Weights are resolved afterwards from the nodes, so
    the work stays linear in the prompt's length however deep the brackets go.

    Returns:
        parents, factors: per node, its parent and its factor (1.1, 1 / 1.1 or the explicit weight).
        pieces: ``(text, innermost round node, innermost square node)`` or BREAK, in prompt order.
    """
    parents, factors = [0], [1.0]
    rounds, squares = [0], [0]
    pieces: list[tuple[str, int, int] | _Break] = []
    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append((token[1:], rounds[-1], squares[-1]))
        elif token in ("(", "["):
            stack = rounds if token == "(" else squares
            parents.append(stack[-1])
            # An unclosed bracket keeps its default factor.
            factors.append(ROUND_FACTOR if token == "(" else SQUARE_FACTOR)
            stack.append(len(factors) - 1)
        elif weight is not None and len(rounds) > 1 and (factor := _factor(weight)) is not None:
            factors[rounds.pop()] = factor
        elif token == ")" and len(rounds) > 1:
            rounds.pop()
        elif token == "]" and len(squares) > 1:
            squares.pop()
        else:
            for i, part in enumerate(_BREAK_WORD.split(token)):
                if i > 0:
                    pieces.append(BREAK)
                pieces.append((part, rounds[-1], squares[-1]))
    return parents, factors, pieces


def _factor(text: str) -> float | None:
    """The number ``text`` as a float (inf for one too large, e.g. 400 digits), or None (``"1.2.3"``)."""
    try:
        return float(text)
    except ValueError:
        return None


def _node_weights(parents: list[int], factors: list[float]) -> tuple[list[float], list[float], list[int]]:
    """Per bracket node: its weight (its parent's weight times its factor, clamped), that product before the clamp, and
    the nearest node on its way to the root whose weight was clamped (0 for none).

    Nodes are numbered in the order their brackets open, so a parent always comes before its children.
    """
    weights, wanted, clamped_at = [1.0], [1.0], [0]
    for node in range(1, len(factors)):
        parent = parents[node]
        product = weights[parent] * factors[node]
        if math.isnan(product):  # zero times a factor too large for a float (inf), which is still zero
            product = 0.0
        weight = max(min(product, WEIGHT_LIMIT), -WEIGHT_LIMIT)
        weights.append(weight)
        wanted.append(product)
        clamped_at.append(node if weight != product else clamped_at[parent])
    return weights, wanted, clamped_at


def _merge(fragments: list[Fragment]) -> list[Fragment]:
    """Join consecutive fragments of equal weight (a BREAK joins nothing)."""
    merged: list[Fragment] = []
    for weight, group in itertools.groupby(fragments, key=lambda f: f if f is BREAK else f[1]):
        if weight is BREAK:
            merged.extend(group)
        else:
            merged.append(("".join(part for part, _ in group), weight))
    return merged


def encode_prompts(
    model: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None = None,
    clip_skip: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning and unconditional conditioning for classifier-free guidance.

    With a per-token text encoder as cond stage (``FrozenCLIPEmbedder``, ``FrozenOpenCLIPEmbedder``) prompts get
    attention weights, 75-token chunks and CLIP skip. Weighted outputs are rescaled so that each chunk of each prompt
    keeps its unweighted mean (A1111 takes that mean over the whole batch; here it is per prompt, so a prompt's
    embedding does not depend on the rest of its batch). Plain prompts of at most 75 tokens give exactly
    ``model.get_learned_conditioning(prompts)``.

    Any other cond stage (a pooled CLIP layer, a class embedder, a custom ``cond_stage_forward``) gets the prompts as
    they are, brackets included, through ``model.get_learned_conditioning``; ``clip_skip`` must then be 1.

    Args:
        model: a ``LatentDiffusion`` (anything with ``cond_stage_model`` and ``get_learned_conditioning``).
        prompts: B prompts (a single string counts as one).
        negative_prompts: B negative prompts; None means empty prompts.
        clip_skip: 1 uses the encoder's configured layer, n stops n - 1 layers earlier.
    Returns:
        cond, uncond: (B, 77 * k, D) each, with the same number of chunks k (the shorter side is padded with chunks of
        the empty prompt) so that guidance can batch them.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    negative_prompts = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise UserError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    if clip_skip < 1:
        raise UserError(f"clip_skip must be at least 1, got {clip_skip}")

    encoder = getattr(model, "cond_stage_model", None)
    token_level = getattr(encoder, "per_token", False) and getattr(model, "cond_stage_forward", None) is None
    if not token_level:
        if clip_skip != 1:
            raise UserError("clip_skip needs a CLIP text encoder as the model's cond stage; use clip_skip=1")
        return model.get_learned_conditioning(prompts), model.get_learned_conditioning(negative_prompts)

    cond_chunks, uncond_chunks = prompt_chunks(encoder, prompts), prompt_chunks(encoder, negative_prompts)
    num_chunks = max(len(chunks) for chunks in cond_chunks + uncond_chunks)
    # Cond and uncond are encoded as separate batches so that plain prompts go through exactly the computation of
    # ``get_learned_conditioning``.
    cond = encode_chunks(encoder, cond_chunks, num_chunks, clip_skip)
    uncond = encode_chunks(encoder, uncond_chunks, num_chunks, clip_skip)
    return cond, uncond


def prompt_chunks(encoder: Any, prompts: Sequence[str]) -> list[list[list[tuple[int, float]]]]:
    """Each prompt's weighted tokens ``(id, weight)`` in chunks of at most ``encoder.tokenizer.max_length - 2``
    (BREAK and the comma rule as in the module docstring); at least one chunk per prompt."""
    tokenizer = encoder.tokenizer
    comma = tokenizer.encode(",")
    comma_id = comma[0] if len(comma) == 1 else None
    # Textual-inversion embeddings attached to the encoder (ldm.adapters.embeddings): their names become vectors.
    embeddings = getattr(encoder, "textual_inversion", None)
    return [_chunk(_weighted_tokens(p, tokenizer, embeddings), tokenizer.max_length - 2, comma_id) for p in prompts]


def _weighted_tokens(prompt: str, tokenizer: Any, embeddings: Any = None) -> list[tuple[Any, float] | None]:
    """BPE ids of a prompt with their weights; None where a BREAK is.

    Each fragment is tokenised on its own, so ``"(red:1.5) circle"`` has the ids of ``"red circle"``. With
    ``embeddings`` (a :class:`ldm.adapters.embeddings.TokenTable`) an embedding's name becomes one item whose token is
    its vectors, (n, D), taking n positions.
    """
    tokens: list[tuple[Any, float] | None] = []
    for fragment in parse_prompt_attention(prompt):
        if fragment is BREAK:
            tokens.append(None)
        else:
            text, weight = fragment
            ids = tokenizer.encode(text)
            tokens.extend((token, weight) for token in (embeddings.substitute(ids) if embeddings else ids))
    return tokens


def _chunk(tokens: list[tuple[Any, float] | None], size: int, comma_id: int | None) -> list[list[tuple[Any, float]]]:
    """Split weighted tokens into chunks of at most ``size``; a None (BREAK) ends a chunk. At least one chunk.

    An embedding's item (vectors (n, D) as its token) becomes n positions, each a vector (D,), that stay in one chunk:
    one that does not fit moves whole to the next chunk, as in A1111.
    """
    chunks: list[list[tuple[Any, float]]] = []
    current: list[tuple[Any, float]] = []
    for item in tokens:
        if item is None:
            chunks.append(current)
            current = []
            continue
        token, weight = item
        if len(current) == size:
            cut = size
            tail = [t if isinstance(t, int) else None for t, _ in current[-COMMA_BACKTRACK:]]
            if not (isinstance(token, int) and token == comma_id) and comma_id in tail:
                cut = size - tail[::-1].index(comma_id)
            chunks.append(current[:cut])
            current = current[cut:]
        if isinstance(token, int):
            current.append(item)
            continue
        if len(current) + len(token) > size:
            chunks.append(current)
            current = []
        current.extend((vector, weight) for vector in token)
    if current or not chunks:
        chunks.append(current)
    return chunks


def encode_chunks(
    encoder: Any,
    chunked: list[list[list[tuple[int, float]]]],
    num_chunks: int,
    clip_skip: int,
    return_pooled: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Encode B prompts' chunks (:func:`prompt_chunks`), padded to ``num_chunks`` with empty chunks, with a per-token
    encoder's ``encode_token_ids``: -> z (B, (size + 2) * num_chunks, D) with the weights applied; with
    ``return_pooled`` also the encoder's pooled output of the first chunk (B, D_p), unweighted, as A1111 gives SDXL."""
    tokenizer = encoder.tokenizer
    size = tokenizer.max_length - 2
    outputs, pooled = [], None
    for j in range(num_chunks):
        ids, weights, vectors = [], [], []
        for chunks in chunked:
            chunk = chunks[j] if j < len(chunks) else []
            padding = size - len(chunk)
            # An embedding's positions hold token 0 (A1111's placeholder) and get its vectors in the encoder.
            ids.append(
                [tokenizer.bos_token_id, *(t if isinstance(t, int) else 0 for t, _ in chunk), tokenizer.eos_token_id]
                + [tokenizer.pad_token_id] * padding
            )
            weights.append([1.0, *(w for _, w in chunk), 1.0] + [1.0] * padding)
            vectors.append([(i + 1, t) for i, (t, _) in enumerate(chunk) if not isinstance(t, int)])
        tokens = torch.tensor(ids, device=encoder.device)
        extra = {"token_vectors": vectors} if any(vectors) else {}
        if return_pooled and j == 0:
            z, pooled = encoder.encode_token_ids(tokens, clip_skip=clip_skip, return_pooled=True, **extra)
        else:
            z = encoder.encode_token_ids(tokens, clip_skip=clip_skip, **extra)
        outputs.append(_apply_weights(z, torch.tensor(weights, device=z.device)))
    z = torch.cat(outputs, dim=1)
    return (z, pooled) if return_pooled else z


def _apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale token features z: (B, L, D) by weights: (B, L), then restore each row's mean over (L, D).

    Rows whose weights are all 1 come back untouched. Computed in float32: fp16 means lose too much precision.
    Restoring a mean scales a row by at most WEIGHT_LIMIT, and never through a change of sign: weights that bring the
    weighted mean near zero (for the tiny test model, 20 tokens at 3.85) would multiply the row by a million (inf in
    fp16), and past zero turn it inside out; there the mean is left as the weights make it.
    """
    reweighted = (weights != 1).any(dim=1)
    if not reweighted.any():
        return z
    z32 = z.float()
    weighted = z32 * weights[..., None]
    ratio = z32.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True)
    weighted = weighted * torch.where(ratio > 0, ratio.clamp(max=WEIGHT_LIMIT), 1.0)
    return torch.where(reweighted[:, None, None], weighted, z32).to(z.dtype)


def unknown_words(prompt: str, vocabulary: Collection[str]) -> list[str]:
    """The words of ``prompt`` (attention syntax removed, lower-cased) that are not in ``vocabulary``, in order."""
    text = " ".join(fragment[0] for fragment in _parse(prompt)[0] if fragment is not BREAK)
    words = re.findall(r"[a-z0-9']+", text.lower())
    return list(dict.fromkeys(w for w in words if w not in vocabulary))
