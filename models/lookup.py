"""Draft tokens for decoding by prompt lookup.

A generation often repeats what its context already holds: a summary or an answer quotes its
source, edited code copies the code it was given, a small model repeats its own phrases.  So the
tokens that followed the last earlier occurrence of the context's final n tokens are a cheap guess
at what comes next.  The decoder feeds those guesses together with its next token in one forward
pass (a few rows cost little more than one while a decode step streams its weights from memory),
and keeps the guesses up to the first that its own choice rejects.  Every kernel computes a row
the same way whatever else is in the pass, and a sampled token takes one uniform draw of the
generation's random stream whatever was drafted, so the generation is token for token the one
without drafts, greedy or seeded; only the number of passes changes.  A sampled generation keeps
a drafted token with the probability the model gives it, which is what speculative sampling
accepts for a guess made with certainty.
"""

from __future__ import annotations


class PromptLookup:
    """The n-grams (n_min <= n <= n_max) of a growing token sequence, each with the position after
    its latest occurrence, so that the tokens that followed the sequence's current suffix last time
    are found in O(n_max) whatever the sequence's length."""

    __slots__ = ("ids", "n_min", "n_max", "_after")

    def __init__(self, ids=(), n_min: int = 2, n_max: int = 3):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"prompt lookup needs 1 <= n_min <= n_max, got {n_min} and {n_max}")
        self.ids: list[int] = []
        self.n_min, self.n_max = n_min, n_max
        self._after: dict[tuple, int] = {}     # n-gram -> the position after its latest occurrence
        self.extend(ids)

    def extend(self, ids) -> None:
        """Append tokens.  An n-gram is indexed once a token follows it, so that the suffix being
        looked up never finds itself."""
        seq, after = self.ids, self._after
        for tok in ids:
            seq.append(tok)
            end = len(seq) - 1                   # the n-grams ending just before the new token
            for n in range(self.n_min, min(self.n_max, end) + 1):
                after[tuple(seq[end - n:end])] = end

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix (of at
        most n_max tokens, at least n_min) seen before; [] if there is none."""
        seq = self.ids
        if k <= 0:
            return []
        for n in range(min(self.n_max, len(seq)), self.n_min - 1, -1):
            at = self._after.get(tuple(seq[len(seq) - n:]))
            if at is not None:
                return seq[at:at + k]
        return []


class DraftLength:
    """How many tokens a generation drafts in its next pass.  It starts at `shortest`, drafts one
    token more after a draft that held to its end (`longest` at most) and falls back to what held
    plus one (`shortest` at least) after a miss: long drafts are tried only while the text keeps
    repeating its context, as a pass costs more with every row once it no longer only streams its
    weights from memory.  After MISSES_BEFORE_PAUSE drafts in a row of which nothing held, it
    drafts nothing for 1, 2, 4, ... passes (PAUSE_MAX at most) until a draft holds again: a
    sampled generation at a high temperature seldom follows its context."""

    MISSES_BEFORE_PAUSE = 2
    PAUSE_MAX = 16
    __slots__ = ("k", "shortest", "longest", "misses", "paused")

    def __init__(self, shortest: int, longest: int):
        self.k = self.shortest = min(shortest, longest)
        self.longest = longest
        self.misses = 0             # drafts in a row of which nothing held
        self.paused = 0             # passes left without a draft

    def next(self) -> int:
        """The next pass's draft length (0 while paused)."""
        if self.paused:
            self.paused -= 1
            return 0
        return self.k

    def checked(self, n: int, held: int) -> None:
        """The last pass checked n drafted tokens and its choices confirmed the first `held`."""
        if n == 0:
            return
        self.k = min(self.longest, self.k + 1) if held == n else max(self.shortest, min(self.k, held + 1))
        self.misses = self.misses + 1 if held == 0 else 0
        if self.misses >= self.MISSES_BEFORE_PAUSE:       # (the shift bounded for very long generations)
            self.paused = min(self.PAUSE_MAX, 1 << min(self.misses - self.MISSES_BEFORE_PAUSE, 30))
