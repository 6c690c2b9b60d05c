"""UNet: parity with the original on the tiny model, SD 1.x/2.x checkpoint key layout, options, and util helpers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel
from ldm.modules.diffusionmodules.util import make_beta_schedule, timestep_embedding

PREFIX = "model.diffusion_model."

SD_V1_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    use_checkpoint=True,
    legacy=False,
)
SD_V2_UNET = {k: v for k, v in SD_V1_UNET.items() if k != "num_heads"} | dict(
    num_head_channels=64, use_linear_in_transformer=True, context_dim=1024, use_fp16=True
)


def tiny_unet(**overrides) -> UNetModel:
    params = dict(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[2],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_heads=2,
    )
    return UNetModel(**(params | overrides))


def reference_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in path.read_text().splitlines()[1:])
    return {
        key[len(PREFIX) :]: tuple(int(n) for n in shape.split("x")) for key, shape, _ in rows if key.startswith(PREFIX)
    }


def test_matches_original_on_tiny_model(tiny_dir, tiny_cases, tiny_weights, assert_matches_reference):
    config = OmegaConf.load(tiny_dir / "original-config.yaml").model.params.unet_config
    unet = UNetModel(**config.params).eval()
    unet.load_state_dict({k[len(PREFIX) :]: v for k, v in tiny_weights.items() if k.startswith(PREFIX)}, strict=True)
    with torch.no_grad():
        out = unet(tiny_cases["unet_x"], tiny_cases["unet_t"], context=tiny_cases["unet_context"])
    assert_matches_reference(out, tiny_cases["unet_out"])


@pytest.mark.parametrize(("params", "keys_file"), [(SD_V1_UNET, "sd-v1-keys.tsv"), (SD_V2_UNET, "sd-v2-keys.tsv")])
def test_state_dict_layout_matches_sd_checkpoints(reference_dir, params, keys_file):
    with torch.device("meta"):
        unet = UNetModel(**params)
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert ours == reference_shapes(reference_dir / keys_file)


@pytest.mark.parametrize(
    "options",
    [
        dict(use_spatial_transformer=True, context_dim=16, transformer_depth=2),
        dict(use_spatial_transformer=True, context_dim=16, use_linear_in_transformer=True, num_head_channels=16),
        dict(use_scale_shift_norm=True, resblock_updown=True, num_head_channels=16),
        dict(use_new_attention_order=True, dropout=0.1),
    ],
)
def test_checkpointing_gives_the_same_gradients(options):
    torch.manual_seed(0)
    plain = tiny_unet(**options)
    checkpointed = tiny_unet(**options, use_checkpoint=True)
    # Zero-initialised output layers would leave most gradients zero; randomise so the comparison means something.
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.1)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    context = torch.randn(2, 5, 16) if "context_dim" in options else None
    grads, middle_runs = [], []
    for model in (plain, checkpointed):
        runs = []
        model.middle_block[0].in_layers.register_forward_hook(lambda *_, runs=runs: runs.append(1))
        torch.manual_seed(1)  # the same dropout masks in both runs
        x_in = x.clone().requires_grad_()
        model(x_in, t, context=context).square().sum().backward()
        grads.append([x_in.grad] + [p.grad for p in model.parameters()])
        middle_runs.append(len(runs))
    assert middle_runs == [1, 2]  # checkpointing really recomputed the block in the backward pass
    assert any(g.abs().sum() > 0 for g in grads[0][1:])
    for expected, actual in zip(*grads, strict=True):
        torch.testing.assert_close(actual, expected)


def test_transformer_context_per_depth():
    torch.manual_seed(0)
    block = SpatialTransformer(32, 2, 16, depth=2, context_dim=[8, 12], use_linear=True)
    with torch.no_grad():
        block.proj_out.weight.normal_()
    x = torch.randn(1, 32, 4, 4)
    out = block(x, context=[torch.randn(1, 3, 8), torch.randn(1, 5, 12)])
    assert out.shape == x.shape and not torch.equal(out, x)
    with pytest.raises(ValueError, match="context_dim"):
        SpatialTransformer(32, 2, 16, depth=3, context_dim=[8, 12])


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_explicit_softmax_attention(new_order):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order)
    with torch.no_grad():
        block.proj_out.weight.normal_(0, 0.1)
    x = torch.randn(2, 64, 3, 5)
    flat = x.reshape(2, 64, 15)
    qkv = block.qkv(block.norm(flat))  # (B, 3C, T)
    # Legacy checkpoints lay the 3C channels out per head as (q, k, v); the new order as q, k, v each over all heads.
    grouped = qkv.reshape(2, 3, 4, 16, 15).transpose(1, 2) if new_order else qkv.reshape(2, 4, 3, 16, 15)
    q, k, v = grouped.unbind(2)  # (B, heads, d, T)
    weights = torch.softmax(torch.einsum("bhds,bhdt->bhst", q, k) / 4, dim=-1)
    attended = torch.einsum("bhst,bhdt->bhds", weights, v).reshape(2, 64, 15)
    expected = (flat + block.proj_out(attended)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)


def test_class_conditional_unets_run():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 999])
    with torch.no_grad():
        unet = tiny_unet(num_classes=10)
        assert unet(x, t, y=torch.tensor([3, 7])).shape == x.shape
        unet = tiny_unet(num_classes="sequential", adm_in_channels=24)
        assert unet.label_emb[0][0].weight.shape == (128, 24)
        assert unet(x, t, y=torch.randn(2, 24)).shape == x.shape
    with pytest.raises(ValueError, match="y"):
        unet(x, t)


def test_use_fp16_and_use_bf16_leave_the_weights_and_outputs_alone():
    # Intel's bf16 configs set use_bf16: accepted, and the precision stays the caller's choice (autocast or .to()).
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([5])
    torch.manual_seed(0)
    plain = tiny_unet()
    for flag in ("use_fp16", "use_bf16"):
        torch.manual_seed(0)
        flagged = tiny_unet(**{flag: True})
        assert {p.dtype for p in flagged.parameters()} == {torch.float32}
        with torch.no_grad():
            torch.testing.assert_close(flagged(x, t), plain(x, t))


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        (dict(use_spatial_transformer=True), "context_dim"),
        (dict(context_dim=16), "use_spatial_transformer"),
        (dict(num_heads=-1), "num_head"),
        (dict(num_res_blocks=[1, 1, 1]), "num_res_blocks"),
        (dict(num_attention_blocks=[2, 2]), "num_attention_blocks"),
        (dict(num_classes="sequential"), "adm_in_channels"),
        (dict(num_classes="bogus"), "num_classes"),
    ],
)
def test_inconsistent_arguments_are_rejected(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        tiny_unet(**overrides)


def test_beta_schedules():
    linear = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    assert linear.dtype == np.float64 and linear.shape == (1000,)
    np.testing.assert_allclose(linear[[0, -1]], [0.00085, 0.012])
    steps = np.diff(np.sqrt(linear))
    np.testing.assert_allclose(steps, steps[0])  # evenly spaced in sqrt(beta)
    cosine = make_beta_schedule("cosine", 1000)
    assert np.all((cosine > 0) & (cosine < 1)) and np.all(np.diff(cosine) >= 0)
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 3, 0.1, 0.3), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(make_beta_schedule("sqrt", 2, 0.04, 0.09), [0.2, 0.3])
    with pytest.raises(ValueError, match="cosine"):
        make_beta_schedule("quadratic", 10)


def test_timestep_embedding_puts_cosines_first():
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]))
    assert timestep_embedding(torch.tensor([2.0]), 7).shape == (1, 7)
