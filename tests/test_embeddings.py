"""Textual-inversion embeddings (ldm/adapters/embeddings.py) on tiny text encoders: every file layout, names in
prompts, multi-vector embeddings at chunk boundaries, weights, widths that fit no encoder.

The reference for "the vectors in place" is independent of the substitution code: a copy of the encoder whose token
table has the embedding's vectors written into spare rows, run on ids that name those rows (the way diffusers adds
new tokens to the vocabulary).
"""

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from ldm.adapters.embeddings import (
    attach_embeddings,
    embeddings_folder,
    load_embeddings,
    read_embedding,
    ti_hashes_field,
)
from ldm.errors import UserError
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.prompts import _apply_weights, encode_chunks, encode_prompts, prompt_chunks
from ldm.serialization import CheckpointError

WIDTH = 32
CLIP_CONFIG = {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
OPEN_CLIP_CONFIG = {"width": 48, "heads": 2, "layers": 2, "context_length": 77, "vocab_size": 49408}
SPARE = 49000  # token rows the reference encoder overwrites with the embedding's vectors


@pytest.fixture(scope="module")
def clip() -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(text_config=CLIP_CONFIG)


@pytest.fixture(scope="module")
def open_clip() -> FrozenOpenCLIPEmbedder:
    torch.manual_seed(1)
    return FrozenOpenCLIPEmbedder(arch="ViT-H-14", layer="penultimate", text_cfg=OPEN_CLIP_CONFIG, embed_dim=16)


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path: Path, vec: torch.Tensor, step: int = 500) -> Path:
    """The layout A1111's ``Embedding.save`` writes."""
    torch.save(
        {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "stored-name", "step": step,
         "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5-pruned"},
        path,
    )  # fmt: skip
    return path


def attached(encoder, *embeddings):
    model = SimpleNamespace(cond_stage_model=encoder)
    attach_embeddings(model, embeddings)
    return model


def encode(encoder, prompt: str) -> torch.Tensor:
    chunks = prompt_chunks(encoder, [prompt])
    return encode_chunks(encoder, chunks, len(chunks), 1)


def reference(encoder, before: str, vec: torch.Tensor, after: str = "") -> torch.Tensor:
    """The encoder output for ``before <vectors> after`` (one chunk) from a vocabulary holding the vectors."""
    spare = copy.deepcopy(encoder)
    spare.textual_inversion = None
    with torch.no_grad():
        spare.token_embedding.weight[SPARE : SPARE + len(vec)] = vec
    tok = encoder.tokenizer
    ids = [tok.bos_token_id, *tok.encode(before), *range(SPARE, SPARE + len(vec)), *tok.encode(after)]
    ids = ids + [tok.eos_token_id] + [tok.pad_token_id] * (tok.max_length - len(ids) - 1)
    return spare.encode_token_ids(torch.tensor([ids]))


# ---------------------------------------------------------------------------------------------------------------------
# Files


def test_each_published_layout_loads(tmp_path):
    vec = vectors(3)
    a1111_pt(tmp_path / "painterly.pt", vec)
    torch.save({"<cat-toy>": vec[0]}, tmp_path / "learned_embeds.bin")  # diffusers' textual_inversion script
    save_file({"emb_params": vec}, tmp_path / "style.safetensors")
    save_file({"clip_l": vec, "clip_g": vectors(3, 48, seed=1)}, tmp_path / "xl.safetensors")

    pt = read_embedding(tmp_path / "painterly.pt")
    assert pt.name == "painterly"  # the file stem, not the stored name (as A1111)
    assert torch.equal(pt.vectors[None], vec) and pt.step == 500 and pt.sd_checkpoint_name == "v1-5-pruned"
    bin_ = read_embedding(tmp_path / "learned_embeds.bin")
    assert bin_.name == "learned_embeds" and torch.equal(bin_.vectors[None], vec[:1])
    assert torch.equal(read_embedding(tmp_path / "style.safetensors").vectors[None], vec)
    xl = read_embedding(tmp_path / "xl.safetensors")
    assert set(xl.vectors) == {"clip_l", "clip_g"} and xl.vectors["clip_g"].shape == (3, 48)
    assert [e.name for e in load_embeddings(tmp_path)] == ["learned_embeds", "painterly", "style", "xl"]


def test_half_precision_files_come_back_float32(tmp_path):
    vec = vectors(2).half()
    save_file({"emb_params": vec}, tmp_path / "half.safetensors")
    loaded = read_embedding(tmp_path / "half.safetensors").vectors[None]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, vec.float())


def test_files_that_are_not_embeddings_are_named(tmp_path):
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="two.safetensors.*not a textual-inversion embedding.*a, b"):
        read_embedding(tmp_path / "two.safetensors")
    torch.save({"string_to_param": {"*": torch.zeros(2, 4, 8)}}, tmp_path / "3d.pt")
    with pytest.raises(CheckpointError, match=r"string_to_param should be a float tensor \(n, D\)"):
        read_embedding(tmp_path / "3d.pt")
    torch.save({"string_to_param": {"*": torch.full((1, 8), float("nan"))}}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        read_embedding(tmp_path / "nan.pt")


def test_a_folder_skips_broken_files_with_a_warning(tmp_path):
    save_file({"emb_params": vectors(1)}, tmp_path / "good.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="embedding skipped: .*broken.pt"):
        assert [e.name for e in load_embeddings(tmp_path)] == ["good"]


def test_embeddings_folder_default_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert embeddings_folder(None) is None
    (tmp_path / "embeddings").mkdir()
    assert embeddings_folder(None) == Path("embeddings")
    with pytest.raises(UserError, match="--embeddings_dir 'nope' is not a folder"):
        embeddings_folder("nope")


def test_the_pickle_in_an_embedding_file_is_never_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    torch.save({"string_to_param": {"*": vectors(1)}, "payload": Boom()}, tmp_path / "evil.pt")
    with pytest.warns(UserWarning, match=r"evil.pt: skipped .*builtins.exec"):
        embedding = read_embedding(tmp_path / "evil.pt")  # a SystemExit here would mean the pickle ran
    assert torch.equal(embedding.vectors[None], vectors(1))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize("which", ["clip", "open_clip"])
def test_the_name_in_a_prompt_puts_the_vectors_in_place(which, request, tmp_path):
    encoder = request.getfixturevalue(which)
    width = encoder.token_embedding.embedding_dim
    vec = vectors(3, width)
    embedding = read_embedding(a1111_pt(tmp_path / "fox-style.pt", vec))
    attached(encoder, embedding)
    try:
        got = encode(encoder, "a painting in fox-style, at night")
        assert prompt_chunks(encoder, ["fox-style"])[0][0][0][0].shape == (width,)
    finally:
        encoder.textual_inversion = None
    expected = reference(encoder, "a painting in", vec, ", at night")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, encode(encoder, "a painting in fox-style, at night"))


def test_names_match_as_token_sequences_longest_first(clip, tmp_path):
    save_file({"emb_params": vectors(1, seed=1)}, tmp_path / "fox.safetensors")
    save_file({"emb_params": vectors(2, seed=2)}, tmp_path / "fox style.safetensors")
    attached(clip, *load_embeddings(tmp_path))
    try:
        items = prompt_chunks(clip, ["a FOX style and a fox"])[0][0]
    finally:
        clip.textual_inversion = None
    tensors = [t for t, _ in items if isinstance(t, torch.Tensor)]
    # "a", [fox style: 2 vectors], "and", "a", [fox: 1 vector]; the CLIP tokenizer lower-cases, as in A1111.
    assert len(items) == 6 and len(tensors) == 3
    assert torch.equal(torch.stack(tensors), torch.cat([vectors(2, seed=2), vectors(1, seed=1)]))


def test_a_multi_vector_embedding_moves_whole_to_the_next_chunk(clip):
    from ldm.adapters.embeddings import Embedding

    attached(clip, Embedding("zzemb", {None: vectors(4)}))
    try:
        words = " ".join(["cat"] * 73)
        chunks = prompt_chunks(clip, [f"{words} zzemb dog"])[0]
        fits = prompt_chunks(clip, [f"{' '.join(['cat'] * 71)} zzemb"])[0]
    finally:
        clip.textual_inversion = None
    # 73 + 4 > 75: the first chunk ends padded after the 73 words; the 4 vectors open the second.
    assert [len(c) for c in chunks] == [73, 5]
    assert all(isinstance(t, torch.Tensor) for t, _ in chunks[1][:4]) and isinstance(chunks[1][4][0], int)
    assert [len(c) for c in fits] == [75]


def test_weights_apply_to_the_vectors(clip):
    from ldm.adapters.embeddings import Embedding

    vec = vectors(2)
    attached(clip, Embedding("zzemb", {None: vec}))
    try:
        chunks = prompt_chunks(clip, ["a (zzemb:1.3) b"])
        weighted = encode_chunks(clip, chunks, 1, 1)
        plain = encode(clip, "a zzemb b")
    finally:
        clip.textual_inversion = None
    assert [w for _, w in chunks[0][0]] == pytest.approx([1.0, 1.3, 1.3, 1.0])
    weights = torch.tensor([[1.0, 1.0, 1.3, 1.3] + [1.0] * 73])
    torch.testing.assert_close(weighted, _apply_weights(plain, weights))


def test_negative_prompts_use_embeddings_too(tiny_model, tmp_path):
    from ldm.adapters.embeddings import Embedding

    encoder = tiny_model.cond_stage_model
    vec = vectors(2, encoder.token_embedding.embedding_dim)
    attach_embeddings(tiny_model, [Embedding("badhands", {None: vec})])
    try:
        cond, uncond = encode_prompts(tiny_model, ["a red circle"], ["badhands"])
    finally:
        attach_embeddings(tiny_model, [])
    torch.testing.assert_close(uncond, reference(encoder, "", vec), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond, tiny_model.get_learned_conditioning(["a red circle"]))


def test_a_width_that_fits_no_encoder_is_skipped_with_one_warning(clip, tmp_path):
    save_file({"emb_params": vectors(2, 768)}, tmp_path / "sd15.safetensors")
    save_file({"clip_l": vectors(1), "clip_g": vectors(1, 48)}, tmp_path / "xl.safetensors")
    model = SimpleNamespace(cond_stage_model=clip)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = attach_embeddings(model, load_embeddings(tmp_path))
    messages = [str(w.message) for w in caught]
    assert used == [] and clip.textual_inversion is None and len(messages) == 2
    assert "'sd15'" in messages[0] and "sd15.safetensors" in messages[0] and "(768 wide)" in messages[0]
    assert "(32)" in messages[0] and "clip_l 32 + clip_g 48" in messages[1]
    assert encode(clip, "sd15").shape == (1, 77, WIDTH)  # the name is plain text


def test_ti_hashes_name_the_embeddings_a_prompt_uses(clip, tmp_path):
    import hashlib

    path = a1111_pt(tmp_path / "my,emb.pt", vectors(1))
    save_file({"emb_params": vectors(1)}, tmp_path / "unused.safetensors")
    model = attached(clip, *load_embeddings(tmp_path))
    try:
        field = ti_hashes_field(model, ["a photo of my,emb", ""])
        none = ti_hashes_field(model, ["a photo"])
    finally:
        clip.textual_inversion = None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert field == {"TI hashes": f"myemb: {digest}"} and none == {}


def test_saved_embeddings_read_back_in_every_written_layout(tmp_path):
    from safetensors import safe_open

    from ldm.adapters.embeddings import save_embedding

    vec = vectors(3)
    save_embedding(tmp_path / "mine.pt", {None: vec}, step=7, sd_checkpoint_name="base")
    save_embedding(tmp_path / "mine2.safetensors", {None: vec}, step=7)
    save_embedding(tmp_path / "xl.safetensors", {"clip_l": vec, "clip_g": vectors(3, 48)})
    data = torch.load(tmp_path / "mine.pt", weights_only=True)  # what A1111's loader calls
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["name"] == "mine" and torch.equal(data["string_to_param"]["*"], vec)
    with safe_open(tmp_path / "mine2.safetensors", "pt") as file:
        assert list(file.keys()) == ["emb_params"] and file.metadata()["step"] == "7"
    back = {e.name: e for e in load_embeddings(tmp_path)}
    assert back["mine"].step == 7 and back["mine"].sd_checkpoint_name == "base"
    assert torch.equal(back["mine2"].vectors[None], vec) and torch.equal(back["xl"].vectors["clip_l"], vec)
    with pytest.raises(UserError, match="saved as .safetensors"):
        save_embedding(tmp_path / "xl.pt", {"clip_l": vec, "clip_g": vec})
