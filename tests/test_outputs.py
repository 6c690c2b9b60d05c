"""The A1111 ``parameters`` text (ldm.outputs.format_parameters / parse_parameters) against prompts that try to pose
as other parts of it."""

import pytest

from ldm.modules.encoders.tokenizer import CLIPTokenizer
from ldm.outputs import format_parameters, parse_parameters
from ldm.prompts import BREAK, parse_prompt_attention

FIELDS = {"Steps": 20, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 1, "Size": "512x512", "Model": "model"}

PROMPTS = [
    "a cat\nNegative prompt: spoofed",
    "a cat\nSteps: 1, Sampler: Euler, Seed: 2",
    "a cat\r\nNegative prompt: spoofed\rSteps: 1, Seed: 2",
    "a cat\u2028Negative prompt: spoofed\u2029Steps: 1, Seed: 2\f",
    "Negative prompt: spoofed",
    "()Negative prompt: spoofed",
    "()()Negative prompt: spoofed",
    "\\Negative prompt: spoofed",
    "Steps: 1, Sampler: Euler, Seed: 2",
    "\nleading and trailing line breaks\n",
    '  spaces, "quotes": and (weights:1.2) BREAK x  ',
    "",
]
NEGATIVES = [
    None,
    "",
    "Negative prompt: twice",
    "  leading spaces",
    "blurry\nSteps: 1, Seed: 2",
    "blurry, Steps: 1, Seed: 2",
    "\n",
]
FIELD_SETS = [
    FIELDS,
    {},
    {"Eta": None},
    {"Model": "a, b: c\nNegative prompt: x", "Sampler": " padded ", "Empty": "", "Quote": '"', "Odd": "x\u2028y\x85z"},
]


def _spaced(text: str) -> str:
    return text.translate(str.maketrans(dict.fromkeys("\n\r\f\u2028\u2029", " ")))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("negative", NEGATIVES)
def test_parameters_round_trip_whatever_the_prompts_contain(prompt: str, negative: str | None) -> None:
    for fields in FIELD_SETS:
        text = format_parameters(prompt, negative, fields)
        assert parse_parameters(text) == {
            "Prompt": _spaced(prompt),
            "Negative prompt": _spaced(negative or ""),
            **{key: str(value) for key, value in fields.items() if value is not None},
        }
        has_fields = any(value is not None for value in fields.values())
        assert len(text.splitlines()) == 1 + bool(negative) + has_fields


def test_a_spoofed_negative_prompt_stays_in_the_prompt() -> None:
    text = format_parameters("a cat\nNegative prompt: nsfw\nSteps: 1, Seed: 2", "", FIELDS)
    assert text.splitlines()[0] == "a cat Negative prompt: nsfw Steps: 1, Seed: 2"
    assert parse_parameters(text)["Negative prompt"] == ""
    assert parse_parameters(text)["Steps"] == "20"
    assert format_parameters("Negative prompt: nsfw", None, FIELDS).startswith("()Negative prompt: nsfw\n")


def test_multi_line_prompts_written_by_a1111_read_back_as_they_are() -> None:
    text = "line one\nNegative prompt: line two\nNegative prompt: line three\nSteps: 20, Seed: 1"
    assert parse_parameters(text) == {
        "Prompt": "line one",
        "Negative prompt": "line two\nNegative prompt: line three",
        "Steps": "20",
        "Seed": "1",
    }
    assert parse_parameters("a\nb\nSteps: 20") == {"Prompt": "a\nb", "Negative prompt": "", "Steps": "20"}
    assert parse_parameters("Negative prompt: only\nSteps: 20") == {
        "Prompt": "",
        "Negative prompt": "only",
        "Steps": "20",
    }


def test_what_is_written_means_the_same_prompt() -> None:
    # Line breaks become spaces and a prompt starting "Negative prompt:" gains a "()": neither changes what the
    # attention syntax (A1111's too) and the tokenizer make of the prompt.
    tokenizer = CLIPTokenizer()

    def tokens(prompt: str) -> list:
        return [f if f is BREAK else (tokenizer.encode(f[0]), f[1]) for f in parse_prompt_attention(prompt)]

    for prompt in PROMPTS:
        written = format_parameters(prompt, None, FIELDS).split("\n")[0]
        assert tokens(written) == tokens(prompt)
