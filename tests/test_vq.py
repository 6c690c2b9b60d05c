"""VQ first stages: the vector quantizer, VQModel / VQModelInterface, the VQ-GAN loss, the originals' VQ configs, and
latent diffusion on a VQ first stage."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_training_models import fit, images

from ldm.errors import UserError
from ldm.models.autoencoder import VQModel, VQModelInterface
from ldm.modules.losses import VQLPIPSWithDiscriminator
from ldm.modules.vqvae.quantize import VectorQuantizer
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config, load_config

TINY_DDCONFIG = {
    "double_z": False,
    "z_channels": 3,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
IDENTITY = {"target": "torch.nn.Identity"}
VQ_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
FIRST_STAGES = "original/latent-diffusion/models/first_stage_models"
LDM_CONFIGS = "original/stable-diffusion/configs/latent-diffusion"


def quantizer(n_e: int = 16, e_dim: int = 3, seed: int = 0, **kwargs) -> VectorQuantizer:
    torch.manual_seed(seed)
    vq = VectorQuantizer(n_e, e_dim, beta=0.25, **kwargs)
    with torch.no_grad():
        vq.embedding.weight.normal_()  # spread the codebook: the default init packs it into [-1/n_e, 1/n_e]
    return vq


# -- the quantizer --


def test_codebook_lookup_is_the_nearest_neighbour():
    vq = quantizer()
    z = torch.randn(2, 3, 4, 5)
    z_q, _, (perplexity, encodings, indices) = vq(z)
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(vectors, vq.embedding.weight).argmin(dim=1)
    assert indices.shape == (40,) and torch.equal(indices, expected)
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, 3), vq.embedding.weight[expected])
    assert encodings is None
    usage = torch.bincount(expected, minlength=16).float() / 40
    entropy = -(usage[usage > 0] * usage[usage > 0].log()).sum()
    torch.testing.assert_close(perplexity, entropy.exp())
    # A latent that is a codebook entry maps to itself.
    entry = vq.embedding.weight[7].reshape(1, 3, 1, 1)
    assert int(vq(entry)[2][2]) == 7


def test_straight_through_gradient_reaches_the_encoder():
    vq = quantizer()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, _, _ = vq(z)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    # The quantizer is the identity backward: the decoder's gradient passes unchanged to z.
    torch.testing.assert_close(z.grad, upstream)
    assert vq.embedding.weight.grad is None


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_places_beta_as_the_legacy_flag_says(legacy: bool):
    vq = quantizer(legacy=legacy)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss, _ = vq(z)
    mse = float(((z_q.detach() - z.detach()) ** 2).mean())
    assert float(loss.detach()) == pytest.approx(1.25 * mse, rel=1e-5)
    loss.backward()
    # The commitment term mean((sg[z_q] - z)^2) trains z; the codebook term mean((z_q - sg[z])^2) the codebook.
    commitment_weight = 1.0 if legacy else 0.25
    codebook_weight = 0.25 if legacy else 1.0
    n = z.numel()
    z_snapped = vq.embedding.weight[vq(z)[2][2]].reshape(2, 4, 4, 3).permute(0, 3, 1, 2).detach()
    torch.testing.assert_close(z.grad, commitment_weight * 2 * (z.detach() - z_snapped) / n)
    total_codebook_grad = vq.embedding.weight.grad.sum(0)
    expected = codebook_weight * 2 * (z_snapped - z.detach()).sum(dim=(0, 2, 3)) / n
    torch.testing.assert_close(total_codebook_grad, expected)


def test_sane_index_shape_and_get_codebook_entry():
    vq = quantizer(sane_index_shape=True)
    z = torch.randn(2, 3, 4, 5)
    z_q, _, (_, _, indices) = vq(z)
    assert indices.shape == (2, 4, 5)
    torch.testing.assert_close(vq.get_codebook_entry(indices.reshape(-1), shape=(2, 4, 5, 3)), z_q)
    assert vq.get_codebook_entry(indices, shape=None).shape == (2, 4, 5, 3)


def test_remap_round_trip(tmp_path: Path):
    used = np.array([3, 9, 12, 14])
    np.save(tmp_path / "used.npy", used)
    vq = quantizer(remap=str(tmp_path / "used.npy"), unknown_index="extra")
    assert vq.re_embed == 5 and torch.equal(vq.state_dict()["used"], torch.from_numpy(used))
    with torch.no_grad():
        vq.embedding.weight[torch.from_numpy(used)] *= 10.0  # so the used entries win for these latents
    z = vq.embedding.weight[torch.tensor([12, 3, 14, 9, 9, 3])].t().reshape(1, 3, 2, 3)
    z_q, _, (_, _, indices) = vq(z)
    assert indices.shape == (6, 1)
    assert indices.flatten().tolist() == [2, 0, 3, 1, 1, 0]
    torch.testing.assert_close(vq.get_codebook_entry(indices.flatten(), shape=(1, 2, 3, 3)), z_q)
    # An index the model never used becomes the extra position, which looks up entry 0.
    assert vq.remap_to_used(torch.tensor([5, 14])).tolist() == [4, 3]
    assert vq.unmap_to_all(torch.tensor([4, 1])).tolist() == [3, 9]
    random_vq = quantizer(remap=str(tmp_path / "used.npy"))
    assert set(random_vq.remap_to_used(torch.zeros(200, dtype=torch.long)).tolist()) <= {0, 1, 2, 3}


def test_bad_remap_is_a_clear_user_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"remap file '.*nope.npy' does not exist"):
        VectorQuantizer(16, 3, beta=0.25, remap=str(tmp_path / "nope.npy"))
    np.save(tmp_path / "big.npy", np.array([1, 99]))
    with pytest.raises(UserError, match="outside the codebook"):
        VectorQuantizer(16, 3, beta=0.25, remap=str(tmp_path / "big.npy"))
    np.save(tmp_path / "ok.npy", np.array([1, 2]))
    with pytest.raises(UserError, match="unknown_index"):
        VectorQuantizer(16, 3, beta=0.25, remap=str(tmp_path / "ok.npy"), unknown_index="first")


# -- VQModel --


def tiny_vq(cls: type = VQModel, lossconfig: dict = IDENTITY, **kwargs) -> VQModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VQLPIPSWithDiscriminator: no perceptual_weights")
        return cls(ddconfig=TINY_DDCONFIG, lossconfig=lossconfig, n_embed=32, embed_dim=3, **kwargs)


def test_vq_model_encode_decode_shapes():
    model = tiny_vq(sane_index_shape=True).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        quant, loss, (_, _, indices) = model.encode(x)
        assert quant.shape == (2, 3, 8, 12) and loss.ndim == 0 and indices.shape == (2, 8, 12)
        reconstruction, diff, predicted = model(x, return_pred_indices=True)
        assert reconstruction.shape == x.shape and torch.equal(predicted, indices)
        torch.testing.assert_close(model.decode_code(indices), model.decode(quant))
        torch.testing.assert_close(reconstruction, model.decode(quant))
    keys = set(model.state_dict())
    assert {"quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight"} <= keys


def test_vq_interface_encodes_before_and_decodes_after_quantization():
    model = tiny_vq(VQModelInterface).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h = model.encode(x)
        assert h.shape == (2, 3, 8, 8)
        torch.testing.assert_close(h, model.encode_to_prequant(x))
        quant = model.quantize(h)[0]
        assert not torch.allclose(h, quant)
        torch.testing.assert_close(model.decode(h), VQModel.decode(model, quant))
        torch.testing.assert_close(model.decode(h, force_not_quantize=True), VQModel.decode(model, h))
        # Its forward still reconstructs through the codebook, so an interface config can train too.
        torch.testing.assert_close(model(x)[0], model.decode(h))


def test_vq_model_config_errors():
    with pytest.raises(UserError, match="double_z: false"):
        VQModel({**TINY_DDCONFIG, "double_z": True}, IDENTITY, n_embed=8, embed_dim=3)
    with pytest.raises(ConfigError, match="batch_resize_range"):
        VQModel(TINY_DDCONFIG, IDENTITY, n_embed=8, embed_dim=3, batch_resize_range=[64, 32])
    inference = tiny_vq()
    inference.learning_rate = 1e-4
    with pytest.raises(ConfigError, match="VQLPIPSWithDiscriminator"):
        inference.configure_optimizers()


def test_vq_loss_formula():
    torch.manual_seed(0)
    loss = VQLPIPSWithDiscriminator(disc_start=0, codebook_weight=0.5, perceptual_weight=0.0, disc_num_layers=2)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    codebook_loss = torch.tensor(0.3)
    with torch.no_grad():  # no gradients: no adaptive weight, so only nll and codebook terms
        value, log = loss(codebook_loss, x, y, 0, 0, split="val")
    nll = (x - y).abs().mean()
    torch.testing.assert_close(value, nll + 0.5 * 0.3)
    torch.testing.assert_close(log["val/nll_loss"], nll)
    assert float(log["val/quant_loss"]) == pytest.approx(0.3) and float(log["val/d_weight"]) == 0.0
    d_loss, log = loss(codebook_loss, x, y, 1, 0)
    logits_real, logits_fake = loss.discriminator(x), loss.discriminator(y)
    expected = 0.5 * (torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean())
    torch.testing.assert_close(d_loss, expected)
    assert set(log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


def test_taming_target_resolves_to_the_project_loss():
    assert get_obj_from_str(VQ_LOSS) is VQLPIPSWithDiscriminator
    assert get_obj_from_str("ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator") is VQLPIPSWithDiscriminator
    with pytest.raises(ConfigError, match="no module named 'taming"):
        get_obj_from_str("taming.modules.losses.vqperceptual.Nope")


def test_tiny_vq_model_trains_both_optimizers():
    loss_params = {"disc_start": 0, "disc_weight": 0.75, "disc_num_layers": 2, "codebook_weight": 1.0}
    model = tiny_vq(lossconfig={"target": VQ_LOSS, "params": loss_params}, use_ema=True, lr_g_factor=0.5)
    model.learning_rate = 1e-3
    optimizers = model.configure_optimizers()
    assert [o.param_groups[0]["lr"] for o in optimizers] == [5e-4, 1e-3]
    codebook = model.quantize.embedding.weight.detach().clone()
    disc = model.loss.discriminator.main[0].weight.detach().clone()
    trainer = fit(model, {"image": images()}, steps=2 * 2, batches=2, val=True)
    assert trainer.global_step == 4  # two batches, each stepping both optimizers
    assert not torch.equal(model.quantize.embedding.weight, codebook)
    assert not torch.equal(model.loss.discriminator.main[0].weight, disc)
    metrics = trainer.callback_metrics
    for name in ("aeloss", "discloss", "train/quant_loss", "train/g_loss", "val/rec_loss", "val_ema/rec_loss"):
        assert torch.isfinite(metrics[name]), name
    assert float(metrics["train/d_weight"]) > 0 and int(model.model_ema.num_updates) == 2
    logged = model.log_images({"image": images()}, N=2, plot_ema=True)
    assert set(logged) == {"inputs", "reconstructions", "reconstructions_ema"}
    assert all(v.shape == (2, 3, 16, 16) for v in logged.values())


def test_scheduler_steps_both_learning_rates_and_batch_resize_starts_at_the_largest_size():
    schedule = {
        "target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
        "params": {"warm_up_steps": 10, "lr_min": 0.0, "lr_max": 1.0, "lr_start": 0.0, "max_decay_steps": 20},
    }
    loss = {"target": VQ_LOSS, "params": {"disc_start": 0, "disc_num_layers": 2}}
    model = tiny_vq(lossconfig=loss, scheduler_config=schedule, batch_resize_range=[16, 32])
    model.learning_rate = 1e-3
    batch = {"image": images()}
    assert model.train().get_input(batch, "image").shape[-2:] == (32, 32)  # the first steps at the largest size
    assert model.eval().get_input(batch, "image").shape[-2:] == (16, 16)  # never outside training
    trainer = fit(model, batch, steps=2 * 2, batches=2)
    # Stepped once per batch: two batches into a linear 10-step warm-up from 0 the multiplier is 0.2.
    lrs = [o.param_groups[0]["lr"] for o in trainer.optimizers]
    assert lrs == pytest.approx([2e-4, 2e-4])


# -- the originals' configs --


def _reference_keys(path: Path, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        rows[prefix + key] = (tuple(int(s) for s in shape.split("x")) if shape else (), dtype)
    return rows


def _layout(module: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}


def _build_on_meta(node):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="VQLPIPSWithDiscriminator: no perceptual_weights")
        return instantiate_from_config(node, path="model")


@pytest.mark.parametrize("name", ["vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16"])
def test_original_vq_first_stage_configs_build_with_the_original_keys(reference_dir: Path, name: str):
    folder = reference_dir / FIRST_STAGES / name
    if not (folder / "config.keys.tsv").exists():
        pytest.skip(f"{folder}/config.keys.tsv is absent")
    model = _build_on_meta(load_config(folder / "config.yaml").model)
    assert type(model) is VQModel and type(model.loss) is VQLPIPSWithDiscriminator
    assert _layout(model) == _reference_keys(folder / "config.keys.tsv")


def _first_stage_keys_for(reference_dir: Path, params) -> dict[str, tuple[tuple[int, ...], str]]:
    """The listed keys of the released VQ first stage with these ddconfig / n_embed / embed_dim, less the loss's."""
    for config_path in sorted((reference_dir / FIRST_STAGES).glob("vq-*/config.yaml")):
        released = OmegaConf.load(config_path).model.params
        same = all(released[k] == params[k] for k in ("ddconfig", "n_embed", "embed_dim"))
        if same and (config_path.parent / "config.keys.tsv").exists():
            keys = _reference_keys(config_path.parent / "config.keys.tsv", prefix="first_stage_model.")
            return {k: v for k, v in keys.items() if not k.startswith("first_stage_model.loss.")}
    return {}


@pytest.mark.parametrize(
    "name", ["celebahq-ldm-vq-4.yaml", "ffhq-ldm-vq-4.yaml", "lsun_bedrooms-ldm-vq-4.yaml", "cin-ldm-vq-f8.yaml"]
)
def test_original_ldm_vq_configs_build_on_a_vq_interface(reference_dir: Path, name: str):
    config = load_config(reference_dir / LDM_CONFIGS / name)
    # They name first-stage checkpoints no repository ships; building without them is what is tested here.
    config.model.params.first_stage_config.params.pop("ckpt_path")
    model = _build_on_meta(config.model)
    stage = model.first_stage_model
    assert type(stage) is VQModelInterface and not stage.training
    assert not any(p.requires_grad for p in stage.parameters())
    ours = {k: v for k, v in _layout(model).items() if k.startswith("first_stage_model.")}
    expected = _first_stage_keys_for(reference_dir, config.model.params.first_stage_config.params)
    if expected:  # vq-f4's architecture (cin's f8 first stage is not one of the released configs)
        assert ours == expected
    n_embed = config.model.params.first_stage_config.params.n_embed
    assert ours["first_stage_model.quantize.embedding.weight"][0][0] == n_embed
    assert not any(".loss." in k for k in ours)


# -- latent diffusion on a VQ first stage --


def tiny_vq_ldm_config() -> dict:
    unet = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "image_size": 8,
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 32,
            "attention_resolutions": [],
            "num_res_blocks": 1,
            "channel_mult": [1],
            "num_heads": 4,
        },
    }
    first_stage = {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {"embed_dim": 3, "n_embed": 32, "ddconfig": TINY_DDCONFIG, "lossconfig": IDENTITY},
    }
    return {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "first_stage_config": first_stage,
            "cond_stage_config": "__is_unconditional__",
            "unet_config": unet,
            "image_size": 8,
            "channels": 3,
            "timesteps": 100,
            "first_stage_key": "image",
            "use_ema": False,
            "scale_factor": 0.5,
        },
    }


def tiny_vq_ldm():
    torch.manual_seed(0)
    return instantiate_from_config(tiny_vq_ldm_config()).eval()


def test_vq_checkpoints_load_as_first_stage_and_as_part_of_an_ldm(tmp_path: Path):
    from safetensors.torch import save_file

    from ldm.checkpoint import load_model_from_config

    stage = tiny_vq(VQModelInterface)
    torch.save({"state_dict": stage.state_dict()}, tmp_path / "vq.ckpt")
    torch.manual_seed(1)
    loaded = VQModelInterface(TINY_DDCONFIG, IDENTITY, n_embed=32, embed_dim=3, ckpt_path=str(tmp_path / "vq.ckpt"))
    torch.testing.assert_close(loaded.state_dict(), stage.state_dict())

    model = tiny_vq_ldm()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ldm.safetensors"))
    config = OmegaConf.create({"model": tiny_vq_ldm_config()})
    restored = load_model_from_config(config, tmp_path / "ldm.safetensors", device="cpu")
    codebook = "first_stage_model.quantize.embedding.weight"
    torch.testing.assert_close(restored.state_dict()[codebook], model.state_dict()[codebook])


def test_latent_diffusion_on_a_vq_first_stage_encodes_decodes_and_samples():
    from ldm.models.diffusion.samplers import sample

    model = tiny_vq_ldm()
    stage = model.first_stage_model
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(x))
        torch.testing.assert_close(z, 0.5 * stage.encode(x))
        quantized = stage.quantize(z / 0.5)[0]
        torch.testing.assert_close(model.decode_first_stage(z), VQModel.decode(stage, quantized))
        not_quantized = model.decode_first_stage(z, force_not_quantize=True)
        torch.testing.assert_close(not_quantized, VQModel.decode(stage, z / 0.5))
        # predict_cids: codebook logits (B, n_embed, h, w) -> their argmax entries, decoded as they are.
        logits = torch.randn(2, 32, 8, 8)
        entries = stage.quantize.embedding.weight[logits.argmax(1)].permute(0, 3, 1, 2) / 0.5
        torch.testing.assert_close(model.decode_first_stage(logits, predict_cids=True), VQModel.decode(stage, entries))
        latents = sample(model, "ddim", 3, None, shape=(2, 3, 8, 8), progress=False)
        images_out = model.decode_first_stage(latents)
    assert latents.shape == (2, 3, 8, 8) and torch.isfinite(latents).all()
    assert images_out.shape == (2, 3, 16, 16) and torch.isfinite(images_out).all()
    logged = model.log_images({"image": x.permute(0, 2, 3, 1)}, N=2, ddim_steps=2)
    assert set(logged) == {"inputs", "reconstruction", "samples"}
