"""A1111's prompt editing, alternation and AND: the parser, and the conditioning each step's model calls see (with an
exact Gaussian-data model standing in for the UNet; the tiny models are in test_prompt_schedule_models.py)."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.guidance import Denoiser, GuidedEps, StepConditioning
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import SAMPLERS, _grid, sample
from ldm.models.diffusion.step_clock import trace_call_steps
from ldm.prompt_schedule import encode_scheduled, is_plain, prompt_schedule, split_and, text_at_step
from tests.analytic_model import GaussianDataModel

# A1111's own examples (modules/prompt_parser.py's doctests), over 10 steps.
A1111_CASES = {
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)],
    "[fe|]male": [(i, "female" if i % 2 else "male") for i in range(1, 11)],
    "[fe|||]male": [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)],
}


@pytest.mark.parametrize(("prompt", "expected"), list(A1111_CASES.items()))
def test_schedules_are_a1111s(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize(
    ("prompt", "texts"),
    [
        ("a [cat::2] b", ["a cat b"] * 3 + ["a  b"] * 3),  # removed after step 2
        ("[dog:3]", [""] * 4 + ["dog"] * 2),  # added after step 3
        ("[a:b:0.5]", ["a"] * 4 + ["b"] * 2),  # int(0.5 * 6) = 3: a for steps 0..3
        (
            "x [(red:1.2):[blue:green:4]:1] BREAK y",
            ["x (red:1.2) BREAK y"] * 2 + ["x blue BREAK y"] * 3 + ["x green BREAK y"],
        ),
        ("[a|b|c]", ["a", "a", "b", "c", "a", "b"]),  # A1111's: steps 0 and 1 both take the first option
        ("[a|b] [c:d:2]", ["a c", "a c", "b c", "a d", "b d", "a d"]),
        ("time: 5:00 [a:b]", ["time: 5:00 [a:b]"] * 6),  # not a schedule: no number
        (r"\[a:b:1\]", [r"\[a:b:1\]"] * 6),  # escaped brackets are text
        ("[a:b:c:1]", ["[a:b:c:1]"] * 6),
        ("[a:b:6] [c:d:9]", ["a c"] * 6),  # switches at or after the last step never happen
        ("[a:b:-1] [c:d:1e999] [e:f:-1e999]", ["b c f"] * 6),  # before never / always
    ],
)
def test_text_at_each_step(prompt, texts):
    schedule = prompt_schedule(prompt, 6)
    assert [text_at_step(schedule, step) for step in range(6)] == texts
    assert schedule[-1][0] == 6


def test_brackets_nested_thousands_deep_are_text():
    prompt = "(" * 5000 + "[a:b:2]" + ")" * 5000
    assert prompt_schedule(prompt, 6) == [(6, prompt)]
    assert prompt_schedule("[" * 300 + "a:b:2" + "]" * 300, 6)[0][1].startswith("[" * 299)


def test_and_splits_sub_prompts_with_weights_as_a1111():
    assert split_and("a cat :1.2 AND a dog :0.8") == [("a cat", 1.2), (" a dog", 0.8)]
    assert split_and("a AND b") == [("a", 1.0), (" b", 1.0)]
    assert split_and("a cat :1") == [("a cat", 1.0)]  # a weight without AND still is one
    assert split_and("ANDROID and band") == [("ANDROID and band", 1.0)]
    assert split_and("a cat") == [("a cat", 1.0)]
    assert is_plain("a (red:1.2) cat BREAK x", 10)
    assert not is_plain("a cat :0.5", 10) and not is_plain("a [b:2]", 10) and not is_plain("a AND b", 10)
    assert is_plain("a AND b", 10, compose=False)  # negative prompts: AND is text


# -- what the model sees, step by step --


class RecordingModel(GaussianDataModel):
    """The exact Gaussian-data model, recording the conditioning rows ((B,) codes) of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[float]] = []

    def apply_model(self, x_t, t, cond=None):
        self.seen.append(cond.tolist())
        return super().apply_model(x_t, t, cond)


CODES = {"": 0.0, "a": 0.1, "b": 0.2, "c": 0.3, "neg": -0.1, "later": -0.2}


def code_encoder(prompts: list[str], negatives: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in text encoder: each text is its code, a (N,) conditioning the Gaussian model adds to its mean."""
    return (torch.tensor([CODES[p.strip()] for p in prompts], dtype=torch.float64),
            torch.tensor([CODES[n.strip()] for n in negatives], dtype=torch.float64))  # fmt: skip


def sample_grid(spec, steps):
    return _grid(spec, spec.schedule, steps, GaussianDataModel().schedule)


def run(prompts, negatives, steps=6, sampler="euler", scale=3.0, model=None, **kwargs):
    model = model if model is not None else RecordingModel()
    cond, uncond = encode_scheduled(code_encoder, prompts, negatives, steps)
    kwargs.setdefault("shape", (len(prompts), 1, 2, 2))
    out = sample(model, sampler, steps, cond, uncond, scale, noise=Noise(range(len(prompts))), progress=False, **kwargs)
    return out, model


def test_prompt_editing_switches_at_its_step_and_the_uncond_comes_first_in_one_call():
    _, model = run(["[a:b:0.5]"], [""])
    # One call per step: [uncond, cond]; a for steps 0..3 (int(0.5 * 6) = 3), then b.
    assert model.seen == [[0.0, 0.1]] * 4 + [[0.0, 0.2]] * 2


def test_alternation_and_negative_schedules():
    _, model = run(["[a|b]"], ["[neg:later:1]"])
    assert model.seen == [[-0.1, 0.1], [-0.1, 0.1], [-0.2, 0.2], [-0.2, 0.1], [-0.2, 0.2], [-0.2, 0.1]]


def test_a_schedule_equals_the_hand_split_run():
    full, _ = run(["[a:b:3]"], ["neg"])
    first, _ = run(["a"], ["neg"], end=4 / 6)  # steps 0..3
    second, _ = run(["b"], ["neg"], start=4 / 6, x_T=first)
    torch.testing.assert_close(full, second, rtol=0, atol=0)
    # A continuation counts its steps from the run's first: the schedule is b's from step 4 on.
    continued, _ = run(["[a:b:3]"], ["neg"], start=4 / 6, x_T=first)
    torch.testing.assert_close(continued, second, rtol=0, atol=0)


def test_dpm_fast_and_adaptive_go_by_noise_level():
    for sampler in ("dpm_fast", "dpm_adaptive"):
        _, model = run(["[a:b:2]"], [""], sampler=sampler)
        codes = [row[1] for row in model.seen]
        assert codes[0] == 0.1 and codes[-1] == 0.2, sampler
        # DPM adaptive's rejected attempts go back up in noise, and so to a's text.
        assert codes == sorted(codes) or sampler == "dpm_adaptive"


def test_every_call_of_a_step_takes_that_steps_text():
    # DPM2 calls the model at each step's start and at a midpoint below it; Heun at the start and (a correction) at
    # the next step's noise level; PLMS's first step is Heun's. All with the step's text: a for steps 0..2.
    for sampler, a_calls in [("dpm_2", 6), ("heun", 6), ("plms", 4), ("euler", 3), ("uni_pc", 3)]:
        _, model = run(["[a:b:2]"], [""], sampler=sampler)
        assert [row[1] for row in model.seen] == [0.1] * a_calls + [0.2] * (len(model.seen) - a_calls), sampler


@pytest.mark.parametrize("name", sorted(name for name, spec in SAMPLERS.items() if spec.fixed_steps))
def test_the_traced_steps_of_every_sampler_are_its_reported_steps(name):
    # The dry run's steps, call by call, are those of a real run's reports: the call just before report i is step
    # i's first, and steps never go back. (DPM adaptive's calls depend on the model: it goes by noise level.)
    spec, model, reports = SAMPLERS[name], RecordingModel(), []
    sigmas = sample_grid(spec, 6)
    options = {"eta": spec.eta} if spec.eta is not None else {}
    traced = trace_call_steps(spec.loop, sigmas, options)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    spec.loop(Denoiser(GuidedEps(model, torch.tensor([0.1]), torch.tensor([0.0]), 3.0)), x, sigmas,
              noise=Noise([0]), callback=lambda step: reports.append((len(model.seen), step["i"])), progress=False,
              **options)  # fmt: skip
    assert len(traced) == len(model.seen)
    assert [traced[calls - 1] for calls, _ in reports] == [i for _, i in reports]
    assert traced == sorted(traced)


def test_img2img_counts_from_the_first_step_it_runs_over_the_requested_steps():
    init = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    # Euler at strength 0.5 runs int(0.5 * 6) + 1 = 4 steps, counted 0..3: a for 0..2, b for step 3.
    _, model = run(["[a:b:2]"], [""], init_latent=init, strength=0.5, shape=None)
    assert [row[1] for row in model.seen] == [0.1, 0.1, 0.1, 0.2]


def test_the_refiner_hand_off_keeps_counting_steps():
    from ldm.models.diffusion.handoff import Handoff

    alone, model = run(["[a:b:3]"], [""])
    cond, uncond = encode_scheduled(code_encoder, ["[a:b:3]"], [""], 6)
    second = RecordingModel()
    handed, _ = run(["[a:b:3]"], [""], handoff=Handoff(second, cond, uncond, switch=0.5))
    assert [row[1] for row in second.seen] == [0.1, 0.2, 0.2]  # steps 3 (still a's, 3 <= 3), 4 and 5
    torch.testing.assert_close(handed, alone, rtol=0, atol=0)


def test_and_is_a1111s_composable_guidance_in_one_call():
    scale = 3.0
    out, model = run(["a :1.5 AND b :-0.5", "c"], ["neg", ""], scale=scale, sampler="euler", steps=2)
    assert model.seen[0] == [-0.1, 0.0, 0.1, 0.2, 0.3]  # uncond of both images, then every sub-prompt
    model, x, t = GaussianDataModel(), torch.randn(2, 1, 2, 2, dtype=torch.float64), 500
    out_c = model.apply_model(x[[0, 0, 1]], torch.full((3,), t), torch.tensor([0.1, 0.2, 0.3]))
    u = model.apply_model(x, torch.full((2,), t), torch.tensor([-0.1, 0.0]))
    cond = StepConditioning(torch.tensor([0.1, 0.2, 0.3]), ((0, 1, 2),), (0, 0, 1), (1.5, -0.5, 1.0))
    uncond = StepConditioning(torch.tensor([-0.1, 0.0]), ((0, 1),), (0, 1), (1.0, 1.0))
    composed = GuidedEps(model, cond, uncond, scale).model_output(x, t)
    expected = torch.stack([
        u[0] + 1.5 * scale * (out_c[0] - u[0]) - 0.5 * scale * (out_c[1] - u[0]),
        u[1] + scale * (out_c[2] - u[1]),
    ])  # fmt: skip
    torch.testing.assert_close(composed, expected)


def test_and_guides_even_at_scale_1_and_rescale_aims_at_the_composed_estimate():
    cond = StepConditioning(torch.tensor([0.1, 0.2]), ((0, 1),), (0, 0), (0.5, 0.5))
    uncond = StepConditioning(torch.tensor([0.0]), ((0,),), (0,), (1.0,))
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    model = GaussianDataModel()
    mean_cond = GuidedEps(model, torch.tensor([0.15]), torch.tensor([0.0]), 1.0).model_output(x, 500)
    # The model is linear in its cond, so the half-and-half composition is the mean conditioning.
    torch.testing.assert_close(GuidedEps(model, cond, uncond, 1.0).model_output(x, 500), mean_cond)
    rescaled = GuidedEps(model, cond, uncond, 5.0, guidance_rescale=1.0).model_output(x, 500)
    assert float(rescaled.std()) == pytest.approx(float(mean_cond.std()))


def test_a_single_weight_1_prompt_is_the_plain_prompt_exactly():
    plain, plain_model = run(["a"], ["neg"], sampler="dpmpp_2m")
    weighted, weighted_model = run(["a :1"], ["neg"], sampler="dpmpp_2m")
    torch.testing.assert_close(weighted, plain, rtol=0, atol=0)
    assert plain_model.calls == weighted_model.calls == 6


def test_plain_prompts_pass_through_the_encoder_untouched():
    cond, uncond = encode_scheduled(code_encoder, ["a", "b"], ["neg", ""], 6)
    assert isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)
    _, model = run(["a"], [""], scale=1.0)
    assert model.calls == 6 and model.seen[0] == [0.1]  # scale 1: no unconditional branch, as before


def test_a_batch_with_different_schedules_is_its_single_runs():
    batch, _ = run(["[a:b:2]", "[c|a] AND b :0.5"], ["neg", "[later:neg:4]"], sampler="euler_ancestral")
    first, _ = run(["[a:b:2]"], ["neg"], sampler="euler_ancestral")
    cond, uncond = encode_scheduled(code_encoder, ["[c|a] AND b :0.5"], ["[later:neg:4]"], 6)
    second = sample(RecordingModel(), "euler_ancestral", 6, cond, uncond, 3.0, shape=(1, 1, 2, 2), noise=Noise([1]),
                    progress=False)  # fmt: skip
    torch.testing.assert_close(batch, torch.cat([first, second]))


def test_each_distinct_text_is_encoded_once():
    texts = []

    def encoder(prompts, negatives):
        texts.append((list(prompts), list(negatives)))
        return code_encoder(prompts, negatives)

    encode_scheduled(encoder, ["[a|b] AND c", "a"], ["[neg:later:2]", "neg"], 20)
    # One call; the shorter side is padded with a repeat. (" c" is its own text, as in A1111.)
    assert texts == [(["a", "b", " c"], ["neg", "later", "neg"])]
