"""Oracle drafter for benchmarks: proposes the target's own greedy continuation, corrupted at a chosen rate.

With error rate e and a chain of k drafts, the expected tokens per target forward is sum_{i=0..k} (1 - e)^i, so a
benchmark can plot speedup against tokens per forward with drafting cost ~0 (it isolates verify cost).

    refs = generate_autoregressive(target, prompts, n)              # the greedy continuations
    drafter = OracleDrafter(refs, error_rate=0.1, vocab_size=V)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.spec.tree import DraftTree, TreeConfig


@dataclass
class OracleDraftState:
    refs: list[list[int]]
    committed: list[int]  # tokens consumed by the target per row

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
        k = config.num_draft_tokens - 1
        rows = []
        for ref, pos in zip(state.refs, state.committed):
            chain = ref[pos + 1: pos + 1 + min(k, config.num_steps)]  # pos = the root's position
            flips = torch.rand(len(chain), generator=self.generator) < self.error_rate
            chain = [(t + 1) % self.vocab_size if f else t for t, f in zip(chain, flips.tolist())]
            rows.append([(t, i, 0.0) for i, t in enumerate(chain)])  # node i + 1 hangs from node i
        return DraftTree.from_lists(root_tokens.tolist(), rows, num_nodes=config.num_draft_tokens, device=root_tokens.device)

    def advance(self, state: OracleDraftState, *, tokens: torch.Tensor, counts: torch.Tensor, target_hidden=None) -> None:
        for i, c in enumerate(counts.tolist()):
            state.committed[i] += c
