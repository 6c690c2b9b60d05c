"""Textual-inversion embeddings with whole models: SDXL's two encoders (clip_l / clip_g), the Pipeline API and
scripts/txt2img.py with --embeddings_dir on the tiny SD 1.x model.

An embedding whose vectors are a word's own token embeddings must give exactly the images of that word: the
strongest end-to-end check there is without real embedding files.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from sdxl_model import tiny_config as sdxl_config
from test_embeddings import reference

from ldm import cli
from ldm.adapters.embeddings import Embedding, attach_embeddings, load_embeddings, prompt_encoders
from ldm.inference import Pipeline
from ldm.outputs import parse_parameters, read_parameters
from ldm.prompts import encode_chunks, prompt_chunks
from ldm.util import instantiate_from_config


def word_vectors(encoder, word: str) -> torch.Tensor:
    """A word's own token embeddings in ``encoder``: (n_tokens, D)."""
    return encoder.token_embedding.weight[encoder.tokenizer.encode(word)].detach().clone()


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    return instantiate_from_config(sdxl_config().model).eval()


def test_sdxl_files_give_clip_l_to_clip_l_and_clip_g_to_big_g(sdxl, tmp_path):
    encoders = prompt_encoders(sdxl)
    assert [key for key, _ in encoders] == ["clip_l", "clip_g"]
    clip_l, clip_g = torch.randn(2, 32), torch.randn(2, 32) * 3
    save_file({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "xlstyle.safetensors")
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "sd15.safetensors")
    with pytest.warns(UserWarning, match=r"'sd15'.*\(32 wide\).*\(clip_l 32 \+ clip_g 32\)"):
        used = attach_embeddings(sdxl, load_embeddings(tmp_path))
    try:
        assert [e.name for e in used] == ["xlstyle"]
        with torch.no_grad():
            outputs = [encode_chunks(e, prompt_chunks(e, ["a xlstyle dog"]), 1, 1) for _, e in encoders]
    finally:
        attach_embeddings(sdxl, [])
    with torch.no_grad():
        for (_, encoder), got, vec in zip(encoders, outputs, (clip_l, clip_g), strict=True):
            torch.testing.assert_close(got, reference(encoder, "a", vec, "dog"), rtol=1e-5, atol=1e-5)


def test_sdxl_conditioning_with_a_words_own_vectors_is_that_words(sdxl):
    from ldm.sdxl_conditioning import encode_sdxl_prompts

    (_, clip_l), (_, clip_g) = prompt_encoders(sdxl)
    red = Embedding("zzred", {"clip_l": word_vectors(clip_l, "red"), "clip_g": word_vectors(clip_g, "red")})
    plain = encode_sdxl_prompts(sdxl, ["a red circle"], ["blue"], 1, {}, 16, 16)
    attach_embeddings(sdxl, [red])
    try:
        with_embedding = encode_sdxl_prompts(sdxl, ["a zzred circle"], ["blue"], 1, {}, 16, 16)
    finally:
        attach_embeddings(sdxl, [])
    for got, expected in zip(with_embedding, plain, strict=True):
        assert torch.equal(got["c_crossattn"][0], expected["c_crossattn"][0])
        assert torch.equal(got["c_adm"], expected["c_adm"])  # the pooled vector too


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline and scripts on the tiny SD 1.x model


@pytest.fixture(scope="module")
def tiny_files(tiny_config, tiny_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-ti")
    OmegaConf.save(tiny_config, folder / "tiny.yaml")
    (folder / "tiny.safetensors").symlink_to(tiny_dir / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def red_embedding(tiny_model, tmp_path_factory) -> Path:
    """``embeddings/zzred.pt`` (A1111 layout) holding the tiny model's own vectors of "red", and a file of a width
    the model does not have."""
    folder = tmp_path_factory.mktemp("embeddings")
    vec = word_vectors(tiny_model.cond_stage_model, "red")
    torch.save({"string_to_param": {"*": vec}, "name": "zzred", "step": 1}, folder / "zzred.pt")
    save_file({"emb_params": torch.randn(1, 768)}, folder / "too-wide.safetensors")
    return folder


def test_pipeline_embeddings_dir_gives_the_words_image_and_ti_hashes(tiny_files, red_embedding):
    args = dict(device="cpu", precision="full")
    files = (tiny_files / "tiny.yaml", tiny_files / "tiny.safetensors")
    with pytest.warns(UserWarning, match=r"'too-wide'.*\(768 wide\).*\(32\)"):
        pipe = Pipeline.from_config(*files, embeddings_dir=red_embedding, **args)
    settings = dict(steps=3, sampler="DDIM", seed=5, width=32, height=32, progress=False)
    with_embedding = pipe.generate("a zzred circle", **settings)
    word = pipe.generate("a red circle", **settings)
    assert np.array_equal(np.asarray(with_embedding.images[0]), np.asarray(word.images[0]))
    digest = hashlib.sha256((red_embedding / "zzred.pt").read_bytes()).hexdigest()[:12]
    assert with_embedding.fields(0)["TI hashes"] == f"zzred: {digest}"
    assert "TI hashes" not in word.fields(0)
    assert f'TI hashes: "zzred: {digest}"' in with_embedding.parameters(0)
    without = Pipeline.from_config(*files, **args).generate("a zzred circle", **settings)
    assert not np.array_equal(np.asarray(without.images[0]), np.asarray(word.images[0]))


def test_txt2img_script_takes_embeddings_dir(tiny_files, red_embedding, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    common = ["--config", str(tiny_files / "tiny.yaml"), "--ckpt", str(tiny_files / "tiny.safetensors")]
    common += ["--device", "cpu", "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    common += ["--H", "32", "--W", "32"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ti_args = ["--prompt", "zzred", "--negative_prompt", "zzred", "--embeddings_dir", str(red_embedding)]
        assert cli.main("txt2img", [*common, *ti_args, "--outdir", str(tmp_path / "ti")]) == 0
    word_args = ["--prompt", "red", "--negative_prompt", "red"]
    assert cli.main("txt2img", [*common, *word_args, "--outdir", str(tmp_path / "word")]) == 0
    (ti,) = sorted((tmp_path / "ti" / "samples").glob("*.png"))
    (word,) = sorted((tmp_path / "word" / "samples").glob("*.png"))
    assert parse_parameters(read_parameters(ti))["TI hashes"].startswith("zzred: ")
    assert "TI hashes" not in parse_parameters(read_parameters(word))
    with Image.open(ti) as a, Image.open(word) as b:
        # Prompt and negative prompt are the embedding of "red" in one, the word in the other: the same image.
        assert np.array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    assert cli.main("txt2img", [*common, "--embeddings_dir", str(tmp_path / "none")]) == 2
    assert "--embeddings_dir" in capsys.readouterr().err


def test_bf16_weights_take_the_float32_file(tiny_files, red_embedding):
    """The file's float32 vectors are cast to the encoder's dtype where they go in."""
    files = (tiny_files / "tiny.yaml", tiny_files / "tiny.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline.from_config(*files, embeddings_dir=red_embedding, device="cpu", precision="bf16")
    assert pipe.model.cond_stage_model.token_embedding.weight.dtype == torch.bfloat16
    settings = dict(steps=2, sampler="DDIM", seed=5, width=32, height=32, progress=False)
    with_embedding = pipe.generate("a zzred circle", **settings)
    word = pipe.generate("a red circle", **settings)
    assert np.array_equal(np.asarray(with_embedding.images[0]), np.asarray(word.images[0]))
