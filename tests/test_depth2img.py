"""SD 2 depth-to-image: MiDaS (``ldm.modules.midas``), ``LatentDepth2ImageDiffusion`` and scripts/depth2img.py.

The real config is built on the meta device against the original's state-dict listing; reduced-width DPTs (the same
code with smaller numbers) run forward, and a tiny depth model (tiny UNet with 4 + 1 input channels, VAE, OpenCLIP
text tower and DPT, all built from a config here) samples, trains and runs the script on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from programs import run_program

from ldm import cli
from ldm.checkpoint import save_checkpoint
from ldm.errors import UserError
from ldm.inference import Pipeline
from ldm.models.diffusion import ddpm, latent_depth
from ldm.models.diffusion.latent_depth import depth_to_condition
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.modules.midas.api import MiDaSInference, midas_input_size, prepare_midas_input
from ldm.modules.midas.midas.vit import resize_pos_embed
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
MIDAS_CONFIG = "original/stablediffusion/configs/stable-diffusion/v2-midas-inference.yaml"
TARGET = "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion"
SIDE, LATENT = 32, 8  # image and latent side: the tiny VAE has f = 4
PROMPTS = ["a red circle", "a blue square"]
# A DPT-Large and a DPT-Hybrid at toy width (img_size: the position embedding's trained grid is 4 x 4).
TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2, "hooks": [0, 1, 2, 3], "features": [8, 16, 32, 32],
            "img_size": 64}  # fmt: skip
TINY_HYBRID = {**TINY_VIT, "features": [128, 256, 32, 32], "resnet_layers": [1, 1, 1],
               "resnet_channels": [128, 256, 512], "resnet_stem": 32}  # fmt: skip


def tiny_midas_config() -> dict:
    return {"target": "ldm.modules.midas.api.MiDaSInference",
            "params": {"model_type": "dpt_large", "features": 16, "vit": TINY_VIT}}  # fmt: skip


def tiny_config(**params) -> dict:
    """v2-midas-inference.yaml's structure at toy size."""
    unet = {"image_size": LATENT, "in_channels": 5, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16,
            "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": 1,
            "context_dim": 32, "legacy": False}  # fmt: skip
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": SIDE, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    text = {"width": 32, "heads": 4, "layers": 2, "context_length": 77, "vocab_size": 49408}
    return {
        "target": TARGET,
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "first_stage_key": "jpg",
            "cond_stage_key": "txt", "image_size": LATENT, "channels": 4, "cond_stage_trainable": False,
            "conditioning_key": "hybrid", "scale_factor": 0.18215, "finetune_keys": None, "use_ema": False,
            "depth_stage_config": tiny_midas_config(),
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {"embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}},
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"layer": "penultimate", "text_cfg": text},
            },
            **params,
        },
    }  # fmt: skip


def lively_midas(midas: MiDaSInference) -> MiDaSInference:
    """Random weights leave the depth head's final ReLU mostly closed; a positive bias opens it."""
    with torch.no_grad():
        midas.model.scratch.output_conv[4].bias.fill_(1.0)
    return midas


def livened(model: torch.nn.Module) -> torch.nn.Module:
    """The UNet's zero-initialised output convolutions given weights and the depth head opened, so an untrained
    model depends on its inputs."""
    with torch.no_grad():
        for p in model.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.05)
    lively_midas(model.depth_model)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return livened(instantiate_from_config(tiny_config())).eval()


def smooth_images(n: int, side: int, seed: int) -> torch.Tensor:
    """(n, 3, side, side) smooth images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=side, mode="bilinear")


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())


def read_keys(path: Path) -> dict[str, tuple[str, str]]:
    rows = path.read_text().splitlines()[1:]
    return {key: (shape, dtype) for key, shape, dtype in (row.split("\t") for row in rows)}


# -- the real config and MiDaS's layout --


@pytest.mark.parametrize("bundled", [False, True], ids=["original", "configs/stable-diffusion"])
def test_midas_config_builds_the_reference_state_dict(reference_dir, bundled):
    path = ROOT / "configs/stable-diffusion/v2-midas-inference.yaml" if bundled else reference_dir / MIDAS_CONFIG
    with torch.device("meta"):
        built = instantiate_from_config(load_config(path).model, path="model")
    assert isinstance(built, latent_depth.LatentDepth2ImageDiffusion)
    expected = read_keys((reference_dir / MIDAS_CONFIG).with_suffix(".keys.tsv"))
    actual = {
        k: ("x".join(map(str, v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in built.state_dict().items()
    }
    assert sorted(set(expected) - set(actual)) == [], "keys missing from the model"
    assert sorted(set(actual) - set(expected)) == [], "keys the reference does not have"
    assert {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]} == {}
    assert sum(k.startswith("depth_model.") for k in actual) == 368
    assert not any(p.requires_grad for p in built.depth_model.parameters())
    # At real size (on meta: shapes only) a 512 x 768 image gives MiDaS a 384 x 576 input and the UNet a depth channel.
    with torch.device("meta"):
        image = torch.zeros(1, 3, 512, 768)
        assert built.depth_model(prepare_midas_input(image)).shape == (1, 1, 384, 576)
        cond = built.sampling_conditioning(torch.zeros(2, 77, 1024), built.image_conditioning(image))
        assert cond["c_concat"][0].shape == (2, 1, 64, 96)
        assert built.apply_model(torch.zeros(2, 4, 64, 96), torch.tensor([999, 999]), cond).shape == (2, 4, 64, 96)


def test_the_stability_paths_name_the_classes():
    assert get_obj_from_str(TARGET) is latent_depth.LatentDepth2ImageDiffusion
    assert "LatentDepth2ImageDiffusion" in dir(ddpm)
    from ldm.modules.midas.midas.dpt_depth import DPTDepthModel

    assert isinstance(MiDaSInference("dpt_large", features=16, vit=TINY_VIT).model, DPTDepthModel)


def test_dpt_large_and_hybrid_have_midas_sizes():
    with torch.device("meta"):
        large, hybrid = MiDaSInference("dpt_large"), MiDaSInference("dpt_hybrid")
    # The DPT paper's parameter counts: 344M and 123M.
    assert round(sum(p.numel() for p in large.parameters()) / 1e6) == 344
    assert round(sum(p.numel() for p in hybrid.parameters()) / 1e6) == 123
    assert large.model.pretrained.model.pos_embed.shape == (1, 577, 1024)
    assert len(large.model.pretrained.model.blocks) == 24 and len(hybrid.model.pretrained.model.blocks) == 12


def test_the_midas_v21_nets_have_midas_sizes_and_layout():
    with torch.device("meta"):
        large, small = MiDaSInference("midas_v21"), MiDaSInference("midas_v21_small")
    # MiDaS v2.1's parameter counts (105M and 21M), and its weight files' layout: the encoders' stems open layer1
    # (ResNeXt conv1 / EfficientNet conv_stem), then the first blocks at index 4 / 3.
    assert round(sum(p.numel() for p in large.parameters()) / 1e6) == 105
    assert round(sum(p.numel() for p in small.parameters()) / 1e6) == 21
    big, little = large.state_dict(), small.state_dict()
    assert big["model.pretrained.layer1.0.weight"].shape == (64, 3, 7, 7)
    assert big["model.pretrained.layer1.4.0.conv2.weight"].shape == (256, 8, 3, 3)  # 32 groups of 8
    assert big["model.scratch.layer4_rn.weight"].shape == (256, 2048, 3, 3)
    assert "model.scratch.refinenet1.out_conv.weight" not in big  # MidasNet's fusion blocks have no out_conv
    assert little["model.pretrained.layer1.0.weight"].shape == (32, 3, 3, 3)
    assert little["model.pretrained.layer1.3.0.conv_dw.weight"].shape == (32, 1, 3, 3)
    assert little["model.scratch.layer4_rn.weight"].shape == (512, 384, 3, 3)  # expand: 64 x 8
    assert little["model.scratch.refinenet4.out_conv.weight"].shape == (256, 512, 1, 1)
    torch.manual_seed(0)
    depth = MiDaSInference("midas_v21_small").eval()(torch.randn(1, 3, 64, 96))
    assert depth.shape == (1, 1, 64, 96) and (depth >= 0).all()


def test_a_midas_weights_file_loads_strictly(tmp_path):
    from ldm.modules.midas.midas.dpt_depth import DPTDepthModel

    torch.manual_seed(0)
    source = DPTDepthModel(backbone="vitl16_384", features=16, vit=TINY_VIT)
    torch.save(source.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": source.state_dict(), "optimizer": {}}, tmp_path / "training.pt")
    for name in ("bare.pt", "training.pt"):
        loaded = DPTDepthModel(path=str(tmp_path / name), backbone="vitl16_384", features=16, vit=TINY_VIT)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ConfigError, match="do not fit DPTDepthModel"):
        DPTDepthModel(path=str(tmp_path / "bare.pt"), backbone="vitl16_384", features=8, vit=TINY_VIT)


def test_unknown_model_types_and_settings_are_config_errors():
    with pytest.raises(ConfigError, match="dpt_hybrid"):
        MiDaSInference("dpt_huge")
    with pytest.raises(ConfigError, match="for the DPT model types"):
        MiDaSInference("midas_v21_small", features=16)
    with pytest.raises(ConfigError, match="BackboneSpec"):
        MiDaSInference("dpt_large", vit={"width": 3})


def test_reduced_dpts_predict_non_negative_depth_at_any_multiple_of_32():
    torch.manual_seed(0)
    for vit in (TINY_VIT, TINY_HYBRID):
        model_type = "dpt_hybrid" if "resnet_layers" in vit else "dpt_large"
        midas = lively_midas(MiDaSInference(model_type, features=16, vit=vit).eval())
        depth = midas(torch.randn(2, 3, 64, 96))
        assert depth.shape == (2, 1, 64, 96) and torch.isfinite(depth).all() and (depth >= 0).all()
        assert depth.std() > 0
    with pytest.raises(ValueError, match="multiples of 32"):
        midas(torch.randn(1, 3, 48, 64))


def test_the_vit_read_out_is_timms_forward_at_the_trained_size():
    torch.manual_seed(0)
    encoder = MiDaSInference("dpt_hybrid", features=16, vit=TINY_HYBRID).model.pretrained.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = encoder.read_out(x)
        theirs = encoder.model.forward_intermediates(x, indices=[2, 3], norm=False, intermediates_only=True)
    assert [tuple(o.shape) for o in ours[:2]] == [(1, 128, 16, 16), (1, 256, 8, 8)]
    for tokens, grid in zip(ours[2:], theirs, strict=True):
        torch.testing.assert_close(tokens[:, 1:].transpose(1, 2).reshape(grid.shape), grid)


def test_position_embedding_resize():
    pos = torch.randn(1, 1 + 16, 8)
    torch.testing.assert_close(resize_pos_embed(pos, (4, 4)), pos)
    flat = torch.cat([pos[:, :1], torch.full((1, 16, 8), 0.5)], dim=1)
    resized = resize_pos_embed(flat, (6, 2))
    assert resized.shape == (1, 13, 8)
    torch.testing.assert_close(resized[:, 0], pos[:, 0])
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 12, 8), 0.5))


def test_midas_input_keeps_the_aspect_at_multiples_of_32():
    assert midas_input_size(512, 512) == (384, 384)
    assert midas_input_size(512, 768) == (384, 576)  # "minimal": the scale nearer 1 (0.75, not 0.5)
    assert midas_input_size(64, 96) == (256, 384)
    assert midas_input_size(512, 768, "midas_v21") == (256, 384)  # "upper_bound": at most 384
    # Mean 0.5 and std 0.5 on [0, 1] pixels: the [-1, 1] image itself, resized.
    constant = torch.full((2, 3, 64, 96), 0.25)
    prepared = prepare_midas_input(constant)
    assert prepared.shape == (2, 3, 256, 384)
    torch.testing.assert_close(prepared, torch.full_like(prepared, 0.25))
    image = smooth_images(1, 384, seed=1)
    torch.testing.assert_close(prepare_midas_input(image), image)


# -- the depth conditioning --


def test_depth_normalisation_invariants():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 1, 40, 60, generator=g) * torch.tensor([3.0, 300.0]).view(2, 1, 1, 1)
    cond = depth_to_condition(depth, (8, 12))
    assert cond.shape == (2, 1, 8, 12)
    low, high = cond.amin(dim=(1, 2, 3)), cond.amax(dim=(1, 2, 3))
    torch.testing.assert_close(low, torch.full((2,), -1.0))
    assert (high < 1.0).all() and (high > 0.999).all()  # 2 range / (range + 0.001) - 1
    # Per image and scale-free: a positive affine change of one image's depth changes nothing visible.
    rescaled = depth_to_condition(torch.cat([depth[:1] * 1000 + 7, depth[1:]]), (8, 12))
    torch.testing.assert_close(rescaled, cond, atol=2e-3, rtol=0)
    # Order-preserving at the same size, and a flat map is the farthest everywhere.
    same = depth_to_condition(depth, (40, 60))
    assert torch.equal(same.flatten(1).argsort(), depth.flatten(1).argsort())
    assert torch.equal(depth_to_condition(torch.full((1, 1, 5, 5), 3.0), (4, 4)), torch.full((1, 1, 4, 4), -1.0))


def test_image_conditioning_estimates_or_takes_the_depth(model):
    image = smooth_images(1, SIDE, seed=2)
    estimated = model.image_conditioning(image)
    midas = model.depth_model(prepare_midas_input(image))
    torch.testing.assert_close(estimated, depth_to_condition(midas, (LATENT, LATENT)))
    ramp = torch.linspace(0, 1, 50).view(1, 1, 1, 50).expand(1, 1, 20, 50)
    given = model.image_conditioning(image, depth=ramp)
    assert given.shape == (1, 1, LATENT, LATENT)
    assert (given[..., 1:] >= given[..., :-1] - 1e-6).all()  # brighter to the right stays so
    cond = model.sampling_conditioning(torch.zeros(3, 77, 32), given)
    assert cond["c_concat"][0].shape == (3, 1, LATENT, LATENT) and cond["c_crossattn"][0].shape == (3, 77, 32)
    with pytest.raises(UserError, match="does not inpaint"):
        model.image_conditioning(image, torch.ones(1, 1, SIDE, SIDE))
    with pytest.raises(UserError, match="init image"):
        model.image_conditioning(None)
    with pytest.raises(UserError, match="image_conditioning"):
        model.sampling_conditioning(cond["c_crossattn"][0], None)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_samples_with_guidance_and_follows_the_depth(model, sampler):
    text = model.get_learned_conditioning(PROMPTS[:1] * 2)
    null = model.get_unconditional_conditioning(2)
    image = smooth_images(1, SIDE, seed=3)

    def run(depth: torch.Tensor | None) -> torch.Tensor:
        image_cond = model.image_conditioning(image, depth=depth)
        c, uc = model.sampling_conditioning(text, image_cond), model.sampling_conditioning(null, image_cond)
        shape = (2, 4, LATENT, LATENT)
        return sample(model, sampler, 4, c, uc, 3.0, shape=shape, noise=Noise.from_seed(0, 2), progress=False)

    latents = run(None)
    assert latents.shape == (2, 4, LATENT, LATENT) and torch.isfinite(latents).all()
    ramp = torch.linspace(0, 1, SIDE).view(1, 1, 1, SIDE).expand(1, 1, SIDE, SIDE)
    assert not torch.allclose(run(ramp), run(ramp.flip(-1)))  # the depth map steers the result


def batch(n: int = 2, seed: int = 0) -> dict:
    images = smooth_images(n, SIDE, seed)
    return {"jpg": images.permute(0, 2, 3, 1), "txt": PROMPTS[:n]}


def test_trains_with_the_depth_model_frozen_and_the_loss_falls():
    torch.manual_seed(0)
    trained = livened(instantiate_from_config(tiny_config()))
    depth_before = {k: v.clone() for k, v in trained.depth_model.state_dict().items()}
    z, c = trained.get_input(batch(), "jpg")
    assert c["c_concat"][0].shape == (2, 1, LATENT, LATENT) and c["c_crossattn"][0].shape == (2, 77, 32)
    # The batch's own MiDaS input (Stability's data pipelines add it as midas_in) gives the same conditioning.
    midas_in = prepare_midas_input(batch()["jpg"].permute(0, 3, 1, 2))
    _, given = trained.get_input({**batch(), "midas_in": midas_in}, "jpg")
    torch.testing.assert_close(given["c_concat"][0], c["c_concat"][0])

    trained.train()
    assert not trained.depth_model.training and not any(p.requires_grad for p in trained.depth_model.parameters())
    optimizer = torch.optim.Adam(trained.trainable_parameters(), lr=1e-3)
    t, noise = torch.tensor([300, 600]), torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss, _ = trained.p_losses(z, c, t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(v, depth_before[k]) for k, v in trained.depth_model.state_dict().items())
    log = trained.log_images(batch(), N=2, ddim_steps=2, unconditional_guidance_scale=2.0)
    assert {"inputs", "samples", "samples_cfg", "depth"} <= set(log) and log["depth"].shape == (2, 3, LATENT, LATENT)


def test_finetunes_from_an_ordinary_checkpoint_and_a_midas_file(model, tmp_path):
    """As Stability started the depth model: the 4-channel UNet widened by a zero channel, MiDaS from its own file."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    ordinary = {k: v for k, v in model.state_dict().items() if not k.startswith("depth_model.")}
    ordinary[key] = ordinary[key][:, :4].clone()
    save_checkpoint(ordinary, tmp_path / "ordinary.ckpt")
    torch.save(model.depth_model.model.state_dict(), tmp_path / "midas.pt")
    midas = {**tiny_midas_config()["params"], "path": str(tmp_path / "midas.pt")}
    config = tiny_config(ckpt_path=str(tmp_path / "ordinary.ckpt"), finetune_keys=[key], ignore_keys=["depth_model."],
                         depth_stage_config={**tiny_midas_config(), "params": midas})  # fmt: skip
    started = instantiate_from_config(config)
    weight = started.state_dict()[key]
    torch.testing.assert_close(weight[:, :4], ordinary[key])
    assert not weight[:, 4].any()
    assert all(torch.equal(v, model.depth_model.state_dict()[k]) for k, v in started.depth_model.state_dict().items())
    with pytest.raises(ConfigError, match="give ckpt_path"):
        instantiate_from_config(tiny_config(finetune_keys=[key]))


def test_configs_that_cannot_condition_on_depth_are_refused():
    with pytest.raises(ConfigError, match="hybrid"):
        instantiate_from_config(tiny_config(conditioning_key="crossattn"))
    with pytest.raises(ConfigError, match="one key"):
        instantiate_from_config(tiny_config(concat_keys=["midas_in", "other"]))


# -- the Python API and the script --


def test_pipeline_depth2img_with_estimated_and_given_depth(model):
    from ldm.geometry import LatentGeometry
    from ldm.request import RuntimeOptions

    pipe = Pipeline(model, LatentGeometry.from_config(OmegaConf.create(tiny_config())), RuntimeOptions("cpu", "full"))
    init = to_pil(smooth_images(1, SIDE, seed=4)[0])
    settings = {"init_image": init, "steps": 4, "seed": 5, "scale": 3.0, "progress": False}
    estimated = pipe.generate(PROMPTS[0], n=2, **settings)
    assert [im.size for im in estimated.images] == [(SIDE, SIDE)] * 2 and estimated.strength == 0.75
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (24, 1)))  # 16-bit, another size
    given = pipe.generate(PROMPTS[0], depth_map=ramp, **settings)
    assert not np.array_equal(np.asarray(given.images[0]), np.asarray(estimated.images[0]))
    with pytest.raises(UserError, match="init image"):
        pipe.generate(PROMPTS[0], steps=4, progress=False)
    with pytest.raises(UserError, match="init image too"):
        pipe.generate(PROMPTS[0], depth_map=ramp, steps=4)


def test_a_depth_map_is_refused_by_other_models(tiny_model, tiny_config):
    from ldm.geometry import LatentGeometry
    from ldm.request import RuntimeOptions

    geometry = LatentGeometry.from_config(tiny_config)
    pipe = Pipeline(tiny_model, geometry, RuntimeOptions("cpu", "full"))
    init = to_pil(smooth_images(1, geometry.multiple * 2, seed=7)[0])
    with pytest.raises(UserError, match="depth map is for depth-to-image models"):
        pipe.generate("a red circle", init_image=init, depth_map=Image.new("L", (16, 16)), steps=2, progress=False)


@pytest.fixture(scope="module")
def tiny_files(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("depth")
    OmegaConf.save(OmegaConf.create({"model": tiny_config()}), folder / "tiny.yaml")
    save_checkpoint(model.state_dict(), folder / "tiny.safetensors")
    no_depth = {k: v for k, v in model.state_dict().items() if not k.startswith("depth_model.")}
    save_checkpoint(no_depth, folder / "no-depth.safetensors")
    to_pil(smooth_images(1, SIDE, seed=6)[0]).save(folder / "init.png")
    Image.fromarray(np.tile(np.linspace(0, 255, SIDE).astype(np.uint8), (SIDE, 1))).save(folder / "depth.png")
    return folder


def script_args(folder: Path, *extra: str, ckpt: str = "tiny.safetensors") -> list[str]:
    return ["--config", str(folder / "tiny.yaml"), "--ckpt", str(folder / ckpt), "--init-img",
            str(folder / "init.png"), "--prompt", PROMPTS[0], "--steps", "3", "--n_samples", "2", "--n_iter", "1",
            "--device", "cpu", "--seed", "7", *extra]  # fmt: skip


def test_the_depth2img_script_runs_end_to_end(tiny_files, tmp_path):
    out = tmp_path / "out"
    done = run_program("depth2img.py", *script_args(tiny_files, "--outdir", str(out)), cwd=tmp_path,
                       env={"XDG_CACHE_HOME": str(tmp_path / "cache")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert Image.open(out / "samples" / "00000.png").size == (SIDE, SIDE)


def test_the_depth2img_script_takes_a_depth_map_and_names_what_is_missing(tiny_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "given"
    assert cli.main("depth2img", script_args(tiny_files, "--depth_map", str(tiny_files / "depth.png"), "--sampler",
                                             "Euler", "--outdir", str(out), "--skip_grid")) == 0  # fmt: skip
    assert len(list((out / "samples").iterdir())) == 2
    capsys.readouterr()
    assert cli.main("depth2img", script_args(tiny_files, "--outdir", str(out), ckpt="no-depth.safetensors")) == 2
    err = capsys.readouterr().err
    assert "depth_model" in err and "512-depth-ema.ckpt" in err
    v2 = str(ROOT / "configs/stable-diffusion/v2-inference.yaml")
    assert cli.main("depth2img", [*script_args(tiny_files)[2:], "--config", v2]) == 2
    assert "LatentDepth2ImageDiffusion" in capsys.readouterr().err
    assert cli.main("depth2img", script_args(tiny_files, "--depth_map", str(tmp_path / "missing.png"))) == 2
    assert "depth map" in capsys.readouterr().err
