"""Oracle drafter for benchmarks: proposes the target's own greedy continuation, corrupted at a chosen rate.

With error rate e and a chain of k drafts, the expected tokens per target forward is sum_{i=0..k} (1 - e)^i, so a
benchmark can plot speedup against tokens per forward with drafting cost ~0 (it isolates verify cost).

    refs = generate_autoregressive(target, prompts, n)              # the greedy continuations
    drafter = OracleDrafter(refs, error_rate=0.1, vocab_size=V)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gdnspec.spec.tree import DraftTree, TreeConfig


@dataclass
class OracleDraftState:
    refs: list[list[int]]
    committed: list[int]  # tokens consumed by the target per row
    # (refs padded (B, Lmax) int64, lengths (B,)) as numpy arrays, built on first use; a cache, not part of the value
    _table: tuple | None = field(default=None, repr=False, compare=False)

    def table(self) -> tuple:
        """The references as one padded numpy array (B, Lmax) and their lengths (B,): propose gathers from it."""
        if self._table is None:
            lengths = np.array([len(r) for r in self.refs], dtype=np.int64)
            refs = np.zeros((len(self.refs), int(lengths.max(initial=0))), dtype=np.int64)  # B = 0 or Lmax = 0 too
            for i, r in enumerate(self.refs):
                refs[i, : len(r)] = r
            self._table = (refs, lengths)
        return self._table

    def select(self, rows) -> "OracleDraftState":
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        return OracleDraftState([self.refs[r] for r in rows], [self.committed[r] for r in rows])

    @staticmethod
    def cat(states: list["OracleDraftState"]) -> "OracleDraftState":
        return OracleDraftState([r for s in states for r in s.refs], [c for s in states for c in s.committed])


class OracleDrafter:
    drafts_on_host = True  # proposes from Python lists: the static engine hands it host tensors (no sync)
    needs_target_hidden = False

    def __init__(self, references, *, error_rate: float = 0.0, vocab_size: int, seed: int = 0):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate!r}")
        self.references = [list(map(int, r)) for r in references]
        self.error_rate, self.vocab_size = error_rate, vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def begin(self, prompts: list[torch.Tensor], *, target_hidden=None) -> OracleDraftState:
        refs = []
        for i, p in enumerate(prompts):
            match = [r for r in self.references if r[: p.numel()] == p.tolist()]
            if not match:
                raise ValueError(f"prompt {i} is not the start of any reference sequence")
            refs.append(match[0])
        return OracleDraftState(refs, [p.numel() for p in prompts])

    def propose(self, state: OracleDraftState, root_tokens: torch.Tensor, config: TreeConfig) -> DraftTree:
        """The chain ref[pos + 1 : pos + 1 + k] below each root (pos = the root's position, k = min(num_steps,
        num_draft_tokens - 1), shorter where the reference ends), each token replaced by (token + 1) % vocab with
        probability error_rate; padded to num_draft_tokens nodes. A few numpy ops whatever the batch (the benchmark's
        drafter must cost ~0: a per-row Python loop took 0.46 ms per step at B = 32 on a 2-core EPYC)."""
        N = config.num_draft_tokens
        k = min(N - 1, config.num_steps)
        refs, lengths = state.table()
        B, L = refs.shape
        idx = np.asarray(state.committed, dtype=np.int64)[:, None] + 1 + np.arange(k)  # (B, k)
        ok = idx < lengths[:, None]  # a prefix of each row
        chain = np.take_along_axis(refs, np.minimum(idx, L - 1), 1) if L else np.zeros((B, k), dtype=np.int64)
        if self.error_rate > 0:
            flips = (torch.rand(B, k, generator=self.generator) < self.error_rate).numpy()
            chain = np.where(flips, (chain + 1) % self.vocab_size, chain)
        valid = np.zeros((B, N), dtype=bool)
        valid[:, 0] = True
        valid[:, 1:k + 1] = ok
        tokens = np.zeros((B, N), dtype=np.int64)
        tokens[:, 0] = root_tokens.cpu().numpy().reshape(B)
        tokens[:, 1:k + 1] = np.where(ok, chain, 0)
        parents = np.zeros((B, N), dtype=np.int64)
        parents[:, 0] = -1
        parents[:, 1:k + 1] = np.where(ok, np.arange(k), 0)  # node i + 1 hangs from node i
        scores = np.where(valid, 0.0, -np.inf).astype(np.float32)
        dev = root_tokens.device
        return DraftTree(*(torch.from_numpy(a).to(dev) for a in (tokens, parents, scores, valid)))

    def advance(self, state: OracleDraftState, *, tokens: torch.Tensor, counts: torch.Tensor, target_hidden=None) -> None:
        for i, c in enumerate(counts.tolist()):
            state.committed[i] += c
