"""A character tokenizer for the synthetic tasks: one token per character, vocabulary in code.

Every id decodes to exactly one character and back, special tokens included (they use the Unicode
control pictures ␀ ␂ ␃). That bijection is what lets position-wise rewards (the sort task) compare
a decoded completion character by character with the target without any offset bookkeeping.
The vocabulary (52 ids) fits the `tiny` model preset's 64-entry embedding.
"""

from __future__ import annotations

from typing import Sequence

PAD, BOS, EOS = "\u2400", "\u2402", "\u2403"  # ␀ ␂ ␃
_SPECIALS = PAD + BOS + EOS
_CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz :=,.+-*/()?!"
VOCAB = _SPECIALS + _CHARACTERS
UNKNOWN = "\ufffd"  # what an id outside the vocabulary decodes to


class CharTokenizer:
    """`encode`/`decode` over `VOCAB`; pad=0, bos=1, eos=2."""

    def __init__(self) -> None:
        self.vocab = VOCAB
        self._ids = {ch: i for i, ch in enumerate(VOCAB)}
        self.vocab_size = len(VOCAB)
        self.pad_id, self.bos_id, self.eos_id = self._ids[PAD], self._ids[BOS], self._ids[EOS]
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str) -> list[int]:
        ids = []
        for pos, ch in enumerate(text):
            token = self._ids.get(ch)
            if token is None:
                raise ValueError(
                    f"character {ch!r} at position {pos} of {text!r} is not in the character vocabulary: "
                    f"expected one of {_CHARACTERS!r} (text is lower-cased ASCII only)"
                )
            ids.append(token)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # A model whose embedding is wider than the vocabulary (the tiny preset has 64 rows) can sample
        # ids with no character; they decode to U+FFFD so positions still line up with token positions.
        return "".join(self.vocab[t] if 0 <= t < self.vocab_size else UNKNOWN for t in ids)
