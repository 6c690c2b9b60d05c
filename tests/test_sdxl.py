"""SDXL base and refiner: the configs build sgm's state dicts; the conditioning vector has sgm's layout; tiny
SDXL-shaped models (tests/sdxl_model.py) sample with every sampler, train, and round-trip the original key layout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from sdxl_model import BASE_ADM, BIG_G, CLIP_L, FOURIER, IMAGE, LATENT, POOLED, REFINER_ADM, tiny_config
from test_original_configs import reference_keys, state_dict_keys

from ldm.checkpoint import load_model_from_config, save_checkpoint
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampler_registry import SAMPLERS
from ldm.models.diffusion.samplers import sample
from ldm.models.diffusion.sdxl import SDXLDiffusion
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.encoders.fourier import ConcatTimestepEmbedderND
from ldm.util import ConfigError, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SGM = ROOT.parent / "shared" / "reference" / "original" / "generative-models" / "configs" / "inference"
CONFIGS = {
    "configs/stable-diffusion/sdxl-base-inference.yaml": "sd_xl_base",
    "sd_xl_base.yaml": "sd_xl_base",
    "configs/stable-diffusion/sdxl-refiner-inference.yaml": "sd_xl_refiner",
    "sd_xl_refiner.yaml": "sd_xl_refiner",
}
needs_sgm = pytest.mark.skipif(not SGM.is_dir(), reason=f"reference data {SGM} is absent (../shared/)")
PROMPTS = ["a red circle", "a blue square"]


def config_path(name: str) -> Path:
    return ROOT / name if name.startswith("configs/") else SGM / name


def build_meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate_from_config(load_config(config_path(name)).model, path="model")


@pytest.fixture(scope="module")
def base() -> SDXLDiffusion:
    torch.manual_seed(0)
    return instantiate_from_config(tiny_config().model).eval()


@pytest.fixture(scope="module")
def refiner() -> SDXLDiffusion:
    torch.manual_seed(1)
    return instantiate_from_config(tiny_config(refiner=True).model).eval()


# -- the full-size configs, on the meta device --


@needs_sgm
@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_sgms_state_dict(name: str) -> None:
    model = build_meta(name)
    assert isinstance(model, SDXLDiffusion)
    expected = reference_keys(SGM / f"{CONFIGS[name]}.keys.tsv")
    assert state_dict_keys(model) == expected
    assert model.scale_factor == 0.13025 and model.parameterization == "eps"


def test_fourier_embedding_is_each_numbers_sinusoid_concatenated() -> None:
    sizes = torch.tensor([[1024.0, 768.0], [512.0, 2048.0]])
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    expected = torch.cat(
        [
            torch.cat([torch.cos(sizes[:, i : i + 1] * freqs), torch.sin(sizes[:, i : i + 1] * freqs)], 1)
            for i in (0, 1)
        ],
        dim=1,
    )
    out = ConcatTimestepEmbedderND(256)(sizes)
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, expected)
    # A scalar per sample (the refiner's aesthetic score) is one block of outdim.
    assert ConcatTimestepEmbedderND(256)(torch.tensor([6.0, 2.5])).shape == (2, 256)


@needs_sgm
@pytest.mark.parametrize(
    ("name", "text", "sizes", "adm"),
    [
        (
            "sd_xl_base.yaml",
            768 + 1280,
            ["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"],
            2816,
        ),
        ("sd_xl_refiner.yaml", 1280, ["original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"], 2560),
    ],
)
def test_full_size_conditioner_widths_add_up_to_the_unets_inputs(name, text, sizes, adm) -> None:
    model = build_meta(name)
    embedders = model.conditioner.embedders
    fourier = [e for e in embedders if isinstance(e, ConcatTimestepEmbedderND)]
    assert [e.input_keys[0] for e in fourier] == sizes and all(e.outdim == 256 for e in fourier)
    big_g = embedders[len(embedders) - len(fourier) - 1]
    pooled = big_g.model.text_projection.shape[1]
    numbers = {"aesthetic_score": 1}
    vector = pooled + sum(256 * numbers.get(key, 2) for key in sizes)
    unet = model.model.diffusion_model
    assert vector == adm == unet.label_emb[0][0].in_features
    widths = [b.attn2.to_k.in_features for b in unet.middle_block[1].transformer_blocks]
    assert set(widths) == {text}
    assert [e.layer for e in embedders[: len(embedders) - len(fourier)]] == (
        ["hidden", "penultimate"] if text > 1280 else ["penultimate"]
    )


def tiny_unet(**overrides) -> UNetModel:
    params = {**tiny_config().model.params.unet_config.params, **overrides}
    return UNetModel(**params)


def test_unet_takes_a_transformer_depth_per_level_and_one_for_the_middle() -> None:
    def depths(unet: UNetModel) -> list[int]:
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        return [len(m.transformer_blocks) for b in blocks for m in b if isinstance(m, SpatialTransformer)]

    # Attention at levels 1 and 2 (ds 2 and 4): one block each going down, two coming up.
    assert depths(tiny_unet(transformer_depth=[1, 2, 3])) == [2, 3, 3, 3, 3, 2, 2]
    assert depths(tiny_unet(transformer_depth=[1, 2, 3], transformer_depth_middle=1)) == [2, 3, 1, 3, 3, 2, 2]
    assert depths(tiny_unet(transformer_depth=2)) == [2] * 7
    with pytest.raises(ValueError, match="one entry per channel_mult level"):
        tiny_unet(transformer_depth=[1, 2])
    with pytest.raises(ValueError, match="spatial_transformer_attn_type"):
        tiny_unet(spatial_transformer_attn_type="flash")
    # sgm's backend names build the same model (attention is SDPA either way).
    assert (
        tiny_unet(spatial_transformer_attn_type="softmax-xformers").state_dict().keys()
        == tiny_unet().state_dict().keys()
    )


# -- the conditioning of the tiny models --


def test_base_conditioning_is_sgms_concatenation(base: SDXLDiffusion) -> None:
    clip_l, big_g, *sizes = base.conditioner.embedders
    batch = {
        "txt": PROMPTS,
        "original_size_as_tuple": torch.tensor([[300.0, 400.0], [64.0, 32.0]]),
        "crop_coords_top_left": torch.tensor([[0.0, 0.0], [8.0, 16.0]]),
        "target_size_as_tuple": torch.tensor([[16.0, 16.0], [16.0, 24.0]]),
    }
    with torch.no_grad():
        c = base.get_learned_conditioning(batch)
        hidden = clip_l(PROMPTS)
        penultimate, pooled = big_g(PROMPTS)
    crossattn, vector = c["c_crossattn"][0], c["c_adm"]
    assert crossattn.shape == (2, 77, CLIP_L["hidden_size"] + BIG_G["width"])
    torch.testing.assert_close(crossattn, torch.cat([hidden, penultimate], dim=2))
    assert vector.shape == (2, BASE_ADM)
    fourier = [ConcatTimestepEmbedderND(FOURIER)(batch[key]) for key in batch if key != "txt"]
    torch.testing.assert_close(vector, torch.cat([pooled, *fourier], dim=1))
    # CLIP-L: hidden state 2 of 3, before the final layer norm; bigG: block 2 of 3's raw output, pooled after all.
    tokens = clip_l.tokenizer(PROMPTS)
    states = clip_l.transformer(input_ids=tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden, states[2])
    tokens = big_g.tokenizer(PROMPTS)
    tower = big_g.model
    x = tower.token_embedding(tokens) + tower.positional_embedding
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    batch_first = getattr(tower.transformer, "batch_first", False)
    x = x if batch_first else x.transpose(0, 1)
    states = []
    for block in tower.transformer.resblocks:
        x = block(x, attn_mask=mask)
        states.append(x if batch_first else x.transpose(0, 1))
    with torch.no_grad():
        torch.testing.assert_close(penultimate, states[-2])
        eos = tokens.argmax(dim=-1)
        torch.testing.assert_close(pooled, tower.ln_final(states[-1])[torch.arange(2), eos] @ tower.text_projection)
    assert pooled.shape == (2, POOLED) and (eos == (tokens == 49407).int().argmax(dim=-1)).all()


def test_refiner_vector_is_pooled_sizes_crop_and_aesthetic_score(refiner: SDXLDiffusion) -> None:
    big_g = refiner.conditioner.embedders[0]
    with torch.no_grad():
        c = refiner.get_learned_conditioning(PROMPTS)
        _, pooled = big_g(PROMPTS)
    vector = c["c_adm"]
    assert vector.shape == (2, REFINER_ADM)
    embed = ConcatTimestepEmbedderND(FOURIER)
    expected = [pooled, embed(torch.full((2, 2), float(IMAGE))), embed(torch.zeros(2, 2)), embed(torch.full((2,), 6.0))]
    torch.testing.assert_close(vector, torch.cat(expected, dim=1))
    # The unconditional branch: zero text, negative aesthetic score 2.5.
    uc = refiner.get_unconditional_conditioning(2)["c_adm"]
    assert torch.all(uc[:, :POOLED] == 0)
    torch.testing.assert_close(uc[:, -FOURIER:], embed(torch.full((2,), 2.5)))


def test_prompts_get_the_output_size_and_uncond_zeroes_only_the_text(base: SDXLDiffusion) -> None:
    with torch.no_grad():
        c = base.get_learned_conditioning(PROMPTS)
        uc = base.get_unconditional_conditioning(2)
        negative = base.get_unconditional_conditioning(2, "blurry")
    assert base.output_size == (IMAGE, IMAGE)
    assert torch.all(uc["c_crossattn"][0] == 0) and torch.all(uc["c_adm"][:, :POOLED] == 0)
    # The size conditioning is the prompt's; a negative prompt is encoded, not zeroed.
    torch.testing.assert_close(uc["c_adm"][:, POOLED:], c["c_adm"][:, POOLED:])
    assert negative["c_crossattn"][0].abs().sum() > 0


def test_ucg_rate_drops_embeddings_in_training_only() -> None:
    config = tiny_config()
    emb_models = config.model.params.cond_stage_config.params.emb_models
    emb_models[2].ucg_rate = 1.0  # original size: always zeroed in training
    emb_models[0].legacy_ucg_value = ""
    emb_models[0].ucg_rate = 1.0  # CLIP-L: the prompt always replaced by ""
    conditioner = instantiate_from_config(config.model.params.cond_stage_config)
    batch = {"txt": PROMPTS, **{k: torch.ones(2, 2) for k in ("original_size_as_tuple", "crop_coords_top_left")}}
    batch["target_size_as_tuple"] = torch.ones(2, 2)
    evaluated = conditioner.eval()(batch)
    trained = conditioner.train()(batch)
    empty = conditioner.eval()({**batch, "txt": ["", ""]})
    width = CLIP_L["hidden_size"]
    torch.testing.assert_close(trained["crossattn"][..., :width], empty["crossattn"][..., :width])
    size_block = slice(POOLED, POOLED + 2 * FOURIER)
    assert torch.all(trained["vector"][:, size_block] == 0) and torch.any(evaluated["vector"][:, size_block] != 0)
    # Frozen embedders stay in eval mode and without gradients while the conditioner trains.
    assert not any(e.training for e in conditioner.embedders)
    assert not any(p.requires_grad for p in conditioner.parameters())


def test_conditioner_entries_need_one_input_key() -> None:
    config = tiny_config().model.params.cond_stage_config
    del config.params.emb_models[2]["input_key"]
    with pytest.raises(ConfigError, match="exactly one of input_key and input_keys"):
        instantiate_from_config(config)


# -- sampling and training --


def sample_with(model: SDXLDiffusion, sampler: str, seeds: list[int], scale: float = 5.0) -> torch.Tensor:
    prompts = (PROMPTS * len(seeds))[: len(seeds)]
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_unconditional_conditioning(len(seeds))
        return sample(
            model, sampler, 4, c, uc, scale, shape=(len(seeds), 4, LATENT, LATENT), noise=Noise(seeds), progress=False
        )


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_tiny_base_samples_with_every_sampler(base: SDXLDiffusion, sampler: str) -> None:
    latents = sample_with(base, sampler, [3, 4])
    assert latents.shape == (2, 4, LATENT, LATENT) and torch.isfinite(latents).all()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_batch_equals_single_runs(base: SDXLDiffusion, refiner: SDXLDiffusion, sampler: str) -> None:
    for model in (base, refiner):
        batch = sample_with(model, sampler, [7, 8])
        singles = torch.cat([sample_with(model, sampler, [7]), sample_with(model, sampler, [8])])
        torch.testing.assert_close(batch, singles, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            image = model.decode_first_stage(batch)
        assert image.shape == (2, 3, IMAGE, IMAGE)


def test_schedule_is_legacy_ddpm_and_sigmas_are_sgms(base: SDXLDiffusion) -> None:
    betas = torch.from_numpy(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(base.alphas_cumprod, alphas_cumprod.float())
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).float() ** 0.5
    assert torch.equal(base.denoiser.sigmas, sigmas)
    assert base.denoiser.sigmas[0] < base.denoiser.sigmas[-1]
    assert 0.0291 < float(sigmas[0]) < 0.0293 and 14.6 < float(sigmas[-1]) < 14.62


def test_pipeline_generates_with_the_tiny_base(base: SDXLDiffusion) -> None:
    from ldm.geometry import LatentGeometry
    from ldm.inference import Pipeline
    from ldm.request import RuntimeOptions

    pipe = Pipeline(base, LatentGeometry.from_config(tiny_config()), RuntimeOptions("cpu", "full"))
    result = pipe.generate(PROMPTS[0], n=2, steps=3, seed=1, scale=4.0, sampler="dpmpp_2m", progress=False)
    assert [image.size for image in result.images] == [(IMAGE, IMAGE)] * 2


def train_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, IMAGE, IMAGE, 3, generator=g) * 2 - 1
    return {"jpg": images, "txt": PROMPTS}


@pytest.mark.parametrize("use_checkpoint", [False, True], ids=["plain", "gradient-checkpointing"])
def test_tiny_base_trains_a_few_steps(use_checkpoint: bool) -> None:
    config = tiny_config()
    config.model.params.unet_config.params.use_checkpoint = use_checkpoint
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    model.learning_rate = 1e-3
    optimizer = model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trainable == {id(p) for p in model.model.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for _ in range(3):
        loss, _ = model.shared_step(train_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"model"}, "only the UNet trains; text encoders and VAE stay frozen"


def test_an_embedder_marked_trainable_trains_with_the_unet() -> None:
    config = tiny_config()
    config.model.params.cond_stage_config.params.emb_models[0].is_trainable = True  # CLIP-L
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    clip_l = model.conditioner.embedders[0]
    assert model.cond_stage_trainable and all(p.requires_grad for p in clip_l.parameters())
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert clip_l.training and not model.conditioner.embedders[1].training
    # Three steps: the UNet's zero-initialised output convolution, then its transformers' zero-initialised output
    # projections, pass no gradient on to the conditioning in the first two.
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = model.shared_step(train_batch())
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {
        ".".join(k.split(".")[: 3 if k.startswith("conditioner") else 2])
        for k in after
        if not torch.equal(after[k], before[k])
    }
    assert changed == {"model.diffusion_model", "conditioner.embedders.0"}
    config.model.params.cond_stage_trainable = True
    with pytest.raises(ConfigError, match="mark those instead"):
        instantiate_from_config(config.model)


def test_original_layout_round_trips(base: SDXLDiffusion, tmp_path: Path) -> None:
    state = base.state_dict()
    assert {k.split(".")[0] for k in state} == {"model", "conditioner", "first_stage_model", "denoiser"}
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in state)
    assert "conditioner.embedders.1.model.text_projection" in state
    for name, drop in (("with.safetensors", ()), ("without.ckpt", ("denoiser.sigmas",))):
        saved = {k: v for k, v in state.items() if k not in drop}
        # Recent transformers releases save CLIP without the text_model level; the loader accepts both.
        if drop:
            saved = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in saved.items()}
        save_checkpoint(saved, tmp_path / name)
        loaded = load_model_from_config(tiny_config(), tmp_path / name, device="cpu")
        assert loaded.state_dict().keys() == state.keys()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), key


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(num_workers|LeafSpec|eval mode|val_dataloader).*")
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_main_py_trains_the_tiny_base(tmp_path: Path, precision: str) -> None:
    from test_training_kinds import NO_IMAGES, data_section, run

    shapes = {"target": "ldm.data.shapes.ShapesDataset", "params": {"size": IMAGE, "length": 8}}
    model = OmegaConf.to_container(tiny_config().model)
    model["base_learning_rate"] = 1e-4
    # run() also checks that the run's last checkpoint loads strictly into the model its saved config builds.
    _, state = run(tmp_path, "sdxl-tiny", model, data_section(shapes), 2, NO_IMAGES, "--precision", precision)
    assert {k.split(".")[0] for k in state["state_dict"]} == {"model", "conditioner", "first_stage_model", "denoiser"}
