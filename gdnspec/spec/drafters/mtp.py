"""Drafting with a checkpoint's own MTP module (Qwen3-Next / Qwen3.5 `mtp.*` weights), chained or as a tree.

    drafter = MTPDrafter(target_model, mtp_module)        # mtp_module from gdnspec.models.hf.load_hf
    GDNSpeculativeWorker(target_model=target_model, drafter=drafter, topk=4, num_steps=3).generate(ids, 64)

The MTP layer consumes pairs (target hidden at token t, token t+1); its KV cache holds one entry per pair the target
has committed, and the state keeps the target hidden of the last committed token ("pending"), which pairs with the
root of the next draft. Proposing step 1 runs (pending, root); step j > 1 runs (MTP output of the parent node, node
token). Each frontier node has its own copy of the KV cache rows (`ModelState.select` gathers the parent's rows), so
tree drafting is exact per path. Needs the target's hidden states (before its final norm): needs_target_hidden = True.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.cache import ModelState
from gdnspec.sampling import RowSampling
from gdnspec.spec.tree import DraftTree, TreeConfig, build_tree, frontier_rows


@dataclass
class MTPDraftState:
    kv: ModelState  # committed MTP KV cache, one row per sequence
    pending: torch.Tensor  # (B, hidden) target hidden (before its final norm) of the last committed token

    def select(self, rows) -> "MTPDraftState":
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.pending.device)
        return MTPDraftState(self.kv.select(rows_t), self.pending[rows_t].clone())

    @staticmethod
    def cat(states: list["MTPDraftState"]) -> "MTPDraftState":
        return MTPDraftState(ModelState.cat([s.kv for s in states]), torch.cat([s.pending for s in states]))


class MTPDrafter:
    needs_target_hidden = True
    supports_draft_sampling = True  # propose(..., draft=RowSampling): stochastic trees carrying q (tree.py)

    def __init__(self, target_model, mtp_module):
        if mtp_module is None:
            raise ValueError("mtp_module is None: the checkpoint has no mtp.* weights")
        if mtp_module.config.hidden_size != target_model.config.hidden_size:
            raise ValueError(f"MTP hidden size {mtp_module.config.hidden_size} != target's {target_model.config.hidden_size}")
        self.target = target_model
        self.mtp = mtp_module

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    # ------------------------------------------------------------------ one MTP step
    def step(self, tokens: torch.Tensor, hidden: torch.Tensor, kv: ModelState) -> torch.Tensor:
        """Like `step_normed`, with hidden (B, T, H) the target's hidden BEFORE its final norm."""
        return self.step_normed(tokens, self.target.norm(hidden), kv)

    def step_normed(self, tokens: torch.Tensor, hidden_normed: torch.Tensor, kv: ModelState) -> torch.Tensor:
        """Run T pairs (hidden_normed[:, t], tokens[:, t]) as a causal chain after `kv` (appended in place).
        Returns the MTP outputs (B, T, H) (final-normed; logits = target.lm_head(out))."""
        embeds = self.target.embed_tokens(tokens.to(self.target.device))
        return self.mtp(embeds, hidden_normed.to(embeds.dtype), kv)

    def logprobs(self, out: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.target.lm_head(out).float(), dim=-1)

    # ------------------------------------------------------------------ Drafter protocol
    @torch.inference_mode()
    def begin(self, prompts: list[torch.Tensor], *, target_hidden: list[torch.Tensor] | None = None) -> MTPDraftState:
        if target_hidden is None or len(target_hidden) != len(prompts):
            raise ValueError("MTPDrafter.begin needs target_hidden: one (T, hidden) tensor per prompt")
        device = self.target.device
        hs = [h.reshape(-1, h.shape[-1]).to(device) for h in target_hidden]
        for i, (p, h) in enumerate(zip(prompts, hs)):
            if h.shape[0] != p.numel():
                raise ValueError(f"target_hidden[{i}] has {h.shape[0]} positions, prompt {i} has {p.numel()} tokens")
        kv = self.mtp.new_state(len(prompts))
        pending = torch.stack([h[-1] for h in hs])
        same = len({p.numel() for p in prompts}) == 1
        if same and prompts[0].numel() > 1:
            self.step(torch.stack([p[1:] for p in prompts]).to(device), torch.stack([h[:-1] for h in hs]), kv)
        elif not same:
            for i, (p, h) in enumerate(zip(prompts, hs)):
                if p.numel() > 1:
                    sub = self.mtp.new_state(1)
                    self.step(p[1:].to(device)[None], h[None, :-1], sub)
                    kv.assign_rows_([i], sub)
        return MTPDraftState(kv, pending)

    @torch.inference_mode()
    def propose(self, state: MTPDraftState, root_tokens: torch.Tensor, config: TreeConfig, *,
                draft: RowSampling | None = None) -> DraftTree:
        """draft: per-row sampling settings + uniforms for stochastic trees (config.sample_drafts; see tree.py)."""
        return self.propose_with_index(state, root_tokens, config, draft=draft)[0]

    @torch.inference_mode()
    def propose_with_index(self, state: MTPDraftState, root_tokens: torch.Tensor, config: TreeConfig, *,
                           draft: RowSampling | None = None):
        B = root_tokens.shape[0]
        device = self.target.device
        front = {"kv": state.kv.clone(), "hidden": self.target.norm(state.pending)[:, None], "width": 1}

        def expand(frontier_tokens: torch.Tensor, parent_slot: torch.Tensor | None) -> torch.Tensor:
            F = frontier_tokens.shape[1]
            kv, hidden = front["kv"], front["hidden"]  # hidden (B * width, 1, H)
            if parent_slot is not None:
                rows = frontier_rows(parent_slot.to(device), front["width"])  # (B * F,)
                kv, hidden = kv.select(rows), hidden[rows]
            out = self.step_normed(frontier_tokens.reshape(B * F, 1), hidden, kv)  # (B * F, 1, H)
            front["kv"], front["hidden"], front["width"] = kv, out, F
            return self.logprobs(out[:, -1]).view(B, F, -1)

        return build_tree(root_tokens.to(device), expand, config, draft=draft)

    @torch.inference_mode()
    def advance(self, state: MTPDraftState, *, tokens: torch.Tensor, counts: torch.Tensor,
                target_hidden: torch.Tensor | None = None) -> None:
        """Commit tokens[b, :counts[b]] (root first) with the target hidden at those tokens (B, L, H)."""
        if target_hidden is None:
            raise ValueError("MTPDrafter.advance needs target_hidden (B, L, hidden) at the committed tokens")
        device = self.target.device
        tokens, target_hidden = tokens.to(device), target_hidden.to(device)
        counts_list = counts.tolist()
        # pair j of row b: (hidden of the token before tokens[b, j], tokens[b, j]); the first one is the pending hidden
        hidden_in = torch.cat([state.pending[:, None].to(target_hidden.dtype), target_hidden[:, :-1]], dim=1)  # (B, L, H)
        for c in sorted(set(counts_list)):
            if c == 0:
                continue
            rows = [i for i, n in enumerate(counts_list) if n == c]
            if len(rows) == len(counts_list):
                self.step(tokens[:, :c], hidden_in[:, :c], state.kv)
            else:
                sub = state.kv.select(rows)
                self.step(tokens[rows, :c], hidden_in[rows, :c], sub)
                state.kv.assign_rows_(rows, sub)
            state.pending[rows] = target_hidden[rows, c - 1].to(state.pending.dtype)
