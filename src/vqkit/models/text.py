"""Caption tokenizers for text-conditioned token priors.

The default, ``"bytes"``, needs no vocabulary file and no download: a caption is its UTF-8 bytes, each shifted past
the special tokens, framed by BOS ... EOS and padded with PAD to a fixed length. Priors put these fixed-length
caption tokens before the image tokens, so every sequence in a batch has the same layout.

``"words"`` is for captions over a closed vocabulary (such as ``shapes``): one token per lower-cased word or
punctuation mark, the vocabulary read from TRAIN's captions and saved in the prior's config. A small prior learns
"red" as one token far more easily than as three bytes whose positions move with the words before them, and the
caption takes 5x fewer positions; a word it never saw is refused rather than guessed.
"""

from __future__ import annotations

import re

import torch

TEXT_VOCABS = ("bytes", "words")


class FramedTokenizer:
    """What both caption tokenizers share: ids 0..2 are PAD, BOS, EOS; a caption's own ids (``_body``) come framed
    as ``[BOS, ..., EOS, PAD...]`` at a fixed length; ``_text`` turns the ids between BOS and EOS back into text."""

    PAD, BOS, EOS = 0, 1, 2
    NUM_SPECIAL = 3

    def encode(self, text: str, max_len: int) -> list[int]:
        """``[BOS, ids..., EOS, PAD...]`` of length ``max_len``; ids past ``max_len - 2`` are cut off."""
        if not isinstance(text, str):
            raise ValueError(f"a caption must be a str, got {type(text).__name__}")
        if max_len < 2:
            raise ValueError(f"max_len must leave room for BOS and EOS (>= 2), got {max_len}")
        ids = [self.BOS, *self._body(text)[: max_len - 2], self.EOS]
        return ids + [self.PAD] * (max_len - len(ids))

    def encode_batch(self, texts: list[str], max_len: int) -> torch.Tensor:
        """int64 [len(texts), max_len]."""
        return torch.tensor([self.encode(t, max_len) for t in texts], dtype=torch.long).reshape(len(texts), max_len)

    def decode(self, ids) -> str:
        """The text of the ids before the first EOS (special tokens dropped)."""
        body = []
        for i in (int(i) for i in ids):
            if i == self.EOS:
                break
            if i >= self.NUM_SPECIAL:
                body.append(i - self.NUM_SPECIAL)
        return self._text(body)

    def _body(self, text: str) -> list[int]:
        raise NotImplementedError

    def _text(self, body: list[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(FramedTokenizer):
    """UTF-8 byte-level tokenizer: byte b is id b + 3 (vocab_size 259)."""

    vocab_size = 256 + FramedTokenizer.NUM_SPECIAL
    name = "bytes"

    def _body(self, text: str) -> list[int]:
        return [b + self.NUM_SPECIAL for b in text.encode("utf-8")]

    def _text(self, body: list[int]) -> str:
        return bytes(body).decode("utf-8", errors="replace")  # a cut-off multi-byte char is replaced


_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*|[^\w\s]|_")


def split_words(text: str) -> list[str]:
    """Lower-cased words (letters and digits, with inner ' or -) and single punctuation marks."""
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def word_vocabulary(captions) -> list[str]:
    """The sorted distinct words of ``captions``: the vocabulary of a WordTokenizer."""
    return sorted({w for caption in captions for w in split_words(caption)})


class WordTokenizer(FramedTokenizer):
    """One id per word of a fixed vocabulary: word i is id i + 3. A word outside the vocabulary is an error that
    names it (the prior has never seen it, so it cannot follow it)."""

    name = "words"

    def __init__(self, words: list[str]):
        if not words:
            raise ValueError("a word vocabulary needs at least one word")
        self.words = list(words)
        self.ids = {w: i + self.NUM_SPECIAL for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words):
            raise ValueError("the word vocabulary repeats a word")
        self.vocab_size = len(self.words) + self.NUM_SPECIAL

    def _body(self, text: str) -> list[int]:
        words = split_words(text)
        unknown = sorted({w for w in words if w not in self.ids})
        if unknown:
            shown = ", ".join(self.words[:40]) + (" ..." if len(self.words) > 40 else "")
            raise ValueError(f"caption {text!r} uses words this prior never saw: {', '.join(unknown)} "
                             f"(it knows {len(self.words)}: {shown})")
        return [self.ids[w] for w in words]

    def _text(self, body: list[int]) -> str:
        return " ".join(self.words[i] for i in body)


def make_text_tokenizer(name: str, words: list[str] | None = None) -> ByteTokenizer | WordTokenizer:
    """The caption tokenizer called ``name`` (one of TEXT_VOCABS); "words" needs its vocabulary."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "words":
        if not words:
            raise ValueError("text_vocab 'words' needs its vocabulary (text_words)")
        return WordTokenizer(words)
    raise ValueError(f"unknown text_vocab {name!r}; use one of {TEXT_VOCABS}")
