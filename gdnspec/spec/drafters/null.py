"""The drafter that drafts nothing: a session with it decodes plainly (`SpecSession.step(speculate=False)`, one target
forward per token, as generate_autoregressive), so plain and speculative decoding share one slot pool (the server's
`--drafter none`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.spec.tree import DraftTree, TreeConfig


@dataclass
class NullDraftState:
    rows: int

    def select(self, rows) -> "NullDraftState":
        return NullDraftState(len(rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)))

    @staticmethod
    def cat(states: list["NullDraftState"]) -> "NullDraftState":
        return NullDraftState(sum(s.rows for s in states))


class NullDrafter:
    needs_target_hidden = False
    drafts_on_host = True
    vocab_size = None
    plain = True  # a session with this drafter only makes plain steps

    def begin(self, prompts: list[torch.Tensor], *, target_hidden=None) -> NullDraftState:
        return NullDraftState(len(prompts))

    def propose(self, state: NullDraftState, root_tokens: torch.Tensor, config: TreeConfig) -> DraftTree:
        """The root alone (a verify step of it is a plain decode step)."""
        B = root_tokens.shape[0]
        dev = root_tokens.device
        return DraftTree(root_tokens.reshape(B, 1).long(), torch.full((B, 1), -1, dtype=torch.long, device=dev),
                         torch.zeros(B, 1, device=dev), torch.ones(B, 1, dtype=torch.bool, device=dev))

    def advance(self, state: NullDraftState, *, tokens: torch.Tensor, counts: torch.Tensor, target_hidden=None) -> None:
        pass
