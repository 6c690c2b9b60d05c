"""The text encoders of the LDM text-to-image models (``txt2img-1p4B``): BERT's tokenizer feeding a transformer
encoder trained from scratch with the diffusion model (``BERTEmbedder``), or that encoder on given token ids
(``TransformerEmbedder``).

Only the tokenizer is BERT's (bert-base-uncased's WordPiece vocabulary, lower-cased, accents stripped); its
vocabulary is not part of LDM checkpoints and nothing is downloaded, so it is read from a local ``vocab.txt``
(:data:`DEFAULT_VOCAB_FILE`, or the ``vocab_file`` argument).
"""

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import BertWordPieceTokenizer

from ldm.errors import UserError
from ldm.modules.encoders.base import AbstractEncoder
from ldm.modules.x_transformer import Encoder, TransformerWrapper

# Where the tokenizer looks when no ``vocab_file`` is given, relative to the working directory (as the checkpoint
# paths of models/README.md): bert-base-uncased's vocab.txt, 30522 lines.
DEFAULT_VOCAB_FILE = Path("models/bert-base-uncased/vocab.txt")
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")


class BERTTokenizer(AbstractEncoder):
    """Prompts -> fixed-length BERT token ids ``[CLS] wordpieces... [SEP] [PAD]...``, as transformers'
    ``BertTokenizerFast("bert-base-uncased")`` called with ``truncation=True, padding="max_length"``.

    Args:
        device: where the ids go; None leaves them on the CPU.
        vq_interface: :meth:`encode` returns ``(None, None, [None, None, ids])``, the shape of a VQ model's output
            (CompVis's interface for token conditioning), instead of the ids alone.
        max_length: length of every id row; longer prompts keep their first ``max_length - 2`` wordpieces.
        vocab_file: a WordPiece ``vocab.txt`` (one token a line, the line number its id), or a directory holding
            one (a transformers model folder). Default :data:`DEFAULT_VOCAB_FILE`, which is read when first needed,
            so a model can be built (and its weights loaded) without it.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        vq_interface: bool = True,
        max_length: int = 77,
        vocab_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise UserError(f"max_length must leave room for [CLS] and [SEP], got {max_length}.")
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length
        self.vocab_file = _vocab_path(vocab_file)
        # An explicitly named file that is missing or broken fails here; the default is looked for when needed.
        self._wordpiece = None if vocab_file is None else _load_wordpiece(self.vocab_file)

    @property
    def wordpiece(self) -> BertWordPieceTokenizer:
        """The WordPiece tokenizer, read from :attr:`vocab_file` on first use."""
        if self._wordpiece is None:
            self._wordpiece = _load_wordpiece(self.vocab_file)
        return self._wordpiece

    @property
    def vocab_size(self) -> int:
        return self.wordpiece.get_vocab_size()

    def token_id(self, token: str) -> int:
        """The id of a vocabulary entry such as ``"[PAD]"``."""
        return self.wordpiece.token_to_id(token)

    def encode_wordpieces(self, texts: Sequence[str]) -> list[list[int]]:
        """The wordpiece ids of each prompt, without special tokens and untruncated."""
        return [e.ids for e in self.wordpiece.encode_batch(list(texts), add_special_tokens=False)]

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """Tokenize prompts: -> ids (B, max_length) int64 on ``device``.

        Prompts longer than ``max_length - 2`` wordpieces are truncated ([SEP] stays last) and one warning says how
        many wordpieces were dropped.
        """
        texts = [text] if isinstance(text, str) else list(text)
        cls_id, sep_id, pad_id = (self.token_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        room = self.max_length - 2
        rows, dropped = [], {}
        for i, pieces in enumerate(self.encode_wordpieces(texts)):
            if len(pieces) > room:
                dropped[i] = len(pieces) - room
            row = [cls_id, *pieces[:room], sep_id]
            rows.append(row + [pad_id] * (self.max_length - len(row)))
        if dropped:
            details = ", ".join(f"prompt {i}: {n}" for i, n in dropped.items())
            warnings.warn(
                f"BERT tokenizer: {sum(dropped.values())} wordpiece(s) beyond the {self.max_length}-token context "
                f"were dropped ({details})",
                stacklevel=2,
            )
        return torch.tensor(rows, dtype=torch.long, device=self.device).reshape(len(texts), self.max_length)

    @torch.no_grad()
    def encode(self, text: str | Sequence[str]) -> Any:
        """The ids (B, max_length), wrapped as ``(None, None, [None, None, ids])`` with ``vq_interface``."""
        tokens = self(text)
        return (None, None, [None, None, tokens]) if self.vq_interface else tokens

    def decode(self, text: Any) -> Any:
        """The identity, as the original: the prompts are the "decoded" conditioning."""
        return text


class TransformerEmbedder(AbstractEncoder):
    """Token ids (B, N) -> features (B, N, n_embed): a transformer encoder of ``n_layer`` blocks, learned positions.

    ``device``: where to move the module after construction; None leaves it where it is built. The ids always go to
    the device of the weights.
    """

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int,
        max_seq_len: int = 77,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size, max_seq_len=max_seq_len, attn_layers=Encoder(dim=n_embed, depth=n_layer)
        )
        self.place(device, freeze=False)

    @property
    def device(self) -> torch.device:
        return self.transformer.token_emb.weight.device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(tokens.to(self.device), return_embeddings=True)


class BERTEmbedder(AbstractEncoder):
    """Prompts -> features (B, max_seq_len, n_embed): :class:`BERTTokenizer` then a transformer encoder of
    ``n_layer`` blocks (trained with the diffusion model; not BERT's weights).

    Args:
        n_embed: encoder width (the UNet's ``context_dim``).
        n_layer: number of (attention, feed-forward) blocks.
        vocab_size: rows of the token embedding, 30522 for bert-base-uncased.
        max_seq_len: tokens per prompt (padded or truncated to it).
        device: where to move the module after construction; None leaves it where it is built.
        use_tokenizer: take prompts; without it, :meth:`forward` takes token ids (B, N) directly.
        embedding_dropout: dropout on the token + position embeddings.
        vocab_file: the tokenizer's vocabulary, see :class:`BERTTokenizer`.
    """

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        device: str | torch.device | None = None,
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        vocab_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, vocab_file=vocab_file)
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            attn_layers=Encoder(dim=n_embed, depth=n_layer),
            emb_dropout=embedding_dropout,
        )
        self.place(device, freeze=False)

    @property
    def device(self) -> torch.device:
        return self.transformer.token_emb.weight.device

    def forward(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Prompts (or, without the tokenizer, ids (B, N) int64) -> (B, N, n_embed), N = max_seq_len for prompts."""
        if self.use_tknz_fn:
            if self.tknz_fn.vocab_size > self.transformer.num_tokens:
                raise UserError(
                    f"the BERT vocabulary {self.tknz_fn.vocab_file} has {self.tknz_fn.vocab_size} tokens but the "
                    f"encoder embeds {self.transformer.num_tokens}; use the vocabulary the model was trained with "
                    "(bert-base-uncased's vocab.txt for vocab_size 30522)."
                )
            tokens = self.tknz_fn(text)
        else:
            tokens = text
        return self.transformer(tokens.to(self.device), return_embeddings=True)


def _vocab_path(vocab_file: str | os.PathLike | None) -> Path:
    """The vocab.txt a ``vocab_file`` argument names: itself, the vocab.txt in it if a directory, or the default."""
    path = DEFAULT_VOCAB_FILE if vocab_file is None else Path(vocab_file)
    return path / "vocab.txt" if path.is_dir() else path


def _load_wordpiece(path: Path) -> BertWordPieceTokenizer:
    """bert-base-uncased's tokenizer pipeline (clean text, split CJK characters, lower-case and strip accents,
    WordPiece with ``##`` continuations) on the vocabulary at ``path``."""
    if not path.is_file():
        raise UserError(
            f"BERT vocabulary {str(path)!r} not found: the BERT tokenizer needs bert-base-uncased's vocab.txt (not "
            f"part of LDM checkpoints); put it at {str(DEFAULT_VOCAB_FILE)!r} or give its path as the "
            "cond stage's vocab_file parameter."
        )
    try:
        tokens = set(path.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError as err:
        raise UserError(f"BERT vocabulary {str(path)!r} is not UTF-8 text ({err}); use bert-base-uncased's.") from None
    # Checked here: the tokenizers library reports a missing special token as a TypeError.
    missing = [token for token in SPECIAL_TOKENS if token not in tokens]
    if missing:
        raise UserError(
            f"BERT vocabulary {str(path)!r} lacks {', '.join(missing)}: it is not a BERT vocab.txt; use "
            "bert-base-uncased's."
        )
    return BertWordPieceTokenizer(str(path), lowercase=True)
