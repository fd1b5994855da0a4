"""A small GDN (or hybrid) language model as drafter: draft trees with one state per frontier node.

The draft model has consumed exactly the tokens the target committed. To propose, it runs the root token from a
copy of that state, takes the topk children, and at each further step gathers the state of each frontier node's
parent (`ModelState.select`) and runs the frontier tokens as one batch of single-token steps. After verification
`advance` runs the committed tokens of each row (different counts per row) from the committed state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.cache import ModelState
from gdnspec.sampling import RowSampling
from gdnspec.spec.tree import DraftTree, TreeConfig, build_tree


@dataclass
class ModelDraftState:
    model_state: ModelState  # committed draft-model state, one row per sequence

    def select(self, rows) -> "ModelDraftState":
        return ModelDraftState(self.model_state.select(rows))

    @staticmethod
    def cat(states: list["ModelDraftState"]) -> "ModelDraftState":
        return ModelDraftState(ModelState.cat([s.model_state for s in states]))

    def clone(self) -> "ModelDraftState":
        return ModelDraftState(self.model_state.clone())

    def copy_(self, other: "ModelDraftState") -> None:
        self.model_state.copy_(other.model_state)


def prefill_rows(model, prompts: list[torch.Tensor]) -> ModelState:
    """State of `model` after each prompt (rows in order; prompts of different lengths run one by one)."""
    device = model.device
    if len({p.numel() for p in prompts}) == 1:
        return model(torch.stack(prompts).to(device), logits_to_keep=1).state
    state = model.new_state(len(prompts))
    for i, p in enumerate(prompts):
        state.assign_rows_([i], model(p.to(device)[None], logits_to_keep=1).state)
    return state


def advance_rows(model, state: ModelState, tokens: torch.Tensor, counts: torch.Tensor, *, sync_free: bool = False) -> None:
    """Run tokens[b, :counts[b]] (B, L) of each row through `model` from `state` (in place), all rows in one pass:
    the L tokens form a chain, verified like a draft tree, and each row commits the state after its counts[b]-th
    token. sync_free=True: no host syncs (KV room must exist; CUDA graphs)."""
    B, L = tokens.shape
    device = model.device
    from gdnspec.layers.layout import TokenLayout

    layout = TokenLayout.chain(B, L, device=device)
    ver = model.forward_tree(tokens.to(device), state=state, layout=layout, validate=not sync_free)
    path = torch.arange(L, device=device).expand(B, L)
    model.commit_tree(state, ver, path=path, counts=counts.to(device), reserve=not sync_free)


class ModelDrafter:
    """Drafts with a small causal LM sharing the target's vocabulary."""

    needs_target_hidden = False

    supports_cuda_graph = True
    supports_draft_sampling = True  # propose(..., draft=RowSampling): stochastic trees carrying q (tree.py)

    def __init__(self, model):
        from gdnspec.generate import check_model

        check_model(model, "draft_model")
        self.model = model

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @torch.inference_mode()
    def begin(self, prompts: list[torch.Tensor], *, target_hidden=None) -> ModelDraftState:
        return ModelDraftState(prefill_rows(self.model, prompts))

    def new_static_state(self, batch_size: int, *, kv_capacity: int) -> ModelDraftState:
        """Preallocated state for static runners (gdnspec.runtime)."""
        return ModelDraftState(self.model.new_state(batch_size, kv_capacity=kv_capacity))

    def load_static_rows_(self, static: ModelDraftState, rows: list[int], state: ModelDraftState) -> None:
        static.model_state.assign_rows_(rows, state.model_state)

    @torch.inference_mode()
    def propose(self, state: ModelDraftState, root_tokens: torch.Tensor, config: TreeConfig, *, sync_free: bool = False,
                draft: RowSampling | None = None) -> DraftTree:
        """draft: per-row sampling settings + uniforms for stochastic trees (config.sample_drafts; see tree.py)."""
        return self.propose_with_index(state, root_tokens, config, sync_free=sync_free, draft=draft)[0]

    @torch.inference_mode()
    def propose_with_index(self, state: ModelDraftState, root_tokens: torch.Tensor, config: TreeConfig, *,
                           sync_free: bool = False, draft: RowSampling | None = None):
        model = self.model
        B = root_tokens.shape[0]
        frontier_state = {"state": state.model_state.clone(), "width": 1}

        def expand(frontier_tokens: torch.Tensor, parent_slot: torch.Tensor | None) -> torch.Tensor:
            F = frontier_tokens.shape[1]
            prev: ModelState = frontier_state["state"]
            if parent_slot is not None:
                rows = (torch.arange(B, device=parent_slot.device)[:, None] * frontier_state["width"] + parent_slot).reshape(-1)
                prev = prev.select(rows)
            ids = frontier_tokens.reshape(B * F, 1)
            out = model(ids if ids.device == model.device else ids.to(model.device), prev, logits_to_keep=1,
                        validate=not sync_free, reserve_kv=not sync_free)
            frontier_state["state"], frontier_state["width"] = out.state, F
            logits = out.logits[:, -1]
            return torch.log_softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1).view(B, F, -1)

        return build_tree(root_tokens.to(model.device), expand, config, sync_free=sync_free, draft=draft)

    @torch.inference_mode()
    def advance(self, state: ModelDraftState, *, tokens: torch.Tensor, counts: torch.Tensor, target_hidden=None,
                sync_free: bool = False) -> None:
        advance_rows(self.model, state.model_state, tokens, counts, sync_free=sync_free)
