"""LoRA / LyCORIS files written here in their published layouts, merged into the tiny SD 1.x and SDXL models.

Each format's merged weight is compared with the formula written out by hand (W + w * scale * delta), weight 0 with the
base exactly, and the state dict after removing the LoRAs with the original bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.adapters.lora import LoraMerger, read_lora
from ldm.adapters.lora_keys import diffusers_block_names, model_targets, text_targets
from ldm.checkpoint import load_model_from_config
from ldm.errors import UserError
from ldm.util import instantiate_from_config

sys.path.insert(0, str(Path(__file__).parent))
import sdxl_model  # noqa: E402

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_PARAM = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV_PARAM = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


@pytest.fixture
def model(tiny_config, tiny_dir):
    """A fresh tiny SD 1.x model with the reference weights (each test may change it)."""
    return load_model_from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu")


def g(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))) * 0.1


def write(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "lora") -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


def merged(model, path: Path, weight: float, key: str) -> torch.Tensor:
    merger = LoraMerger(model)
    merger.apply([(read_lora(path), weight, weight)])
    return model.state_dict()[key].clone()


def base(model, key: str) -> torch.Tensor:
    return model.state_dict()[key].clone()


def tucker(core, wa, wb):
    # core (i, j, kh, kw), wa (i, p), wb (j, q) -> (p, q, kh, kw), written as loops over the kernel
    out = torch.empty(wa.shape[1], wb.shape[1], *core.shape[2:])
    for y in range(core.shape[2]):
        for x in range(core.shape[3]):
            out[:, :, y, x] = wa.T @ core[:, :, y, x] @ wb
    return out


# -- each format ----------------------------------------------------------------------------------------------------


def test_lora_linear_with_alpha(model, tmp_path):
    w0 = base(model, Q_PARAM)
    up, down = g(32, 4), g(4, 32, seed=1)
    path = write(tmp_path, {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down, f"{Q}.alpha": torch.tensor(2.0)})
    torch.testing.assert_close(merged(model, path, 0.7, Q_PARAM), w0 + 0.7 * (2.0 / 4) * up @ down)


def test_lora_without_alpha_scales_by_one(model, tmp_path):
    w0 = base(model, Q_PARAM)
    up, down = g(32, 4), g(4, 32, seed=1)
    path = write(tmp_path, {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down})
    torch.testing.assert_close(merged(model, path, 1.0, Q_PARAM), w0 + up @ down)


def test_locon_3x3_down_with_1x1_up(model, tmp_path):
    w0 = base(model, CONV_PARAM)  # (32, 32, 3, 3)
    up, down = g(32, 4, 1, 1), g(4, 32, 3, 3, seed=1)
    path = write(
        tmp_path, {f"{CONV}.lora_up.weight": up, f"{CONV}.lora_down.weight": down, f"{CONV}.alpha": torch.tensor(8.0)}
    )
    expected = w0 + 0.5 * 2.0 * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(merged(model, path, 0.5, CONV_PARAM), expected)


def test_locon_tucker_mid(model, tmp_path):
    w0 = base(model, CONV_PARAM)
    up, down, mid = g(32, 4, 1, 1), g(4, 32, 1, 1, seed=1), g(4, 4, 3, 3, seed=2)
    path = write(
        tmp_path, {f"{CONV}.lora_up.weight": up, f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid}
    )
    expected = w0 + tucker(mid, up[:, :, 0, 0].T, down[:, :, 0, 0])
    torch.testing.assert_close(merged(model, path, 1.0, CONV_PARAM), expected)


def test_loha(model, tmp_path):
    w0 = base(model, Q_PARAM)
    t = {
        f"{Q}.hada_w1_a": g(32, 4),
        f"{Q}.hada_w1_b": g(4, 32, seed=1),
        f"{Q}.hada_w2_a": g(32, 4, seed=2),
        f"{Q}.hada_w2_b": g(4, 32, seed=3),
        f"{Q}.alpha": torch.tensor(1.0),
    }
    delta = (t[f"{Q}.hada_w1_a"] @ t[f"{Q}.hada_w1_b"]) * (t[f"{Q}.hada_w2_a"] @ t[f"{Q}.hada_w2_b"])
    torch.testing.assert_close(merged(model, write(tmp_path, t), 0.8, Q_PARAM), w0 + 0.8 * 0.25 * delta)


def test_loha_tucker_conv(model, tmp_path):
    w0 = base(model, CONV_PARAM)
    t = {
        f"{CONV}.hada_w1_a": g(4, 32),
        f"{CONV}.hada_w1_b": g(4, 32, seed=1),
        f"{CONV}.hada_t1": g(4, 4, 3, 3),
        f"{CONV}.hada_w2_a": g(4, 32, seed=2),
        f"{CONV}.hada_w2_b": g(4, 32, seed=3),
        f"{CONV}.hada_t2": g(4, 4, 3, 3, seed=4),
    }
    delta = tucker(t[f"{CONV}.hada_t1"], t[f"{CONV}.hada_w1_a"], t[f"{CONV}.hada_w1_b"]) * tucker(
        t[f"{CONV}.hada_t2"], t[f"{CONV}.hada_w2_a"], t[f"{CONV}.hada_w2_b"]
    )
    torch.testing.assert_close(merged(model, write(tmp_path, t), 1.0, CONV_PARAM), w0 + delta)


def test_lokr_full_w1_factored_w2(model, tmp_path):
    w0 = base(model, Q_PARAM)
    w1, w2a, w2b = g(4, 4), g(8, 2, seed=1), g(2, 8, seed=2)
    t = {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2_a": w2a, f"{Q}.lokr_w2_b": w2b, f"{Q}.alpha": torch.tensor(1.0)}
    expected = w0 + 0.9 * 0.5 * torch.kron(w1, w2a @ w2b)
    torch.testing.assert_close(merged(model, write(tmp_path, t), 0.9, Q_PARAM), expected)


def test_lokr_unfactored_ignores_alpha(model, tmp_path):
    w0 = base(model, Q_PARAM)
    w1, w2 = g(2, 4), g(16, 8, seed=1)
    t = {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2": w2, f"{Q}.alpha": torch.tensor(3.0)}
    torch.testing.assert_close(merged(model, write(tmp_path, t), 1.0, Q_PARAM), w0 + torch.kron(w1, w2))


def test_lokr_tucker_conv(model, tmp_path):
    w0 = base(model, CONV_PARAM)
    w1a, w1b = g(4, 2), g(2, 4, seed=1)
    t2, w2a, w2b = g(2, 2, 3, 3, seed=2), g(2, 8, seed=3), g(2, 8, seed=4)
    t = {
        f"{CONV}.lokr_w1_a": w1a,
        f"{CONV}.lokr_w1_b": w1b,
        f"{CONV}.lokr_t2": t2,
        f"{CONV}.lokr_w2_a": w2a,
        f"{CONV}.lokr_w2_b": w2b,
        f"{CONV}.alpha": torch.tensor(1.0),
    }
    w1, w2 = w1a @ w1b, tucker(t2, w2a, w2b)
    delta = torch.einsum("ab,cdkl->acbdkl", w1, w2).reshape(32, 32, 3, 3)
    torch.testing.assert_close(merged(model, write(tmp_path, t), 1.0, CONV_PARAM), w0 + 0.5 * delta)


def test_full_diff_with_bias(model, tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    param = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"
    w0, b0 = base(model, f"{param}.weight"), base(model, f"{param}.bias")
    diff, diff_b = g(32, 32), g(32, seed=1)
    merger = LoraMerger(model)
    merger.apply([(read_lora(write(tmp_path, {f"{key}.diff": diff, f"{key}.diff_b": diff_b})), 0.5, 0.5)])
    torch.testing.assert_close(model.state_dict()[f"{param}.weight"], w0 + 0.5 * diff)
    torch.testing.assert_close(model.state_dict()[f"{param}.bias"], b0 + 0.5 * diff_b)
    merger.restore()
    assert torch.equal(model.state_dict()[f"{param}.bias"], b0)


@pytest.mark.parametrize("axis", [1, 0])
def test_dora_rescales_the_merged_weight(model, tmp_path, axis):
    w0 = base(model, Q_PARAM)
    up, down = g(32, 4), g(4, 32, seed=1)
    magnitude = torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.5
    shape = (1, 32) if axis == 1 else (32, 1)
    t = {
        f"{Q}.lora_up.weight": up,
        f"{Q}.lora_down.weight": down,
        f"{Q}.alpha": torch.tensor(2.0),
        f"{Q}.dora_scale": magnitude.reshape(shape),
    }
    changed = w0 + 0.5 * up @ down
    # lycoris' default (axis 1): one norm per input column; wd_on_out: one per output row
    norms = torch.stack([changed[:, i].norm() for i in range(32)])[None] if axis == 1 else changed.norm(dim=1)[:, None]
    expected = w0 + 0.6 * (changed * magnitude.reshape(shape) / norms - w0)
    torch.testing.assert_close(merged(model, write(tmp_path, t), 0.6, Q_PARAM), expected)


# -- names ----------------------------------------------------------------------------------------------------------


def test_compvis_and_diffusers_unet_names_reach_the_same_layers(model):
    table = model_targets(model)
    pairs = {
        "down_blocks_0_resnets_1_time_emb_proj": "input_blocks.2.0.emb_layers.1",
        "down_blocks_0_resnets_0_conv2": "input_blocks.1.0.out_layers.3",
        "down_blocks_1_resnets_0_conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks_0_downsamplers_0_conv": "input_blocks.3.0.op",
        "down_blocks_0_attentions_1_proj_in": "input_blocks.2.1.proj_in",
        "down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": "input_blocks.1.1.transformer_blocks.0.ff.net.2",
        "mid_block_attentions_0_transformer_blocks_0_attn2_to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "mid_block_resnets_1_conv1": "middle_block.2.in_layers.2",
        "up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
        "up_blocks_1_attentions_2_proj_out": "output_blocks.5.1.proj_out",
        "up_blocks_1_resnets_0_conv_shortcut": "output_blocks.3.0.skip_connection",
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
        "time_embedding_linear_2": "time_embed.2",
    }
    for diffusers, compvis in pairs.items():
        target = table[f"lora_unet_{diffusers}"]
        assert target.name == f"model.diffusion_model.{compvis}.weight", diffusers
        assert table["lora_unet_" + compvis.replace(".", "_")] is target


def test_sdxl_block_names_follow_its_levels():
    unet = instantiate_from_config(sdxl_model.tiny_config().model.params.unet_config)
    names = diffusers_block_names(unet)
    assert names["input_blocks.3.1"] == "down_blocks.1.attentions.0"  # level 0 has no attention in SDXL
    assert names["output_blocks.1.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks.5.0"] == "up_blocks.2.resnets.1" and "output_blocks.5.1" not in names


def test_sdxl_te1_and_te2_names(tmp_path):
    sdxl = instantiate_from_config(sdxl_model.tiny_config().model).eval()
    layer = "text_model_encoder_layers_1_"
    t = {
        f"lora_te1_{layer}self_attn_q_proj.lora_up.weight": g(32, 2),
        f"lora_te1_{layer}self_attn_q_proj.lora_down.weight": g(2, 32),
        f"lora_te2_{layer}self_attn_k_proj.lora_up.weight": g(32, 2, seed=1),
        f"lora_te2_{layer}self_attn_k_proj.lora_down.weight": g(2, 32, seed=1),
        f"lora_te2_{layer}mlp_fc1.lora_up.weight": g(128, 2),
        f"lora_te2_{layer}mlp_fc1.lora_down.weight": g(2, 32, seed=2),
    }
    before = {k: v.clone() for k, v in sdxl.state_dict().items()}
    LoraMerger(sdxl).apply([(read_lora(write(tmp_path, t)), 1.0, 0.0)])
    after = sdxl.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    te2 = "conditioner.embedders.1.model.transformer.resblocks.1."
    assert changed == {te1, te2 + "attn.in_proj_weight", te2 + "mlp.c_fc.weight"}
    pick = lambda k: t[f"lora_te2_{layer}{k}.lora_up.weight"] @ t[f"lora_te2_{layer}{k}.lora_down.weight"]  # noqa: E731
    in_proj = after[te2 + "attn.in_proj_weight"] - before[te2 + "attn.in_proj_weight"]
    assert torch.equal(in_proj[:32], torch.zeros(32, 32)) and torch.equal(in_proj[64:], torch.zeros(32, 32))
    torch.testing.assert_close(in_proj[32:64], pick("self_attn_k_proj"))  # k is the middle third
    torch.testing.assert_close(after[te2 + "mlp.c_fc.weight"] - before[te2 + "mlp.c_fc.weight"], pick("mlp_fc1"))


def test_diffusers_and_peft_names_match_kohya(model, tmp_path):
    up, down, up2, down2 = g(32, 4), g(4, 32, seed=1), g(32, 4, seed=2), g(4, 32, seed=3)
    te = "text_model.encoder.layers.0.self_attn.q_proj"
    kohya = {
        f"{Q}.lora_up.weight": up,
        f"{Q}.lora_down.weight": down,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up2,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down2,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight": down,
    }
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    peft = {
        f"{block}.attn1.to_q.lora_B.weight": up,
        f"{block}.attn1.to_q.lora_A.weight": down,
        f"text_encoder.{te}.lora_B.weight": up2,
        f"text_encoder.{te}.lora_A.weight": down2,
        f"{block}.attn2.to_out.0.lora_B.weight": up,
        f"{block}.attn2.to_out.0.lora_A.weight": down,
    }
    old = {
        f"{block}.attn1.processor.to_q_lora.up.weight": up,
        f"{block}.attn1.processor.to_q_lora.down.weight": down,
        f"text_encoder.{te}.lora_linear_layer.up.weight": up2,
        f"text_encoder.{te}.lora_linear_layer.down.weight": down2,
        f"{block}.attn2.processor.to_out_lora.up.weight": up,
        f"{block}.attn2.processor.to_out_lora.down.weight": down,
    }
    results = []
    for i, tensors in enumerate((kohya, peft, old)):
        merger = LoraMerger(model)
        merger.apply([(read_lora(write(tmp_path, tensors, f"l{i}")), 0.7, 0.7)])
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        merger.restore()
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_unknown_keys_are_refused_by_name(model, tmp_path):
    path = write(tmp_path, {f"{Q}.lora_up.weight": g(32, 4), f"{Q}.lora_down.weight": g(4, 32), "mystery.weight": g(2)})
    with pytest.raises(UserError, match="mystery.weight"):
        read_lora(path)


def test_modules_that_match_no_layer_are_refused_and_nothing_changes(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ghost = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {
        f"{Q}.lora_up.weight": g(32, 4),
        f"{Q}.lora_down.weight": g(4, 32),
        f"{ghost}.lora_up.weight": g(32, 4),
        f"{ghost}.lora_down.weight": g(4, 32),
    }
    with pytest.raises(UserError, match=ghost):
        LoraMerger(model).apply([(read_lora(write(tmp_path, t)), 1.0, 1.0)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_lora_for_other_shapes_is_refused_before_any_change(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = {
        f"{CONV}.lora_up.weight": g(32, 4, 1, 1),
        f"{CONV}.lora_down.weight": g(4, 32, 3, 3),
        f"{Q}.lora_up.weight": g(64, 4),
        f"{Q}.lora_down.weight": g(4, 64),
    }
    with pytest.raises(UserError, match="another model"):
        LoraMerger(model).apply([(read_lora(write(tmp_path, t)), 1.0, 1.0)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pt_files_load_through_the_safe_reader(model, tmp_path):
    up, down = g(32, 4), g(4, 32, seed=1)
    torch.save({f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down}, tmp_path / "old.pt")
    w0 = base(model, Q_PARAM)
    torch.testing.assert_close(merged(model, tmp_path / "old.pt", 1.0, Q_PARAM), w0 + up @ down)


# -- applying -------------------------------------------------------------------------------------------------------


def two_loras(tmp_path):
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    a = {
        f"{Q}.lora_up.weight": g(32, 4),
        f"{Q}.lora_down.weight": g(4, 32),
        f"{Q}.alpha": torch.tensor(3.0),
        f"{te}.lora_up.weight": g(128, 4),
        f"{te}.lora_down.weight": g(4, 32),
    }
    b = {
        f"{CONV}.hada_w1_a": g(32, 2),
        f"{CONV}.hada_w1_b": g(2, 288),
        f"{CONV}.hada_w2_a": g(32, 2, seed=1),
        f"{CONV}.hada_w2_b": g(2, 288, seed=1),
        f"{Q}.lokr_w1": g(4, 4),
        f"{Q}.lokr_w2": g(8, 8),
    }
    return read_lora(write(tmp_path, a, "a")), read_lora(write(tmp_path, b, "b"))


def test_weight_zero_is_the_base_model_exactly(model, tmp_path):
    a, b = two_loras(tmp_path)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = model.get_learned_conditioning(["a fox"])
    with torch.no_grad():
        expected = model.apply_model(x, t, context)
        LoraMerger(model).apply([(a, 0.0, 0.0), (b, 0.0, 0.0)])
        assert torch.equal(model.get_learned_conditioning(["a fox"]), context)
        assert torch.equal(model.apply_model(x, t, context), expected)


def test_several_loras_add_and_te_unet_weights_are_separate(model, tmp_path):
    a, b = two_loras(tmp_path)
    fc1 = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    w_q, w_fc1 = base(model, Q_PARAM), base(model, fc1)
    merger = LoraMerger(model)
    merger.apply([(a, 0.25, 1.0), (b, 1.0, 0.5)])
    delta_a = a.modules[Q]["lora_up.weight"] @ a.modules[Q]["lora_down.weight"] * 0.75
    delta_b = torch.kron(b.modules[Q]["lokr_w1"], b.modules[Q]["lokr_w2"])
    torch.testing.assert_close(model.state_dict()[Q_PARAM], w_q + 1.0 * delta_a + 0.5 * delta_b)
    te = a.modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    torch.testing.assert_close(model.state_dict()[fc1], w_fc1 + 0.25 * te["lora_up.weight"] @ te["lora_down.weight"])


def test_many_switches_restore_the_state_dict_bit_for_bit(model, tmp_path):
    model.to(torch.bfloat16)  # where rounding would build up, were the base not restored from its copy
    original = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = two_loras(tmp_path)
    merger = LoraMerger(model)
    for i in range(30):
        merger.apply([[(a, 1.0, 0.9)], [(b, 0.3, -0.7)], [(a, 0.5, 0.5), (b, 1.0, 1.0)]][i % 3])
    first = {k: v.clone() for k, v in model.state_dict().items()}
    merger.apply([])
    merger.apply([(a, 1.0, 0.9)])
    merger.apply([(a, 0.5, 0.5), (b, 1.0, 1.0)])
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())  # the same set: the same weights
    merger.apply([])
    assert not merger.touched
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_applying_the_merged_set_again_changes_nothing(model, tmp_path):
    a, _ = two_loras(tmp_path)
    merger = LoraMerger(model)
    assert merger.apply([(a, 1.0, 1.0)]) is True
    assert merger.apply([(a, 1.0, 1.0)]) is False


def test_sd2_openclip_text_encoder_takes_lora_te_names():
    big_g = sdxl_model.text_embedders(refiner=True)[0]
    encoder = instantiate_from_config({"target": big_g["target"], "params": big_g["params"]})
    table = text_targets(encoder, "cond_stage_model.", "lora_te_")
    v = table["lora_te_text_model_encoder_layers_2_self_attn_v_proj"]
    assert (v.param, v.rows) == ("in_proj_weight", (64, 96))  # v is the last third
    fc2 = table["lora_te_text_model_encoder_layers_0_mlp_fc2"]
    assert fc2.name == "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight"
    assert len(table) == 3 * 6
