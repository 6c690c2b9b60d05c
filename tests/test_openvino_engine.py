"""The OpenVINO engine (--engine openvino) against the torch engine: the networks' outputs within 1e-4 of their
scale in fp32 on tiny models and on the bundled demo model, whole images, the disk cache (hits, damaged entries,
weights changed in place), the torch fallbacks, and the errors for options it cannot take."""

import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import ldm.openvino_engine as engine_module
from ldm.checkpoint import load_model_from_config
from ldm.control import ControlNetCache
from ldm.errors import UserError
from ldm.inference import Pipeline
from ldm.openvino_cache import CACHE_ENV, MANIFEST
from ldm.openvino_engine import EngineForward, OpenVINOEngine, check_engine, networks
from ldm.resident_pages import in_mapping
from ldm.util import instantiate_from_config
from tests.test_resident_pages import resident_kib

pytestmark = pytest.mark.openvino
openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install -r requirements-openvino.txt")

DEMO = Path(__file__).resolve().parents[1] / "models" / "ldm" / "shapes"
PROMPTS = ["a red circle on a blue background", "a yellow star on a green background"]


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory) -> Iterator[Path]:
    """Converted models go to a folder of this module's, never to the user's cache: the demo model's tests share
    their conversions."""
    folder = tmp_path_factory.mktemp("openvino-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of the test's own, for tests that look at the entries."""
    folder = tmp_path / "openvino-cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, share: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    difference = (actual.float() - expected.float()).abs().max().item()
    assert difference <= share * scale, f"max difference {difference:.3g} against scale {scale:.3g}"


@pytest.fixture(scope="module")
def demo_model():
    return load_model_from_config(OmegaConf.load(DEMO / "config.yaml"), DEMO / "model.safetensors", device="cpu")


def outputs_of_every_network(model) -> dict[str, torch.Tensor]:
    """What the UNet, the VAE encoder and decoder and the text encoder give for fixed seeded inputs."""
    generator = torch.Generator().manual_seed(0)
    tokens = model.cond_stage_model.tokenizer(PROMPTS)
    context = model.cond_stage_model.encode_token_ids(tokens)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        return {
            "text": context,
            "unet": model.model.diffusion_model(x, torch.tensor([999, 10]), context=context),
            "decoder": model.first_stage_model.decoder(x[:1]),
            "encoder": model.first_stage_model.encoder(image),
        }


@torch.no_grad()
def test_the_demo_models_networks_match_the_torch_engine_within_1e_4_of_their_scale(demo_model, module_cache):
    expected = outputs_of_every_network(demo_model)
    engine = OpenVINOEngine("full")
    try:
        for name, _, module in networks(demo_model):
            engine.attach(module, name)
        assert isinstance(demo_model.model.diffusion_model.forward, EngineForward)
        actual = outputs_of_every_network(demo_model)
    finally:
        for _, _, module in networks(demo_model):
            del module.forward  # back to the class's forward, for the other tests of this module
    for name in expected:
        assert_close_to_scale(actual[name], expected[name])
    made = {json.loads(p.read_text())["made_from"]["network"] for p in module_cache.glob(f"*/{MANIFEST}")}
    assert {"UNet", "VAE encoder", "VAE decoder", "CLIP text encoder"} <= made


def tiny_sdxl():
    from tests.sdxl_model import tiny_config

    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config().model).eval()
    with torch.no_grad():  # the output convolutions start at zero, which would make every comparison trivial
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@torch.no_grad()
def test_a_tiny_sdxl_model_with_both_text_encoders_and_its_adm_vector_matches_the_torch_engine():
    model = tiny_sdxl()
    sizes = torch.tensor([[64, 64]] * 2)
    batch = {"txt": PROMPTS, "original_size_as_tuple": sizes, "crop_coords_top_left": torch.zeros(2, 2),
             "target_size_as_tuple": sizes}  # fmt: skip
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])

    def run() -> tuple[torch.Tensor, ...]:
        cond = model.get_learned_conditioning(batch)
        return cond["c_crossattn"][0], cond["c_adm"], model.apply_model(x, t, cond)

    expected = run()
    engine = OpenVINOEngine("full")
    names = [name for name, _, _ in networks(model)]
    assert any("OpenCLIP" in name for name in names) and any("CLIP text encoder" in name for name in names)
    for name, stage, module in networks(model):
        engine.attach(module, name, stage)
    for actual, wanted in zip(run(), expected, strict=True):
        assert_close_to_scale(actual, wanted)


@torch.no_grad()
def test_a_controlnet_runs_through_the_engine_with_its_list_of_residuals(tiny_config):
    from tests.controlnet_model import tiny_controlnet

    net = tiny_controlnet(tiny_config).eval()
    x, hint = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    width = int(tiny_config.model.params.unet_config.params.context_dim)
    t, context = torch.tensor([300, 7]), torch.randn(2, 77, width)
    expected = net(x, hint, t, context)
    nets = ControlNetCache()  # as a pipeline on the openvino engine sets it up
    nets.prepare = functools.partial(OpenVINOEngine("full").attach, name="ControlNet")
    assert nets.get(net, net, torch.device("cpu")) is net and isinstance(net.forward, EngineForward)
    actual = net(x, hint, t, context)
    assert isinstance(actual, list) and len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_close_to_scale(a, e)


def small_unet():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=[1, 2], num_heads=2,
                     use_spatial_transformer=True, context_dim=8).eval()  # fmt: skip
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def unet_call(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 3, 8, generator=generator)
    with torch.no_grad():
        return unet(x, torch.tensor([5]), context=context)


def test_a_second_engine_reads_the_cache_and_a_damaged_entry_is_converted_again(cache, capsys):
    unet = small_unet()
    expected = unet_call(unet)
    OpenVINOEngine("full").attach(unet, "UNet")
    unet_call(unet)
    assert "converting the UNet" in capsys.readouterr().err
    fresh = small_unet()  # the same weights: the same entry
    OpenVINOEngine("full").attach(fresh, "UNet")
    assert_close_to_scale(unet_call(fresh), expected)
    assert "converting" not in capsys.readouterr().err
    (entry,) = [p.parent for p in cache.glob(f"*/{MANIFEST}")]
    with (entry / "model.bin").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 64)
    damaged = small_unet()
    OpenVINOEngine("full").attach(damaged, "UNet")
    assert_close_to_scale(unet_call(damaged), expected)
    err = capsys.readouterr().err
    assert "is damaged; converting it again" in err and "converting the UNet" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident pages are read from /proc: Linux")
def test_an_attached_network_keeps_its_torch_weights_in_a_file_mapping_with_no_pages_resident():
    unet = small_unet()
    expected = unet_call(unet)
    parameters = list(unet.parameters())
    OpenVINOEngine("full").attach(unet, "UNet")
    mapping = unet.forward.mapping  # from the attach on: a network that never runs holds no resident memory
    assert mapping is not None and all(in_mapping(t, mapping) for t in (*unet.parameters(), *unet.buffers()))
    assert resident_kib(mapping.data_ptr()) <= 4 * 8
    assert_close_to_scale(unet_call(unet), expected)
    assert unet.forward.mapping is mapping  # the compile found them there
    assert all(in_mapping(t, mapping) for t in (*unet.parameters(), *unet.buffers()))
    assert list(unet.parameters()) == parameters  # the same Parameter objects, in a file mapping now
    assert resident_kib(mapping.data_ptr()) <= 4 * 8  # a few pages at most: the weights' pages were handed back
    assert_close_to_scale(unet_call(unet), expected)


def test_compiled_shapes_are_bounded_and_a_dropped_one_comes_back_from_the_disk_cache(capsys, monkeypatch):
    monkeypatch.setattr(engine_module, "KEPT_SHAPES", 1)
    unet = small_unet()
    OpenVINOEngine("full").attach(unet, "UNet")
    expected = unet_call(unet)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), context=torch.randn(2, 3, 8))  # a second shape
    assert len(unet.forward.compiled) == 1
    capsys.readouterr()
    assert_close_to_scale(unet_call(unet), expected, share=1e-6)
    assert "converting" not in capsys.readouterr().err


def test_weights_changed_in_place_are_converted_again_and_restored_weights_hit_the_cache(capsys):
    unet = small_unet()
    engine = OpenVINOEngine("full")
    engine.attach(unet, "UNet")
    before = unet_call(unet)
    weight = unet.out[-1].weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.5)  # as a LoRA merge does: in place
    changed = unet_call(unet)
    del unet.forward
    assert_close_to_scale(changed, unet_call(unet))
    assert (changed - before).abs().max() > 0.1
    engine.attach(unet, "UNet")
    with torch.no_grad():
        weight.copy_(saved)  # as a LoRA's restore does
    capsys.readouterr()
    assert_close_to_scale(unet_call(unet), before, share=1e-5)
    assert "converting" not in capsys.readouterr().err


@pytest.fixture
def releases(monkeypatch) -> list[str]:
    """The names of the networks that hand their buffers back, in order."""
    names: list[str] = []
    release = EngineForward.release_memory

    def recorded(self: EngineForward) -> None:
        names.append(self.name)
        release(self)

    monkeypatch.setattr(EngineForward, "release_memory", recorded)
    return names


def test_networks_of_one_stage_keep_their_buffers_and_the_stage_before_hands_them_back(releases):
    unet, control, decoder = small_unet(), small_unet(), small_unet()
    engine = OpenVINOEngine("full")
    engine.attach(unet, "UNet", "denoiser")
    engine.attach(control, "ControlNet", "denoiser")
    engine.attach(decoder, "VAE decoder")
    expected = unet_call(unet)
    for _ in range(2):
        unet_call(control)
        unet_call(unet)
    assert releases == []  # a ControlNet and the UNet run in turn at every step
    unet_call(decoder)
    assert sorted(releases) == ["ControlNet", "UNet"]
    assert_close_to_scale(unet_call(unet), expected, share=1e-6)  # its buffers allocated again
    assert releases[2:] == ["VAE decoder"]


def test_an_openvino_pipeline_holds_no_buffers_between_runs_and_gives_the_same_images(releases):
    pipe = Pipeline.from_config(DEMO / "config.yaml", DEMO / "model.safetensors", device="cpu", precision="full",
                                engine="openvino")  # fmt: skip
    runs = [pipe.generate(PROMPTS[0], steps=4, height=64, width=64, seed=3, progress=False) for _ in range(2)]
    assert releases == ["CLIP text encoder", "UNet", "VAE decoder"] * 2
    assert np.array_equal(np.asarray(runs[0].images[0]), np.asarray(runs[1].images[0]))
    encoder = pipe.model.first_stage_model.encoder  # txt2img never runs it, so its weights were never read again
    assert not encoder.forward.compiled and resident_kib(encoder.forward.mapping.data_ptr()) <= 4 * 8


def test_calls_with_gradients_or_forward_hooks_run_in_torch():
    unet = small_unet()
    OpenVINOEngine("full").attach(unet, "UNet")
    forward = unet.forward
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 3, 8, generator=generator)
    out = unet(x.requires_grad_(), torch.tensor([5]), context=context)
    assert out.requires_grad and not forward.compiled  # training: torch, which has gradients
    seen = []
    handle = unet.out.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        unet(x, torch.tensor([5]), context=context)
    handle.remove()
    assert seen and not forward.compiled  # the hook ran: the torch forward did


def test_options_the_engine_cannot_take_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(UserError, match="runs on the CPU: give --device cpu"):
        check_engine("openvino", torch.device("cuda"), "full", compile=False)
    with pytest.raises(UserError, match="full \\(fp32\\) or bf16"):
        check_engine("openvino", torch.device("cpu"), "fp16", compile=False)
    with pytest.raises(UserError, match="drop one"):
        check_engine("openvino", torch.device("cpu"), "full", compile=True)
    with pytest.raises(UserError, match="engine must be one of torch, openvino"):
        check_engine("onnx", torch.device("cpu"), "full", compile=False)
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install -r requirements-openvino.txt"):
        check_engine("openvino", torch.device("cpu"), "full", compile=False)
    assert engine_module.INSTALL in str(UserError(engine_module.INSTALL))


DEMO_PROMPTS = ["a red circle on a blue background", "a yellow star on a green background",
                "a white triangle on a black background", "a pink diamond on a purple background"]  # fmt: skip


def demo_images(engine: str, precision: str) -> np.ndarray:
    """The 8 images tests/test_fast_paths.py compares bf16 with fp32 on (20 steps of DPM++ 2M Karras at scale 10)."""
    pipe = Pipeline.from_config(DEMO / "config.yaml", DEMO / "model.safetensors", device="cpu", precision=precision,
                                engine=engine)  # fmt: skip
    result = pipe.generate(DEMO_PROMPTS * 2, steps=20, sampler="DPM++ 2M Karras", scale=10.0, seed=0, progress=False)
    return np.stack([np.asarray(image, dtype=np.float64) for image in result.images])


@torch.no_grad()
def test_the_bf16_unet_of_the_openvino_engine_errs_at_most_twice_as_much_as_torch_bf16(demo_model):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(8, 4, 16, 16, generator=generator), torch.randn(8, 4, 64, generator=generator)
    t = torch.tensor([999, 700, 400, 100] * 2)
    full = demo_model.model.diffusion_model(x, t, context=context)
    unet = UNetModel(**OmegaConf.load(DEMO / "config.yaml").model.params.unet_config.params).eval()
    unet.load_state_dict(demo_model.model.diffusion_model.state_dict())
    unet.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_error = (unet(x, t, context=context).float() - full).abs().max() / full.abs().max()
    OpenVINOEngine("bf16").attach(unet, "UNet")
    openvino_error = (unet(x, t, context=context) - full).abs().max() / full.abs().max()
    # Measured: torch 0.96 %, OpenVINO 1.80 % of the output's scale.
    assert torch_error < 0.02 and openvino_error < 0.03 and openvino_error < 2.5 * torch_error


@pytest.mark.skipif(not os.environ.get("LDM_SLOW_TESTS"), reason="about 55 s (two bf16 conversions and 24 images); "
                    "LDM_SLOW_TESTS=1 runs it")  # fmt: skip
def test_bf16_demo_images_of_the_openvino_engine_are_as_close_to_fp32_as_the_torch_engines():
    full = demo_images("torch", "full")  # (fp32 on both engines: the networks' test above, within 1e-4)
    # Measured (grey levels, mean per image): torch bf16 0.44-1.56 but one fork (seed 3, 15.2) in 8;
    # OpenVINO bf16 0.43-0.77, 4.9 for seed 7, and the same fork (10.1). Its UNet's bf16 error is about twice
    # torch's (1.8% against 1.0% of the output's scale), which a sampler at scale 10 amplifies on some seeds.
    differences = np.abs(demo_images("openvino", "bf16") - full).mean(axis=(1, 2, 3))
    assert np.median(differences) <= 1 and (differences <= 2).sum() >= 6, differences


def test_txt2img_takes_engine_openvino(tmp_path, module_cache):
    from ldm.cli import main

    code = main("txt2img", ["--config", str(DEMO / "config.yaml"), "--ckpt", str(DEMO / "model.safetensors"),
                            "--prompt", PROMPTS[0], "--H", "64", "--W", "64", "--n_samples", "1", "--n_iter", "1",
                            "--steps", "4", "--device", "cpu", "--precision", "full", "--engine", "openvino",
                            "--outdir", str(tmp_path), "--skip_grid"])  # fmt: skip
    assert code == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    assert any(module_cache.glob(f"*/{MANIFEST}"))
