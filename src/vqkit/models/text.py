"""Caption tokenizers for text-conditioned token priors.

The default, ``"bytes"``, needs no vocabulary file and no download: a caption is its UTF-8 bytes, each shifted past
the special tokens, framed by BOS ... EOS and padded with PAD to a fixed length. Priors put these fixed-length
caption tokens before the image tokens, so every sequence in a batch has the same layout.
"""

from __future__ import annotations

import torch

TEXT_VOCABS = ("bytes",)


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: ids 0..2 are PAD, BOS, EOS; byte b is id b + 3 (vocab_size 259)."""

    PAD, BOS, EOS = 0, 1, 2
    NUM_SPECIAL = 3
    vocab_size = 256 + NUM_SPECIAL
    name = "bytes"

    def encode(self, text: str, max_len: int) -> list[int]:
        """``[BOS, bytes..., EOS, PAD...]`` of length ``max_len``; bytes past ``max_len - 2`` are cut off."""
        if not isinstance(text, str):
            raise ValueError(f"a caption must be a str, got {type(text).__name__}")
        if max_len < 2:
            raise ValueError(f"max_len must leave room for BOS and EOS (>= 2), got {max_len}")
        body = [b + self.NUM_SPECIAL for b in text.encode("utf-8")[: max_len - 2]]
        ids = [self.BOS, *body, self.EOS]
        return ids + [self.PAD] * (max_len - len(ids))

    def encode_batch(self, texts: list[str], max_len: int) -> torch.Tensor:
        """int64 [len(texts), max_len]."""
        return torch.tensor([self.encode(t, max_len) for t in texts], dtype=torch.long).reshape(len(texts), max_len)

    def decode(self, ids) -> str:
        """The text between BOS and the first EOS (special tokens dropped; a cut-off multi-byte char is replaced)."""
        out = bytearray()
        for i in (int(i) for i in ids):
            if i == self.EOS:
                break
            if i >= self.NUM_SPECIAL:
                out.append(i - self.NUM_SPECIAL)
        return out.decode("utf-8", errors="replace")


def make_text_tokenizer(name: str) -> ByteTokenizer:
    """The caption tokenizer called ``name`` (one of TEXT_VOCABS)."""
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown text_vocab {name!r}; use one of {TEXT_VOCABS}")
