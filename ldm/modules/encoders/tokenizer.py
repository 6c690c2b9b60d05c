"""Offline CLIP tokenizer for the SD text encoders.

The byte-level BPE vocabulary of OpenAI CLIP ships inside ``open_clip_torch``
(``open_clip/bpe_simple_vocab_16e6.txt.gz``), so prompts are tokenized without any hub access. SD 1.x (transformers'
``CLIPTokenizer`` of ``openai/clip-vit-large-patch14``) and SD 2.x (``open_clip.tokenize``) use that same vocabulary;
they differ only in the padding id, which is therefore a constructor argument.
"""

import functools
import os
import re
import warnings
from collections.abc import Callable, Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>
# BPE merges a word in time quadratic in its length (a 100,000-letter word took minutes), so runs of letters or of
# symbols, the BPE's words, are cut into pieces of at most this many characters first. No real word is that long.
MAX_WORD = 64
_LONG_RUNS = (
    re.compile(rf"[^\W\d_]{{{MAX_WORD}}}(?=[^\W\d_])"),
    re.compile(rf"(?:[^\w\s]|_){{{MAX_WORD}}}(?=[^\w\s]|_)"),
)


@functools.cache
def _open_clip_bpe() -> SimpleTokenizer:
    # Reading and parsing the merges takes a noticeable fraction of a second; every tokenizer shares one copy.
    return SimpleTokenizer()


class CLIPTokenizer:
    """Turns prompts into fixed-length CLIP token ids: ``[BOS, bpe..., EOS, pad...]``.

    Args:
        max_length: context length of the text encoder (77 for every SD text encoder).
        pad_token_id: id filling the positions after EOS: 49407 (EOS) for SD 1.x, 0 for SD 2.x / OpenCLIP.
        vocab_dir: optional local directory holding a transformers tokenizer (``vocab.json`` + ``merges.txt`` or
            ``tokenizer.json``), e.g. a model folder with tokens added by textual inversion. By default the
            vocabulary bundled with open_clip is used.
    """

    def __init__(
        self,
        max_length: int = 77,
        pad_token_id: int = EOS_TOKEN_ID,
        vocab_dir: str | os.PathLike | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._encode: Callable[[str], list[int]]
        if vocab_dir is None:
            self.bos_token_id, self.eos_token_id = BOS_TOKEN_ID, EOS_TOKEN_ID
            self._encode = _open_clip_bpe().encode
        else:
            from transformers import CLIPTokenizer as HFCLIPTokenizer

            hf_tokenizer = HFCLIPTokenizer.from_pretrained(os.fspath(vocab_dir), local_files_only=True)
            self.bos_token_id, self.eos_token_id = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
            self._encode = functools.partial(hf_tokenizer.encode, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Raw BPE ids of one prompt, without BOS/EOS and without truncation (its length is the prompt's length).

        Words longer than :data:`MAX_WORD` characters are encoded in pieces of that length.
        """
        for long_run in _LONG_RUNS:
            text = long_run.sub(r"\g<0> ", text)
        return list(self._encode(text))

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Tokenize a batch of prompts.

        Prompts longer than ``max_length - 2`` BPE tokens are truncated (EOS stays last) and one warning says how many
        tokens were dropped.

        Returns:
            ids: (B, max_length) int64, on the CPU.
        """
        if isinstance(texts, str):
            texts = [texts]
        room = self.max_length - 2
        ids = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long, device="cpu")
        dropped = {}
        for i, text in enumerate(texts):
            bpe = self.encode(text)
            if len(bpe) > room:
                dropped[i] = len(bpe) - room
                bpe = bpe[:room]
            row = [self.bos_token_id, *bpe, self.eos_token_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device="cpu")
        if dropped:
            details = ", ".join(f"prompt {i}: {n}" for i, n in dropped.items())
            warnings.warn(
                f"CLIP tokenizer: {sum(dropped.values())} token(s) beyond the {self.max_length}-token context were "
                f"dropped ({details})",
                stacklevel=2,
            )
        return ids
