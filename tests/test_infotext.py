"""A1111 infotext read back: the texts A1111 writes for an empty prompt, and every field this project writes."""

import pytest

from ldm.outputs import format_parameters, parse_parameters

FIELDS = {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1", "Size": "512x512"}
LINE = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"


@pytest.mark.parametrize(
    "text, prompt, negative",
    [
        (LINE, "", ""),  # A1111 strips the text, so an empty prompt leaves the parameters line alone
        ("\n" + LINE, "", ""),  # this project's writer keeps the empty first line
        ("Negative prompt: blurry\n" + LINE, "", "blurry"),
        ("a fox\n" + LINE, "a fox", ""),
    ],
)
def test_an_empty_prompt_is_read_as_empty(text, prompt, negative):
    assert parse_parameters(text) == {"Prompt": prompt, "Negative prompt": negative, **FIELDS}


def test_a_one_line_prompt_with_fewer_than_three_fields_stays_a_prompt():
    # A1111's rule: a last line is the parameters line when it holds at least three of them.
    assert parse_parameters("style: oil, mood: calm") == {"Prompt": "style: oil, mood: calm", "Negative prompt": ""}


def test_a_prompt_alone_that_looks_like_parameters_round_trips():
    text = format_parameters("a: 1, b: 2, c: 3", None, {})
    assert parse_parameters(text) == {"Prompt": "a: 1, b: 2, c: 3", "Negative prompt": ""}


def test_empty_prompt_round_trips_with_and_without_negative():
    for negative in ("", "ugly"):
        text = format_parameters("", negative, {"Steps": 4, "Seed": 3, "Size": "16x16"})
        assert parse_parameters(text) == {
            "Prompt": "", "Negative prompt": negative, "Steps": "4", "Seed": "3", "Size": "16x16",
        }  # fmt: skip
