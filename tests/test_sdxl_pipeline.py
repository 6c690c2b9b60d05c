"""SDXL through the Python API and the scripts: size conditioning as request fields and flags, the zeroed
unconditional text, prompt weighting / chunking / CLIP skip through both text encoders, the 1024 px default, and
txt2img / img2img / inpaint on a tiny SDXL model saved as config + safetensors (tests/sdxl_model.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sdxl_model import BIG_G, CLIP_L, FOURIER, IMAGE, POOLED, tiny_config

from ldm import cli
from ldm.checkpoint import save_checkpoint
from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.inference import Pipeline
from ldm.models.diffusion.sdxl import SDXLDiffusion
from ldm.outputs import parse_parameters, read_parameters
from ldm.request import GenerationRequest, RuntimeOptions
from ldm.request_conditioning import encode_request
from ldm.sdxl_conditioning import check_model_takes, config_size_keys
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square"]
D_L = CLIP_L["hidden_size"]


@pytest.fixture(scope="module")
def base() -> SDXLDiffusion:
    torch.manual_seed(0)
    return instantiate_from_config(tiny_config().model).eval()


@pytest.fixture(scope="module")
def refiner() -> SDXLDiffusion:
    torch.manual_seed(1)
    return instantiate_from_config(tiny_config(refiner=True).model).eval()


def encode(model: SDXLDiffusion, prompts=PROMPTS, negative="", **settings):
    request = GenerationRequest(list(prompts), negative_prompts=negative, **settings)
    request = request.for_model(LatentGeometry.from_config(tiny_config()))  # the refiner's sizes are the base's
    prompts, negatives = request.image_prompts
    with torch.no_grad():
        return encode_request(model, request, prompts, negatives, torch.device("cpu"))


def embed(model: SDXLDiffusion, index: int, values) -> torch.Tensor:
    """The Fourier embedding of embedder ``index`` for one sample's ``values``: (1, n * FOURIER)."""
    return model.conditioner.embedders[index](torch.tensor([values], dtype=torch.float32))


# -- the unconditional branch --


def test_empty_negative_is_the_models_zeroed_uncond_and_plain_prompts_its_cond(base: SDXLDiffusion) -> None:
    cond, uncond = encode(base)
    with torch.no_grad():
        expected_c = base.get_learned_conditioning(PROMPTS)
        expected_uc = base.get_unconditional_conditioning(2)
        negative = base.get_unconditional_conditioning(2, "blurry")
    torch.testing.assert_close(cond["c_crossattn"][0], expected_c["c_crossattn"][0])
    torch.testing.assert_close(cond["c_adm"], expected_c["c_adm"])
    assert torch.all(uncond["c_crossattn"][0] == 0) and torch.all(uncond["c_adm"][:, :POOLED] == 0)
    torch.testing.assert_close(uncond["c_adm"], expected_uc["c_adm"])
    _, encoded = encode(base, negative="blurry")
    torch.testing.assert_close(encoded["c_crossattn"][0], negative["c_crossattn"][0])
    torch.testing.assert_close(encoded["c_adm"], negative["c_adm"])


def test_a_batch_with_some_empty_negatives_is_its_single_runs(base: SDXLDiffusion) -> None:
    _, batch = encode(base, negative=["blurry", ""])
    _, first = encode(base, PROMPTS[:1], "blurry")
    _, second = encode(base, PROMPTS[1:], "")
    torch.testing.assert_close(batch["c_crossattn"][0], torch.cat([first["c_crossattn"][0], second["c_crossattn"][0]]))
    torch.testing.assert_close(batch["c_adm"], torch.cat([first["c_adm"], second["c_adm"]]))
    assert torch.all(batch["c_crossattn"][0][1] == 0) and batch["c_crossattn"][0][0].abs().sum() > 0


# -- size conditioning --


def test_size_fields_default_to_the_output_size_and_the_negatives_to_the_positives(base: SDXLDiffusion) -> None:
    # The base's vector: pooled, then original size, crop, target size (2 * FOURIER each).
    spans = {name: slice(POOLED + i * 2 * FOURIER, POOLED + (i + 1) * 2 * FOURIER) for i, name in enumerate("oct")}
    cond, uncond = encode(base, original_size=(32, 48), crops_coords_top_left=(4, 8), negative_target_size=(8, 24))
    for c in (cond["c_adm"], uncond["c_adm"]):
        torch.testing.assert_close(c[:, spans["o"]], embed(base, 2, [32, 48]).expand(2, -1))
        torch.testing.assert_close(c[:, spans["c"]], embed(base, 3, [4, 8]).expand(2, -1))
    torch.testing.assert_close(cond["c_adm"][:, spans["t"]], embed(base, 4, [IMAGE, IMAGE]).expand(2, -1))
    torch.testing.assert_close(uncond["c_adm"][:, spans["t"]], embed(base, 4, [8, 24]).expand(2, -1))
    plain, _ = encode(base)
    torch.testing.assert_close(plain["c_crossattn"][0], cond["c_crossattn"][0])  # the text is unchanged


def test_refiner_aesthetic_scores_default_to_6_and_2_5(refiner: SDXLDiffusion) -> None:
    cond, uncond = encode(refiner)
    torch.testing.assert_close(cond["c_adm"][:, -FOURIER:], embed(refiner, 3, [6.0]).expand(2, -1))
    torch.testing.assert_close(uncond["c_adm"][:, -FOURIER:], embed(refiner, 3, [2.5]).expand(2, -1))
    cond, uncond = encode(refiner, aesthetic_score=7.0, negative_aesthetic_score=1.0)
    torch.testing.assert_close(cond["c_adm"][:, -FOURIER:], embed(refiner, 3, [7.0]).expand(2, -1))
    torch.testing.assert_close(uncond["c_adm"][:, -FOURIER:], embed(refiner, 3, [1.0]).expand(2, -1))


def test_models_refuse_size_fields_they_are_not_conditioned_on(base, refiner) -> None:
    with pytest.raises(UserError, match="not conditioned on aesthetic_score"):
        encode(base, aesthetic_score=6.0)
    with pytest.raises(UserError, match="not conditioned on target_size"):
        encode(refiner, target_size=(16, 16))
    sd = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    assert config_size_keys(sd) == set()
    with pytest.raises(UserError, match="original_size: size conditioning is for SDXL models"):
        check_model_takes({"original_size": (512, 512)}, config_size_keys(sd), "LatentDiffusion")
    assert config_size_keys(tiny_config()) == {"original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("original_size", (0, 16), "original_size must be two whole numbers"),
        ("crops_coords_top_left", (-1, 0), "crops_coords_top_left must be two whole numbers"),
        ("negative_target_size", (16,), "negative_target_size must be two whole numbers"),
        ("aesthetic_score", "high", "aesthetic_score must be a number"),
    ],
)
def test_bad_size_fields_are_refused_by_the_request(field, value, message) -> None:
    with pytest.raises(UserError, match=message):
        GenerationRequest("a", **{field: value})


# -- prompts through both text encoders --


def test_weights_break_and_chunks_reach_both_encoders(base: SDXLDiffusion) -> None:
    plain, _ = encode(base, ["a red circle"])
    weighted, _ = encode(base, ["a (red:1.5) circle"])
    z, zw = plain["c_crossattn"][0], weighted["c_crossattn"][0]
    assert not torch.allclose(z[..., :D_L], zw[..., :D_L]) and not torch.allclose(z[..., D_L:], zw[..., D_L:])
    torch.testing.assert_close(plain["c_adm"], weighted["c_adm"])  # the pooled vector is unweighted
    broken, uncond = encode(base, ["a red circle BREAK a blue square"])
    assert broken["c_crossattn"][0].shape == (1, 2 * 77, D_L + BIG_G["width"])
    assert uncond["c_crossattn"][0].shape == broken["c_crossattn"][0].shape  # guidance batches them
    # The pooled vector is the first chunk's: "a red circle" alone.
    torch.testing.assert_close(broken["c_adm"], plain["c_adm"])
    long, _ = encode(base, [", ".join(["red circle"] * 40)])
    assert long["c_crossattn"][0].shape[1] == 2 * 77


def test_clip_skip_moves_both_encoders_layer_but_not_the_pooled_vector(base: SDXLDiffusion) -> None:
    plain, _ = encode(base, clip_skip=1)
    skipped, _ = encode(base, clip_skip=2)
    z, zs = plain["c_crossattn"][0], skipped["c_crossattn"][0]
    assert not torch.allclose(z[..., :D_L], zs[..., :D_L]) and not torch.allclose(z[..., D_L:], zs[..., D_L:])
    torch.testing.assert_close(plain["c_adm"], skipped["c_adm"])
    with torch.no_grad():
        ids = base.conditioner.embedders[0].tokenizer(PROMPTS)
        hidden = base.conditioner.embedders[0].transformer(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(zs[..., :D_L], hidden[1])  # layer_idx 2, one earlier


# -- defaults, the Pipeline and the scripts --


def test_the_sdxl_base_config_defaults_to_1024_pixels() -> None:
    for name in ("sdxl-base-inference.yaml", "sdxl-refiner-inference.yaml"):
        geometry = LatentGeometry.from_config(load_config(ROOT / "configs/stable-diffusion" / name))
        assert geometry.default_size == 1024 and geometry.factor == 8


def test_pipeline_takes_size_fields_as_keywords(base: SDXLDiffusion, monkeypatch) -> None:
    pipe = Pipeline(base, LatentGeometry.from_config(tiny_config()), RuntimeOptions("cpu", "full"))
    settings = {"steps": 2, "seed": 3, "sampler": "Euler", "progress": False}
    # The UNet's output layer starts at zero, so the images do not show the conditioning: what the UNet gets does.
    vectors = []
    apply_model = base.apply_model
    monkeypatch.setattr(base, "apply_model", lambda x, t, c: vectors.append(c["c_adm"]) or apply_model(x, t, c))
    plain = pipe.generate("a red circle", **settings)
    resized = pipe.generate("a red circle", original_size=(64, 64), **settings)
    assert plain.images[0].size == (IMAGE, IMAGE)
    half = len(vectors) // 2
    original = slice(POOLED, POOLED + 2 * FOURIER)
    for before, after in zip(vectors[:half], vectors[half:], strict=True):
        torch.testing.assert_close(after[:, original], embed(base, 2, [64, 64]).expand(len(after), -1))
        assert not torch.allclose(before[:, original], after[:, original])
    assert resized.parameters(0) == plain.parameters(0)  # A1111's infotext, with its own fields only
    with pytest.raises(UserError, match="aesthetic_score"):
        pipe.generate("a red circle", aesthetic_score=5.0, **settings)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, base: SDXLDiffusion) -> list[str]:
    folder = tmp_path_factory.mktemp("sdxl")
    OmegaConf.save(tiny_config(), folder / "tiny-sdxl.yaml")
    save_checkpoint(base.state_dict(), folder / "tiny-sdxl.safetensors")
    Image.new("RGB", (IMAGE, IMAGE), (200, 40, 40)).save(folder / "init.png")
    mask = Image.new("L", (IMAGE, IMAGE), 0)
    mask.paste(255, (0, 0, IMAGE // 2, IMAGE))
    mask.save(folder / "mask.png")
    common = ["--config", str(folder / "tiny-sdxl.yaml"), "--ckpt", str(folder / "tiny-sdxl.safetensors")]
    return [*common, "--device", "cpu", "--precision", "full", "--steps", "2", "--n_samples", "1", "--n_iter", "1"]


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_scripts_run_the_tiny_sdxl_model(mode, tiny_files, tmp_path, capsys) -> None:
    folder = Path(tiny_files[1]).parent
    extra = {"txt2img": [], "img2img": ["--init-img", str(folder / "init.png")]}
    extra["inpaint"] = [*extra["img2img"], "--mask", str(folder / "mask.png")]
    out = tmp_path / "out"
    args = [*tiny_files, *extra[mode], "--outdir", str(out), "--skip_grid", "--prompt", "a (red:1.2) circle"]
    assert cli.main(mode, [*args, "--original_size", "32", "32", "--negative_target_size", "8", "8"]) == 0
    (sample,) = sorted(out.glob("samples/*.png"))
    with Image.open(sample) as image:
        assert image.size == (IMAGE, IMAGE)
    fields = parse_parameters(read_parameters(sample))
    assert fields["Size"] == f"{IMAGE}x{IMAGE}" and fields["Seed"] == "42"
    capsys.readouterr()


def test_a_bad_size_flag_is_one_error_line(tiny_files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main("txt2img", [*tiny_files, "--outdir", str(out), "--aesthetic_score", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: this SDXLDiffusion is not conditioned on aesthetic_score")
    assert cli.main("txt2img", [*tiny_files, "--outdir", str(out), "--original_size", "0", "16"]) == 2
    assert capsys.readouterr().err.startswith("error: original_size must be two whole numbers")
    assert not out.exists()


def test_the_refiner_script_takes_aesthetic_scores_and_refuses_a_target_size(refiner, tmp_path, capsys) -> None:
    OmegaConf.save(tiny_config(refiner=True), tmp_path / "refiner.yaml")
    save_checkpoint(refiner.state_dict(), tmp_path / "refiner.safetensors")
    args = ["--config", str(tmp_path / "refiner.yaml"), "--ckpt", str(tmp_path / "refiner.safetensors")]
    args += ["--device", "cpu", "--precision", "full", "--steps", "2", "--n_samples", "1", "--n_iter", "1"]
    out = tmp_path / "out"
    scores = ["--aesthetic_score", "7", "--negative_aesthetic_score", "2", "--crops_coords_top_left", "2", "2"]
    assert cli.main("txt2img", [*args, "--outdir", str(out), "--skip_grid", *scores]) == 0
    assert len(list(out.glob("samples/*.png"))) == 1
    capsys.readouterr()
    assert cli.main("txt2img", [*args, "--outdir", str(tmp_path / "no"), "--target_size", "16", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not conditioned on target_size" in err and "aesthetic_score" in err


def test_bf16_weights_from_the_file_idle_device_and_vae_tiling(tiny_files) -> None:
    config, ckpt = tiny_files[1], tiny_files[3]
    pipe = Pipeline.from_config(config, ckpt, device="cpu", precision="bf16", idle_device="cpu", vae_tiling=True)
    stages = pipe.model.stages()
    assert {p.dtype for p in stages["unet"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in stages["cond_stage"].parameters()} == {torch.bfloat16}  # both text encoders
    result = pipe.generate("a red circle", steps=2, seed=1, sampler="Euler a", progress=False)
    assert result.images[0].size == (IMAGE, IMAGE)
