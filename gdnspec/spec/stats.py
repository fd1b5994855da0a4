"""Speculative decoding statistics, accumulated per verify step and row.

    total_steps            target verify forwards (batched rows count once per step)
    total_row_steps        (row, step) pairs: how many sequence-steps were verified
    total_draft_tokens     drafted (valid, non-root) tree nodes offered to the target
    total_accepted_tokens  drafted tokens accepted (bonus tokens excluded)
    total_emitted_tokens   tokens produced by verify steps (accepted + bonus)
    mean_accept_length     emitted tokens per sequence-step = tokens per target forward, bonus included
    mean_acceptance_rate   accepted drafted tokens / drafted tokens
    accept_length_histogram  {accept length: count of sequence-steps}
    acceptance_by_depth    {depth d: fraction of sequence-steps whose accepted path reached depth d}
    speedup_ratio          = mean_accept_length (tokens per target forward). NOT a wall-clock speedup: that is only
                           reported by benchmarks that time generate_autoregressive on the same inputs.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SpecStats:
    total_steps: int = 0
    total_row_steps: int = 0
    total_draft_tokens: int = 0
    total_accepted_tokens: int = 0
    total_emitted_tokens: int = 0
    histogram: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, *, drafted: list[int], accepted: list[int], emitted: list[int]) -> None:
        """One verify step: per row, drafted nodes, accepted draft tokens and emitted tokens (thread-safe)."""
        with self._lock:
            self._record(drafted, accepted, emitted)

    def _record(self, drafted: list[int], accepted: list[int], emitted: list[int]) -> None:
        self.total_steps += 1
        self.total_row_steps += len(drafted)
        self.total_draft_tokens += sum(drafted)
        self.total_accepted_tokens += sum(accepted)
        self.total_emitted_tokens += sum(emitted)
        self.histogram.update(a + 1 for a in accepted)

    def as_dict(self) -> dict:
        rs = max(self.total_row_steps, 1)
        mean_len = self.total_emitted_tokens / rs
        max_len = max(self.histogram, default=0)
        by_depth = {d: sum(c for L, c in self.histogram.items() if L - 1 >= d) / rs for d in range(1, max_len)}
        return {
            "total_steps": self.total_steps,
            "total_row_steps": self.total_row_steps,
            "total_draft_tokens": self.total_draft_tokens,
            "total_accepted_tokens": self.total_accepted_tokens,
            "total_emitted_tokens": self.total_emitted_tokens,
            "mean_accept_length": mean_len,
            "mean_acceptance_rate": self.total_accepted_tokens / max(self.total_draft_tokens, 1),
            "accept_length_histogram": dict(sorted(self.histogram.items())),
            "acceptance_by_depth": by_depth,
            "speedup_ratio": mean_len,
        }
