"""A small GDN (or hybrid) language model as drafter: draft trees with one state per frontier node.

The draft model has consumed exactly the tokens the target committed. To propose, it runs the root token from a
copy of that state, takes the topk children, and at each further step gathers the state of each frontier node's
parent (`ModelState.select`) and runs the frontier tokens as one batch of single-token steps. After verification
`advance` brings the committed state past the committed tokens of each row (different counts per row).

Catch-up from the proposal's states (eager steps on the CPU, draft models whose layers are all GDN): `propose` keeps
the state after every expanded node (`ModelDraftState.trace`; a chain clones its one state before each step, a tree's
frontier states are the gathered copies it makes anyway). Every committed token but the last was expanded during the
proposal (a node has children in the tree only if it was expanded), so `advance` finds, per row, the deepest
committed token whose state exists, by walking the recorded frontiers (same parent slot, same token: two such nodes
ran the same computation), copies that state in, and runs what is left: at most one token, as a decode step. The
result is the state after the same tokens, computed by single-token steps instead of a chain verify + commit: the
same maths, rounded differently (float64: ~1e-15; tests/test_draft_catch_up.py); what the drafter proposes next may
differ at a near-tie, the target's output never does. On the 2-core CPU a catch-up of 3 tokens was a chain verify +
commit of ~280 torch ops (3.2 ms, benchmarks/bench_cpu_ops.py). Anything the trace cannot explain (another state,
rows, root or tokens than the last proposal's; sync-free / static steps; CUDA; KV-cache layers, whose per-level
copies would cost the context) takes the chain verify + commit (`advance_rows`), as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gdnspec.cache import GDNLayerState, ModelState
from gdnspec.generate import graph_prefill
from gdnspec.sampling import RowSampling
from gdnspec.spec.tree import DraftLogits, DraftTree, TreeConfig, build_tree, frontier_rows


@dataclass
class ProposalTrace:
    """What `propose` computed, for `advance`: per expansion level j, the frontier tokens (B, F_j) long, their parent
    slots in level j - 1 (B, F_j) long (None: level 0, or a chain's one node), and the draft-model state after
    running them (B * F_j rows, row b * F_j + f). roots (B,) = the level-0 tokens."""

    roots: torch.Tensor
    levels: list  # [(tokens, parent_slot | None, ModelState)]


@dataclass
class ModelDraftState:
    model_state: ModelState  # committed draft-model state, one row per sequence
    # the last eager proposal's states (catch-up without a chain verify); select / cat / clone drop it
    trace: ProposalTrace | None = field(default=None, repr=False, compare=False)

    def select(self, rows) -> "ModelDraftState":
        return ModelDraftState(self.model_state.select(rows))

    @staticmethod
    def cat(states: list["ModelDraftState"]) -> "ModelDraftState":
        return ModelDraftState(ModelState.cat([s.model_state for s in states]))

    def clone(self) -> "ModelDraftState":
        return ModelDraftState(self.model_state.clone())

    def copy_(self, other: "ModelDraftState") -> None:
        self.model_state.copy_(other.model_state)
        self.trace = None  # the proposal's states no longer start from this state


def prefill_rows(model, prompts: list[torch.Tensor]) -> ModelState:
    """State of `model` after each prompt (rows in order; prompts of different lengths run one by one). On CUDA each
    group of equal lengths is one replay of a captured prefill (generate.graph_prefill, as the target's prefill): the
    draft model's eager prefill cost several ms of host time per prompt on an H200."""
    device = model.device

    def run(ids: torch.Tensor) -> ModelState:  # (B, T) of one length
        graphed = graph_prefill(model, ids)
        return graphed[0] if graphed is not None else model(ids, logits_to_keep=1).state

    if len({p.numel() for p in prompts}) == 1:
        return run(torch.stack(prompts).to(device))
    state = model.new_state(len(prompts))
    for i, p in enumerate(prompts):
        state.assign_rows_([i], run(p.to(device)[None]))
    return state


def advance_rows(model, state: ModelState, tokens: torch.Tensor, counts: torch.Tensor, *, sync_free: bool = False) -> None:
    """Run tokens[b, :counts[b]] (B, L) of each row through `model` from `state` (in place), all rows in one pass:
    the L tokens form a chain, verified like a draft tree, and each row commits the state after its counts[b]-th
    token. sync_free=True: no host syncs (KV room must exist; CUDA graphs)."""
    B, L = tokens.shape
    device = model.device
    from gdnspec.layers.layout import TokenLayout

    layout = TokenLayout.chain(B, L, device=device)
    ver = model.forward_tree(tokens.to(device), state=state, layout=layout, validate=not sync_free, need_logits=False)
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
        # the committed state is only read: the first expansion writes a new state, and each tree expansion gathers
        # its parents' rows, through ModelState.select_deferred (on the fused path the GDN decode kernels read the
        # source rows: no clone or index_select launches; attention layers are copied)
        frontier_state = {"state": state.model_state, "width": 1, "owned": False}
        state.trace = None
        levels = [] if _traceable(state.model_state, sync_free) else None

        def expand(frontier_tokens: torch.Tensor, parent_slot: torch.Tensor | None, *,
                   parent_rows: torch.Tensor | None = None) -> DraftLogits:
            F = frontier_tokens.shape[1]
            prev: ModelState = frontier_state["state"]
            if parent_slot is not None:
                rows = frontier_rows(parent_slot, frontier_state["width"], parent_rows)  # (B * F,)
                prev = prev.select_deferred(rows)
            elif levels or not frontier_state["owned"]:  # a chain step advances its state in place: keep the
                prev = prev.select_deferred(None)         # committed state and, with levels, the previous level's
            frontier_state["owned"] = True
            ids = frontier_tokens.reshape(B * F, 1)
            out = model(ids if ids.device == model.device else ids.to(model.device), prev, logits_to_keep=1,
                        validate=not sync_free, reserve_kv=not sync_free)
            frontier_state["state"], frontier_state["width"] = out.state, F
            if levels is not None:
                levels.append((frontier_tokens, parent_slot, out.state))
            return DraftLogits(out.logits[:, -1].view(B, F, -1), model.vocab_size)

        expand.takes_parent_rows = True  # build_tree's fused frontier kernel hands over the rows
        roots = root_tokens.to(model.device)
        result = build_tree(roots, expand, config, sync_free=sync_free, draft=draft)
        if levels:
            state.trace = ProposalTrace(roots, levels)
        return result

    @torch.inference_mode()
    def advance(self, state: ModelDraftState, *, tokens: torch.Tensor, counts: torch.Tensor, target_hidden=None,
                sync_free: bool = False) -> None:
        """Bring state past tokens[b, :counts[b]] (B, L) of each row: from the last proposal's states where they
        explain the tokens (module docstring), else by `advance_rows`."""
        trace, state.trace = state.trace, None
        if trace is None or sync_free or not catch_up_from_trace(self.model, state.model_state, trace, tokens, counts):
            advance_rows(self.model, state.model_state, tokens, counts, sync_free=sync_free)


def _traceable(state: ModelState, sync_free: bool) -> bool:
    """Whether a proposal from `state` keeps its states: eager steps on the CPU of a draft model whose layers are all
    GDN. Not on CUDA: there the engine's default is the static (graph) path, and keeping every level's states through
    the target's verify would hold ~2x the draft states of a proposal at peak (a helper's estimate: ~13 GiB for a
    12-layer draft at batch 64), for a catch-up that costs a few kernels there anyway."""
    return (not sync_free and state.layers[0].recurrent.device.type == "cpu"
            and all(isinstance(layer, GDNLayerState) for layer in state.layers))


def deepest_traced(trace: ProposalTrace, tokens: list[list[int]], counts: list[int]) -> list[tuple[int, int]]:
    """Per row b: (m, slot) = the number m >= 1 of leading committed tokens tokens[b][:m] whose state the proposal
    computed, and its row in level m - 1's state (b * F + slot); (0, 0) when the row's root is not the proposal's."""
    out = []
    lv = [(t.tolist(), None if p is None else p.tolist()) for t, p, _ in trace.levels]
    roots = trace.roots.tolist()
    for b, (row, n) in enumerate(zip(tokens, counts)):
        if n < 1 or row[0] != roots[b]:
            out.append((0, 0))
            continue
        m, slot = 1, 0
        while m < n and m < len(lv):
            toks, par = lv[m]
            nxt = next((f for f, t in enumerate(toks[b]) if t == row[m] and (par is None or par[b][f] == slot)), None)
            if nxt is None:
                break
            m, slot = m + 1, nxt
        out.append((m, slot))
    return out


def catch_up_from_trace(model, state: ModelState, trace: ProposalTrace, tokens: torch.Tensor,
                        counts: torch.Tensor) -> bool:
    """Advance `state` (B rows, in place) past tokens[b, :counts[b]] (B, L) from the proposal's states; returns
    False (state untouched) when the trace does not explain the tokens: the caller then runs `advance_rows`."""
    B = tokens.shape[0]
    if trace.roots.shape[0] != B or state.batch_size != B or tokens.dim() != 2 or tokens.shape[1] < 1:
        return False
    tok, cnt = tokens.tolist(), counts.tolist()
    found = deepest_traced(trace, tok, cnt)
    if any(m == 0 for m, _ in found) or any(c - m > 1 for (m, _), c in zip(found, cnt)):
        return False  # not the proposal's root, or more than one token past its states: the chain verify
    device = state.layers[0].recurrent.device
    for j in sorted({m - 1 for m, _ in found}):  # copy each row's deepest state in, level by level
        rows = [b for b, (m, _) in enumerate(found) if m - 1 == j]
        F = trace.levels[j][0].shape[1]
        src = torch.tensor([b * F + found[b][1] for b in rows], device=device)
        lvl = trace.levels[j][2]
        if len(rows) == B and F == 1:
            state.copy_(lvl)
        else:
            state.assign_rows_(torch.tensor(rows, device=device), lvl.select(src))
    rest = [b for b, ((m, _), c) in enumerate(zip(found, cnt)) if c > m]  # rows with their last token not run
    if rest:
        ids = torch.tensor([[tok[b][found[b][0]]] for b in rest], device=device)
        if len(rest) == B:
            model(ids, state, logits_to_keep=1)
        else:
            idx = torch.tensor(rest, device=device)
            sub = state.select(idx)
            model(ids, sub, logits_to_keep=1)
            state.assign_rows_(idx, sub)
    return True
