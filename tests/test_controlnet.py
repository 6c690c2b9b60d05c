"""The ControlNet module, its files and preprocessors (the runs are in test_controlnet_pipeline.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_model import diffusers_key, tiny_control_params, tiny_controlnet, write_cldm, write_diffusers
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import empty_parameters
from ldm.control_files import control_state_dict, diffusers_to_cldm, load_controlnet
from ldm.control_preprocess import preprocess
from ldm.errors import UserError
from ldm.modules.diffusionmodules.controlnet import ControlNet
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def inputs(batch=2, size=4, context_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    hint = torch.rand(batch, 3, 8 * size, 8 * size, generator=g)
    context = torch.randn(batch, 5, context_dim, generator=g)
    return x, hint, torch.tensor([999, 10]), context


def test_residuals_have_the_skip_shapes_and_a_fresh_controlnet_gives_zeros(tiny_config):
    net = tiny_controlnet(tiny_config, seed=None)
    x, hint, t, context = inputs()
    with torch.no_grad():
        residuals = net(x, hint, t, context)
    # 6 input blocks (conv_in, 2 + downsample, 2) and the middle block.
    assert [tuple(r.shape) for r in residuals] == [(2, 32, 4, 4)] * 3 + [(2, 32, 2, 2)] + [(2, 64, 2, 2)] * 3
    assert all(torch.equal(r, torch.zeros_like(r)) for r in residuals)


def tiny_unet(tiny_config, tiny_weights) -> UNetModel:
    """The tiny reference model's UNet with its weights."""
    unet = UNetModel(**dict(tiny_config.model.params.unet_config.params)).eval()
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix) :]: v for k, v in tiny_weights.items() if k.startswith(prefix)})
    return unet


def test_unet_adds_the_residuals_to_skips_and_middle_and_zero_residuals_change_nothing(tiny_config, tiny_weights):
    unet = tiny_unet(tiny_config, tiny_weights)
    net = tiny_controlnet(tiny_config)
    x, hint, t, context = inputs()
    with torch.no_grad():
        base = unet(x, t, context)
        residuals = net(x, hint, t, context)
        assert torch.equal(unet(x, t, context, control=[torch.zeros_like(r) for r in residuals]), base)
        controlled = unet(x, t, context, control=residuals)
    assert not torch.allclose(controlled, base, atol=1e-3)


def test_the_hint_joins_after_the_first_block(tiny_config):
    net = tiny_controlnet(tiny_config)
    x, hint, t, context = inputs()
    with torch.no_grad():
        first = net.zero_convs[0](net.input_blocks[0](x, None) + net.input_hint_block(hint, None, context), None)
        assert torch.allclose(net(x, hint, t, context)[0], first, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "context_dim", "linear"), [("cldm_v15", 768, False), ("cldm_v21", 1024, True), ("cldm_xl", 2048, True)]
)
def test_full_size_configs_have_the_unets_encoder_keys_and_cldms_own(name, context_dim, linear):
    node = load_config(ROOT / "configs" / "controlnet" / f"{name}.yaml").model.params.control_stage_config
    unet_config = {"cldm_v15": "v1-inference", "cldm_v21": "v2-inference", "cldm_xl": "sdxl-base-inference"}[name]
    unet_node = load_config(ROOT / "configs" / "stable-diffusion" / f"{unet_config}.yaml").model.params.unet_config
    with empty_parameters():
        net = instantiate_from_config(node)
        unet = instantiate_from_config(unet_node)
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    unet_keys = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    encoder = {
        k: v for k, v in keys.items() if k.startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block."))
    }
    assert encoder == {k: v for k, v in unet_keys.items() if k.split(".")[0] in {p.split(".")[0] for p in encoder}}
    own = {k: v for k, v in keys.items() if k not in encoder}
    # cldm's input hint block: 8 convolutions, 3 of them stride 2, the last zero; a zero conv per skip + the middle.
    hint = {k: v for k, v in own.items() if k.startswith("input_hint_block.")}
    assert hint["input_hint_block.0.weight"] == (16, 3, 3, 3)
    assert hint["input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert sorted({int(k.split(".")[1]) for k in hint}) == list(range(0, 16, 2))
    levels = 4 if name != "cldm_xl" else 3
    assert len([k for k in own if k.startswith("zero_convs.") and k.endswith(".weight")]) == 3 * levels
    assert own["zero_convs.0.0.weight"] == (320, 320, 1, 1)
    assert own["middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    attn = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    assert keys[attn][1] == context_dim
    assert len(keys[attn.replace("transformer_blocks.0.attn2.to_k", "proj_in")]) == (2 if linear else 4)
    if name == "cldm_v15":
        # Keys of the published control_sd15_*.pth / control_v11p_sd15_*.pth (without control_model.): 361,279,120
        # values in 340 tensors; the last level has no attention, the channel changes have 1x1 skip convolutions.
        assert len(keys) == 340 and sum(np.prod(s) for s in keys.values()) == 361_279_120
        assert keys["input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
        assert keys["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
        assert keys["input_blocks.11.0.out_layers.3.bias"] == (1280,)
        assert keys["middle_block.1.proj_out.bias"] == (1280,)
        assert keys["input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias"] == (320,)
        assert not any(k.startswith("input_blocks.10.1.") or "to_q.bias" in k for k in keys)


def test_cldm_files_with_and_without_the_prefix_and_diffusers_files_load_the_same_weights(tiny_config, tmp_path):
    net = tiny_controlnet(tiny_config)
    expected = net.state_dict()
    for path in (
        write_cldm(tmp_path / "control_tiny.safetensors", net, tiny_config),
        write_cldm(tmp_path / "bare.safetensors", net, tiny_config, prefix=""),
        write_diffusers(tmp_path / "diffusion_pytorch_model.safetensors", net, tiny_config),
    ):
        loaded = load_controlnet(path).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), path.name


def test_the_original_cldm_yaml_beside_a_file_builds_it(tiny_config, tmp_path):
    net = tiny_controlnet(tiny_config)
    path = write_cldm(tmp_path / "control_v11p_tiny.pth", net, tiny_config)
    # As lllyasviel's models/cldm_v15.yaml has it: the whole ControlLDM, cldm's class names.
    original = {"model": {"target": "cldm.cldm.ControlLDM", "params": {
        "control_key": "hint", "only_mid_control": False,
        "control_stage_config": {"target": "cldm.cldm.ControlNet", "params": tiny_control_params(tiny_config)},
        "unet_config": {"target": "cldm.cldm.ControlledUnetModel", "params": {}}}}}  # fmt: skip
    OmegaConf.save(OmegaConf.create(original), path.with_suffix(".yaml"))
    loaded = load_controlnet(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())


def test_a_whole_controlldm_checkpoint_gives_its_control_model(tiny_config, tiny_weights):
    net = tiny_controlnet(tiny_config)
    both = {**tiny_weights, **{"control_model." + k: v for k, v in net.state_dict().items()}}
    assert control_state_dict(both).keys() == net.state_dict().keys()


def test_difference_controlnets_are_added_to_the_base_unet(tiny_config, tiny_weights):
    net = tiny_controlnet(tiny_config)
    unet = tiny_unet(tiny_config, tiny_weights)
    base = unet.state_dict()
    full = net.state_dict()
    diff = {"control_model." + k: v - base[k] if k in base else v for k, v in full.items()}
    diff["difference"] = torch.tensor([0.0])
    got = control_state_dict(diff, unet)
    assert all(torch.allclose(got[k], full[k], atol=1e-6) for k in full)
    with pytest.raises(UserError, match="difference"):
        control_state_dict(diff)


def test_files_of_another_family_or_no_controlnet_are_one_line_errors(tiny_config, tmp_path):
    net = tiny_controlnet(tiny_config)
    path = write_cldm(tmp_path / "control_tiny.pth", net, tiny_config)
    params = {**dict(tiny_config.model.params.unet_config.params), "context_dim": 768}
    with empty_parameters():
        sd15_like = UNetModel(**params)
    with pytest.raises(UserError, match=r"control_tiny.pth is a ControlNet for a 32-wide text context, but the model "
                                        r"is SD 1.x: use a ControlNet made for SD 1.x"):  # fmt: skip
        load_controlnet(path, base_unet=sd15_like)
    with pytest.raises(UserError, match="not a ControlNet"):
        control_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="not a key of a diffusers ControlNetModel"):
        names = ("controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.norm1.weight", "unet.foo")
        diffusers_to_cldm(dict.fromkeys(names, torch.zeros(1)))
    (tmp_path / "control_tiny.yaml").unlink()
    with pytest.raises(UserError, match="put its cldm YAML config beside it"):
        load_controlnet(path)


def drawing() -> Image.Image:
    """Black strokes (one dark grey) on white, as a user draws them."""
    image = Image.new("RGB", (16, 16), "white")
    image.paste((0, 0, 0), (2, 2, 14, 4))
    image.paste((100, 100, 100), (2, 10, 14, 12))
    return image


def test_drawing_preprocessors_invert_and_scribble_thresholds():
    pixels = {name: np.asarray(preprocess(drawing(), name)) for name in ("invert", "lineart", "scribble", "none")}
    assert all(p.shape == (16, 16, 3) for p in pixels.values())
    assert np.array_equal(pixels["none"], np.asarray(drawing()))
    assert np.array_equal(pixels["invert"], 255 - np.asarray(drawing()))
    assert pixels["lineart"][3, 5, 0] == 255 and pixels["lineart"][11, 5, 0] == 155 and pixels["lineart"][7, 5, 0] == 0
    assert set(np.unique(pixels["scribble"])) == {0, 255} and pixels["scribble"][11, 5, 0] == 255


def test_canny_finds_the_edges_with_opencv():
    pytest.importorskip(
        "cv2", reason="opencv-python is optional (requirements-compare.txt); the canny preprocessor needs it"
    )
    edges = np.asarray(preprocess(drawing(), "canny"))[..., 0]
    assert edges[0, 0] == 0 and edges.max() == 255 and set(np.unique(edges)) == {0, 255}


def test_canny_without_opencv_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(UserError, match="pip install opencv-python"):
        preprocess(drawing(), "canny")
    with pytest.raises(UserError, match="unknown ControlNet preprocessor 'hed'"):
        preprocess(drawing(), "hed")


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2-linear-proj"])
def test_against_diffusers_controlnetmodel(tiny_config, sd2):
    diffusers = pytest.importorskip(
        "diffusers", reason="diffusers is optional (requirements-compare.txt); only this comparison needs it"
    )
    params = tiny_control_params(tiny_config)
    heads = params["num_heads"]
    if sd2:  # SD 2.x's way: a fixed head width (diffusers counts heads per level) and linear projections
        del params["num_heads"]
        params.update(num_head_channels=16, use_linear_in_transformer=True)
        heads = (2, 4)
    torch.manual_seed(0)
    theirs = diffusers.ControlNetModel(
        in_channels=4, conditioning_channels=3, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=params["context_dim"],
        attention_head_dim=heads, norm_num_groups=32, use_linear_projection=sd2,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for param in theirs.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    state = theirs.state_dict()
    assert set(state) == {diffusers_key(k) for k in ControlNet(**params).state_dict()}
    ours = ControlNet(**params).eval()
    ours.load_state_dict(diffusers_to_cldm(state))
    x, hint, t, context = inputs()
    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, return_dict=False)
        got = ours(x, hint, t, context)
    diff = max((a - b).abs().max().item() for a, b in zip(got, [*down, mid], strict=True))
    scale = max(r.abs().max().item() for r in got)
    print(f"max |ours - diffusers| = {diff:.3g} (largest residual {scale:.3g})")
    assert scale > 1 and diff <= 1e-5 * scale
