"""Conditioning encoders: offline tokenizer, SD 1.x / 2.x text encoders, class embedder."""

import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from ldm.modules.encoders.modules import ClassEmbedder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPTokenizer, _open_clip_bpe

PROMPTS = [
    "a red circle on a blue background",
    "A painting of a virus monster playing guitar!",
    " ".join(["very"] * 100) + " long prompt",
]
TINY_OPENCLIP_CFG = {"width": 32, "heads": 4, "layers": 3, "context_length": 77, "vocab_size": 49408}


def _cond_stage_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "cond_stage_model."
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}


def _reference_shapes(reference_dir: Path, name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (reference_dir / name).read_text().splitlines():
        key, shape = line.split("\t")[:2]
        if key.startswith("cond_stage_model."):
            shapes[key.removeprefix("cond_stage_model.")] = tuple(int(n) for n in shape.split("x") if n != "scalar")
    return shapes


@pytest.fixture
def tiny_clip(tiny_dir: Path, tiny_weights: dict[str, torch.Tensor]) -> FrozenCLIPEmbedder:
    model = FrozenCLIPEmbedder(text_config=tiny_dir / "text-config.json")
    model.load_state_dict(_cond_stage_weights(tiny_weights), strict=True)
    return model


@pytest.mark.parametrize(("pad", "case"), [(49407, "clip_token_ids_v1"), (0, "clip_token_ids_v2")])
def test_tokenizer_reproduces_reference_ids(pad: int, case: str, tiny_cases: dict[str, torch.Tensor]) -> None:
    with pytest.warns(UserWarning, match=r"27 token\(s\) .* dropped \(prompt 2: 27\)"):
        ids = CLIPTokenizer(pad_token_id=pad)(PROMPTS)
    assert ids.dtype == torch.long
    torch.testing.assert_close(ids, tiny_cases[case], rtol=0, atol=0)


def test_tokenizer_short_prompts_do_not_warn_and_expose_raw_ids() -> None:
    tokenizer = CLIPTokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenizer(PROMPTS[:2])
    assert ids.shape == (2, 77)
    assert len(tokenizer.encode(PROMPTS[2])) == 102
    assert tokenizer.encode(PROMPTS[1]) == ids[1, 1:10].tolist()


def test_tokenizer_is_linear_in_word_length_and_keeps_real_words() -> None:
    tokenizer = CLIPTokenizer()
    words = "a photo of an astronaut, masterpiece,best_quality!!! " + "x" * 64 + " " + "?" * 64
    assert tokenizer.encode(words) == _open_clip_bpe().encode(words), "words up to 64 characters are unchanged"
    start = time.perf_counter()
    letters = tokenizer.encode("qwertzuiop" * 10_000)  # one 100,000-letter word: minutes of BPE merges uncut
    symbols = tokenizer.encode("!?" * 50_000)
    assert time.perf_counter() - start < 30
    assert len(letters) > 10_000 and len(symbols) > 1_000
    assert letters[:10] == _open_clip_bpe().encode(("qwertzuiop" * 7)[:64])[:10]


def test_clip_embedder_matches_reference(
    tiny_clip: FrozenCLIPEmbedder, tiny_cases: dict[str, torch.Tensor], assert_matches_reference
) -> None:
    expected = tiny_cases["clip_hidden"]
    with torch.no_grad():
        from_ids = tiny_clip.transformer(input_ids=tiny_cases["clip_token_ids_v1"]).last_hidden_state
        with pytest.warns(UserWarning, match="dropped"):
            from_text = tiny_clip(PROMPTS)
    assert_matches_reference(from_ids, expected)
    assert_matches_reference(from_text, expected)
    assert not any(p.requires_grad for p in tiny_clip.parameters()) and not tiny_clip.training


def test_clip_embedder_hidden_and_pooled_layers(
    tiny_dir: Path, tiny_weights: dict[str, torch.Tensor], tiny_cases: dict[str, torch.Tensor]
) -> None:
    config = tiny_dir / "text-config.json"
    hidden = FrozenCLIPEmbedder(text_config=config, layer="hidden", layer_idx=-2)
    pooled = FrozenCLIPEmbedder(text_config=config, layer="pooled")
    for model in (hidden, pooled):
        model.load_state_dict(_cond_stage_weights(tiny_weights), strict=True)
    ids = tiny_cases["clip_token_ids_v1"][:2]
    with torch.no_grad():
        outputs = hidden.transformer(input_ids=ids, output_hidden_states=True)
        z_hidden, z_pooled = hidden(PROMPTS[:2]), pooled(PROMPTS[:2])
    torch.testing.assert_close(z_hidden, outputs.hidden_states[-2])
    assert not torch.allclose(z_hidden, outputs.last_hidden_state)
    eos_position = (ids == 49407).int().argmax(dim=1)
    torch.testing.assert_close(z_pooled[:, 0], outputs.last_hidden_state[torch.arange(2), eos_position])
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(text_config=config, layer="hidden")


def test_clip_embedder_honours_local_directory(
    tiny_clip: FrozenCLIPEmbedder, tiny_cases: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    tiny_clip.transformer.text_model.save_pretrained(tmp_path)
    # A transformers tokenizer folder (vocab.json + merges.txt) written from open_clip's BPE vocabulary.
    bpe = _open_clip_bpe()
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (tmp_path / "vocab.json").write_text(json.dumps({hf_names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    loaded = FrozenCLIPEmbedder(version=str(tmp_path))
    assert loaded.state_dict().keys() == tiny_clip.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPTS[:2]), tiny_clip(PROMPTS[:2]))
    torch.testing.assert_close(loaded.tokenizer(PROMPTS[:2]), tiny_cases["clip_token_ids_v1"][:2])


@pytest.mark.parametrize(
    ("cls", "keys_file"), [(FrozenCLIPEmbedder, "sd-v1-keys.tsv"), (FrozenOpenCLIPEmbedder, "sd-v2-keys.tsv")]
)
def test_full_size_state_dict_layout_on_meta(cls: type, keys_file: str, reference_dir: Path) -> None:
    start = time.perf_counter()
    with torch.device("meta"):
        model = cls()
    assert time.perf_counter() - start < 5
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _reference_shapes(reference_dir, keys_file)


def test_openclip_embedder_layers() -> None:
    torch.manual_seed(0)
    last = FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG, layer="last")
    penultimate = FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG, layer="penultimate")
    penultimate.load_state_dict(last.state_dict(), strict=True)
    tower = last.model
    tokens = last.tokenizer(PROMPTS[:2])
    assert tokens[0, 9:].eq(0).all()
    with torch.no_grad():
        z_last, z_penultimate = last(PROMPTS[:2]), penultimate(PROMPTS[:2])
        # open_clip's own forward (its Transformer.forward and causal-mask buffer) as the reference.
        x = tower.token_embedding(tokens) + tower.positional_embedding
        expected_last = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
        expected_penultimate = tower.forward_intermediates(
            tokens, indices=[1], normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )["text_intermediates"][0]
    assert z_last.shape == z_penultimate.shape == (2, 77, 32)
    torch.testing.assert_close(z_last, expected_last)
    torch.testing.assert_close(z_penultimate, expected_penultimate)
    assert not torch.allclose(z_last, z_penultimate)


def test_openclip_embedder_loads_local_checkpoint_and_ignores_tags(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG)
    checkpoint = {k: v.clone() for k, v in source.model.state_dict().items()}
    checkpoint["visual.proj"] = torch.zeros(2, 2)  # a full open_clip checkpoint also holds the visual tower
    path = tmp_path / "open_clip.safetensors"
    save_file(checkpoint, str(path))

    loaded = FrozenOpenCLIPEmbedder(version=str(path), text_cfg=TINY_OPENCLIP_CFG)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    FrozenOpenCLIPEmbedder(version="laion2b_s32b_b79k", text_cfg=TINY_OPENCLIP_CFG)  # no download, no error


def test_class_embedder() -> None:
    embedder = ClassEmbedder(embed_dim=8, n_classes=10, ucg_rate=0.5)
    labels = torch.arange(6)
    embedder.eval()
    torch.testing.assert_close(embedder({"class": labels}), embedder.embedding.weight[labels][:, None])

    uc = embedder.get_unconditional_conditioning(4)
    assert uc["class"].tolist() == [9] * 4 and uc["class"].device == embedder.embedding.weight.device
    assert embedder(uc).shape == (4, 1, 8)

    embedder.train()
    torch.manual_seed(0)
    dropped = embedder({"class": torch.zeros(1000, dtype=torch.long)})
    is_uc = torch.isclose(dropped, embedder.embedding.weight[9]).all(dim=-1)
    assert 0.4 < is_uc.float().mean() < 0.6
    torch.testing.assert_close(
        embedder({"label": labels}, key="label", disable_dropout=True), embedder.embedding.weight[labels][:, None]
    )
    compvis = ClassEmbedder(embed_dim=8, n_classes=10).train()  # CompVis's class drops no labels
    torch.testing.assert_close(compvis({"class": labels}), compvis.embedding.weight[labels][:, None])


def test_meta_construction_then_loading_needs_no_buffers(tiny_clip: FrozenCLIPEmbedder, tiny_dir: Path) -> None:
    # A checkpoint loader may build on the meta device and materialise with ``to_empty``, which leaves
    # non-persistent buffers (position ids, causal masks) uninitialised: forward must not depend on them.
    pairs = [
        (tiny_clip, lambda: FrozenCLIPEmbedder(text_config=tiny_dir / "text-config.json")),
        (
            FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG),
            lambda: FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG),
        ),
    ]
    for reference, build in pairs:
        with torch.device("meta"):
            model = build()
        model.to_empty(device="cpu")
        for buffer in model.buffers():
            buffer.fill_(7)
        model.load_state_dict(reference.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model(PROMPTS[:2]), reference(PROMPTS[:2]))


def test_assigning_a_device_moves_the_text_encoder(tiny_dir: Path) -> None:
    # Stability's txt2img.py does ``model.cond_stage_model.device = "cpu"`` after loading on the CPU.
    for embedder in (
        FrozenCLIPEmbedder(text_config=tiny_dir / "text-config.json"),
        FrozenOpenCLIPEmbedder(text_cfg=TINY_OPENCLIP_CFG),
    ):
        embedder.device = "meta"
        assert embedder.device == torch.device("meta")
        assert all(p.device.type == "meta" for p in embedder.parameters())
