"""Host-side record of the tokens and logprobs each live sample has generated, appended per step in one go.

Every engine step samples one token for each of R rows and brings the tokens, logprobs and stop
flags to the host in one transfer. Appending them to R Python lists would put a per-sequence loop in
every step; instead each live sample owns a row ("slot") of two numpy arrays,

    tokens   int64   [capacity, max_new_tokens]
    logprobs float32 [capacity, max_new_tokens]   (the fp32 values exactly as sampled)

and a step's results go in with one fancy-indexed assignment (`append`). A finished sample's row
becomes plain lists (`take`) and its slot is reused, so the arrays hold only the live samples
(capacity doubles when more are live at once).
"""

from __future__ import annotations

import numpy as np


class TokenHistory:
    def __init__(self, max_new_tokens: int, capacity: int = 64):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens}: expected at least 1")
        if capacity < 1:
            raise ValueError(f"capacity = {capacity}: expected at least 1")
        self.width = max_new_tokens
        self.tokens = np.zeros((capacity, max_new_tokens), dtype=np.int64)
        self.logprobs = np.zeros((capacity, max_new_tokens), dtype=np.float32)
        self.counts = np.zeros(capacity, dtype=np.int64)  # tokens held per slot
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: lowest slot first

    @property
    def capacity(self) -> int:
        return self.counts.shape[0]

    @property
    def num_open(self) -> int:
        return self.capacity - len(self._free)

    def open(self) -> int:
        """A fresh, empty slot for a new sample."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.counts[slot] = 0
        return slot

    def append(self, slots: np.ndarray, tokens: np.ndarray, logprobs: np.ndarray) -> None:
        """One token per slot: tokens[i] (and its logprob) goes to the end of slot slots[i]; slots are distinct."""
        if not (slots.shape == tokens.shape == logprobs.shape) or slots.ndim != 1:
            raise ValueError(
                f"slots {slots.shape}, tokens {tokens.shape}, logprobs {logprobs.shape}: expected three [R] arrays"
            )
        cols = self.counts[slots]  # [R]
        if cols.size and int(cols.max()) >= self.width:
            full = slots[cols >= self.width].tolist()
            raise ValueError(f"slots {full[:5]} already hold max_new_tokens = {self.width} tokens")
        self.tokens[slots, cols] = tokens
        self.logprobs[slots, cols] = logprobs
        self.counts[slots] = cols + 1

    def generated(self, slot: int) -> list[int]:
        return self.tokens[slot, : self.counts[slot]].tolist()

    def last_tokens(self, slots: np.ndarray) -> np.ndarray:
        """The newest token of each slot [R] (every slot holds at least one)."""
        return self.tokens[slots, self.counts[slots] - 1]

    def take(self, slot: int) -> tuple[list[int], list[float]]:
        """A finished sample's tokens and logprobs as lists; the slot is free again afterwards."""
        n = int(self.counts[slot])
        out = self.tokens[slot, :n].tolist(), self.logprobs[slot, :n].tolist()
        self.counts[slot] = 0
        self._free.append(slot)
        return out

    def _grow(self) -> None:
        old = self.capacity
        self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])
        self.logprobs = np.concatenate([self.logprobs, np.zeros_like(self.logprobs)])
        self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
        self._free.extend(range(2 * old - 1, old - 1, -1))
