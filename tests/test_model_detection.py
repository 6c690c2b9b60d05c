"""ldm.model_detection: the config of any checkpoint, from its key layout.

Layouts (key -> shape, tensors on the meta device) come from the originals' key lists in ``../shared/reference/``;
real files are written with just the tensors the detector reads, at their real shapes, in the published formats
(safetensors, and a CompVis ``.ckpt`` with ``state_dict``), with EMA copies and with or without ``text_model.``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm import cli
from ldm.errors import UserError
from ldm.inference import Pipeline
from ldm.model_detection import FAMILIES, UNET_IN, V_TEST_KEY, detect, detect_checkpoint
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SD = "configs/stable-diffusion/"
DEMO = ROOT / "models" / "ldm" / "shapes"
V2 = "original/stablediffusion/configs/stable-diffusion/"
XL = "original/generative-models/configs/inference/"
CLIP_NORM = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
OPENCLIP_NORM = "cond_stage_model.model.ln_final.weight"
CONTEXT = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def read_tsv(path: Path) -> dict[str, torch.Tensor]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return {k: torch.empty([int(n) for n in shape.split("x")] if shape else [], device="meta") for k, shape, _ in rows}


def with_std(std: float, n: int = 320) -> torch.Tensor:
    """``n`` values whose (biased) standard deviation is exactly ``std``."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return (x - x.mean()) / x.std(unbiased=False) * std


def bias_of(std: float):
    return lambda key: with_std(std)


# (family, the key list, what to change in it, the config it must detect as)
REFERENCE_CASES = [
    ("SD 1.x", "sd-v1-keys.tsv", {}, SD + "v1-inference.yaml"),
    ("SD 1.x inpainting", "sd-v1-keys.tsv", {UNET_IN: (320, 9, 3, 3)}, SD + "v1-inpainting-inference.yaml"),
    ("SD 2.x inpainting", V2 + "v2-inpainting-inference.keys.tsv", {}, SD + "v2-inpainting-inference.yaml"),
    ("SD 2 depth", V2 + "v2-midas-inference.keys.tsv", {}, SD + "v2-midas-inference.yaml"),
    ("x4 upscaler", V2 + "x4-upscaling.keys.tsv", {}, SD + "x4-upscaling.yaml"),
    ("unCLIP H", V2 + "v2-1-stable-unclip-h-inference.keys.tsv", {}, SD + "v2-1-stable-unclip-h-inference.yaml"),
    ("LDM BERT", "original/stable-diffusion/configs/latent-diffusion/txt2img-1p4B-eval.keys.tsv", {},
     "configs/latent-diffusion/txt2img-1p4B-eval.yaml"),
    ("SDXL base", XL + "sd_xl_base.keys.tsv", {}, SD + "sdxl-base-inference.yaml"),
    ("SDXL refiner", XL + "sd_xl_refiner.keys.tsv", {}, SD + "sdxl-refiner-inference.yaml"),
]  # fmt: skip


@pytest.mark.parametrize("family, tsv, changes, config", REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_each_family_of_the_reference_key_lists_detects_as_its_config(reference_dir, family, tsv, changes, config):
    layout = read_tsv(reference_dir / tsv)
    layout.update({k: torch.empty(shape, device="meta") for k, shape in changes.items()})
    detection = detect(layout)
    assert str(detection.config) == config and detection.overrides == ()
    assert detection.line().startswith("detected ") and config in detection.line()


def test_unclip_l_detects_by_its_vit_l_image_encoder():
    """Its original config names a CLIP statistics file no repository ships, so there is no reference key list: the
    layout is the bundled config's, built on the meta device."""
    config = load_config(ROOT / SD / "v2-1-stable-unclip-l-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    assert str(detect(model.state_dict()).config) == SD + "v2-1-stable-unclip-l-inference.yaml"


@pytest.mark.parametrize("tsv", ["v2-inference.keys.tsv", "v2-inference-v.keys.tsv"])
def test_sd2_eps_or_v_from_comfyuis_bias_test(reference_dir, tsv):
    """The 512-base and 768-v layouts are the same; only the weights tell them apart."""
    layout = read_tsv(reference_dir / V2 / tsv)
    v = detect(layout, read=bias_of(0.12))
    assert str(v.config) == SD + "v2-inference-v.yaml" and "v-prediction (768-v)" in v.family
    assert "guessed" in v.reason and f"--config {SD}v2-inference.yaml" in v.reason
    eps = detect(layout, read=bias_of(0.05))
    assert str(eps.config) == SD + "v2-inference.yaml" and "--config " + SD + "v2-inference-v.yaml" in eps.reason


@pytest.mark.parametrize(
    "marks, metadata, config",
    [
        ({"v_pred": ()}, {}, "v2-inference-v.yaml"),
        ({}, {"modelspec.prediction_type": "v"}, "v2-inference-v.yaml"),
        ({}, {"modelspec.prediction_type": "epsilon"}, "v2-inference.yaml"),
        ({}, {"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v2-inference-v.yaml"),
        ({}, {"modelspec.architecture": "stable-diffusion-v2-512"}, "v2-inference.yaml"),
    ],
)
def test_a_files_own_mark_of_v_prediction_wins_over_the_guess(reference_dir, marks, metadata, config):
    layout = read_tsv(reference_dir / V2 / "v2-inference.keys.tsv")
    layout.update({k: torch.empty(shape) for k, shape in marks.items()})
    # The weights would say the opposite: the mark is what counts, and the line says where it came from.
    detection = detect(layout, metadata, read=bias_of(0.05 if config.endswith("-v.yaml") else 0.2))
    assert str(detection.config) == SD + config and "guessed" not in detection.reason
    assert ("v_pred" if marks else next(iter(metadata))) in detection.reason


def test_sd2_without_the_tested_tensor_asks_for_the_config(reference_dir):
    layout = read_tsv(reference_dir / V2 / "v2-inference.keys.tsv")
    del layout[V_TEST_KEY]
    with pytest.raises(UserError, match="does not say whether it predicts eps") as err:
        detect(layout, read=bias_of(0.2))
    assert f"--config {SD}v2-inference.yaml" in str(err.value) and f"--config {SD}v2-inference-v.yaml" in str(err.value)


def test_v_prediction_and_zero_snr_marks_on_sd1_become_overrides(reference_dir):
    layout = read_tsv(reference_dir / "sd-v1-keys.tsv") | {"v_pred": torch.empty(()), "ztsnr": torch.empty(())}
    detection = detect(layout)
    assert str(detection.config) == SD + "v1-inference.yaml" and detection.family == "SD 1.x v-prediction"
    assert detection.overrides == ("model.params.parameterization=v", "model.params.zero_terminal_snr=true")


def test_a_v_prediction_sdxl_is_refused(reference_dir):
    layout = read_tsv(reference_dir / XL / "sd_xl_base.keys.tsv") | {"v_pred": torch.empty(())}
    with pytest.raises(UserError, match="v-prediction SDXL base"):
        detect(layout)


def variants(layout: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The forms one SD file is published in: fp16, pruned (no EMA, no schedule), with EMA copies, EMA-only (A1111's
    v1-5-pruned-emaonly: the EMA weights under model.*), and with newer transformers' names (no ``text_model.``)."""
    ema = {"model_ema." + k[len("model.") :].replace(".", ""): v for k, v in layout.items() if k.startswith("model.")}
    return {
        "fp16": {k: v.to(torch.float16) for k, v in layout.items()},
        "pruned": {k: v for k, v in layout.items() if "." in k},
        "with EMA": layout | ema | {"model_ema.decay": torch.empty(()), "model_ema.num_updates": torch.empty(())},
        "no text_model.": {k.replace("transformer.text_model.", "transformer."): v for k, v in layout.items()},
    }


@pytest.mark.parametrize("tsv", ["sd-v1-keys.tsv", V2 + "v2-inference-v.keys.tsv", XL + "sd_xl_base.keys.tsv"])
def test_published_variants_of_a_file_detect_the_same(reference_dir, tsv):
    layout = read_tsv(reference_dir / tsv)
    expected = detect(layout, read=bias_of(0.12)).config
    for name, variant in variants(layout).items():
        assert detect(variant, read=bias_of(0.12)).config == expected, name


def test_unknown_layouts_are_one_line_naming_what_was_looked_for(reference_dir):
    cases = {
        "VAE": read_tsv(reference_dir / "original/latent-diffusion/models/first_stage_models/kl-f8/config.keys.tsv"),
        "class-conditional LDM": read_tsv(reference_dir / "original/stable-diffusion/configs/latent-diffusion/"
                                          "cin256-v2.keys.tsv"),
        "instruct-pix2pix": read_tsv(reference_dir / "sd-v1-keys.tsv") | {UNET_IN: torch.empty(320, 8, 3, 3)},
    }  # fmt: skip
    for name, layout in cases.items():
        with pytest.raises(UserError) as err:
            detect(layout, name="x.safetensors")
        message = str(err.value)
        assert "\n" not in message and "cannot tell which model 'x.safetensors' is" in message, name
        assert all(family.name in message for family in FAMILIES) and "--config" in message
    assert "a UNet of 8 input channels, CLIP ViT-L/14" in message


def test_a_model_of_a_familys_structure_but_not_its_size_names_the_family(tiny_dir):
    """The shared tiny SD 1.x-layout model: structure SD 1.x, size not (a UNet 32 wide, a 32-wide context)."""
    from safetensors.torch import load_file

    with pytest.raises(UserError, match=r"laid out like SD 1\.x .* 32 channels wide with a 32-wide context") as err:
        detect(load_file(str(tiny_dir / "model.safetensors")))
    assert "\n" not in str(err.value) and "pass its --config" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# Real files


def signature_tensors(text: str, unet_in: int = 4, v_std: float | None = None) -> dict[str, torch.Tensor]:
    """The tensors the detector reads, at the real SD 1.x / 2.x shapes (fp16: 0.7 MB), plus their EMA copies."""
    width = {"clip": 768, "openclip": 1024}[text]
    sd = {
        UNET_IN: torch.zeros(320, unet_in, 3, 3, dtype=torch.float16),
        CONTEXT: torch.zeros(320, width, dtype=torch.float16),
        CLIP_NORM if text == "clip" else OPENCLIP_NORM: torch.ones(width, dtype=torch.float16),
    }
    if v_std is not None:
        sd[V_TEST_KEY] = with_std(v_std).to(torch.float16)
    return sd | {"model_ema." + k[6:].replace(".", ""): v.clone() for k, v in sd.items() if k.startswith("model.")}


def write(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file(state_dict, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 6}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_real_files_detect_from_their_header_or_pickle(tmp_path, suffix):
    sd1 = signature_tensors("clip")
    renamed = {k.replace("text_model.", ""): v for k, v in sd1.items()}
    assert str(detect_checkpoint(write(tmp_path / f"sd1{suffix}", sd1)).config) == SD + "v1-inference.yaml"
    assert str(detect_checkpoint(write(tmp_path / f"new{suffix}", renamed)).config) == SD + "v1-inference.yaml"
    inpainting = write(tmp_path / f"inpainting{suffix}", signature_tensors("clip", unet_in=9))
    assert str(detect_checkpoint(inpainting).config) == SD + "v1-inpainting-inference.yaml"
    # The v test reads that one tensor from the file (a safetensors slice, or one record of the .ckpt's zip).
    v = detect_checkpoint(write(tmp_path / f"v{suffix}", signature_tensors("openclip", v_std=0.13)))
    eps = detect_checkpoint(write(tmp_path / f"eps{suffix}", signature_tensors("openclip", v_std=0.04)))
    assert (str(v.config), str(eps.config)) == (SD + "v2-inference-v.yaml", SD + "v2-inference.yaml")
    assert "is 0.130" in v.reason and "is 0.040" in eps.reason


def test_safetensors_metadata_marks_v_prediction(tmp_path):
    path = write(tmp_path / "m.safetensors", signature_tensors("openclip"), {"modelspec.prediction_type": "v"})
    detection = detect_checkpoint(path)
    assert str(detection.config) == SD + "v2-inference-v.yaml" and "modelspec.prediction_type=v" in detection.reason


def test_a_config_beside_the_checkpoint_wins(tmp_path):
    ckpt = write(tmp_path / "mine.safetensors", signature_tensors("clip"))
    (tmp_path / "mine.yaml").write_text("model: {}")
    detection = detect_checkpoint(ckpt)
    assert detection.path == tmp_path / "mine.yaml" and not detection.bundled


def test_a_detected_config_missing_from_the_project_is_named(tmp_path, monkeypatch):
    import ldm.model_detection as model_detection

    monkeypatch.setattr(model_detection, "ROOT", tmp_path)
    with pytest.raises(UserError, match=f"'sd1.safetensors' is SD 1.x, but {SD}v1-inference.yaml is not in"):
        detect_checkpoint(write(tmp_path / "sd1.safetensors", signature_tensors("clip")))


# ---------------------------------------------------------------------------------------------------------------------
# End to end

needs_demo = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason=f"no demo model in {DEMO}")


@needs_demo
def test_the_demo_model_is_its_folders_config_and_its_layout_alone_names_what_it_resembles():
    assert detect_checkpoint(DEMO / "model.safetensors").path == DEMO / "config.yaml"
    from ldm.checkpoint import read_checkpoint

    with pytest.raises(UserError, match=r"laid out like SD 1\.x"):
        detect(read_checkpoint(DEMO / "model.safetensors", layout_only=True)[0])


@needs_demo
def test_txt2img_without_config_runs_the_demo_model_and_says_which_config(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--ckpt", str(DEMO / "model.safetensors"), "--prompt", "a red circle", "--device", "cpu", "--n_samples",
            "1", "--n_iter", "1", "--ddim_steps", "2", "--skip_grid", "--outdir", str(out)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main("txt2img", args) == 0
    stdout = capsys.readouterr().out
    assert f"detected the checkpoint's own config: {DEMO / 'config.yaml'}" in stdout
    assert len(list((out / "samples").glob("*.png"))) == 1


@needs_demo
def test_marker_keys_load_as_no_weights(tmp_path):
    from ldm.checkpoint import load_model_from_config, read_checkpoint

    state_dict = read_checkpoint(DEMO / "model.safetensors")[0] | {"v_pred": torch.empty(0), "ztsnr": torch.empty(0)}
    write(tmp_path / "marked.safetensors", state_dict)
    load_model_from_config(load_config(DEMO / "config.yaml"), tmp_path / "marked.safetensors", device="cpu")


@needs_demo
def test_pipeline_from_checkpoint_detects_and_keeps_the_detection(capsys):
    pipe = Pipeline.from_checkpoint(DEMO / "model.safetensors", device="cpu", precision="full")
    assert pipe.detection is not None and pipe.detection.path == DEMO / "config.yaml"
    assert "detected" in capsys.readouterr().out


def test_a_detected_bundled_config_is_announced_and_user_overrides_come_last(tmp_path, capsys):
    ckpt = write(tmp_path / "sd1.safetensors", signature_tensors("clip") | {"v_pred": torch.empty(0)})
    config = cli.choose_config(None, ckpt, ["model.params.parameterization=eps"])
    assert config.model.params.parameterization == "eps"  # the user's override wins over the detected one
    line = capsys.readouterr().out.strip()
    assert line == (
        f"detected SD 1.x v-prediction: {SD}v1-inference.yaml with model.params.parameterization=v "
        "(a UNet of 4 input channels, CLIP ViT-L/14 text encoder; its v_pred key)"
    )


@needs_demo
def test_depth2img_and_upscale_refuse_a_detected_model_of_another_kind_before_loading(tmp_path, capsys, monkeypatch):
    import importlib.util

    from PIL import Image

    monkeypatch.setattr("ldm.checkpoint.load_state_dict_into", None)  # loading would fail loudly
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    common = ["--ckpt", str(DEMO / "model.safetensors"), "--init-img", str(image), "--outdir", str(tmp_path / "out")]
    assert cli.main("depth2img", [*common, "--device", "cpu"]) == 2
    assert "depth2img needs a depth-to-image model" in capsys.readouterr().err
    spec = importlib.util.spec_from_file_location("upscale_script", ROOT / "scripts" / "upscale.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(common) == 2
    assert "upscale.py needs the x4 upscaler" in capsys.readouterr().err


def test_an_unknown_checkpoint_is_a_one_line_error_of_the_script(tmp_path, capsys):
    vae = write(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)})
    code = cli.main("txt2img", ["--ckpt", str(vae), "--device", "cpu", "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot tell which model 'vae.safetensors' is" in err
    assert "not a full model checkpoint" in err and not (tmp_path / "out").exists()


LDM_MODELS = ["bsr_sr", "celeba256", "cin256", "ffhq256", "inpainting_big", "layout2img-openimages256", "lsun_beds256",
              "lsun_churches256", "semantic_synthesis256", "semantic_synthesis512", "text2img256"]  # fmt: skip


def ldm_layout(folder: str) -> dict[str, torch.Tensor]:
    """The key layout of a CompVis latent-diffusion pretrained model, from its config built on the meta device."""
    config = load_config(ROOT / "models" / "ldm" / folder / "config.yaml")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return instantiate_from_config(config.model, path="model").state_dict()


@pytest.mark.parametrize("folder", LDM_MODELS)
def test_each_compvis_ldm_model_detects_as_its_config_from_a_bare_file(folder):
    """A bare file (no config.yaml beside it) named as CompVis's downloads unpack, by folder: the layout tells the
    first stage (VQ or KL), the UNet's channels and width, and the conditioning model; the name picks among the
    configs that build the very same architecture."""
    detection = detect(ldm_layout(folder), name=f"{folder}.ckpt")
    assert str(detection.config) == f"models/ldm/{folder}/config.yaml", detection.line()
    assert detection.path.is_file() and detection.overrides == ()


def test_configs_sharing_an_architecture_fall_back_to_the_first_and_say_so():
    detection = detect(ldm_layout("ffhq256"), name="model.ckpt")
    assert str(detection.config) == "models/ldm/celeba256/config.yaml"
    assert "the file name names none" in detection.reason
    assert "FFHQ, LSUN bedrooms: same architecture" in detection.reason


def test_a_ldm_model_of_another_width_is_named_as_its_family_not_guessed():
    layout = ldm_layout("cin256")
    layout[UNET_IN] = torch.empty(128, 4, 3, 3, device="meta")
    with pytest.raises(UserError, match=r"laid out like LDM class-conditional ImageNet \(cin256\).*128 channels wide"):
        detect(layout)
