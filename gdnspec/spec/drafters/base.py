"""The drafter interface: every draft source (small model, EAGLE head, MTP head, n-gram) fills the same DraftTree.

A drafter is stateless configuration; its per-sequence state lives in a `DraftState` object that the engine owns:

    dstate = drafter.begin(prompts, target_hidden=...)        # after the target's prefill of the same prompts
    tree   = drafter.propose(dstate, root_tokens, config)       # root_tokens (B,) = verified ids; dstate read
    drafter.advance(dstate, tokens=acc, counts=n, target_hidden=h)   # the tokens the target committed this step
    dstate = dstate.select(rows)                                # drop finished sequences (row order = engine's)
    dstate = type(dstate).cat([a, b])                           # add sequences (rows of a, then of b)

`propose` does not change what the state means: it may fill caches derived from it (the n-gram drafter's per-row
index of the history's n-grams), which `advance` keeps current and `select` / `cat` move to the new state (the source
state's rows then rebuild theirs if used again).

`tokens` (B, L) holds, per row, the committed tokens of this step in order (the root first, then the accepted draft
tokens; counts[b] of them are real); `target_hidden` (B, L, hidden) is the target's hidden state (before its final
norm) at those tokens. Drafters that need target features set `needs_target_hidden = True`.

Stochastic trees (TreeConfig.sample_drafts, when sampling): drafters with `supports_draft_sampling = True` (the model,
EAGLE and MTP drafters) take `propose(..., draft=RowSampling)` and return trees whose children were drawn from q,
carrying q (DraftTree.draft_probs); the others (n-gram, oracle) stay deterministic (q = one-hot). `propose_tree`
is the one call site that knows the difference.
"""
from __future__ import annotations

from typing import Protocol

import torch

from gdnspec.sampling import RowSampling
from gdnspec.spec.tree import DraftTree, TreeConfig


class DraftState(Protocol):
    def select(self, rows: torch.Tensor | list[int]) -> "DraftState": ...

    @staticmethod
    def cat(states: list["DraftState"]) -> "DraftState": ...


class Drafter(Protocol):
    vocab_size: int | None
    needs_target_hidden: bool

    def begin(self, prompts: list[torch.Tensor], *, target_hidden: list[torch.Tensor] | None = None) -> DraftState: ...

    def propose(self, state: DraftState, root_tokens: torch.Tensor, config: TreeConfig) -> DraftTree: ...

    def advance(self, state: DraftState, *, tokens: torch.Tensor, counts: torch.Tensor,
                target_hidden: torch.Tensor | None = None) -> None: ...


def check_drafter(drafter, name: str = "drafter") -> None:
    """Raise TypeError naming `name` unless `drafter` has the Drafter interface (begin / propose / advance)."""
    if all(callable(getattr(drafter, m, None)) for m in ("begin", "propose", "advance")):
        return
    hint = ""
    if isinstance(drafter, torch.nn.Module):
        hint = " (a model drafts through ModelDrafter(model), or pass it as draft_model=)"
    raise TypeError(f"{name} must be a drafter with begin / propose / advance (NGramDrafter(), ModelDrafter(model), "
                    f"bundle.drafters[...]), got {type(drafter).__name__}{hint}")


def propose_tree(drafter, state, root_tokens: torch.Tensor, config: TreeConfig, *, draft: RowSampling | None = None,
                 **kw) -> DraftTree:
    """drafter.propose(...), handing `draft` (per-row sampling settings + uniforms) to drafters that draw stochastic
    trees when config.sample_drafts is set; other drafters (and greedy decoding: draft None) draft as always."""
    if draft is not None and config.sample_drafts and getattr(drafter, "supports_draft_sampling", False):
        return drafter.propose(state, root_tokens, config, draft=draft, **kw)
    return drafter.propose(state, root_tokens, config, **kw)
