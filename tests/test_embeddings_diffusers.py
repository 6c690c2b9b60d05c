"""ldm's textual-inversion token handling against diffusers' ``load_textual_inversion`` on one A1111 file, where
diffusers is installed (it is no requirement of ldm).

diffusers adds the name (and ``name_1`` ... for more vectors) to the tokenizer as new tokens; ldm, as A1111, matches
the name's BPE tokens in the tokenised prompt. For the name written as it is the encodings are identical; the two
differ where the name appears with other capitals, inside a longer word or with its BPE pieces spaced apart.
"""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from ldm.adapters.embeddings import attach_embeddings, load_embeddings
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import _open_clip_bpe
from ldm.prompts import encode_chunks, prompt_chunks

textual_inversion = pytest.importorskip(
    "diffusers.loaders.textual_inversion",
    reason="diffusers is not installed (requirements-compare.txt; only for this comparison)",
)


def hf_tokenizer(folder):
    """A transformers CLIPTokenizer written from the BPE open_clip bundles (the same vocabulary, offline)."""
    from transformers import CLIPTokenizer

    bpe = _open_clip_bpe()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder))


def test_the_same_vectors_as_diffusers_for_the_name_as_written(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "emb").mkdir()
    tokenizer = hf_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    encoder = FrozenCLIPEmbedder(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    )
    path = tmp_path / "emb" / "fox-style.pt"
    torch.save({"string_to_param": {"*": torch.randn(3, 32)}, "name": "fox-style", "step": 1}, path)

    class Loader(textual_inversion.TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}

    loader, text_model = Loader(), copy.deepcopy(encoder.transformer.text_model)
    loader.load_textual_inversion(str(path), token="fox-style", tokenizer=tokenizer, text_encoder=text_model)
    attach_embeddings(SimpleNamespace(cond_stage_model=encoder), load_embeddings(tmp_path / "emb"))

    def both(prompt):
        converted = loader.maybe_convert_prompt(prompt, tokenizer)
        ids = tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs = text_model(input_ids=ids, position_ids=torch.arange(77)[None]).last_hidden_state
            ours = encode_chunks(encoder, prompt_chunks(encoder, [prompt]), 1, 1)
        return ours, theirs

    for prompt in ["a painting in fox-style, at night", "fox-style"]:
        ours, theirs = both(prompt)
        assert torch.equal(ours, theirs), prompt
    for prompt in ["a FOX-STYLE dog", "fox-styles", "fox - style"]:
        ours, theirs = both(prompt)
        assert not torch.allclose(ours, theirs), prompt
