"""The weight change of one LoRA / LyCORIS module, for each file format.

A module's tensors are the file's keys of one layer, by suffix (``lora_down.weight``, ``alpha``, ...). For a layer
weight W of shape (out, in) or (out, in, kh, kw), :func:`module_delta` gives ``updown`` of W's shape such that the
merged weight at multiplier m is ``W + m * updown`` (A1111's order: the file's scale, then DoRA's decomposition, then
the multiplier):

- LoRA / LoCon: ``up @ down`` with up (out, r[, 1, 1]), down (r, in[, kh, kw]); LoCon's Tucker form adds
  ``lora_mid`` (r, r, kh, kw) with a 1x1 down. Scale ``alpha / r`` (no alpha: 1).
- LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product); with ``hada_t1`` / ``hada_t2`` each factor is the Tucker
  product ``t x w_a x w_b``. Scale ``alpha / w1_b.shape[0]``.
- LoKr: ``kron(w1, w2)`` with w1 = ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b`` and w2 = ``lokr_w2``, ``lokr_w2_a @
  lokr_w2_b`` or with ``lokr_t2`` its Tucker product. Scale ``alpha / r`` of the factored side (w2's when both are),
  1 when neither is factored.
- full: ``diff`` as it is (and ``diff_b`` for the bias), scale 1.
- ``scale`` (a scalar key) overrides the scale; ``dora_scale`` (DoRA, weight-decomposed):
  ``W' = (W + d) * m / ||W + d||``
  with the norm over every axis but the input one when ``dora_scale`` is (1, in, ...) (lycoris' and A1111's default)
  and over every axis but the output one when it is (out, 1, ...) (lycoris' ``wd_on_out``); the change is ``W' - W``.

Everything is computed in float32; on the ``meta`` device the same code checks the shapes without any arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.errors import UserError

LORA = {"lora_up.weight", "lora_down.weight", "lora_mid.weight"}
LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
FULL = {"diff", "diff_b"}
COMMON = {"alpha", "scale", "dora_scale"}
SUFFIXES = LORA | LOHA | LOKR | FULL | COMMON


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """core (i, j, kh, kw), wa (i, p), wb (j, q) -> (p, q, kh, kw): lycoris' Tucker form of conv factors."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, wa.flatten(1), wb.flatten(1))


def _lora(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    rank = down.shape[0]
    if "lora_mid.weight" in t:
        # up (out, r), down (r, in), mid (r, r, kh, kw) -> (out, in, kh, kw)
        return _tucker(t["lora_mid.weight"], up.flatten(1).T, down.flatten(1)), rank
    if up.dim() == 4 and down.dim() == 4:
        return torch.einsum("or,rikl->oikl", up.flatten(1), down), rank
    return up.flatten(1) @ down.flatten(1), rank


def _loha(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    factors = []
    for n in "12":
        a, b = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"]
        core = t.get(f"hada_t{n}")
        # Tucker: a (r, out), b (r, in), core (r, r, kh, kw); plain: a (out, r), b (r, in...)
        factors.append(_tucker(core, a, b) if core is not None else a @ b.flatten(1))
    return factors[0] * factors[1], t["hada_w1_b"].shape[0]


def _lokr(t: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    rank = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2, rank = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]), t["lokr_w2_b"].shape[0]
    else:
        w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1), t["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # A 2-D w2 of a conv layer holds (in, kh, kw) flattened: the 2-D product reshaped is the same as the 4-D one.
    return torch.kron(w1.contiguous(), w2.contiguous()), rank


def _required(t: Mapping[str, torch.Tensor], name: str) -> str:
    """The format of a module's tensors; UserError for an incomplete or mixed set."""
    keys = set(t)
    kinds = [kind for kind, group in (("lora", LORA), ("loha", LOHA), ("lokr", LOKR), ("full", FULL)) if keys & group]
    complete = {
        "lora": {"lora_up.weight", "lora_down.weight"} <= keys,
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys,
        "lokr": ("lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys)
        and ("lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys),
        "full": "diff" in keys,
    }
    if len(kinds) != 1 or not complete[kinds[0]]:
        raise UserError(
            f"LoRA module {name!r} has the tensors {sorted(keys)}: not one complete LoRA, LoHa, LoKr or full-diff set."
        )
    return kinds[0]


def module_delta(
    name: str, t: Mapping[str, torch.Tensor], weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(updown of ``weight``'s shape, the bias change from ``diff_b`` or None) of one module, at multiplier 1.

    ``t``: the module's tensors by suffix, on ``weight``'s device (``meta`` to check shapes only). ``weight``: the
    layer's base weight. Raises UserError when the module's shape does not fit the layer (a LoRA for another model).
    """
    t = {k: v.float() for k, v in t.items()}
    kind = _required(t, name)
    rank = None
    if kind == "lora":
        updown, rank = _lora(t)
    elif kind == "loha":
        updown, rank = _loha(t)
    elif kind == "lokr":
        updown, rank = _lokr(t)
    else:
        updown = t["diff"]
    if updown.numel() != weight.numel():
        raise UserError(
            f"LoRA module {name!r} changes a weight of shape {tuple(updown.shape)}, but the model's layer "
            f"{tuple(weight.shape)}: the LoRA was made for another model (SD 1.x, 2.x and SDXL LoRAs do not mix)."
        )
    updown = updown.reshape(weight.shape)
    if "scale" in t:
        updown = updown * t["scale"].reshape(())
    elif rank is not None and "alpha" in t:
        updown = updown * (t["alpha"].reshape(()) / rank)
    if "dora_scale" in t:
        updown = _decompose(name, updown, weight.float(), t["dora_scale"])
    bias = t.get("diff_b")
    return updown, bias


def _decompose(name: str, updown: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: the change that takes ``weight`` to ``(weight + updown)`` rescaled to the norms ``magnitude``."""
    merged = weight + updown
    if magnitude.numel() == weight.shape[1] and (magnitude.dim() < 2 or magnitude.shape[0] == 1):
        axis = 1  # one norm per input channel, over the output channels (and the kernel)
    elif magnitude.numel() == weight.shape[0]:
        axis = 0  # one norm per output channel (lycoris' wd_on_out, the DoRA paper's rows)
    else:
        raise UserError(
            f"DoRA module {name!r}: dora_scale {tuple(magnitude.shape)} fits no axis of {tuple(weight.shape)}."
        )
    dims = [d for d in range(weight.dim()) if d != axis]
    norm = merged.norm(dim=dims, keepdim=True)
    return merged * (magnitude.reshape(norm.shape) / norm) - weight
