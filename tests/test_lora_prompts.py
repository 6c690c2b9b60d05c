"""LoRAs named in prompts, by the Python API and on the scripts' command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from ldm import cli
from ldm.adapters.lora import short_hash
from ldm.adapters.lora_prompts import LoraTag, find_lora, parse_tag, split_prompt
from ldm.errors import UserError
from ldm.outputs import parse_parameters, read_parameters

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_tags_follow_a1111_te_then_unet():
    assert parse_tag("style") == LoraTag("style", 1.0, 1.0)
    assert parse_tag("style:0.8") == LoraTag("style", 0.8, 0.8)
    assert parse_tag("style:0.8:0.5") == LoraTag("style", 0.8, 0.5)  # text encoder first, as A1111
    assert parse_tag("style:unet=0.3") == LoraTag("style", 1.0, 0.3)
    assert parse_tag("style:te=0.2:0.9") == LoraTag("style", 0.2, 0.2)  # te= overrides the first positional
    assert parse_tag("style:0.7:te=0.2") == LoraTag("style", 0.2, 0.2)  # unet defaults to the final te
    assert parse_tag("style:0.7:0.4:te=0.2") == LoraTag("style", 0.2, 0.4)


def test_tags_are_removed_from_the_prompt():
    text, tags = split_prompt("a fox <lora:style:0.8>, (red:1.2) <lyco:other:1:0.5>")
    assert text == "a fox , (red:1.2) "
    assert tags == [LoraTag("style", 0.8, 0.8), LoraTag("other", 1.0, 0.5)]


@pytest.mark.parametrize("body", ["style:x", "style:inf", ":1", "style:1:2:3:4", "style:dyn=4"])
def test_bad_tags_are_user_errors(body):
    with pytest.raises(UserError):
        parse_tag(body)


def lora_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"{Q}.lora_up.weight": torch.randn(32, 4, generator=gen),
        f"{Q}.lora_down.weight": torch.randn(4, 32, generator=gen),
        f"{TE}.lora_up.weight": torch.randn(128, 4, generator=gen),
        f"{TE}.lora_down.weight": torch.randn(4, 32, generator=gen),
    }
    save_file(tensors, str(folder / "style.safetensors"))
    (tmp_path / "outside.safetensors").write_bytes((folder / "style.safetensors").read_bytes())
    return folder


def test_names_resolve_only_inside_the_folder(tmp_path):
    folder = lora_folder(tmp_path)
    assert find_lora(folder, "style") == folder / "style.safetensors"
    assert find_lora(folder, "style.safetensors") == folder / "style.safetensors"
    for name in ("../outside", str(tmp_path / "outside"), ".hidden", "sub/style"):
        with pytest.raises(UserError, match="without a path"):
            find_lora(folder, name)
    with pytest.raises(UserError, match=r"'missing' is not in .*there: style\.safetensors"):
        find_lora(folder, "missing")
    with pytest.raises(UserError, match="--lora_dir"):
        find_lora(None, "style")


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def test_prompt_tags_and_the_api_merge_and_switch(pipe, tmp_path):
    pipe.loras.directory = lora_folder(tmp_path)
    settings = {"steps": 2, "seed": 3, "height": 16, "width": 16, "progress": False}
    state = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    plain = pixels(pipe.generate("a fox", **settings))
    zero = pipe.generate("a fox <lora:style:0>", **settings)
    assert np.array_equal(pixels(zero), plain)  # weight 0: the base model exactly
    tagged = pipe.generate("a fox <lora:style:0.8:0.5>", **settings)
    assert not np.array_equal(pixels(tagged), plain)
    assert tagged.prompts == ["a fox <lora:style:0.8:0.5>"]  # the infotext keeps the tag, as A1111's
    fields = parse_parameters(tagged.parameters(0))
    assert fields["Lora hashes"] == f"style: {short_hash(pipe.loras.directory / 'style.safetensors')}"
    by_api = pipe.generate("a fox", loras=[("style", 0.8, 0.5)], **settings)
    assert np.array_equal(pixels(by_api), pixels(tagged))
    te_only = pipe.generate("a fox <lora:style:1:0>", **settings)
    assert not np.array_equal(pixels(te_only), plain)
    assert np.array_equal(pixels(pipe.generate("a fox", **settings)), plain)  # switched off again
    assert all(torch.equal(state[k], v) for k, v in pipe.model.state_dict().items())


def test_prompts_of_one_batch_must_name_the_same_loras(pipe, tmp_path):
    pipe.loras.directory = lora_folder(tmp_path)
    with pytest.raises(UserError, match="different LoRAs"):
        pipe.generate(["a <lora:style:1>", "b"], steps=1, height=16, width=16, progress=False)


def test_a_script_run_with_lora(tiny_config, tiny_dir, tmp_path):
    folder = lora_folder(tmp_path)
    OmegaConf.save(tiny_config, tmp_path / "tiny.yaml")
    args = [
        "--config",
        str(tmp_path / "tiny.yaml"),
        "--ckpt",
        str(tiny_dir / "model.safetensors"),
        "--device",
        "cpu",
        "--ddim_steps",
        "2",
        "--n_samples",
        "1",
        "--n_iter",
        "1",
        "--H",
        "16",
        "--W",
        "16",
        "--skip_grid",
        "--prompt",
        "a fox",
        "--lora_dir",
        str(folder),
    ]
    assert cli.main("txt2img", [*args, "--outdir", str(tmp_path / "plain")]) == 0
    assert cli.main("txt2img", [*args, "--outdir", str(tmp_path / "lora"), "--lora", "style:0.8"]) == 0
    (plain,) = (tmp_path / "plain").rglob("*.png")
    (with_lora,) = (tmp_path / "lora").rglob("*.png")
    assert "Lora hashes" in read_parameters(with_lora) and "Lora hashes" not in read_parameters(plain)
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(with_lora)))


def test_a_missing_lora_fails_before_the_model_loads(tiny_config, tiny_dir, tmp_path, capsys):
    folder = lora_folder(tmp_path)
    OmegaConf.save(tiny_config, tmp_path / "tiny.yaml")
    code = cli.main(
        "txt2img",
        [
            "--config",
            str(tmp_path / "tiny.yaml"),
            "--ckpt",
            str(tiny_dir / "model.safetensors"),
            "--device",
            "cpu",
            "--lora_dir",
            str(folder),
            "--lora",
            "nope:1",
            "--outdir",
            str(tmp_path / "out"),
        ],
    )
    assert code != 0
    assert "'nope' is not in" in capsys.readouterr().err


def test_the_switch_benchmark_runs_and_restores_the_base(tiny_dir, capsys):
    from scripts import benchmark_lora

    config = [f"model.params.cond_stage_config.params.text_config={tiny_dir / 'text-config.json'}"]
    args = ["--config", str(tiny_dir / "original-config.yaml"), "--device", "cpu", "--rank", "2", "--switches", "2"]
    assert benchmark_lora.main([*args, *config]) == 0
    out = capsys.readouterr().out
    assert "weights touched" in out and "bit for bit: True" in out
    assert benchmark_lora.main([*args, "--rank", "0"]) == 2
    assert "--rank and --switches must be at least 1" in capsys.readouterr().err
