"""A whole ControlLDM checkpoint (SD weights + ``control_model.*``, as lllyasviel's control_sd15_*.pth) as the base
``--ckpt``: the SD part loads strictly, one line names the ControlNet, and the same file serves as --control_model."""

from pathlib import Path

import pytest
import torch
from controlnet_model import tiny_controlnet, write_config
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from ldm import cli
from ldm.checkpoint import CheckpointError, empty_parameters, load_model_from_config
from ldm.control_files import load_controlnet
from ldm.model_detection import detect
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write_controlldm(path: Path, tiny_weights, net, extra=None) -> Path:
    """The ControlLDM layout: the SD model's keys and the ControlNet's under ``control_model.``, in one file."""
    both = {**tiny_weights, **{"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}}
    save_file({**both, **(extra or {})}, str(path))
    return path


def test_the_sd_part_loads_strictly_and_one_line_names_the_controlnet(tiny_config, tiny_weights, tmp_path, capsys):
    net = tiny_controlnet(tiny_config)
    path = write_controlldm(tmp_path / "control_sd15_tiny.safetensors", tiny_weights, net)
    model = load_model_from_config(tiny_config, path, device="cpu")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_weights.items() if k in loaded)
    assert not any(k.startswith("control_model.") for k in loaded)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    count = len(net.state_dict())
    assert f"a ControlNet (control_model.*, {count} tensors)" in lines[0]
    assert f"--control_model {path}" in lines[0]
    # ... which the ControlNet loader reads from the same file.
    write_config(path, tiny_config)
    control = load_controlnet(path, base_unet=model.model.diffusion_model).state_dict()
    assert all(torch.equal(control[k], v) for k, v in net.state_dict().items())


def test_a_plain_sd_file_prints_nothing_and_other_extra_keys_still_fail(tiny_config, tiny_weights, tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    save_file(dict(tiny_weights), str(plain))
    load_model_from_config(tiny_config, plain, device="cpu")
    assert capsys.readouterr().out == ""
    net = tiny_controlnet(tiny_config)
    stray = {"lora_unet_down.alpha": torch.ones(())}
    path = write_controlldm(tmp_path / "merged.safetensors", tiny_weights, net, stray)
    with pytest.raises(CheckpointError, match="1 unexpected .*lora_unet_down.alpha"):
        load_model_from_config(tiny_config, path, device="cpu")


def read_tsv(path: Path) -> dict[str, torch.Tensor]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return {k: torch.empty([int(n) for n in shape.split("x")] if shape else [], device="meta") for k, shape, _ in rows}


def test_a_controlldm_layout_still_detects_as_its_sd_family(reference_dir):
    node = load_config(ROOT / "configs/controlnet/cldm_v15.yaml").model.params.control_stage_config
    with empty_parameters():
        net = instantiate_from_config(node)
    layout = read_tsv(reference_dir / "sd-v1-keys.tsv")
    layout |= {"control_model." + k: v.to("meta") for k, v in net.state_dict().items()}
    assert detect(layout, name="control_sd15_canny.pth").config == Path("configs/stable-diffusion/v1-inference.yaml")


def test_the_script_takes_one_file_as_base_and_controlnet(tiny_config, tiny_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = write_controlldm(tmp_path / "control_sd15_tiny.safetensors", tiny_weights, tiny_controlnet(tiny_config))
    write_config(path, tiny_config)  # the ControlNet's cldm YAML (the tiny widths are no bundled family)
    OmegaConf.save(tiny_config, tmp_path / "tiny.yaml")
    Image.new("RGB", (16, 16), "white").save(tmp_path / "hint.png")
    args = ["--config", str(tmp_path / "tiny.yaml"), "--ckpt", str(path), "--device", "cpu", "--precision", "full",
            "--ddim_steps", "2", "--H", "16", "--W", "16", "--n_samples", "1", "--skip_grid", "--seed", "1",
            "--outdir", str(tmp_path / "out"), "--control_model", str(path), "--control_image",
            str(tmp_path / "hint.png")]  # fmt: skip
    assert cli.main("txt2img", args) == 0, capsys.readouterr().err
    assert "also holds a ControlNet" in capsys.readouterr().out
    info = Image.open(next((tmp_path / "out").glob("samples/*.png"))).info["parameters"]
    assert "Model: control_sd15_tiny [" in info
