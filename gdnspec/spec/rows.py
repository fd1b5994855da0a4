"""Per-sequence sampling settings for a batch whose rows decode with different temperature / top-k / top-p / seed.

A `SpecSession` (and the server built on it) mixes greedy and sampled sequences in one batch. The accept and sample
functions take ONE setting for all rows, so the rows are grouped by identical settings and each group is accepted
(or sampled) on its own, then the results are put back in row order:

    groups = group_rows([seq.sampling for seq in rows])        # [(SeqSampling, [row indices]), ...]
    acc = accept_grouped(tree, logits, layout, samplings)       # one Acceptance for the whole batch
    tok = sample_grouped(logits, samplings)                     # (B,) next tokens

Greedy rows form one group whatever their seed. A sampled row with its own seed has its own torch.Generator and
forms a group of its own, accepted on its own draft tree trimmed to its own width: the random draws it consumes do
not depend on its batch neighbours, so its tokens are those of the same sequence decoded alone with that seed.
(sampling.RowSampling is the static steps' form of per-row settings: device tensors and counter-based uniforms.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.layers.layout import TokenLayout
from gdnspec.sampling import check_sampling_args, sample_next
from gdnspec.spec.accept import Acceptance, accept_greedy, accept_sampling
from gdnspec.spec.tree import DraftTree


@dataclass(frozen=True, eq=False)
class SeqSampling:
    """How one sequence picks its tokens: temperature 0 = greedy; generator None = torch's global generator."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    own_generator: bool = False  # a generator of this sequence alone (seeded): its row is accepted on its own

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> tuple:
        """Rows with equal keys are accepted / sampled together."""
        if self.greedy:
            return ("greedy",)
        return (self.temperature, self.top_k, self.top_p, id(self.generator))

    def kwargs(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "generator": self.generator}

    @staticmethod
    def seeded(temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
               default_generator: torch.Generator | None = None) -> "SeqSampling":
        """A row's settings: with a seed, a generator of its own (CPU, as the acceptance's uniform draws); without
        one, `default_generator` (shared with the other rows that have none)."""
        if seed is None or temperature == 0:
            return SeqSampling(temperature, top_k, top_p, default_generator if temperature else None)
        return SeqSampling(temperature, top_k, top_p, torch.Generator().manual_seed(seed % 2 ** 64), own_generator=True)


def group_rows(samplings: list[SeqSampling]) -> list[tuple[SeqSampling, list[int]]]:
    """[(settings, row indices)] with one entry per distinct key, in order of first appearance."""
    groups: dict[tuple, tuple[SeqSampling, list[int]]] = {}
    for r, s in enumerate(samplings):
        groups.setdefault(s.key(), (s, []))[1].append(r)
    return list(groups.values())


def sample_grouped(logits: torch.Tensor, samplings: list[SeqSampling]) -> torch.Tensor:
    """logits (B, vocab) -> (B,) tokens, each row with its own settings. A row with its own (CPU) generator samples
    on the CPU, on any device (the same draws everywhere)."""
    groups = group_rows(samplings)
    if len(groups) == 1 and not groups[0][0].own_generator:
        return sample_next(logits, **groups[0][0].kwargs())
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for s, rows in groups:
        idx = torch.tensor(rows, device=logits.device)
        lg = logits[idx].cpu() if s.own_generator else logits[idx]
        out[idx] = sample_next(lg, **s.kwargs()).to(out.device)
    return out


def _trim(tree: DraftTree) -> DraftTree:
    used = tree.valid.any(0).nonzero()
    n = int(used.max()) + 1 if used.numel() else 1
    return tree if n == tree.num_nodes else tree.first_nodes(n)


def _cpu(tree: DraftTree) -> DraftTree:
    opt = lambda t: None if t is None else t.cpu()  # noqa: E731
    return DraftTree(tree.tokens.cpu(), tree.parents.cpu(), tree.scores.cpu(), tree.valid.cpu(),
                     opt(tree.draft_probs), opt(tree.draft_index))


def _accept(s: SeqSampling, tree: DraftTree, logits: torch.Tensor, layout: TokenLayout) -> Acceptance:
    if s.greedy:
        return accept_greedy(tree, logits, layout)
    return accept_sampling(tree, logits, layout, **s.kwargs())


def accept_grouped(tree: DraftTree, logits: torch.Tensor, layout: TokenLayout, samplings: list[SeqSampling]
                ) -> Acceptance:
    """accept_greedy / accept_sampling with each row's own settings (see the module docstring)."""
    groups = group_rows(samplings)
    if len(groups) == 1 and not groups[0][0].own_generator:
        return _accept(groups[0][0], tree, logits, layout)
    B = tree.batch_size
    parts = []
    for s, rows in groups:
        idx = torch.tensor(rows, device=tree.tokens.device)
        sub = tree.select(idx)
        lg = logits[idx]
        if s.own_generator:  # the tree this row would have alone, on the CPU (its generator's device): its draws
            sub = _cpu(_trim(sub))  # depend neither on the other rows nor on the device
            sub_layout, lg = sub.layout(), lg[:, :sub.num_nodes].cpu()
        else:
            sub_layout = TokenLayout(parents=layout.parents[idx], ancestor_mask=layout.ancestor_mask[idx],
                                     depth=layout.depth[idx])
        parts.append((idx, _accept(s, sub, lg, sub_layout)))
    width = max(a.path.shape[1] for _, a in parts)
    path = torch.empty(B, width, dtype=torch.long, device=tree.tokens.device)
    counts = torch.empty(B, dtype=torch.long, device=tree.tokens.device)
    bonus = torch.empty(B, dtype=torch.long, device=tree.tokens.device)
    for idx, a in parts:
        p = a.path
        if p.shape[1] < width:  # paths are padded with their last node
            p = torch.cat([p, p[:, -1:].expand(-1, width - p.shape[1])], dim=1)
        path[idx], counts[idx], bonus[idx] = p.to(path.device), a.counts.to(counts.device), a.bonus.to(bonus.device)
    return Acceptance(path=path, counts=counts, bonus=bonus)
