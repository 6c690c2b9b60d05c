"""Prompt handling: A1111 attention syntax, weighting, 75-token chunks, BREAK, negative padding, CLIP skip."""

import math
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.prompts import BREAK, WEIGHT_LIMIT, encode_prompts, parse_prompt_attention, unknown_words

TINY_OPENCLIP_CFG = {"width": 32, "heads": 4, "layers": 3, "context_length": 77, "vocab_size": 49408}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.1 * 1.1 * 1.3),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
        ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
        ("( a : 1.25 )", [(" a ", 1.25)]),
        ("(x:-1)", [("x", -1.0)]),
        ("[[a]] b", [("a", 1 / 1.1**2), (" b", 1.0)]),
        ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
        ("((a) b)", [("a", 1.21), (" b", 1.1)]),
        ("a) b] c", [("a) b] c", 1.0)]),
        ("time: 5:00", [("time: 5:00", 1.0)]),
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),
        (r"\\ and a\b", [("\\ and ab", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
        ("BREAK a", [BREAK, ("a", 1.0)]),
        ("a break BREAKfast", [("a break BREAKfast", 1.0)]),
    ],
)
def test_parse_prompt_attention(text: str, expected: list) -> None:
    parsed = parse_prompt_attention(text)
    assert [f if f is BREAK else f[0] for f in parsed] == [f if f is BREAK else f[0] for f in expected]
    assert [f[1] for f in parsed if f is not BREAK] == pytest.approx([f[1] for f in expected if f is not BREAK])


def _glc(model, prompts: list[str]) -> torch.Tensor:
    return model.get_learned_conditioning(prompts)


@torch.no_grad()
def test_plain_prompts_equal_get_learned_conditioning(tiny_model) -> None:
    prompts = ["a red circle on a blue background", "A painting of a virus monster playing guitar!"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cond, uncond = encode_prompts(tiny_model, prompts)
    assert cond.shape == uncond.shape == (2, 77, 32)
    assert torch.equal(cond, _glc(tiny_model, prompts))
    assert torch.equal(uncond, _glc(tiny_model, ["", ""]))
    negative, _ = encode_prompts(tiny_model, ["blurry"])
    assert torch.equal(encode_prompts(tiny_model, "a cat", negative_prompts="blurry")[1], negative)
    # Fragments are tokenised on their own: a weight of 1 changes nothing.
    assert torch.equal(encode_prompts(tiny_model, ["(red:1) circle"])[0], _glc(tiny_model, ["red circle"]))
    assert torch.equal(encode_prompts(tiny_model, [""])[0], _glc(tiny_model, [""]))


@torch.no_grad()
def test_weights_scale_their_tokens_and_keep_the_mean(tiny_model) -> None:
    plain = _glc(tiny_model, ["a red circle"])[0]
    weighted = encode_prompts(tiny_model, ["a (red:1.5) [circle]"])[0][0]
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1  # [BOS, a, red, circle, EOS, ...]
    ratio = weighted / plain
    # Every token is scaled by its weight times one common factor, which restores the unweighted mean.
    factor = ratio[0, 0]
    torch.testing.assert_close(ratio, (weights * factor)[:, None].expand_as(ratio), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weighted.mean(), plain.mean())
    torch.testing.assert_close(factor, plain.mean() / (plain * weights[:, None]).mean())
    assert not torch.isclose(factor, torch.tensor(1.0))


@torch.no_grad()
def test_weights_that_cancel_the_mean_do_not_blow_the_features_up(tiny_model) -> None:
    # The weight at which 20 weighted "cat"s cancel the mean of the rest of their chunk: restoring the mean there
    # multiplied the features by 600,000, inf in float16.
    encoder = tiny_model.cond_stage_model
    cats = " ".join(["cat"] * 20)
    z = encoder.encode_token_ids(encoder.tokenizer([cats]))[0]
    cancelling = (-(z.sum() - z[1:21].sum()) / z[1:21].sum()).item()
    assert -WEIGHT_LIMIT < cancelling < WEIGHT_LIMIT
    plain = _glc(tiny_model, [cats])
    for weight in (cancelling, cancelling * 0.999, cancelling * 1.001):
        cond = encode_prompts(tiny_model, [f"({cats}:{weight:.9f})"])[0]
        assert cond.abs().max() <= WEIGHT_LIMIT**2 * plain.abs().max()


@torch.no_grad()
def test_weighting_is_per_prompt(tiny_model) -> None:
    alone = encode_prompts(tiny_model, ["a (red:1.5) circle"])[0]
    batched = encode_prompts(tiny_model, ["a (red:1.5) circle", "(a very heavy:3) [square]"])[0]
    torch.testing.assert_close(batched[:1], alone)


@torch.no_grad()
def test_long_prompt_is_split_into_chunks_without_truncation(tiny_model) -> None:
    prompt = " ".join(["cat"] * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cond, uncond = encode_prompts(tiny_model, [prompt])
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond[:, :77], _glc(tiny_model, [" ".join(["cat"] * 75)]), rtol=0, atol=0)
    torch.testing.assert_close(cond[:, 77:], _glc(tiny_model, [" ".join(["cat"] * 25)]), rtol=0, atol=0)
    torch.testing.assert_close(uncond, _glc(tiny_model, [""]).repeat(1, 2, 1), rtol=0, atol=0)


@torch.no_grad()
def test_full_chunk_breaks_after_a_late_comma(tiny_model) -> None:
    head, tail = " ".join(["cat"] * 64) + ",", " ".join(["dog"] * 20)
    cond = encode_prompts(tiny_model, [f"{head} {tail}"])[0]
    torch.testing.assert_close(cond, torch.cat([_glc(tiny_model, [head]), _glc(tiny_model, [tail])], dim=1))
    # An early comma (more than 20 tokens back) does not move the break.
    early = "cat, " + " ".join(["cat"] * 80)
    cond = encode_prompts(tiny_model, [early])[0]
    torch.testing.assert_close(cond[:, 77:], _glc(tiny_model, [" ".join(["cat"] * 7)]))


@torch.no_grad()
def test_break_starts_a_new_chunk(tiny_model) -> None:
    cond = encode_prompts(tiny_model, ["a red circle BREAK on blue"])[0]
    expected = torch.cat([_glc(tiny_model, ["a red circle"]), _glc(tiny_model, ["on blue"])], dim=1)
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)
    leading = encode_prompts(tiny_model, ["BREAK blue"])[0]
    expected = torch.cat([_glc(tiny_model, [""]), _glc(tiny_model, ["blue"])], dim=1)
    torch.testing.assert_close(leading, expected, rtol=0, atol=0)
    assert encode_prompts(tiny_model, ["blue BREAK"])[0].shape == (1, 77, 32)


@torch.no_grad()
def test_cond_and_uncond_are_padded_to_the_same_chunk_count(tiny_model) -> None:
    long_negative = "ugly " * 80 + "BREAK blurry"
    cond, uncond = encode_prompts(tiny_model, ["a cat", "a dog"], negative_prompts=[long_negative, "bad"])
    assert cond.shape == uncond.shape == (2, 231, 32)
    empty = _glc(tiny_model, [""])[0]
    for chunk in (1, 2):
        for row in (0, 1):
            torch.testing.assert_close(cond[row, 77 * chunk : 77 * (chunk + 1)], empty, rtol=0, atol=0)
        torch.testing.assert_close(uncond[1, 77 * chunk : 77 * (chunk + 1)], empty, rtol=0, atol=0)
    torch.testing.assert_close(cond[:, :77], _glc(tiny_model, ["a cat", "a dog"]), rtol=0, atol=0)
    torch.testing.assert_close(uncond[1:, :77], _glc(tiny_model, ["bad"]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        encode_prompts(tiny_model, ["a cat"], negative_prompts=["x", "y"])


@torch.no_grad()
def test_clip_skip_uses_the_penultimate_layer_and_the_final_norm(tiny_model) -> None:
    encoder = tiny_model.cond_stage_model
    prompts = ["a red circle", "a blue square"]
    tokens = encoder.tokenizer(prompts)
    outputs = encoder.transformer(input_ids=tokens, output_hidden_states=True)
    final_norm = encoder.transformer.text_model.final_layer_norm
    torch.testing.assert_close(final_norm(outputs.hidden_states[-1]), outputs.last_hidden_state)

    skip1, _ = encode_prompts(tiny_model, prompts, clip_skip=1)
    skip2, uncond2 = encode_prompts(tiny_model, prompts, clip_skip=2)
    torch.testing.assert_close(skip2, final_norm(outputs.hidden_states[-2]))
    assert not torch.allclose(skip1, skip2)
    torch.testing.assert_close(uncond2, encoder.encode_token_ids(encoder.tokenizer(["", ""]), clip_skip=2))
    torch.testing.assert_close(encoder.encode_token_ids(tokens, clip_skip=3), final_norm(outputs.hidden_states[0]))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="clip_skip"):
            encoder.encode_token_ids(tokens, clip_skip=bad)


@torch.no_grad()
def test_clip_skip_counts_back_from_a_configured_hidden_layer(tiny_dir, tiny_model) -> None:
    hidden = FrozenCLIPEmbedder(text_config=tiny_dir / "text-config.json", layer="hidden", layer_idx=-1)
    hidden.load_state_dict(tiny_model.cond_stage_model.state_dict())
    tokens = hidden.tokenizer(["a red circle"])
    outputs = hidden.transformer(input_ids=tokens, output_hidden_states=True)
    torch.testing.assert_close(hidden.encode_token_ids(tokens), outputs.hidden_states[-1])
    torch.testing.assert_close(hidden.encode_token_ids(tokens, clip_skip=2), outputs.hidden_states[-2])


@torch.no_grad()
def test_openclip_encoder_pads_with_zero_and_skips_blocks() -> None:
    torch.manual_seed(0)
    last = FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG, layer="last")
    penultimate = FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG, layer="penultimate")
    penultimate.load_state_dict(last.state_dict())
    model = SimpleNamespace(cond_stage_model=penultimate, cond_stage_forward=None, get_learned_conditioning=penultimate)

    cond, uncond = encode_prompts(model, ["a red circle"], negative_prompts=["cat " * 80])
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond[:, :77], penultimate(["a red circle"]), rtol=0, atol=0)
    # The padding chunk is [BOS, EOS, 0, 0, ...]; padding with EOS instead would change its features.
    empty = torch.zeros(1, 77, dtype=torch.long)
    empty[0, :2] = torch.tensor([49406, 49407])
    torch.testing.assert_close(cond[:, 77:], penultimate.encode_with_transformer(empty), rtol=0, atol=0)
    assert not torch.allclose(cond[:, 77:], penultimate.encode_with_transformer(empty.clamp(min=49406)))

    tokens = last.tokenizer(["a red circle"])
    torch.testing.assert_close(last.encode_token_ids(tokens, clip_skip=2), penultimate(["a red circle"]))
    model.cond_stage_model = last
    torch.testing.assert_close(encode_prompts(model, ["a red circle"], clip_skip=2)[0], penultimate(["a red circle"]))
    with pytest.raises(ValueError, match="clip_skip"):
        penultimate.encode_token_ids(tokens, clip_skip=4)


@torch.no_grad()
def test_other_cond_stages_get_the_text_as_is(tiny_dir, tiny_model) -> None:
    pooled = FrozenCLIPEmbedder(text_config=tiny_dir / "text-config.json", layer="pooled")
    pooled.load_state_dict(tiny_model.cond_stage_model.state_dict())
    model = SimpleNamespace(cond_stage_model=pooled, cond_stage_forward=None, get_learned_conditioning=pooled)
    cond, uncond = encode_prompts(model, ["(red:1.5) circle"])
    assert cond.shape == (1, 1, 32)
    torch.testing.assert_close(cond, pooled(["(red:1.5) circle"]), rtol=0, atol=0)
    torch.testing.assert_close(uncond, pooled([""]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="clip_skip needs a CLIP text encoder"):
        encode_prompts(model, ["a cat"], clip_skip=2)


def test_unknown_words_ignore_attention_syntax_and_case():
    vocabulary = {"a", "red", "circle", "on", "blue", "background"}
    assert unknown_words("A (RED:1.3) circle on a [blue] dragon BREAK background", vocabulary) == ["dragon"]
    assert unknown_words("a red circle", vocabulary) == []
    # Negatively weighted words are still words the model reads; only a real BREAK is not a word.
    assert unknown_words("(dragon:-1) BREAK (BRE()AK:-1)", vocabulary) == ["dragon", "break"]


OVERFLOWING = {
    "400 digits": "a (fox:" + "9" * 400 + ")",
    "1e38 written out": "a (fox:1" + "0" * 38 + ")",
    "negative 400 digits": "a (fox:-" + "9" * 400 + ")",
    "10,000 nested brackets": "a " + "(" * 10_000 + "fox" + ")" * 10_000,
    "long unclosed brackets": "a " + "(fox " * 1_000,
}


def _weights(fragments) -> list[float]:
    return [f[1] for f in fragments if f is not BREAK]


def _parse_warnings(text: str) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fragments = parse_prompt_attention(text)
    return fragments, [str(w.message) for w in caught]


@pytest.mark.parametrize("text", OVERFLOWING.values(), ids=OVERFLOWING.keys())
def test_overflowing_weights_are_clamped_with_one_warning(text: str) -> None:
    fragments, messages = _parse_warnings(text)
    assert len(messages) == 1
    assert "limited to [-10, 10]" in messages[0] and "'fox" in messages[0]
    assert all(math.isfinite(w) and -WEIGHT_LIMIT <= w <= WEIGHT_LIMIT for w in _weights(fragments))
    assert fragments[0] == ("a ", 1.0)
    assert abs(fragments[-1][1]) == WEIGHT_LIMIT


def test_clamping_goes_bracket_by_bracket_and_never_gives_nan() -> None:
    huge = "1" + "0" * 400
    assert _parse_warnings(f"((a:{huge}):0)") == ([("a", 0.0)], [])
    assert _parse_warnings("(a:nan) (b:inf)") == ([("a:nan", 1.1), (" ", 1.0), ("b:inf", 1.1)], [])
    assert _parse_warnings("(a:10) (b:-10)") == ([("a", 10.0), (" ", 1.0), ("b", -10.0)], [])
    # Inside brackets that are already at the limit, a factor scales from the limit.
    fragments, messages = _parse_warnings(f"(x (y:0.5):{huge})")
    assert fragments == [("x ", 10.0), ("y", 5.0)]
    assert messages == ["prompt weights are limited to [-10, 10]: the brackets around 'x ' ask for inf; clamped to 10."]
    assert 0 <= _weights(_parse_warnings("[" * 10_000 + "a")[0])[0] < 1e-300


@torch.no_grad()
def test_overflowing_weights_give_finite_conditioning(tiny_model) -> None:
    prompts, negatives = list(OVERFLOWING.values()), list(reversed(OVERFLOWING.values()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cond, uncond = encode_prompts(tiny_model, prompts, negative_prompts=negatives)
    assert len(caught) == 2 * len(prompts)
    assert torch.isfinite(cond).all() and torch.isfinite(uncond).all()


def test_parsing_is_linear_in_the_prompt_length() -> None:
    # 100,000 characters each; the old parser rescaled every later fragment at each closing bracket, so that
    # "(a" * 50,000 took 33 s to parse.
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in ("(a" * 50_000, "[a" * 50_000, "(" * 100_000, "\\(" * 50_000, "a:" * 50_000):
            parse_prompt_attention(text)
            unknown_words(text, {"a"})
    assert time.perf_counter() - start < 5, "well under a second when linear"


@pytest.mark.parametrize(
    "text", ["(BRE()AK:-1)", "(BRE[]AK:-1)", "(BRE\\AK:-1)", "(BRE\\(\\)AK:-1)", "BRE(AK:-1)", "(BREAK_:-1)"]
)
def test_only_a_written_break_word_is_a_break(text: str) -> None:
    fragments = parse_prompt_attention(text)
    assert BREAK not in fragments
    assert all(isinstance(f, tuple) for f in fragments)


@torch.no_grad()
def test_literal_text_weighted_minus_one_is_encoded_as_text(tiny_model) -> None:
    assert parse_prompt_attention("(BRE()AK:-1)") == [("BREAK", -1.0)]
    assert parse_prompt_attention("(BREAK:-1)") == [BREAK]
    assert encode_prompts(tiny_model, ["a (BRE()AK:-1) b"])[0].shape == (1, 77, 32)
    assert encode_prompts(tiny_model, ["a (BREAK:-1) b"])[0].shape == (1, 154, 32)
    literal = encode_prompts(tiny_model, ["a (BRE()AK:-1) b"])[0]
    assert not torch.allclose(literal, encode_prompts(tiny_model, ["a b"])[0])
