"""One kohya LoRA file, merged here and loaded by diffusers + peft into the same tiny UNet: the outputs agree.

Needs ``diffusers`` and ``peft`` (not requirements of the project); skipped without them.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.adapters.lora import LoraMerger, read_lora
from ldm.checkpoint import load_model_from_config

diffusers = pytest.importorskip(
    "diffusers", reason="the comparison needs diffusers and peft (pip install -r requirements-compare.txt)"
)
pytest.importorskip("peft", reason="diffusers loads LoRAs through peft (pip install -r requirements-compare.txt)")

LAYERS = {  # diffusers-form kohya name -> (up, down) shapes: attention, feed-forward, proj, resnet convs, resampler
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((32, 4), (4, 32)),
    "down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": ((32, 4), (4, 32)),
    "mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0": ((64, 4), (4, 64)),
    "up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj": ((256, 4), (4, 32)),
    "up_blocks_1_attentions_0_proj_in": ((32, 4, 1, 1), (4, 32, 1, 1)),
    "down_blocks_0_resnets_1_conv1": ((32, 4, 1, 1), (4, 32, 3, 3)),
    "down_blocks_1_resnets_0_time_emb_proj": ((64, 4), (4, 128)),
    "up_blocks_0_upsamplers_0_conv": ((64, 4, 1, 1), (4, 64, 3, 3)),
}


def kohya_file(path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (up, down) in LAYERS.items():
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(*up, generator=gen) * 0.05
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(*down, generator=gen) * 0.05
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))


def test_kohya_lora_matches_diffusers_and_peft(tiny_config, tiny_dir, tiny_weights, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    from ldm.to_diffusers import unet_and_vae

    kohya_file(tmp_path / "l.safetensors")
    model = load_model_from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu")
    theirs, _ = unet_and_vae(tiny_config, dict(tiny_weights))
    gen = torch.Generator().manual_seed(1)
    x, t, context = (
        torch.randn(2, 4, 16, 16, generator=gen),
        torch.tensor([10, 700]),
        torch.randn(2, 77, 32, generator=gen),
    )
    ours = model.model.diffusion_model
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample, rtol=1e-4, atol=1e-5
        )
        base = ours(x, t, context)
        LoraMerger(model).apply([(read_lora(tmp_path / "l.safetensors"), 1.0, 0.8)])
        merged = ours(x, t, context)

        from safetensors.torch import load_file

        state, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(tmp_path / "l.safetensors")))
        theirs.load_lora_adapter(state, network_alphas=alphas, adapter_name="l", prefix="unet")
        theirs.set_adapters(["l"], weights=[0.8])
        reference = theirs(x, t, encoder_hidden_states=context).sample
    assert (merged - base).abs().max() > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)
