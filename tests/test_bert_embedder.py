"""The LDM text-to-image cond stage: BERT's tokenizer, the x-transformers encoder and the txt2img-1p4B layout."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_training_models import build, fit, images

from ldm.checkpoint import load_model_from_config, load_state_dict_into, save_checkpoint
from ldm.errors import UserError
from ldm.models.diffusion.samplers import sample
from ldm.modules.attention import set_attention_slicing
from ldm.modules.encoders.modules import BERTEmbedder, BERTTokenizer, TransformerEmbedder
from ldm.modules.x_transformer import Attention, Encoder, TransformerWrapper
from ldm.serialization import CheckpointError
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TXT2IMG = "stable-diffusion/configs/latent-diffusion/txt2img-1p4B-eval"
# A vocab.txt in bert-base-uncased's format: special tokens first, "##" marks a word's continuation.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "on", "blue", "background", "cat"]
VOCAB += ["##s", ".", "green", "square", "cafe"]
ID = {token: i for i, token in enumerate(VOCAB)}
CLS, SEP, PAD, UNK = ID["[CLS]"], ID["[SEP]"], ID["[PAD]"], ID["[UNK]"]
CAPTIONS = ["a red circle on a blue background", "a green square", "Cats on a CAFÉ.", ""]


@pytest.fixture
def vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


def tiny_bert(vocab_file: Path, n_embed: int = 32, n_layer: int = 2, **kwargs) -> BERTEmbedder:
    return BERTEmbedder(n_embed=n_embed, n_layer=n_layer, vocab_size=len(VOCAB), vocab_file=vocab_file, **kwargs)


def read_keys(path: Path) -> dict[str, tuple[str, str]]:
    rows = [row.split("\t") for row in path.read_text().splitlines()[1:]]
    return {key: (shape, dtype) for key, shape, dtype in rows}


def test_txt2img_1p4b_builds_the_original_state_dict_exactly(reference_dir):
    config = load_config(reference_dir / "original" / f"{TXT2IMG}.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    actual = {
        key: ("x".join(map(str, value.shape)) or "scalar", str(value.dtype).removeprefix("torch."))
        for key, value in model.state_dict().items()
    }
    expected = read_keys(reference_dir / "original" / f"{TXT2IMG}.keys.tsv")
    assert sorted(set(expected) - set(actual)) == [], "keys missing from the model"
    assert sorted(set(actual) - set(expected)) == [], "keys the reference does not have"
    assert {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]} == {}
    # 32 (attention, feed-forward) pairs of width 1280, 8 heads of 64, over BERT's 30522-token vocabulary.
    encoder = model.cond_stage_model
    assert isinstance(encoder, BERTEmbedder) and len(encoder.transformer.attn_layers.layers) == 64
    assert sum(1 for k in expected if k.startswith("cond_stage_model.")) == 2 + 64 * 2 + 32 * 5 + 32 * 4 + 4


def test_the_project_config_is_the_original_model(reference_dir):
    ours = load_config(ROOT / "configs/latent-diffusion/txt2img-1p4B-eval.yaml")
    original = load_config(reference_dir / "original" / f"{TXT2IMG}.yaml")
    assert ours.model == original.model


def test_tokenizer_pads_and_truncates_as_bert(vocab_file):
    tokenizer = BERTTokenizer(vq_interface=False, max_length=8, vocab_file=vocab_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenizer(CAPTIONS[1:])
    # Lower-cased, accents stripped, "cats" split into wordpieces, unknown words [UNK]; [CLS] ... [SEP] [PAD]...
    assert ids.dtype == torch.long and ids.tolist() == [
        [CLS, ID["a"], ID["green"], ID["square"], SEP, PAD, PAD, PAD],
        [CLS, ID["cat"], ID["##s"], ID["on"], ID["a"], ID["cafe"], ID["."], SEP],
        [CLS, SEP, PAD, PAD, PAD, PAD, PAD, PAD],
    ]
    with pytest.warns(UserWarning, match=r"1 wordpiece\(s\) beyond the 8-token context were dropped \(prompt 0: 1\)"):
        long = tokenizer(CAPTIONS[0])
    assert long.tolist() == [[CLS, ID["a"], ID["red"], ID["circle"], ID["on"], ID["a"], ID["blue"], SEP]]
    assert tokenizer(["zebra"])[0, :3].tolist() == [CLS, UNK, SEP]


def test_tokenizer_matches_transformers_bert_tokenizer(vocab_file):
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizerFast.from_pretrained(str(vocab_file.parent), local_files_only=True)
    for max_length in (77, 6):
        # How CompVis's BERTTokenizer calls it.
        expected = reference(
            CAPTIONS, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
        )["input_ids"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            actual = BERTTokenizer(vq_interface=False, max_length=max_length, vocab_file=vocab_file.parent)(CAPTIONS)
        assert torch.equal(actual, expected), max_length


def test_tokenizer_vq_interface_and_device(vocab_file):
    tokenizer = BERTTokenizer(device="meta", max_length=5, vocab_file=vocab_file)
    first, second, (a, b, ids) = tokenizer.encode(["a cat"])
    assert first is second is a is b is None
    assert ids.device.type == "meta" and ids.shape == (1, 5)
    assert tokenizer.decode(["a cat"]) == ["a cat"]


def test_a_missing_vocabulary_is_one_clear_error(tmp_path, vocab_file, monkeypatch):
    with pytest.raises(UserError, match=r"BERT vocabulary '.*nothere.txt' not found.*vocab_file") as err:
        BERTTokenizer(vocab_file=tmp_path / "nothere.txt")
    assert "\n" not in str(err.value)
    # Without a vocab_file the default path is looked for only when prompts are tokenized, so the model builds.
    monkeypatch.chdir(tmp_path)
    encoder = BERTEmbedder(n_embed=16, n_layer=1, vocab_size=len(VOCAB))
    with pytest.raises(UserError, match=r"'models/bert-base-uncased/vocab.txt' not found"):
        encoder.encode(["a cat"])
    (tmp_path / "models/bert-base-uncased").mkdir(parents=True)
    (tmp_path / "models/bert-base-uncased/vocab.txt").write_text(vocab_file.read_text())
    assert encoder.encode(["a cat"]).shape == (1, 77, 16)

    not_bert = tmp_path / "words.txt"
    not_bert.write_text("a\nb\n")
    with pytest.raises(UserError, match=r"lacks \[CLS\], \[SEP\], \[PAD\], \[UNK\]"):
        BERTTokenizer(vocab_file=not_bert)
    with pytest.raises(UserError, match=f"has {len(VOCAB)} tokens but the encoder embeds 10"):
        BERTEmbedder(n_embed=16, n_layer=1, vocab_size=10, vocab_file=vocab_file)(["a"])


def test_bert_embedder_encodes_captions(vocab_file):
    torch.manual_seed(0)
    encoder = tiny_bert(vocab_file).eval()
    z = encoder.encode(CAPTIONS)
    assert z.shape == (4, 77, 32) and z.dtype == torch.float32 and torch.isfinite(z).all()
    # Each caption is encoded on its own: the same caption gives the same rows in any batch.
    torch.testing.assert_close(encoder.encode(CAPTIONS[1:2]), z[1:2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z[0], z[1])
    ids = encoder.tknz_fn(CAPTIONS)
    untokenized = tiny_bert(vocab_file, use_tokenizer=False)
    untokenized.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(untokenized.eval()(ids), z)
    embedder = TransformerEmbedder(n_embed=32, n_layer=2, vocab_size=len(VOCAB))
    embedder.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(embedder.encode(ids), z)


def test_too_many_tokens_are_refused():
    wrapper = TransformerWrapper(num_tokens=10, max_seq_len=4, attn_layers=Encoder(dim=16, depth=1))
    assert wrapper(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 10)
    with pytest.raises(UserError, match="5 tokens exceed the transformer's 4 positions"):
        wrapper(torch.zeros(1, 5, dtype=torch.long))


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out: x (B, N, dim) -> (B, N, dim)."""
    heads = attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        b, n, inner = t.shape
        return t.reshape(b, n, heads, inner // heads).permute(0, 2, 1, 3)

    q, k, v = (split(x @ layer.weight.T) for layer in (attn.to_q, attn.to_k, attn.to_v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return out @ attn.to_out.weight.T + attn.to_out.bias


def test_attention_matches_plain_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(48, dim_head=16, heads=3)
    x = torch.randn(2, 11, 48)
    expected = reference_attention(attn, x)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    set_attention_slicing(attn, 4)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_encoder_is_pre_norm_attention_then_feed_forward():
    torch.manual_seed(0)
    wrapper = TransformerWrapper(num_tokens=20, max_seq_len=9, attn_layers=Encoder(dim=32, depth=2, heads=4))
    tokens = torch.randint(0, 20, (3, 9))
    h = wrapper.token_emb.weight[tokens] + wrapper.pos_emb.emb.weight[:9]
    for i, (norm, block) in enumerate(wrapper.attn_layers.layers):
        normed = F.layer_norm(h, (32,), norm.weight, norm.bias)
        if i % 2 == 0:
            h = h + reference_attention(block, normed)
        else:
            hidden = F.gelu(normed @ block.net[0][0].weight.T + block.net[0][0].bias)
            h = h + hidden @ block.net[2].weight.T + block.net[2].bias
    h = F.layer_norm(h, (32,), wrapper.norm.weight, wrapper.norm.bias)
    torch.testing.assert_close(wrapper(tokens, return_embeddings=True), h, rtol=1e-5, atol=1e-5)
    logits = h @ wrapper.to_logits.weight.T + wrapper.to_logits.bias
    torch.testing.assert_close(wrapper(tokens), logits, rtol=1e-5, atol=1e-5)


def bert_cond_stage(vocab_file: Path) -> dict:
    return {
        "target": "ldm.modules.encoders.modules.BERTEmbedder",
        "params": {"n_embed": 32, "n_layer": 1, "vocab_size": len(VOCAB), "vocab_file": str(vocab_file)},
    }


def test_tiny_ldm_with_bert_cond_stage_samples_and_trains(tiny_config, vocab_file):
    torch.manual_seed(0)
    model = build(tiny_config, "model.params.cond_stage_trainable=true", cond_stage_config=bert_cond_stage(vocab_file))
    c = model.get_learned_conditioning(CAPTIONS[:2])
    uc = model.get_unconditional_conditioning(2)
    assert c.shape == uc.shape == (2, 77, 32)
    latents = sample(model.eval(), "ddim", 2, c, uc, 3.0, shape=(2, 4, 8, 8), progress=False)
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()

    embedding = model.cond_stage_model.transformer.token_emb.weight
    before = embedding.detach().clone()
    # Lightning keeps the mode a module is in, and the loss is logged under "train/" in train mode only.
    trainer = fit(model.train(), {"jpg": images(), "txt": CAPTIONS}, steps=2)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    # The encoder is trained with the UNet, through the captions' tokens.
    assert not torch.equal(embedding, before)


def test_checkpoints_keep_the_bert_encoder_keys(tiny_config, tiny_model, vocab_file, tmp_path):
    torch.manual_seed(0)
    model = build(tiny_config, "model.params.cond_stage_trainable=true", cond_stage_config=bert_cond_stage(vocab_file))
    path = tmp_path / "bert-ldm.safetensors"
    save_checkpoint(model.state_dict(), path)
    config = tiny_config.copy()
    config.model.params.cond_stage_config = bert_cond_stage(vocab_file)
    loaded = load_model_from_config(config, path, device="cpu")
    # cond_stage_model.transformer.* is also the CLIP text model's prefix: these keys must not be taken for it.
    key = "cond_stage_model.transformer.attn_layers.layers.0.1.to_q.weight"
    torch.testing.assert_close(loaded.state_dict()[key], model.state_dict()[key], rtol=0, atol=0)
    torch.testing.assert_close(
        loaded.get_learned_conditioning(CAPTIONS), model.eval().get_learned_conditioning(CAPTIONS)
    )
    with pytest.raises(CheckpointError, match="LDM text-to-image checkpoint .*txt2img-1p4B-eval.yaml"):
        load_state_dict_into(tiny_model, model.state_dict())
