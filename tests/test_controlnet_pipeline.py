"""ControlNets in generation runs of the tiny SD model: txt2img, img2img, inpainting, the API and the scripts."""

import numpy as np
import pytest
import torch
from controlnet_model import tiny_controlnet, write_cldm, write_diffusers
from PIL import Image
from safetensors.torch import save_file

from ldm import cli
from ldm.control import ControlSpec, run_steps
from ldm.errors import UserError
from ldm.inference import Pipeline
from ldm.outputs import parse_parameters
from ldm.request import GenerationRequest

SIZE = dict(height=16, width=16)


@pytest.fixture(scope="module")
def files(tiny_config, tmp_path_factory):
    """A tiny ControlNet as a cldm file and a diffusers file, a second one, and control images."""
    folder = tmp_path_factory.mktemp("controlnets")
    net = tiny_controlnet(tiny_config, seed=0)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / "hint.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "hint2.png")
    return {
        "cldm": write_cldm(folder / "control_tiny.safetensors", net, tiny_config),
        "diffusers": write_diffusers(folder / "diffusion_pytorch_model.safetensors", net, tiny_config),
        "other": write_cldm(folder / "control_other.pth", tiny_controlnet(tiny_config, seed=1), tiny_config),
        "fresh": write_cldm(folder / "control_fresh.safetensors", tiny_controlnet(tiny_config, None), tiny_config),
        "hint": folder / "hint.png",
        "hint2": folder / "hint2.png",
        "folder": folder,
    }


def generate(pipe, *controls, **settings):
    settings = {"steps": 3, "seed": 3, "sampler": "Euler", "n": 1, **SIZE, **settings}
    return pipe.generate("a red circle", negative_prompt="blue", controls=list(controls), **settings)


def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))


@pytest.fixture(scope="module")
def base(pipe):
    return generate(pipe)


def test_a_controlnet_changes_the_image_and_strength_zero_or_an_empty_range_gives_the_base_exactly(pipe, files, base):
    spec = ControlSpec(files["cldm"], files["hint"])
    assert not same(generate(pipe, spec), base)
    assert same(generate(pipe, ControlSpec(files["cldm"], files["hint"], strength=0.0)), base)
    assert same(generate(pipe, ControlSpec(files["cldm"], files["hint"], start=1.0, end=1.0)), base)


def test_a_fresh_controlnet_with_zero_convolutions_gives_the_base_exactly(pipe, files, base):
    assert same(generate(pipe, ControlSpec(files["fresh"], files["hint"])), base)


def test_the_cldm_and_the_diffusers_file_of_the_same_weights_give_the_same_image(pipe, files):
    cldm = generate(pipe, ControlSpec(files["cldm"], files["hint"], strength=0.7))
    assert same(generate(pipe, ControlSpec(files["diffusers"], files["hint"], strength=0.7)), cldm)


def test_two_controlnets_add_their_residuals(pipe, files, base):
    one, two = ControlSpec(files["cldm"], files["hint"]), ControlSpec(files["other"], files["hint2"], strength=0.8)
    both = generate(pipe, one, two)
    assert not same(both, generate(pipe, one)) and not same(both, generate(pipe, two))
    # Halves of one ControlNet add up to it exactly (0.5 r + 0.5 r = r in floating point).
    half = ControlSpec(files["cldm"], files["hint"], strength=0.5)
    assert same(generate(pipe, half, half), generate(pipe, one))


def test_the_guidance_range_counts_the_steps_of_the_run(pipe, files, monkeypatch):
    seen = []
    spec = ControlSpec(files["cldm"], files["hint"], start=0.25, end=0.5)
    from ldm.control import ControlStack

    call = ControlStack.__call__
    monkeypatch.setattr(ControlStack, "__call__", lambda self, *a: seen.append(self.step) or call(self, *a))
    # Heun's correction evaluates at the next step's sigma, after the step's callback: it counts as that step.
    generate(pipe, spec, sampler="Heun", steps=4)
    assert seen == [0, 1, 1, 2, 2, 3, 3]
    seen.clear()
    monkeypatch.setattr(ControlStack, "__call__", lambda self, *a: seen.append(spec.active(self.step, self.steps)))
    generate(pipe, spec, steps=8)
    assert seen == [False, False, True, True, True, False, False, False]


def test_img2img_and_inpainting_take_controls_and_count_their_share_of_the_steps(pipe, files, tmp_path):
    init = Image.open(files["hint2"]).convert("RGB")
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    spec = ControlSpec(files["cldm"], files["hint"])
    for extra in ({"init_image": init, "strength": 0.5}, {"init_image": init, "mask": mask}):
        plain = generate(pipe, **extra)
        assert not same(generate(pipe, spec, **extra), plain)
        assert same(generate(pipe, ControlSpec(files["cldm"], files["hint"], strength=0), **extra), plain)
    assert run_steps(GenerationRequest("a", steps=20, sampler="Euler", init_image=init, strength=0.5)) == 11
    assert run_steps(GenerationRequest("a", steps=20, sampler="ddim", init_image=init, strength=0.5)) == 10
    assert run_steps(GenerationRequest("a", steps=20)) == 20


def test_infotext_has_a1111s_controlnet_entries(pipe, files):
    spec = ControlSpec(files["cldm"], files["hint"], strength=0.5, start=0.1, end=0.9, preprocessor="invert")
    fields = parse_parameters(generate(pipe, spec).parameters(0))
    entry = fields["ControlNet 0"]
    assert entry.startswith("Module: invert, Model: control_tiny [") and "], Weight: 0.5, " in entry
    assert entry.endswith("Guidance Start: 0.1, Guidance End: 0.9")


def test_api_takes_dicts_and_bad_settings_are_user_errors(pipe, files, base):
    as_dict = generate(pipe, {"model": files["cldm"], "image": files["hint"], "strength": 0.0})
    assert same(as_dict, base)
    for bad, message in [
        ({"strength": -1}, "strength must be at least 0"),
        ({"start": 0.6, "end": 0.5}, "0 <= start <= end <= 1"),
        ({"preprocessor": "hed"}, "unknown ControlNet preprocessor"),
        ({"weight": 1}, "unknown ControlNet setting"),
    ]:
        with pytest.raises(UserError, match=message):
            generate(pipe, {"model": files["cldm"], "image": files["hint"], **bad})
    with pytest.raises(UserError, match="does not exist"):
        generate(pipe, ControlSpec(files["folder"] / "missing.pth", files["hint"]))


def test_the_controlnets_leave_the_model_after_a_run_even_a_failed_one(pipe, files):
    def fail(i, denoised):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(pipe, ControlSpec(files["cldm"], files["hint"]), callback=fail)
    assert pipe.model.model.control is None


def test_with_an_idle_device_the_controlnets_wait_there_and_come_to_the_device_for_the_run(pipe, files, base):
    """As the refiner's UNet: loaded onto the idle device, on the device while sampling, back after (even when the
    run fails). Both devices are the CPU here (the idle one as cpu:0): the moves are recorded."""
    spec = ControlSpec(files["cldm"], files["hint"], strength=0.0)
    unet = pipe.model.model.diffusion_model
    net = pipe.controlnets.get(spec.model, unet, pipe.device)  # the cached one
    moves: list[str] = []
    seen_while_sampling: list[str] = []

    def to(device, *args):
        moves.append(str(device))
        return net

    def during(i, denoised):
        seen_while_sampling.append(moves[-1])
        if i == 1:
            raise KeyboardInterrupt

    net.to = to
    pipe.idle_device = torch.device("cpu", 0)
    try:
        assert same(generate(pipe, spec), base)
        assert moves == ["cpu:0", "cpu", "cpu:0"]
        moves.clear()
        with pytest.raises(KeyboardInterrupt):
            generate(pipe, spec, callback=during)
        assert moves == ["cpu:0", "cpu", "cpu:0"] and seen_while_sampling == ["cpu", "cpu"]
        pipe.idle_device = None
        moves.clear()
        generate(pipe, spec)
        assert moves == ["cpu"], "without an idle device it is put on the device once, when the run takes it"
    finally:
        pipe.idle_device = None
        del net.to


def run_main(mode, args, capsys):
    code = cli.main(mode, args)
    return code, capsys.readouterr().err


@pytest.fixture
def tiny_files(tiny_config, tiny_dir, tmp_path):
    from omegaconf import OmegaConf

    OmegaConf.save(tiny_config, tmp_path / "tiny.yaml")
    return ["--config", str(tmp_path / "tiny.yaml"), "--ckpt", str(tiny_dir / "model.safetensors"), "--device", "cpu",
            "--precision", "full", "--ddim_steps", "3", "--H", "16", "--W", "16", "--n_samples", "1", "--skip_grid",
            "--seed", "1"]  # fmt: skip


def test_script_flags_pair_up_in_groups(files, tiny_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    control = ["--control_model", str(files["cldm"]), "--control_image", str(files["hint"]),
               "--controlnet", str(files["other"]), "--control_image", str(files["hint2"]),
               "--control_weight", "0.9", "--control_weight", "0.4", "--control_end", "0.5",
               "--control_preprocessor", "scribble"]  # fmt: skip
    code, err = run_main("txt2img", [*tiny_files, "--outdir", str(out), *control], capsys)
    assert code == 0, err
    info = Image.open(next(out.glob("samples/*.png"))).info["parameters"]
    fields = parse_parameters(info)
    assert "Weight: 0.9" in fields["ControlNet 0"] and "Model: control_other [" in fields["ControlNet 1"]
    assert "Module: scribble" in fields["ControlNet 1"] and "Guidance End: 0.5" in fields["ControlNet 1"]
    code, err = run_main("txt2img", [*tiny_files, "--outdir", str(out), *control[:6]], capsys)
    assert code == 2 and "got 2 --control_model for 1 --control_image" in err
    code, err = run_main("txt2img", [*tiny_files, "--outdir", str(out), *control[:4], "--control_start", "0.1",
                                     "--control_start", "0.2"], capsys)  # fmt: skip
    assert code == 2 and "give --control_start once for all ControlNets or once each (1), not 2 times" in err


def test_sdxl_controlnets_take_the_adm_vector_and_load_from_diffusers_files(tmp_path):
    from controlnet_model import diffusers_key
    from omegaconf import OmegaConf
    from sdxl_model import tiny_config as sdxl_config

    from ldm.control_files import load_controlnet
    from ldm.modules.diffusionmodules.controlnet import ControlNet

    config = sdxl_config()
    torch.manual_seed(0)
    pipe = Pipeline.from_config(config, None, device="cpu", precision="full")
    with torch.no_grad():
        pipe.model.model.diffusion_model.out[2].weight.normal_()  # fresh, the UNet's output is zero
    params = OmegaConf.to_container(config.model.params.unet_config.params)
    del params["out_channels"]
    net = ControlNet(**params, hint_channels=3).eval()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("zero_convs", "middle_block_out", "input_hint_block.14")):
                param.normal_(std=0.3)
    assert "label_emb.0.0.weight" in net.state_dict()
    hint = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    settings = {"steps": 1, "seed": 1, "sampler": "Euler", "height": 16, "width": 16}
    plain = pipe.generate("a", **settings)
    controlled = pipe.generate("a", controls=[ControlSpec(net, hint)], **settings)
    assert not same(controlled, plain)
    assert same(pipe.generate("a", controls=[ControlSpec(net, hint, strength=0)], **settings), plain)
    # The same weights as a diffusers SDXL ControlNetModel file (add_embedding, one resnet a level).
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({diffusers_key(k, 1): v.contiguous() for k, v in net.state_dict().items()}, str(path))
    node = {"target": "ldm.modules.diffusionmodules.controlnet.ControlNet", "params": {**params, "hint_channels": 3}}
    OmegaConf.save(OmegaConf.create(node), path.with_suffix(".yaml"))
    loaded = load_controlnet(path, base_unet=pipe.model.model.diffusion_model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    assert same(pipe.generate("a", controls=[ControlSpec(path, hint)], **settings), controlled)
