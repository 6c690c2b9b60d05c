"""SD 2.1 unCLIP (stable-unclip H and L): ``ImageEmbeddingConditionedLatentDiffusion``, the CLIP image embedders and
``CLIPEmbeddingNoiseAugmentation``.

The real configs are built on the meta device (tests/test_original_configs.py compares the H one with the original's
state-dict listing); the tiny unCLIP model of ``unclip_model.py`` samples, guides and trains on the CPU
(tests/test_image_variation.py runs it behind the Python API and scripts/image_variation.py).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from open_clip.transformer import QuickGELU
from torch.utils.data import DataLoader
from unclip_model import EMBED, LATENT, SIZE, TINY_VISION, batch, noise_aug_config, smooth_images, tiny_config, wake

from ldm.errors import UserError
from ldm.models.diffusion import ddpm, latent_unclip
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.modules.diffusionmodules.util import make_beta_schedule, timestep_embedding
from ldm.modules.encoders import modules
from ldm.modules.encoders.clip_image import CLIP_MEAN, CLIP_STD, antialiased_resize
from ldm.util import ConfigError, instantiate_from_config, load_config

ORIGINAL_L = "original/stablediffusion/configs/stable-diffusion/v2-1-stable-unclip-l-inference.yaml"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return wake(instantiate_from_config(tiny_config())).eval()


# -- the noise schedule and the embedding noise augmentation --


def test_squaredcos_cap_v2_is_the_glide_cosine_schedule():
    betas = make_beta_schedule("squaredcos_cap_v2", 1000)
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 1, 500, 998):
        assert betas[i] == pytest.approx(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), rel=1e-9)
    assert betas[0] == pytest.approx(4.1284e-5, rel=1e-4) and betas[-1] == 0.999  # the cap
    assert np.all(np.diff(betas) > 0)


def test_noise_level_zero_keeps_the_embedding_up_to_the_schedules_first_step():
    aug = instantiate_from_config(noise_aug_config())
    x = torch.randn(4, EMBED) * 3 + 1
    eps = torch.randn(4, EMBED)
    z, level_embedding = aug(x, noise_level=0, noise=eps)
    # Level 0 is step 0 of the schedule: sqrt(1 - alphas_cumprod[0]) = 0.0064 of noise, as in the original.
    a0 = float(aug.alphas_cumprod[0])
    torch.testing.assert_close(z, math.sqrt(a0) * x + math.sqrt(1 - a0) * eps)
    assert (z - x).abs().max() < 0.01 * (x.abs().max() + eps.abs().max())
    # Without the eps it is the identity to within 2e-5 relative.
    torch.testing.assert_close(aug(x, noise_level=0, noise=torch.zeros_like(x))[0], x, rtol=3e-5, atol=1e-6)
    torch.testing.assert_close(level_embedding, timestep_embedding(torch.zeros(4), EMBED))
    assert level_embedding.shape == (4, EMBED)


def test_noise_augmentation_matches_diffusers_stable_unclip_noising():
    """diffusers' StableUnCLIPImg2ImgPipeline noises the embedding with a squaredcos_cap_v2 DDPMScheduler and appends
    ``get_timestep_embedding(level, D, flip_sin_to_cos=True, downscale_freq_shift=0)`` (with diffusers installed:
    ``pip install -r requirements-bench.txt``)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (requirements-compare.txt)")
    from diffusers.models.embeddings import get_timestep_embedding

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    aug = instantiate_from_config(noise_aug_config(timestep_dim=1024))
    x, eps, levels = torch.randn(3, 1024), torch.randn(3, 1024), torch.tensor([0, 100, 999])
    z, level_embedding = aug(x, noise_level=levels, noise=eps)
    torch.testing.assert_close(z, scheduler.add_noise(x, eps, levels), rtol=1e-5, atol=1e-5)
    expected = get_timestep_embedding(levels, 1024, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(level_embedding, expected)


def test_clip_statistics_scale_the_embedding_around_the_noise(tmp_path):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(EMBED, generator=g), torch.rand(EMBED, generator=g) + 0.5
    torch.save((mean, std), tmp_path / "stats.th")
    aug = instantiate_from_config(noise_aug_config(clip_stats_path=str(tmp_path / "stats.th")))
    x = mean + std * torch.randn(4096, EMBED, generator=g)
    scaled = aug.scale(x)
    torch.testing.assert_close(scaled.mean(0), torch.zeros(EMBED), atol=0.05, rtol=0)
    torch.testing.assert_close(scaled.std(0), torch.ones(EMBED), atol=0.05, rtol=0)
    torch.testing.assert_close(aug.unscale(scaled), x, rtol=1e-5, atol=1e-5)
    # At the last level the embedding is replaced by noise with the data's statistics.
    eps = torch.randn(4096, EMBED, generator=g)
    z, _ = aug(x, noise_level=999, noise=eps)
    torch.testing.assert_close(z, mean + std * eps, atol=1e-3, rtol=0)
    # The statistics are not in the state dict (the original's checkpoints do not have them).
    assert set(aug.state_dict()) == {k for k in aug.state_dict() if not k.startswith("data_")}
    plain = instantiate_from_config(noise_aug_config())
    assert torch.equal(plain.data_mean, torch.zeros(1, EMBED)) and torch.equal(plain.data_std, torch.ones(1, EMBED))


def test_a_missing_or_wrong_statistics_file_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        instantiate_from_config(noise_aug_config(clip_stats_path="nowhere/ViT-L-14_stats.th"), path="aug")
    assert str(err.value).startswith("aug.params.clip_stats_path: ") and "\n" not in str(err.value)
    assert "'nowhere/ViT-L-14_stats.th' does not exist" in str(err.value)
    torch.save((torch.zeros(3), torch.ones(3)), tmp_path / "narrow.th")
    with pytest.raises(ConfigError, match="width 3"):
        instantiate_from_config(noise_aug_config(clip_stats_path=str(tmp_path / "narrow.th")))


@pytest.mark.parametrize("level", [-1, 1000, 2.5])
def test_a_noise_level_outside_the_schedule_is_a_user_error(level):
    aug = instantiate_from_config(noise_aug_config())
    with pytest.raises(UserError, match="noise_level"):
        aug(torch.zeros(1, EMBED), noise_level=level)


def test_training_levels_are_drawn_below_the_maximum():
    aug = instantiate_from_config(noise_aug_config(max_noise_level=10))
    torch.manual_seed(0)
    _, level_embedding = aug(torch.zeros(512, EMBED))
    levels = {tuple(row.tolist()) for row in level_embedding.round(decimals=4)}
    assert len(levels) == 10


# -- the image embedders --


def test_resize_is_kornias_antialiased_bicubic():
    same = torch.rand(1, 3, 224, 224)
    assert antialiased_resize(same, (224, 224)) is same
    flat = torch.full((2, 3, 448, 300), 0.3)
    torch.testing.assert_close(antialiased_resize(flat, (224, 224)), torch.full((2, 3, 224, 224), 0.3))
    # A 1-pixel checkerboard aliases to stripes when shrunk without the blur; with it, it is near grey.
    board = ((torch.arange(448)[:, None] + torch.arange(448)[None]) % 2).float().expand(1, 3, -1, -1) * 2 - 1
    blurred = antialiased_resize(board, (224, 224))
    plain = torch.nn.functional.interpolate(board, size=(224, 224), mode="bicubic", align_corners=True)
    assert blurred[..., 2:-2, 2:-2].abs().max() < 0.6 < plain.abs().max()
    # Halving: sigma (2 - 1) / 2, a 3-tap kernel (exp(-2) either side of 1), then bicubic with aligned corners.
    impulse = torch.zeros(1, 1, 16, 16)
    impulse[..., 7, 7] = 1.0
    kernel = torch.tensor([math.exp(-2), 1.0, math.exp(-2)])
    kernel = kernel / kernel.sum()
    blurred = torch.nn.functional.pad((kernel[:, None] * kernel[None])[None, None], (6, 7, 6, 7))
    expected = torch.nn.functional.interpolate(blurred, size=(8, 8), mode="bicubic", align_corners=True)
    torch.testing.assert_close(antialiased_resize(impulse, (8, 8)), expected)


def test_open_clip_image_embedder_preprocesses_and_pools():
    torch.manual_seed(0)
    embedder = modules.FrozenOpenCLIPImageEmbedder(model_cfg=TINY_VISION)
    assert not hasattr(embedder.model, "transformer")  # the text transformer is removed, as in the original
    assert {"token_embedding.weight", "ln_final.weight", "text_projection", "logit_scale"} <= set(
        embedder.model.state_dict()
    )
    assert not embedder.training and not any(p.requires_grad for p in embedder.parameters())
    white = torch.ones(1, 3, 40, 40)
    pre = embedder.preprocess(-white)
    assert pre.shape == (1, 3, 28, 28)
    torch.testing.assert_close(pre[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))
    images = smooth_images(3, 40, 0)
    z = embedder(images)
    assert z.shape == (3, EMBED) and embedder.embedding_dim == EMBED
    torch.testing.assert_close(z, embedder.model.visual(embedder.preprocess(images)))
    torch.testing.assert_close(embedder(images[:1]), z[:1])
    # Embedding dropout only in training mode: sampling stays deterministic.
    dropping = modules.FrozenOpenCLIPImageEmbedder(model_cfg=TINY_VISION, ucg_rate=1.0, freeze=False)
    assert torch.equal(dropping.train()(images), torch.zeros(3, EMBED))
    assert dropping.eval()(images).abs().sum() > 0
    with pytest.raises(ConfigError, match="pooled"):
        modules.FrozenOpenCLIPImageEmbedder(model_cfg=TINY_VISION, layer="penultimate")


def test_real_size_embedders_have_the_originals_widths_and_layouts():
    with torch.device("meta"):
        vit_h = modules.FrozenOpenCLIPImageEmbedder()
        vit_l = modules.ClipImageEmbedder("ViT-L/14")
    assert vit_h.embedding_dim == 1024 and vit_h.image_size == 224
    assert len(vit_h.state_dict()) == 398  # as in v2-1-stable-unclip-h-inference.keys.tsv under embedder.
    assert vit_l.embedding_dim == 768 and vit_l.image_size == 224
    # OpenAI CLIP's state dict, read the way clip.model.build_model reads its architecture from it.
    sd = vit_l.model.state_dict()
    assert sd["visual.conv1.weight"].shape == (1024, 3, 14, 14)
    assert sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd) == 24
    assert round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5) * 14 == 224
    assert sd["text_projection"].shape == (768, 768) and sd["positional_embedding"].shape == (77, 768)
    assert sd["token_embedding.weight"].shape == (49408, 768) and sd["ln_final.weight"].shape == (768,)
    assert len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}) == 12
    block = {
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    }  # fmt: skip
    assert {
        k.removeprefix("visual.transformer.resblocks.0.") for k in sd if ".resblocks.0." in k and "visual" in k
    } == (block)
    others = {k for k in sd if ".resblocks." not in k}
    assert others == {
        "positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
        "ln_final.bias", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
        "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight",
        "visual.ln_post.bias",
    }  # fmt: skip
    assert len(sd) == 14 + 12 * (24 + 12)
    assert sum(t.numel() for t in sd.values()) == 427_616_513  # OpenAI's ViT-L/14, text tower included
    assert isinstance(vit_l.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)  # OpenAI's activation
    assert not isinstance(vit_h.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    with pytest.raises(ConfigError, match="ViT-L/14"):
        modules.ClipImageEmbedder("RN50x4")


def test_the_l_config_builds_the_unet_for_its_embedding(reference_dir):
    config = load_config(reference_dir / ORIGINAL_L)
    del config.model.params.noise_aug_config.params.clip_stats_path
    with torch.device("meta"):
        built = instantiate_from_config(config.model)
    assert isinstance(built.embedder, modules.ClipImageEmbedder)
    assert built.model.diffusion_model.label_emb[0][0].in_features == 768 + 768
    assert {k.split(".")[0] for k in built.state_dict()} >= {"embedder", "noise_augmentor", "model"}


# -- the model --


def test_the_stability_path_names_the_class():
    assert ddpm.ImageEmbeddingConditionedLatentDiffusion is latent_unclip.ImageEmbeddingConditionedLatentDiffusion


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"conditioning_key": "crossattn"}, "crossattn-adm"),
        ({"cond_stage_trainable": True}, "cond_stage_trainable"),
        ({"embedding_dropout": 1.5}, "embedding_dropout"),
    ],
)
def test_configs_that_cannot_condition_on_the_embedding_are_refused(params, match):
    with pytest.raises(ConfigError, match=match):
        instantiate_from_config(tiny_config(**params))


def test_get_input_embeds_augments_and_drops_the_image(model):
    torch.manual_seed(0)
    z, c = model.get_input(batch(), "jpg")
    assert z.shape == (2, 4, LATENT, LATENT) and c["c_crossattn"][0].shape == (2, 77, 32)
    assert c["c_adm"].shape == (2, 2 * EMBED)
    embedding = model.embed_image(batch()["jpg"].permute(0, 3, 1, 2))
    # The first half is the embedding noised (squaredcos levels are small for most of the range), the second a
    # sinusoidal level embedding (entries in [-1, 1]).
    assert c["c_adm"][:, EMBED:].abs().max() <= 1.0
    assert not torch.equal(c["c_adm"][:, :EMBED], embedding)
    model.train()
    try:
        model.embedding_dropout = 1.0
        _, dropped = model.get_input(batch(), "jpg")
    finally:
        model.embedding_dropout = 0.25
        model.eval()
    assert torch.equal(dropped["c_adm"], torch.zeros(2, 2 * EMBED))
    model.embed_key = "cond_image"
    try:
        with pytest.raises(UserError, match="embedding_key"):
            model.get_input(batch(), "jpg")
    finally:
        model.embed_key = "jpg"


def test_image_conditioning_and_its_null_feed_the_unet(model):
    image = smooth_images(1, SIZE, 2)
    image_cond = model.image_conditioning(image, noise_level=0, noise=torch.zeros(1, EMBED))
    torch.testing.assert_close(
        image_cond["c_adm"][:, :EMBED], model.embed_image(image), rtol=3e-5, atol=1e-6
    )  # level 0, no eps
    cond, uncond = model.get_learned_conditioning(["a cat"] * 2), model.get_learned_conditioning([""] * 2)
    c = model.sampling_conditioning(cond, image_cond)
    uc = model.sampling_conditioning(uncond, model.null_image_conditioning(image_cond))
    assert c["c_adm"].shape == (2, 2 * EMBED) and torch.equal(uc["c_adm"], torch.zeros(2, 2 * EMBED))
    assert torch.equal(model.unconditional_like(c, 2)["c_adm"], uc["c_adm"])
    x, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor([500, 500])
    assert not torch.allclose(model.apply_model(x, t, c), model.apply_model(x, t, uc))
    with pytest.raises(UserError, match="image"):
        model.image_conditioning(None)
    with pytest.raises(UserError, match="mask"):
        model.image_conditioning(image, torch.ones(1, 1, SIZE, SIZE))


@pytest.mark.parametrize("sampler", ["ddim", "Euler a"])
def test_samples_with_guidance_and_follows_the_image(model, sampler):
    cond = model.get_learned_conditioning(["a red circle"])
    uncond = model.get_learned_conditioning([""])
    results = []
    for seed in (2, 3):
        image_cond = model.image_conditioning(smooth_images(1, SIZE, seed), noise_level=0)
        c = model.sampling_conditioning(cond, image_cond)
        uc = model.sampling_conditioning(uncond, model.null_image_conditioning(image_cond))
        shape = (1, 4, LATENT, LATENT)
        results.append(sample(model, sampler, 4, c, uc, 3.0, shape=shape, noise=Noise([7]), progress=False))
    assert all(torch.isfinite(r).all() for r in results)
    assert not torch.allclose(results[0], results[1])  # same seed, another image: another sample


def test_stabilitys_demo_calls_sample_through_the_compvis_ddim_sampler(model):
    # As Stability's stableunclip demo conditions and guides (the zero embedding for the unconditional branch).
    c_adm, level_embedding = model.noise_augmentor(model.embedder(smooth_images(2, SIZE, 4)), torch.tensor([0, 500]))
    c_adm = torch.cat((c_adm, level_embedding), 1)
    cond = {"c_crossattn": [model.get_learned_conditioning(["a cat", "a dog"])], "c_adm": c_adm}
    uncond = {"c_crossattn": [model.get_learned_conditioning(["", ""])], "c_adm": torch.zeros_like(c_adm)}
    x_T = Noise([1, 2], "cpu").randn((2, 4, LATENT, LATENT))
    samples, _ = DDIMSampler(model).sample(
        4, 2, (4, LATENT, LATENT), cond, verbose=False, x_T=x_T, unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond,
    )  # fmt: skip
    torch.testing.assert_close(samples, sample(model, "ddim", 4, cond, uncond, 3.0, x_T=x_T, progress=False))


def test_trains_with_falling_loss_and_logs_images(tmp_path):
    torch.manual_seed(0)
    trained = wake(instantiate_from_config(tiny_config(embedding_dropout=0.0)))
    trained.learning_rate = 3e-3

    @torch.no_grad()
    def fixed_loss() -> float:
        trained.eval()
        torch.manual_seed(0)
        z, c = trained.get_input(batch(), "jpg")
        loss, _ = trained.p_losses(z, c, torch.tensor([300, 700]), torch.randn_like(z))
        trained.train()
        return float(loss)

    before = fixed_loss()
    trainer = pl.Trainer(
        max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    items = [{k: v[i] for k, v in batch().items()} for i in range(2)] * 8
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|eval mode|LeafSpec|val_dataloader|resumable).*")
        trainer.fit(trained, DataLoader(items, batch_size=2))
    after = fixed_loss()
    assert trainer.global_step == 8 and after < 0.8 * before, (before, after)
    assert not any(p.requires_grad for p in trained.embedder.parameters())
    log = trained.log_images(batch(), N=2, ddim_steps=2, unconditional_guidance_scale=2.0)
    assert {"inputs", "reconstruction", "samples", "samples_cfg"} <= set(log)
    assert log["samples_cfg"].shape == (2, 3, SIZE, SIZE)


def test_an_unfrozen_embedder_trains_with_the_unet():
    torch.manual_seed(0)
    model = wake(instantiate_from_config(tiny_config(freeze_embedder=False, embedding_dropout=0.0))).train()
    assert set(model.embedder.parameters()) <= set(model.trainable_parameters())
    loss, _ = model.shared_step(batch())
    loss.backward()
    assert model.embedder.model.visual.proj.grad is not None and model.embedder.model.visual.proj.grad.abs().sum() > 0
    frozen = instantiate_from_config(tiny_config())
    assert not set(frozen.embedder.parameters()) & set(frozen.trainable_parameters())
    z, c = frozen.train().get_input(batch(), "jpg")
    assert not c["c_adm"].requires_grad
