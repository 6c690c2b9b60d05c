"""SDXL base -> refiner through the Pipeline, on the tiny SDXL-shaped base and refiner (tests/sdxl_model.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sdxl_model import tiny_config

from ldm import cli
from ldm.adapters.embeddings import attach_embeddings, prompt_encoders, save_embedding
from ldm.checkpoint import save_checkpoint
from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.inference import Pipeline
from ldm.outputs import model_hash, parse_parameters
from ldm.refiner import attach_refiner, load_refiner
from ldm.request import GenerationRequest, RuntimeOptions
from ldm.sdxl_conditioning import encode_sdxl_prompts
from ldm.util import instantiate_from_config

SETTINGS = {"steps": 5, "scale": 4.0, "progress": False}


def _pipeline(refiner: bool, seed: int) -> Pipeline:
    torch.manual_seed(seed)
    config = tiny_config(refiner=refiner)
    model = instantiate_from_config(config.model).eval()
    with torch.no_grad():  # the UNet's zero-initialised output layers would make every model predict eps = 0
        for parameter in model.model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return Pipeline(model, LatentGeometry.from_config(config), RuntimeOptions("cpu", "full"))


@pytest.fixture(scope="module")
def pair() -> tuple[Pipeline, Pipeline]:
    return _pipeline(False, 0), _pipeline(True, 1)


def _counting(model: torch.nn.Module) -> list[int]:
    calls = [0]
    apply = model.apply_model

    def counted(*args, **kwargs):
        calls[0] += 1
        return apply(*args, **kwargs)

    model.apply_model = counted
    return calls


def _pixels(result) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in result.images]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_the_refiner_runs_the_last_fifth_with_its_own_conditioning(pair, sampler):
    base, refiner = pair
    plain = base.generate("a red circle", seed=3, sampler=sampler, **SETTINGS)
    attach_refiner(base, refiner)
    try:
        base_calls, refiner_calls = _counting(base.model), _counting(refiner.model)
        refined = base.generate("a red circle", seed=3, sampler=sampler, **SETTINGS)
    finally:
        attach_refiner(base, None)
        del base.model.apply_model, refiner.model.apply_model
    # ceil(0.8 * 5) = 4 steps on the base, 1 on the refiner; both guided: one batched call per step.
    assert (base_calls[0], refiner_calls[0]) == (4, 1)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_pixels(refined), _pixels(plain), strict=True))
    fields = parse_parameters(refined.parameters(0))
    assert fields["Refiner switch at"] == "0.8" and fields["Refiner"] == "SDXLDiffusion"
    assert "Refiner" not in parse_parameters(plain.parameters(0))


def test_switch_at_one_is_the_base_alone(pair):
    base, refiner = pair
    plain = base.generate("a red circle", seed=3, sampler="euler", **SETTINGS)
    attach_refiner(base, refiner)
    try:
        whole = base.generate("a red circle", seed=3, sampler="euler", refiner_switch=1.0, **SETTINGS)
    finally:
        attach_refiner(base, None)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(whole), _pixels(plain), strict=True))


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_a_refined_batch_equals_single_refined_runs(pair, sampler):
    base, refiner = pair
    attach_refiner(base, refiner)
    try:
        batch = base.generate(["a red circle", "a blue square"], seed=7, sampler=sampler, **SETTINGS)
        singles = [
            base.generate(prompt, seed=7 + i, sampler=sampler, **SETTINGS)
            for i, prompt in enumerate(["a red circle", "a blue square"])
        ]
    finally:
        attach_refiner(base, None)
    for i, single in enumerate(singles):
        assert np.abs(_pixels(batch)[i] - _pixels(single)[0]).max() <= 1  # rounding to 8 bits


def test_a_refiner_of_another_latent_space_or_kind_is_refused(pair):
    base, _ = pair
    config = tiny_config(refiner=True)
    config.model.params.channels = 8
    config.model.params.first_stage_config.params.ddconfig.z_channels = 8
    config.model.params.first_stage_config.params.embed_dim = 8
    config.model.params.unet_config.params.in_channels = config.model.params.unet_config.params.out_channels = 8
    other = Pipeline(
        instantiate_from_config(config.model).eval(), LatentGeometry.from_config(config), RuntimeOptions("cpu", "full")
    )
    with pytest.raises(UserError, match="matching pair"):
        attach_refiner(base, other)
    sd_scaled = _pipeline(True, 2)
    sd_scaled.model.scale_factor = 0.18215  # an SD 1.x VAE's latent space: same shape, other latents
    with pytest.raises(UserError, match=r"scale 0.18215\) are not the base's \(4, 2, 1000, 0.13025\)"):
        attach_refiner(base, sd_scaled)
    assert base.refiner is None


@pytest.mark.parametrize("switch", [0.0, 1.5, "0.8", True])
def test_the_switch_is_checked_with_the_request(switch):
    with pytest.raises(UserError, match="refiner switch"):
        GenerationRequest("a red circle", refiner_switch=switch)


# -- the scripts' --refiner, --refiner_config and --refiner_switch --


@pytest.fixture(scope="module")
def pair_files(pair, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl-pair")
    for name, pipe, refiner in (("base", pair[0], False), ("refiner", pair[1], True)):
        OmegaConf.save(tiny_config(refiner=refiner), folder / f"{name}.yaml")
        save_checkpoint(pipe.model.state_dict(), folder / f"{name}.safetensors")
    return folder


def _script_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(folder / "base.yaml"), "--ckpt", str(folder / "base.safetensors"), "--device", "cpu",
            "--precision", "full", "--steps", "5", "--sampler", "Euler", "--n_samples", "1", "--n_iter", "1",
            "--skip_grid", "--outdir", str(out), *extra]  # fmt: skip


def test_txt2img_refines_and_writes_a1111s_refiner_entries(pair_files, tmp_path, capsys):
    refiner = [
        "--refiner",
        str(pair_files / "refiner.safetensors"),
        "--refiner_config",
        str(pair_files / "refiner.yaml"),
    ]
    assert cli.main("txt2img", _script_args(pair_files, tmp_path / "refined", *refiner, "--refiner_switch", "0.6")) == 0
    assert cli.main("txt2img", _script_args(pair_files, tmp_path / "plain")) == 0
    (refined,), (plain,) = (sorted((tmp_path / kind).rglob("*.png")) for kind in ("refined", "plain"))
    fields = parse_parameters(Image.open(refined).text["parameters"])
    assert fields["Refiner"] == f"refiner [{model_hash(pair_files / 'refiner.safetensors')}]"
    assert fields["Refiner switch at"] == "0.6"
    assert "Refiner" not in parse_parameters(Image.open(plain).text["parameters"])
    assert not np.array_equal(np.asarray(Image.open(refined)), np.asarray(Image.open(plain)))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--refiner_config", "x.yaml"], "--refiner_config goes with --refiner"),
        (["--refiner", "missing.safetensors"], "refiner checkpoint 'missing.safetensors' does not exist"),
        (["--refiner", "{ckpt}", "--refiner_config", "{yaml}", "--refiner_switch", "0"], "refiner switch"),
    ],
)
def test_bad_refiner_flags_are_one_line_errors(pair_files, tmp_path, capsys, extra, message):
    extra = [e.format(ckpt=pair_files / "refiner.safetensors", yaml=pair_files / "refiner.yaml") for e in extra]
    assert cli.main("txt2img", _script_args(pair_files, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_refiners_aesthetic_score_is_set_in_a_refined_run(pair):
    """The base takes no aesthetic score, the refiner does: with a refiner attached the request may set it, and it
    changes only the refiner's steps."""
    base, refiner = pair
    with pytest.raises(UserError, match="not conditioned on aesthetic_score"):
        base.generate("a red circle", seed=3, sampler="euler", aesthetic_score=3.0, **SETTINGS)
    attach_refiner(base, refiner)
    try:
        run = {"seed": 3, "sampler": "euler", "refiner_switch": 0.2, **SETTINGS}
        default = base.generate("a red circle", **run)
        same = base.generate("a red circle", aesthetic_score=6.0, **run)
        low = base.generate("a red circle", aesthetic_score=-50.0, **run)  # far off, so the tiny model shows it
    finally:
        attach_refiner(base, None)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(default), _pixels(same), strict=True))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_pixels(default), _pixels(low), strict=True))


def test_with_an_idle_device_only_the_unet_in_charge_is_on_the_device(pair):
    """--idle_device in a refined run: the refiner's UNet comes over at the switch, the base's goes idle, and the
    base's is back when the run ends (here both devices are the CPU: the moves are recorded)."""
    base, refiner = pair
    moves: list[tuple[str, str]] = []
    units = {"base": base.stages["unet"], "refiner": refiner.stages["unet"]}
    for name, unet in units.items():
        unet.to = lambda device, name=name: moves.append((name, str(device)))
    base.idle_device = torch.device("cpu")
    try:
        attach_refiner(base, refiner)
        assert moves == [("refiner", "cpu")]
        moves.clear()
        base.generate("a red circle", seed=3, sampler="euler", **SETTINGS)
    finally:
        attach_refiner(base, None)
        base.idle_device = None
        for unet in units.values():
            del unet.to
    # Switch: the base's goes idle, the refiner's comes; after the run the other way round.
    assert moves == [("base", "cpu"), ("refiner", "cpu"), ("refiner", "cpu"), ("base", "cpu")]


def test_txt2img_takes_the_refiners_aesthetic_score(pair_files, tmp_path, capsys):
    refiner = ["--refiner", str(pair_files / "refiner.safetensors")]
    refiner += ["--refiner_config", str(pair_files / "refiner.yaml")]
    args = _script_args(pair_files, tmp_path / "refined", *refiner, "--aesthetic_score", "3.5")
    assert cli.main("txt2img", args) == 0
    assert len(list((tmp_path / "refined").rglob("*.png"))) == 1
    assert cli.main("txt2img", _script_args(pair_files, tmp_path / "plain", "--aesthetic_score", "3.5")) == 2
    assert "not conditioned on aesthetic_score" in capsys.readouterr().err


def test_the_refiner_takes_the_bases_textual_inversion_embeddings(pair_files, tmp_path):
    """An SDXL embedding in the base's embeddings_dir reaches the refiner (its clip_g vectors), so a refined run
    reads the name the same way in both parts."""
    torch.manual_seed(3)
    vectors = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}
    save_embedding(tmp_path / "emb" / "shiny.safetensors", vectors)
    options = RuntimeOptions("cpu", "full")
    folder = pair_files
    pipe = Pipeline.from_config(
        folder / "base.yaml", folder / "base.safetensors", options, embeddings_dir=tmp_path / "emb"
    )
    refiner = load_refiner(pipe, folder / "refiner.safetensors", folder / "refiner.yaml")
    assert set(refiner.model.textual_inversions) == {"shiny"}
    ((key, encoder),) = prompt_encoders(refiner.model)
    assert key == "clip_g"
    torch.testing.assert_close(encoder.textual_inversion.vectors["shiny"], vectors["clip_g"])
    with torch.no_grad():
        size = refiner.model.output_size
        with_embedding = encode_sdxl_prompts(refiner.model, ["a shiny cat"], [""], 1, {}, *size)[0]
        attach_embeddings(refiner.model, [])
        without = encode_sdxl_prompts(refiner.model, ["a shiny cat"], [""], 1, {}, *size)[0]
    assert not torch.allclose(with_embedding["c_crossattn"][0], without["c_crossattn"][0])
