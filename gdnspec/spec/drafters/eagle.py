"""EAGLE-style drafter: a one-layer GDN head that reads the target's features (gdnspec.models.eagle.EagleHead).

At each draft node the head takes (feature of the parent, embedding of the node's token) and predicts the node's
feature, whose logits (the target's norm + lm_head) propose the node's children. The root's parent feature is the
target's own hidden state of the last committed token. Per frontier node the drafter keeps the head's (small,
fixed-size) GDN state and predicted feature, gathered by parent at each expansion, like the model drafter.

After verification, `advance` feeds the head the TRUE target features of the committed tokens:
pairs (f_last, x_root), (f_root, x_1), ..., (f_{c-2}, x_{c-1}) in one chain pass, each row committing its own count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gdnspec.cache import ModelState
from gdnspec.concurrency import static_lock
from gdnspec.sampling import RowSampling
from gdnspec.spec.tree import DraftLogits, DraftTree, TreeConfig, build_tree, frontier_rows


@dataclass
class EagleDraftState:
    head_state: ModelState  # the head's one GDN layer, one row per sequence
    last_feature: torch.Tensor  # (B, H) target hidden state of the last committed token

    def select(self, rows) -> "EagleDraftState":
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.last_feature.device)
        return EagleDraftState(self.head_state.select(rows), self.last_feature[rows].clone())

    @staticmethod
    def cat(states: list["EagleDraftState"]) -> "EagleDraftState":
        return EagleDraftState(ModelState.cat([s.head_state for s in states]), torch.cat([s.last_feature for s in states]))

    def clone(self) -> "EagleDraftState":
        return EagleDraftState(self.head_state.clone(), self.last_feature.clone())

    def copy_(self, other: "EagleDraftState") -> None:
        self.head_state.copy_(other.head_state)
        self.last_feature.copy_(other.last_feature)


class EagleDrafter:
    needs_target_hidden = True
    supports_cuda_graph = True
    supports_draft_sampling = True  # propose(..., draft=RowSampling): stochastic trees carrying q (tree.py)

    PREFILL_CHUNK = 64  # prompt pairs per fused catch-up in begin() (EagleHead.catch_up's fused path takes <= 64)

    def __init__(self, head, target):
        if head.hidden_size != target.config.hidden_size:
            raise ValueError(f"EAGLE head hidden size {head.hidden_size} != target hidden size {target.config.hidden_size}")
        self.head, self.target = head, target

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        dev = self.target.device
        return self.target.embed_tokens(tokens if tokens.device == dev else tokens.to(dev))

    def _run_chain(self, state: ModelState, features: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor, *,
                   last: torch.Tensor | None = None) -> None:
        """Advance the head state over pairs (features[:, i], tokens[:, i]), i < counts[b], all rows in one pass
        (last: (counts - 1).clamp(min=0) when the caller has it)."""
        self.head.catch_up_ids(features, tokens, state, counts=counts, target=self.target, last=last)

    @torch.inference_mode()
    def begin(self, prompts: list[torch.Tensor], *, target_hidden: list[torch.Tensor] | None = None) -> EagleDraftState:
        if target_hidden is None:
            raise ValueError("the EAGLE drafter needs the target's hidden states of the prompts (target_hidden)")
        B = len(prompts)
        head = self.head
        state = head.new_state(B)
        last = torch.stack([h[-1] for h in target_hidden]).to(head.dtype)
        for i, (p, h) in enumerate(zip(prompts, target_hidden)):
            if p.numel() < 2:
                continue
            sub = head.new_state(1)
            feats = h[None, :-1].to(head.dtype)  # pairs (f_t, x_{t+1})
            if head.fused_catch_up_ok(feats[:, :self.PREFILL_CHUNK], sub, target=self.target):
                # the fused catch-up (~20 kernels per 64 pairs) instead of the module forward's eager chunk kernels:
                # the same recurrence (EagleHead.catch_up), a few ms less per prompt on the GPU
                ids = p[None, 1:].to(self.target.device)
                graphed = self._graphed_begin()
                if graphed is not None:  # CUDA: one graph replay per chunk (runtime.StaticEagleBegin)
                    with static_lock(self.target):
                        state.assign_rows_([i], graphed.run(feats, ids))
                    continue
                for c0 in range(0, ids.shape[1], self.PREFILL_CHUNK):
                    f, t = feats[:, c0:c0 + self.PREFILL_CHUNK], ids[:, c0:c0 + self.PREFILL_CHUNK]
                    counts = torch.full((1,), t.shape[1], dtype=torch.long, device=t.device)
                    head.catch_up_ids(f, t, sub, counts=counts, target=self.target)
            else:
                head(feats, self._embed(p[None, 1:]), sub)
            state.assign_rows_([i], sub)
        return EagleDraftState(state, last)

    def _graphed_begin(self):
        """The cached runtime.StaticEagleBegin of this drafter on CUDA (rebuilt when the head's or the target
        embedding's tensors were replaced), or None (CPU, or GDNSPEC_PREFILL_GRAPH=0)."""
        if self.head.device.type != "cuda" or os.environ.get("GDNSPEC_PREFILL_GRAPH") == "0":
            return None
        from gdnspec.runtime import StaticEagleBegin  # the runtime layer sits above the drafters: imported on use

        with static_lock(self.target):
            begin = getattr(self, "_begin_static", None)
            if begin is None or not begin.current():
                begin = self._begin_static = StaticEagleBegin(self.head, self.target, chunk=self.PREFILL_CHUNK)
            return begin

    def new_static_state(self, batch_size: int, *, kv_capacity: int) -> EagleDraftState:
        return EagleDraftState(self.head.new_state(batch_size),
                               torch.zeros(batch_size, self.head.hidden_size, dtype=self.head.dtype, device=self.head.device))

    def load_static_rows_(self, static: EagleDraftState, rows: list[int], state: EagleDraftState) -> None:
        static.head_state.assign_rows_(rows, state.head_state)
        static.last_feature[rows] = state.last_feature

    @torch.inference_mode()
    def propose(self, state: EagleDraftState, root_tokens: torch.Tensor, config: TreeConfig, *, sync_free: bool = False,
                draft: RowSampling | None = None) -> DraftTree:
        """draft: per-row sampling settings + uniforms for stochastic trees (config.sample_drafts; see tree.py)."""
        head = self.head
        B = root_tokens.shape[0]
        # the committed state is only read: the first expansion writes a new state (select_deferred: on the fused
        # path the GDN decode kernel reads the committed rows, no clone copies), later ones gather their parents'
        # states and features inside their kernels the same way (no index_select / gather launches)
        cur = {"state": state.head_state, "feat": state.last_feature[:, None], "width": 1, "owned": False}

        def expand(frontier_tokens: torch.Tensor, parent_slot: torch.Tensor | None, *,
                   parent_rows: torch.Tensor | None = None) -> DraftLogits:
            F = frontier_tokens.shape[1]
            prev_state, prev_feat = cur["state"], cur["feat"]  # (B * width rows), (B, width, H)
            rows = None
            if parent_slot is not None:
                rows = frontier_rows(parent_slot, cur["width"], parent_rows)  # (B * F,)
                prev_state = prev_state.select_deferred(rows)
            elif not cur["owned"]:
                prev_state = prev_state.select_deferred(None)
            ids = frontier_tokens.reshape(B * F, 1)
            out, logits = head.decode_step_ids(prev_feat.reshape(-1, 1, prev_feat.shape[-1]), ids if ids.device ==
                                               self.target.device else ids.to(self.target.device), prev_state,
                                               target=self.target, hidden_rows=rows)  # prev_state advanced in place
            cur["state"], cur["feat"], cur["width"], cur["owned"] = prev_state, out.view(B, F, -1), F, True
            # over draft_ids (reduced draft vocab): the builder maps the ranked columns to the target's ids
            return DraftLogits(logits.view(B, F, -1), head.config.vocab_size, head.draft_ids)

        expand.takes_parent_rows = True  # build_tree's fused frontier kernel hands over the rows
        roots = root_tokens if root_tokens.device == head.device else root_tokens.to(head.device)
        return build_tree(roots, expand, config, sync_free=sync_free, draft=draft)[0]

    @torch.inference_mode()
    def advance(self, state: EagleDraftState, *, tokens: torch.Tensor, counts: torch.Tensor,
                target_hidden: torch.Tensor | None = None, sync_free: bool = False) -> None:
        if target_hidden is None:
            raise ValueError("the EAGLE drafter needs the target's hidden states of the committed tokens")
        h = target_hidden.to(self.head.dtype)  # (B, L, H)
        features = torch.cat([state.last_feature[:, None], h[:, :-1]], dim=1)  # the feature before each token
        last = (counts.to(h.device) - 1).clamp(min=0)  # (B,) each row's last committed token
        self._run_chain(state.head_state, features, tokens, counts, last=last)
        B, H = state.last_feature.shape
        idx = last[:, None, None].expand(B, 1, H)
        if state.last_feature.is_contiguous():  # one gather into the buffer (CUDA graphs keep its address)
            torch.gather(h, 1, idx, out=state.last_feature.view(B, 1, H))
        else:
            state.last_feature.copy_(h.gather(1, idx).squeeze(1))
