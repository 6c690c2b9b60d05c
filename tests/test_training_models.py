"""Training code of the models: diffusion losses and options, EMA, caption dropout, scale_by_std, the autoencoder's
LPIPS + GAN loss, LR schedules, and a few real Lightning runs of tiny models on the CPU."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.modules.losses.lpips import LPIPS
from ldm.util import ConfigError, apply_overrides, instantiate_from_config

TINY_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
UNCONDITIONAL = [
    "model.params.cond_stage_config=__is_unconditional__",
    "model.params.conditioning_key=null",
    "model.params.unet_config.params.use_spatial_transformer=false",
    "model.params.unet_config.params.context_dim=null",
]
CAPTIONS = ["a red circle on a blue background", "a green square", "a yellow triangle", "a white star"]


def build(config, *overrides: str, lr: float = 1e-3, cond_stage_config: dict | None = None):
    config = apply_overrides(config, list(overrides))
    if cond_stage_config is not None:
        config.model.params.cond_stage_config = cond_stage_config
    model = instantiate_from_config(config.model, path="model")
    model.learning_rate = lr
    return model


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Fixed smooth images, (n, size, size, 3) in [-1, 1] (the data loaders' channels-last layout)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear").permute(0, 2, 3, 1).contiguous()


def loader(batch: dict, repeats: int = 1) -> DataLoader:
    """A loader yielding ``batch`` (a dict of equal-length tensors / lists) ``repeats`` times, unshuffled."""
    n = len(next(iter(batch.values())))
    items = [{k: v[i] for k, v in batch.items()} for i in range(n)] * repeats
    return DataLoader(items, batch_size=n)


def fit(
    model, batch: dict, steps: int, val: bool = False, batches: int | None = None, ckpt_path: str | None = None, **kw
) -> pl.Trainer:
    """Train ``steps`` optimizer steps on ``batch`` (an epoch of ``batches`` copies, default ``steps``), resuming from
    ``ckpt_path`` if given."""
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1 if val else 0,
        **kw,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|eval mode|LeafSpec|val_dataloader|resumable).*")
        trainer.fit(model, loader(batch, repeats=batches or steps), loader(batch) if val else None, ckpt_path=ckpt_path)
    return trainer


@torch.no_grad()
def fixed_ldm_loss(model, batch: dict) -> float:
    """The LDM loss on ``batch`` at fixed timesteps and noise."""
    torch.manual_seed(0)
    z, c = model.get_input(batch, model.first_stage_key)
    if model.cond_stage_trainable and c is not None:
        c = model.get_learned_conditioning(c)
    t = torch.linspace(20, 980, len(z)).long()
    loss, _ = model.p_losses(z, c, t, torch.randn_like(z))
    return float(loss)


# -- LatentDiffusion end to end --


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ldm_training_lowers_loss_on_fixed_batch(tiny_config, parameterization):
    torch.manual_seed(0)
    model = build(tiny_config, f"model.params.parameterization={parameterization}")
    batch = {"jpg": images(), "txt": CAPTIONS}
    before = fixed_ldm_loss(model, batch)
    trainer = fit(model, batch, steps=10, val=True)
    assert trainer.global_step == 10
    after = fixed_ldm_loss(model, batch)
    assert after < 0.8 * before, (before, after)
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/loss_simple", "train/loss_vlb", "val/loss_simple", "val/loss_simple_ema"):
        assert torch.isfinite(metrics[name]), name


def test_ldm_trains_under_bf16_mixed_precision(tiny_config):
    torch.manual_seed(0)
    model = build(tiny_config)
    before = model.model.diffusion_model.out[2].weight.detach().clone()
    trainer = fit(model, {"jpg": images(), "txt": CAPTIONS}, steps=2, precision="bf16-mixed")
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(model.model.diffusion_model.out[2].weight, before)


def test_ema_follows_training_and_ema_scope_swaps(tiny_config):
    torch.manual_seed(0)
    model = build(tiny_config, "model.params.use_ema=true")
    param = model.model.diffusion_model.out[2].weight
    ema_key = "diffusion_modelout2weight"
    initial = param.detach().clone()
    fit(model, {"jpg": images(), "txt": CAPTIONS}, steps=3)
    ema = dict(model.model_ema.named_buffers())[ema_key]
    assert int(model.model_ema.num_updates) == 3
    assert not torch.equal(ema, initial) and not torch.equal(ema, param)
    trained = param.detach().clone()
    with model.ema_scope():
        torch.testing.assert_close(param, ema)
    torch.testing.assert_close(param, trained)


def test_ema_restarts_from_a_checkpoint_without_ema(tiny_config, tiny_dir, tiny_weights):
    model = build(tiny_config, "model.params.use_ema=true", f"model.params.ckpt_path={tiny_dir / 'model.safetensors'}")
    ema = dict(model.model_ema.named_buffers())["diffusion_modelout2weight"]
    torch.testing.assert_close(ema, tiny_weights["model.diffusion_model.out.2.weight"])
    assert model.restarted_from_ckpt


def test_scale_by_std_sets_scale_factor_from_first_batch(tiny_config):
    torch.manual_seed(0)
    model = build(tiny_config, "model.params.scale_by_std=true", "model.params.scale_factor=1.0")
    with torch.no_grad():  # widen the random VAE's means and shrink its posterior noise: latents far from unit std
        conv = model.first_stage_model.quant_conv
        conv.weight[:4] *= 20
        conv.weight[4:] = 0.0
        conv.bias[4:] = -20.0
    x = images(8, seed=1)
    fit(model, {"jpg": x, "txt": CAPTIONS * 2}, steps=1)
    with torch.no_grad():
        z = model.encode_first_stage(x.permute(0, 3, 1, 2)).sample()
    assert "scale_factor" in model.state_dict()
    assert float(model.scale_factor) == pytest.approx(1.0 / float(z.std()), rel=1e-4)
    assert float(model.scale_factor) < 0.5

    restored = build(tiny_config, "model.params.scale_by_std=true", "model.params.scale_factor=1.0")
    restored.restarted_from_ckpt = True
    fit(restored, {"jpg": x, "txt": CAPTIONS * 2}, steps=1)
    assert float(restored.scale_factor) == 1.0


def test_cond_stage_trainable_puts_text_encoder_in_optimizer(tiny_config):
    torch.manual_seed(0)
    model = build(tiny_config, "model.params.cond_stage_trainable=true")
    text_params = list(model.cond_stage_model.parameters())
    assert all(p.requires_grad for p in text_params)
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert {id(p) for p in text_params} <= optimized
    embedding = model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight
    before = embedding.detach().clone()
    fit(model, {"jpg": images(), "txt": CAPTIONS}, steps=2)
    assert not torch.equal(embedding, before)

    frozen = build(tiny_config)
    optimized = {id(p) for group in frozen.configure_optimizers().param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen.cond_stage_model.parameters()}


def test_class_conditional_ldm_trains(tiny_config):
    torch.manual_seed(0)
    model = build(
        tiny_config,
        "model.params.cond_stage_key=class_label",
        "model.params.cond_stage_trainable=true",
        cond_stage_config={
            "target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"embed_dim": 32, "n_classes": 5, "key": "class_label"},
        },
    )
    batch = {"jpg": images(), "class_label": torch.tensor([0, 1, 2, 3])}
    before = model.cond_stage_model.embedding.weight.detach().clone()
    trainer = fit(model, batch, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(model.cond_stage_model.embedding.weight, before)
    logged = model.log_images(batch, N=2, ddim_steps=2, unconditional_guidance_scale=3.0)
    assert logged["samples_cfg"].shape == (2, 3, 16, 16)


def test_unconditional_ldm_trains_and_logs_images(tiny_config):
    torch.manual_seed(0)
    model = build(tiny_config, *UNCONDITIONAL)
    batch = {"jpg": images()}
    trainer = fit(model, batch, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    logged = model.log_images(batch, N=3, ddim_steps=2, unconditional_guidance_scale=3.0)
    assert set(logged) == {"inputs", "reconstruction", "samples"}
    for value in logged.values():
        assert value.shape == (3, 3, 16, 16) and value.min() >= -1 and value.max() <= 1


def test_pixel_space_ddpm_trains():
    torch.manual_seed(0)
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
    model = instantiate_from_config(
        {
            "target": "ldm.models.diffusion.ddpm.DDPM",
            "params": {"unet_config": unet, "image_size": 8, "channels": 3, "timesteps": 100, "use_ema": False},
        }
    )
    model.learning_rate = 1e-3
    batch = {"image": images(4, size=8)}
    trainer = fit(model, batch, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert model.log_images(batch, N=2, ddim_steps=2)["samples"].shape == (2, 3, 8, 8)


def test_log_images_gives_inputs_reconstruction_and_samples(tiny_config):
    torch.manual_seed(0)
    model = build(tiny_config, "model.params.ucg_training.txt.p=0.1", "model.params.ucg_training.txt.val=''")
    batch = {"jpg": images(), "txt": CAPTIONS}
    logged = model.log_images(batch, N=2, ddim_steps=3, unconditional_guidance_scale=5.0)
    assert set(logged) == {"inputs", "reconstruction", "samples", "samples_cfg"}
    for value in logged.values():
        assert value.shape == (2, 3, 16, 16) and value.min() >= -1 and value.max() <= 1
    torch.testing.assert_close(logged["inputs"], images()[:2].permute(0, 3, 1, 2))
    assert not torch.equal(logged["samples"], logged["samples_cfg"])
    assert model.training


# -- the loss, unit by unit --


@pytest.fixture(scope="module")
def ldm(tiny_config):
    return build(tiny_config)


def test_targets_for_each_parameterization(ldm):
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ldm.parameterization = "x0"
    torch.testing.assert_close(ldm.training_target(x0, noise, t), x0)
    ldm.parameterization = "v"
    a = ldm.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(ldm.training_target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    ldm.parameterization = "eps"
    torch.testing.assert_close(ldm.training_target(x0, noise, t), noise)


def test_loss_with_learned_logvar_vlb_and_l1(tiny_config):
    model = build(
        tiny_config,
        "model.params.learn_logvar=true",
        "model.params.original_elbo_weight=0.5",
        "model.params.loss_type=l1",
    )
    with torch.no_grad():
        model.logvar.copy_(torch.linspace(-1, 1, model.num_timesteps))
    x0, noise, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 400, 999])
    loss, log = model.diffusion_loss(out, x0, noise, t)
    simple = (out - noise).abs().mean(dim=(1, 2, 3))
    logvar = model.logvar[t]
    vlb = (model.lvlb_weights[t] * simple).mean()
    expected = (simple / logvar.exp() + logvar).mean() + 0.5 * vlb
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(log["train/loss_simple"], simple.mean())
    torch.testing.assert_close(log["train/loss_vlb"], vlb)
    assert set(log) == {"train/loss_simple", "train/loss_gamma", "logvar", "train/loss_vlb", "train/loss"}
    loss.backward()
    assert model.logvar.grad is not None and model.logvar.grad[t].abs().sum() > 0
    assert any(p is model.logvar for p in model.trainable_parameters())


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_min_snr_gamma_weights_the_loss(ldm, parameterization):
    ldm.parameterization = parameterization
    x0, noise, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 300, 999])
    target = ldm.training_target(x0, noise, t)
    simple = (out - target).pow(2).mean(dim=(1, 2, 3))
    snr = ldm.alphas_cumprod[t] / (1 - ldm.alphas_cumprod[t])
    weight = {"eps": snr.clamp(max=5) / snr, "v": snr.clamp(max=5) / (snr + 1), "x0": snr.clamp(max=5)}
    try:
        ldm.snr_gamma = 5.0
        loss, log = ldm.diffusion_loss(out, x0, noise, t)
    finally:
        ldm.snr_gamma = None
        ldm.parameterization = "eps"
    torch.testing.assert_close(loss, (simple * weight[parameterization]).mean() + 0.0)
    torch.testing.assert_close(log["train/loss_simple"], simple.mean())
    if parameterization == "eps":
        assert weight["eps"][0] < 1 and weight["eps"][2] == 1  # low-noise steps are down-weighted


def test_offset_noise_adds_a_per_channel_constant(ldm):
    x0, t, c = torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), torch.randn(2, 77, 32)
    torch.manual_seed(3)
    expected = torch.randn_like(x0) + 0.1 * torch.randn(2, 4, 1, 1)
    try:
        ldm.offset_noise_strength = 0.1
        torch.manual_seed(3)
        torch.testing.assert_close(ldm.draw_noise(x0), expected)
        torch.manual_seed(3)
        with torch.no_grad():
            offset_loss, _ = ldm.p_losses(x0, c, t)
    finally:
        ldm.offset_noise_strength = 0.0
    with torch.no_grad():
        given_loss, _ = ldm.p_losses(x0, c, t, expected)
        torch.manual_seed(3)
        plain_loss, _ = ldm.p_losses(x0, c, t)
    torch.testing.assert_close(offset_loss, given_loss)
    assert not torch.equal(offset_loss, plain_loss)


def test_ucg_training_drops_captions_at_the_stated_rate(tiny_config):
    model = build(tiny_config, "model.params.ucg_training.txt.p=0.25", "model.params.ucg_training.txt.val=null")
    torch.manual_seed(0)
    batch = {"txt": [f"caption {i}" for i in range(4000)], "jpg": torch.zeros(4000, 1, 1, 3)}
    dropped = model.drop_conditioning(batch)
    empty = sum(c == "" for c in dropped["txt"])
    assert 0.22 * 4000 < empty < 0.28 * 4000
    assert all(c in ("", f"caption {i}") for i, c in enumerate(dropped["txt"]))
    assert batch["txt"][0] == "caption 0" and "" not in batch["txt"]

    model.ucg_training = {"class_label": {"p": 0.5, "val": 9}}
    labels = model.drop_conditioning({"class_label": torch.zeros(2000, dtype=torch.long)})["class_label"]
    assert set(labels.tolist()) == {0, 9} and 0.45 < (labels == 9).float().mean() < 0.55


def test_bad_training_options_are_config_errors(tiny_config):
    with pytest.raises(ConfigError, match="ucg_training.txt"):
        build(tiny_config, "model.params.ucg_training.txt.p=1.5")
    with pytest.raises(ConfigError, match="snr_gamma"):
        build(tiny_config, "model.params.snr_gamma=0")
    with pytest.raises(ConfigError, match="loss_type"):
        build(tiny_config, "model.params.loss_type=l3")


def test_scheduler_config_drives_the_learning_rate(tiny_config):
    model = build(
        tiny_config,
        "model.params.scheduler_config.target=ldm.lr_scheduler.LambdaLinearScheduler",
        "model.params.scheduler_config.params={warm_up_steps: [10], cycle_lengths: [1000], f_start: [0.1], "
        "f_max: [1.0], f_min: [1.0]}",
        lr=2e-4,
    )
    config = model.configure_optimizers()
    scheduler = config["lr_scheduler"]
    assert scheduler["interval"] == "step"
    lrs = []
    for _ in range(12):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        scheduler["scheduler"].step()
    assert lrs[0] == pytest.approx(2e-5) and lrs[5] == pytest.approx(2e-4 * 0.55) and lrs[11] == pytest.approx(2e-4)


def test_resume_restores_ema_scheduler_and_step(tiny_config, tmp_path):
    overrides = [
        "model.params.use_ema=true",
        "model.params.scheduler_config.target=ldm.lr_scheduler.LambdaLinearScheduler",
        "model.params.scheduler_config.params={warm_up_steps: [10], cycle_lengths: [1000], f_start: [0.1], "
        "f_max: [1.0], f_min: [1.0]}",
    ]
    batch = {"jpg": images(), "txt": CAPTIONS}
    torch.manual_seed(0)
    first = fit(build(tiny_config, *overrides), batch, steps=3, batches=10)
    first.save_checkpoint(tmp_path / "last.ckpt")
    model = build(tiny_config, *overrides)
    second = fit(model, batch, steps=5, batches=10, ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.global_step == 5 and int(model.model_ema.num_updates) == 5
    assert second.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * (0.1 + 0.9 * 5 / 10))


# -- LR schedules --


def test_warm_up_cosine_scheduler():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)


def test_warm_up_cosine_scheduler2_cycles():
    s = LambdaWarmUpCosineScheduler2(
        warm_up_steps=[10, 0], f_min=[0.0, 0.5], f_max=[1.0, 1.0], f_start=[0.0, 1.0], cycle_lengths=[110, 100]
    )
    assert s(5) == pytest.approx(0.5) and s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
    assert s(111) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 100)))
    assert s(160) == pytest.approx(0.75) and s(210) == pytest.approx(0.5) and s(10_000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="f_min"):
        LambdaWarmUpCosineScheduler2([1], [0.0, 1.0], [1.0], [0.0], [10])


def test_linear_scheduler_sd_style():
    sd = LambdaLinearScheduler(warm_up_steps=[10000], cycle_lengths=[10**13], f_start=[1e-6], f_max=[1.0], f_min=[1.0])
    assert sd(0) == pytest.approx(1e-6) and sd(5000) == pytest.approx(0.5, abs=1e-6)
    assert sd.schedule(10000) == 1.0 and sd(10**9) == 1.0
    decay = LambdaLinearScheduler(warm_up_steps=[0], cycle_lengths=[100], f_start=[1.0], f_max=[1.0], f_min=[0.0])
    assert decay(0) == 1.0 and decay(25) == pytest.approx(0.75) and decay(100) == 0.0 and decay(500) == 0.0


# -- the autoencoder --


def autoencoder(tmp_path=None, perceptual_weights=None, **loss_params) -> AutoencoderKL:
    params = {"disc_start": 0, "kl_weight": 1e-6, "disc_weight": 0.5, "disc_num_layers": 2, **loss_params}
    if perceptual_weights is not None:
        params["perceptual_weights"] = perceptual_weights
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LPIPSWithDiscriminator: no perceptual_weights")
        model = AutoencoderKL(
            ddconfig=TINY_VAE,
            lossconfig={"target": "ldm.modules.losses.LPIPSWithDiscriminator", "params": params},
            embed_dim=4,
            ema_decay=0.9,
        )
    model.learning_rate = 1e-3
    return model


@torch.no_grad()
def reconstruction_error(model: AutoencoderKL, x: torch.Tensor) -> float:
    x = x.permute(0, 3, 1, 2)
    return float((model(x, sample_posterior=False)[0] - x).abs().mean())


def test_autoencoder_training_with_discriminator_lowers_loss():
    torch.manual_seed(0)
    model = autoencoder()
    x = images()
    disc_before = model.loss.discriminator.main[0].weight.detach().clone()
    before = reconstruction_error(model, x)
    trainer = fit(model, {"image": x}, steps=2 * 12, batches=12, val=True)
    assert trainer.global_step == 24  # Lightning counts both optimizers' steps: 12 batches
    assert reconstruction_error(model, x) < 0.7 * before
    metrics = trainer.callback_metrics
    assert metrics["train/disc_factor"] == 1.0 and metrics["train/d_weight"] > 0
    assert not torch.equal(model.loss.discriminator.main[0].weight, disc_before)
    assert int(model.model_ema.num_updates) == 12
    for name in ("val/rec_loss", "val_ema/rec_loss", "train/disc_loss", "train/g_loss", "aeloss", "discloss"):
        assert torch.isfinite(metrics[name]), name
    logged = model.log_images({"image": x}, N=2)
    assert set(logged) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (2, 3, 16, 16) for v in logged.values())


def test_disc_start_counts_batches():
    torch.manual_seed(0)
    model = autoencoder(disc_start=3)
    seen = []
    original = model.loss.forward

    def spy(*args, **kwargs):
        seen.append(args[4])
        return original(*args, **kwargs)

    model.loss.forward = spy
    disc_before = model.loss.discriminator.main[0].weight.detach().clone()
    fit(model, {"image": images()}, steps=2 * 3, batches=3)
    assert seen == [0, 0, 1, 1, 2, 2]
    # Before disc_start the discriminator gets no loss, so its weights stay put.
    torch.testing.assert_close(model.loss.discriminator.main[0].weight, disc_before)


def test_autoencoder_ema_and_config_errors():
    model = autoencoder()
    assert "model_ema.decay" in model.state_dict() and any("lossdiscriminator" in k for k in model.state_dict())
    with pytest.raises(ConfigError, match="ema_decay"):
        AutoencoderKL(ddconfig=TINY_VAE, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4, ema_decay=1.5)
    inference = AutoencoderKL(ddconfig=TINY_VAE, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    inference.learning_rate = 1e-4
    with pytest.raises(ConfigError, match="LPIPSWithDiscriminator"):
        inference.configure_optimizers()


def test_adaptive_weight_balances_gradients_at_last_layer():
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_weight=2.0)
    last = torch.randn(3, 3, requires_grad=True)
    nll, g = (last * 4).sum(), (last * 0.5).sum()
    expected = 2.0 * (torch.full((3, 3), 4.0).norm() / (torch.full((3, 3), 0.5).norm() + 1e-4))
    torch.testing.assert_close(loss.calculate_adaptive_weight(nll, g, last), expected)


def test_discriminator_layout_actnorm_and_gan_losses():
    from ldm.modules.discriminator.model import ActNorm, NLayerDiscriminator
    from ldm.modules.losses.contperceptual import hinge_d_loss, vanilla_d_loss

    disc = NLayerDiscriminator(input_nc=3, n_layers=3)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert "main.2.bias" not in disc.state_dict() and disc.state_dict()["main.11.weight"].shape == (1, 512, 4, 4)
    norm = NLayerDiscriminator(use_actnorm=True).main[3]
    assert isinstance(norm, ActNorm)
    features = torch.randn(4, 128, 5, 5) * 3 + 2
    out = norm(features)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(128), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), torch.ones(128), atol=1e-3, rtol=0)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    expected = 0.5 * (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean())
    torch.testing.assert_close(vanilla_d_loss(real, fake), expected)


# -- LPIPS --


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = LPIPS().state_dict()
    return {k: torch.rand(v.shape, generator=g) * 0.1 for k, v in state.items() if not k.startswith("scaling_layer.")}


def test_lpips_loads_weights_from_a_local_file(tmp_path):
    state = random_lpips_state()
    path = tmp_path / "lpips.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weights=str(path))
    assert loss.perceptual_weight == 1.0
    torch.testing.assert_close(loss.perceptual_loss.lin0.model[1].weight, state["lin0.model.1.weight"])
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    distance = loss.perceptual_loss(x, y)
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    assert loss.perceptual_loss(x, x).abs().max() < 1e-6

    posterior = AutoencoderKL(ddconfig=TINY_VAE, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).encode(x)
    _, log = loss(x, y, posterior, 0, 0, split="val")
    torch.testing.assert_close(log["val/rec_loss"], ((x - y).abs() + distance).mean())


def test_lpips_weights_in_torchvision_and_autoencoder_layouts(tmp_path):
    state = random_lpips_state(1)
    vgg = {}
    for key, value in state.items():
        if key.startswith("net."):
            index, param = key.split(".")[2:]
            vgg[f"features.{index}.{param}"] = value
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, tmp_path / "vgg16.pth")
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if k.startswith("lin")}, str(tmp_path / "lin.safetensors"))
    lpips = LPIPS(weights=[tmp_path / "vgg16.pth", tmp_path / "lin.safetensors"])
    for key, value in state.items():
        torch.testing.assert_close(lpips.state_dict()[key], value, msg=key)
    torch.testing.assert_close(getattr(lpips.net.slice2, "5").weight, vgg["features.5.weight"])

    torch.save({"state_dict": {f"loss.perceptual_loss.{k}": v for k, v in state.items()}}, tmp_path / "kl.ckpt")
    torch.testing.assert_close(LPIPS(weights=tmp_path / "kl.ckpt").lin4.model[1].weight, state["lin4.model.1.weight"])
    with pytest.raises(ValueError, match="lack"):
        LPIPS(weights=tmp_path / "vgg16.pth")


def test_perceptual_term_is_off_with_one_notice_without_weights():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = LPIPSWithDiscriminator(disc_start=0)
        x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
        posterior = AutoencoderKL(ddconfig=TINY_VAE, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).encode(x)
        _, log = loss(x, y, posterior, 0, 0)
        loss(x, y, posterior, 1, 0)
    notices = [w for w in caught if "perceptual" in str(w.message)]
    assert len(notices) == 1 and "perceptual_weights" in str(notices[0].message)
    assert loss.perceptual_weight == 0.0
    torch.testing.assert_close(log["train/rec_loss"], (x - y).abs().mean())
    assert "loss.perceptual_loss.lin0.model.1.weight" in {f"loss.{k}" for k in loss.state_dict()}
