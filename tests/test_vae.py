"""``--vae FILE`` into the first stage, and SDXL's VAE kept float32 in float16 runs (tiny SDXL-shaped models)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sdxl_model import tiny_config

from ldm import cli
from ldm.checkpoint import save_checkpoint
from ldm.errors import UserError
from ldm.inference import Pipeline
from ldm.outputs import model_hash, parse_parameters
from ldm.util import instantiate_from_config
from ldm.vae import decodes_in_float32, float32_decoder, load_vae, prepare_first_stage


def _model(seed: int, **vae: object):
    torch.manual_seed(seed)
    config = tiny_config()
    config.model.params.first_stage_config.params.ddconfig.update(vae)
    return instantiate_from_config(config.model).eval()


@pytest.fixture(scope="module")
def donor():
    return _model(1)


def _vae_files(donor, folder: Path) -> dict[str, Path]:
    state = donor.first_stage_model.state_dict()
    files = {"prefixed": folder / "prefixed.safetensors", "bare": folder / "bare.ckpt"}
    save_checkpoint({f"first_stage_model.{k}": v for k, v in state.items()}, files["prefixed"])
    # A VAE training checkpoint as A1111 users hold them: bare keys, the loss's weights, the EMA counters.
    extra = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)}
    torch.save({"state_dict": {**state, **extra}}, files["bare"])
    return files


@pytest.mark.parametrize("layout", ["prefixed", "bare"])
def test_a_vae_file_replaces_the_first_stage_weights(donor, tmp_path, layout):
    model = _model(0)
    unet_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    load_vae(model, _vae_files(donor, tmp_path)[layout])
    for key, value in model.first_stage_model.state_dict().items():
        assert torch.equal(value, donor.first_stage_model.state_dict()[key]), key
    assert all(torch.equal(v, unet_before[k]) for k, v in model.model.state_dict().items())


def test_a_vae_of_another_shape_or_layout_is_a_clear_error(tmp_path):
    model, other = _model(0), _model(1, ch=64)
    save_checkpoint(other.first_stage_model.state_dict(), tmp_path / "narrow.safetensors")
    with pytest.raises(UserError, match=r"not a VAE of this model's first stage \(of another shape: decoder\."):
        load_vae(model, tmp_path / "narrow.safetensors")
    save_checkpoint({"decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=r"missing: .* more"):
        load_vae(model, tmp_path / "partial.safetensors")
    save_checkpoint({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, tmp_path / "d.safetensors")
    with pytest.raises(UserError, match="diffusers-layout VAE"):
        load_vae(model, tmp_path / "d.safetensors")
    with pytest.raises(FileNotFoundError, match="check --vae"):
        load_vae(model, tmp_path / "absent.safetensors")


def test_fp16_sdxl_decodes_in_float32_and_stays_finite():
    model = _model(0)
    for stage in model.stages().values():
        stage.to(torch.float16)  # what Pipeline.from_config does for --precision fp16
    assert prepare_first_stage(model, "fp16", torch.device("cpu"), None)
    assert next(model.first_stage_model.parameters()).dtype == torch.float32
    assert next(model.model.parameters()).dtype == torch.float16
    seen = []
    model.first_stage_model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    images = float32_decoder(model.decode_first_stage, torch.device("cpu"))(latents)
    assert seen == [torch.float32] and images.dtype == torch.float32 and torch.isfinite(images).all()


def test_only_float16_runs_of_models_that_need_it_without_a_vae_file_upcast(tmp_path):
    sdxl, cuda, cpu = _model(0), torch.device("cuda"), torch.device("cpu")
    assert decodes_in_float32(sdxl, "fp16", cuda) and decodes_in_float32(sdxl, "autocast", cuda)
    assert not decodes_in_float32(sdxl, "autocast", cpu)  # float32 compute there
    assert not decodes_in_float32(sdxl, "bf16", cuda) and not decodes_in_float32(sdxl, "full", cuda)
    assert not decodes_in_float32(sdxl, "fp16", cuda, vae_file=tmp_path / "sdxl-vae-fp16-fix.safetensors")
    sd = torch.nn.Module()  # an SD 1.x/2.x model: its VAE is fine in float16
    assert not decodes_in_float32(sd, "fp16", cuda)


def test_a_fixed_vae_file_keeps_the_models_precision(donor, tmp_path):
    model = _model(0)
    for stage in model.stages().values():
        stage.to(torch.float16)
    assert not prepare_first_stage(model, "fp16", torch.device("cpu"), _vae_files(donor, tmp_path)["prefixed"])
    assert next(model.first_stage_model.parameters()).dtype == torch.float16


def test_sd1_models_take_a_vae_file_too(tiny_model, tmp_path):
    state = {k: v + 0.01 for k, v in tiny_model.first_stage_model.state_dict().items()}
    save_checkpoint(state, tmp_path / "sd-vae.safetensors")
    model = copy.deepcopy(tiny_model)  # the fixture is shared
    load_vae(model, tmp_path / "sd-vae.safetensors")
    for key, value in model.first_stage_model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.fixture(scope="module")
def sdxl_files(donor, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl-vae")
    OmegaConf.save(tiny_config(), folder / "base.yaml")
    save_checkpoint(_model(0).state_dict(), folder / "base.safetensors")
    _vae_files(donor, folder)
    return folder


def test_pipeline_and_txt2img_take_vae_and_record_it_as_a1111(donor, sdxl_files, tmp_path, capsys):
    pipe = Pipeline.from_config(sdxl_files / "base.yaml", None, device="cpu", precision="full",
                                vae=sdxl_files / "bare.ckpt")  # fmt: skip
    assert torch.equal(
        pipe.model.first_stage_model.decoder.conv_out.weight, donor.first_stage_model.decoder.conv_out.weight
    )
    fields = parse_parameters(pipe.generate("a red circle", steps=2, seed=1, progress=False).parameters(0))
    assert (fields["VAE"], fields["VAE hash"]) == ("bare.ckpt", model_hash(sdxl_files / "bare.ckpt"))
    args = ["--config", str(sdxl_files / "base.yaml"), "--ckpt", str(sdxl_files / "base.safetensors"), "--device",
            "cpu", "--precision", "full", "--steps", "2", "--n_samples", "1", "--n_iter", "1",
            "--skip_grid"]  # fmt: skip
    out = tmp_path / "out"
    assert cli.main("txt2img", [*args, "--outdir", str(out), "--vae", str(sdxl_files / "prefixed.safetensors")]) == 0
    (image,) = out.rglob("*.png")
    assert parse_parameters(Image.open(image).text["parameters"])["VAE"] == "prefixed.safetensors"
    assert cli.main("txt2img", [*args, "--outdir", str(tmp_path / "x"), "--vae", "nowhere.safetensors"]) == 2
    assert "VAE file 'nowhere.safetensors' does not exist; check --vae." in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
