"""The seed's API, same names, on top of the engine (gdnspec.spec.engine):

    GDNDraftWorker(draft_model, topk=4, num_steps=2, num_draft_tokens=None)
        .draft_step(input_ids, past_state=None) -> (scores (B, topk), token_ids (B, topk), hidden_states (B, T, H), past_state)
        .generate_draft_tree(input_ids, verified_id) -> (draft_tokens (B, N-1), parent_list (B, N-1), top_scores_index (B, N-1))
    GDNVerifyWorker(target_model)
        .verify(verified_id, draft_tokens, parent_list, seq_lens, *, state=None) -> (accepted_tokens (B, L), accept_length (B,))
    GDNSpeculativeWorker(draft_model=None, target_model=..., topk=4, num_steps=2, num_draft_tokens=None, device=None, drafter=None)
        .generate_step(input_ids, verified_id, seq_lens, temperature=0.0) -> (accepted_tokens (B, L), accept_length (B,))
        .generate(input_ids, max_new_tokens, temperature=0.0, eos_token_id=None, top_k=None, top_p=None)
        .get_statistics() / .reset_statistics()

parent_list indexes the full node list (0 = the root = verified_id, drafted node j is node j + 1).
accepted_tokens rows hold the accepted draft tokens then the bonus token, padded with -1; accept_length counts
them (>= 1: tokens emitted per target forward).
"""
from __future__ import annotations

import torch

from gdnspec.generate import check_model, normalize_prompts
from gdnspec.spec.accept import accept_greedy, accept_sampling
from gdnspec.spec.drafters.base import check_drafter
from gdnspec.spec.drafters.model import ModelDraftState, ModelDrafter, prefill_rows
from gdnspec.spec.engine import SpeculativeEngine
from gdnspec.spec.stats import SpecStats
from gdnspec.spec.tree import DraftTree, TreeConfig


def _move(model, device):
    return model if device is None else model.to(device)


def _prompts_from(input_ids: torch.Tensor, seq_lens) -> list[torch.Tensor]:
    """Rows of a right-padded (B, T) tensor cut at seq_lens (None = full rows)."""
    if seq_lens is None:
        return list(input_ids)
    seq_lens = torch.as_tensor(seq_lens).tolist()
    if len(seq_lens) != input_ids.shape[0]:
        raise ValueError(f"seq_lens has {len(seq_lens)} entries, input_ids has {input_ids.shape[0]} rows")
    for b, n in enumerate(seq_lens):
        if not (1 <= n <= input_ids.shape[1]):
            raise ValueError(f"seq_lens[{b}] = {n} must be in [1, {input_ids.shape[1]}]")
    return [input_ids[b, :n] for b, n in enumerate(seq_lens)]


def _pad_rows(rows: list[list[int]], device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class GDNDraftWorker(ModelDrafter):
    """The seed's draft worker: a small GDN LM drafting trees (also a Drafter for the engine)."""

    def __init__(self, draft_model, topk: int = 4, num_steps: int = 2, num_draft_tokens: int | None = None, device=None,
                 builder: str = "eagle2"):
        check_model(draft_model, "draft_model")
        super().__init__(_move(draft_model, device))
        self.tree_config = TreeConfig(topk=topk, num_steps=num_steps, num_draft_tokens=num_draft_tokens, builder=builder)
        if topk > draft_model.vocab_size:
            raise ValueError(f"topk ({topk}, children per tree node) is larger than the draft model's vocabulary "
                             f"({draft_model.vocab_size} tokens)")
        self.topk = self.tree_config.topk

    @torch.inference_mode()
    def draft_step(self, input_ids: torch.Tensor, past_state=None):
        """Run input_ids (B, T) from past_state; returns (softmax scores (B, topk) of the last position, token_ids (B, topk),
        hidden_states (B, T, hidden) before the final norm, the advanced state)."""
        out = self.model(input_ids.to(self.model.device), past_state, logits_to_keep=1)
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        scores, token_ids = probs.topk(self.topk, dim=-1)
        return scores, token_ids, out.hidden_states, out.state

    @torch.inference_mode()
    def generate_draft_tree(self, input_ids: torch.Tensor, verified_id: torch.Tensor, seq_lens=None):
        """Draft a tree after the context input_ids (B, T) (right-padded rows cut at seq_lens) from root verified_id (B,)."""
        prompts, _ = normalize_prompts(_prompts_from(input_ids, seq_lens), vocab_size=self.vocab_size)
        state = ModelDraftState(prefill_rows(self.model, prompts))
        tree, index = self.propose_with_index(state, verified_id.to(self.model.device), self.tree_config)
        return tree.tokens[:, 1:], tree.parents[:, 1:], index - 1


class GDNVerifyWorker:
    """The seed's verify worker: one target pass over the tree, acceptance against the target."""

    def __init__(self, target_model, device=None):
        check_model(target_model, "target_model")
        self.target = _move(target_model, device)

    @torch.inference_mode()
    def verify(self, verified_id: torch.Tensor, draft_tokens: torch.Tensor, parent_list: torch.Tensor, seq_lens=None, *,
               state=None, temperature: float = 0.0, top_k=None, top_p=None, commit: bool = False):
        """Verify drafted nodes (B, N-1) hanging from roots verified_id (B,).

        state: the target's committed ModelState for these rows (None = an empty prefix). seq_lens, when given with a
        state whose model has attention layers, must equal the cached lengths. With commit=True the state is advanced
        over the accepted path. Returns (accepted_tokens (B, L) padded with -1, accept_length (B,)).
        """
        B = verified_id.shape[0]
        if draft_tokens.dim() != 2 or draft_tokens.shape[0] != B or tuple(parent_list.shape) != tuple(draft_tokens.shape):
            raise ValueError(f"draft_tokens and parent_list must both be (B, N-1) with B = {B}, got "
                             f"{tuple(draft_tokens.shape)} and {tuple(parent_list.shape)}")
        dev = self.target.device
        tokens = torch.cat([verified_id.view(B, 1), draft_tokens], 1).long().to(dev)
        parents = torch.cat([torch.full((B, 1), -1, dtype=torch.long), parent_list.long().cpu()], 1).to(dev)
        tree = DraftTree(tokens, parents, torch.zeros(tokens.shape, device=dev), torch.ones(tokens.shape, dtype=torch.bool, device=dev))
        tree.validate(self.target.vocab_size)
        if state is None:
            state = self.target.new_state(B)
        if seq_lens is not None:
            from gdnspec.cache import KVCache
            want = torch.as_tensor(seq_lens, device=dev)
            for layer_state in state.layers:
                if isinstance(layer_state, KVCache) and not torch.equal(layer_state.lengths, want):
                    raise ValueError(f"seq_lens {want.tolist()} do not match the state's cached lengths {layer_state.lengths.tolist()}")
        layout = tree.layout()
        ver = self.target.forward_tree(tokens, state=state, layout=layout)
        if temperature == 0:
            acc = accept_greedy(tree, ver.logits, layout)
        else:
            acc = accept_sampling(tree, ver.logits, layout, temperature=temperature, top_k=top_k, top_p=top_p)
        if commit:
            self.target.commit_tree(state, ver, path=acc.path, counts=acc.counts, all_rows_accept=True)
        return _pad_rows(acc.emitted(tree), dev), acc.counts


class GDNSpeculativeWorker:
    """The seed's speculative worker: draft model (or any drafter) + target, lossless tree speculative decoding."""

    def __init__(self, draft_model=None, target_model=None, topk: int = 4, num_steps: int = 2, num_draft_tokens: int | None = None,
                 device=None, drafter=None, builder: str = "eagle2", dynamic_topk_mass: float | None = None,
                 min_frontier_prob: float | None = None):
        if target_model is None:
            raise ValueError("target_model is required")
        if (draft_model is None) == (drafter is None):
            raise ValueError("give exactly one of draft_model (a small LM) or drafter (any drafter object, e.g. NGramDrafter())")
        check_model(target_model, "target_model")
        if draft_model is not None:
            check_model(draft_model, "draft_model")
        else:
            check_drafter(drafter)
        self.target = _move(target_model, device)
        self.drafter = ModelDrafter(_move(draft_model, device)) if draft_model is not None else drafter
        self.tree_config = TreeConfig(topk=topk, num_steps=num_steps, num_draft_tokens=num_draft_tokens, builder=builder,
                                      dynamic_topk_mass=dynamic_topk_mass, min_frontier_prob=min_frontier_prob)
        self.verify_worker = GDNVerifyWorker(self.target)
        self._engine = SpeculativeEngine(self.target, self.drafter, self.tree_config)  # validates vocab sizes
        self.stats = SpecStats()

    def _engine_for(self, temperature, top_k, top_p, generator=None) -> SpeculativeEngine:
        eng = SpeculativeEngine(self.target, self.drafter, self.tree_config, temperature=temperature, top_k=top_k,
                                top_p=top_p, generator=generator)
        eng.stats = self.stats
        return eng

    @torch.inference_mode()
    def generate_step(self, input_ids: torch.Tensor, verified_id: torch.Tensor, seq_lens=None, temperature: float = 0.0):
        """One speculative step after the context input_ids (B, T) (rows cut at seq_lens) with roots verified_id (B,).

        Returns (accepted_tokens (B, L) padded with -1: accepted drafts + bonus, accept_length (B,))."""
        eng = self._engine_for(temperature, None, None)
        prompts, _ = normalize_prompts(_prompts_from(input_ids, seq_lens), vocab_size=self.target.vocab_size)
        session = eng.session()
        ids = session.add(prompts, max_new_tokens=1 << 30)
        session.verified = verified_id.to(self.target.device).long()  # the caller's root replaces the prefill's own
        for i in ids:
            session.sequences[i].new_tokens.clear()
        new = session.step()
        rows = [new[i] for i in ids]
        return _pad_rows(rows, self.target.device), torch.tensor([len(r) for r in rows], device=self.target.device)

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | list[int] | None = None, top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None):
        """Same inputs and outputs as gdnspec.generate_autoregressive (eos_token_id: one id or a list of stop ids);
        greedy output is identical to it."""
        return self._engine_for(temperature, top_k, top_p, generator).generate(input_ids, max_new_tokens, eos_token_id)

    def get_statistics(self) -> dict:
        """See gdnspec.spec.stats: speedup_ratio is tokens per target forward (mean_accept_length), not wall-clock."""
        return self.stats.as_dict()

    def reset_statistics(self) -> None:
        self.stats = SpecStats()
