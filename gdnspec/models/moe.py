"""Sparse mixture-of-experts block of Qwen3-Next / Qwen3.5-MoE (router, routed SwiGLU experts, gated shared expert).

    p        = softmax(x @ gate.weight^T)  (float32)           # (N, E)
    w, idx   = topk(p, k); w /= w.sum() if norm_topk_prob      # (N, k), cast to x's dtype
    routed   = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))   # e = idx_j; gate/up rows of experts.gate_up_proj[e]
    out      = routed + sigmoid(x @ shared_expert_gate^T) * shared_expert(x)     (when a shared expert exists)

Parameters use Hugging Face's in-memory names: experts.gate_up_proj (E, 2I, H) (gate rows first), experts.down_proj
(E, H, I), gate.weight (E, H), shared_expert.{gate,up,down}_proj, shared_expert_gate.weight (1, H).

`forward` picks a gather path (each token's k expert matrices gathered and applied with one batched matmul: no host
sync, used when the gathered weights are small, i.e. decode / small trees) or a grouped path (tokens sorted by expert,
one matmul per expert that has tokens). `forward_reference` is the plain per-token loop both are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdnspec.layers.mlp import SwiGLUMLP

GATHER_MAX_ELEMENTS = 1 << 24  # gathered expert weights per forward above which the grouped path is used


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype=None, device=None):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, num_experts_per_tok: int, moe_intermediate_size: int, *,
                 shared_expert_intermediate_size: int = 0, norm_topk_prob: bool = True, dtype=None, device=None):
        super().__init__()
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {num_experts_per_tok}")
        kw = dict(dtype=dtype, device=device)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.experts = Experts(num_experts, hidden_size, moe_intermediate_size, **kw)
        if shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLUMLP(hidden_size, shared_expert_intermediate_size, **kw)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **kw)
        else:
            self.shared_expert = None
        with torch.no_grad():
            self.experts.gate_up_proj.normal_(0.0, 0.02)
            self.experts.down_proj.normal_(0.0, 0.02)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, H) -> top-k weights (N, k) in x's dtype, expert ids (N, k) long."""
        logits = self.gate(x)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
        w, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w.to(logits.dtype), idx

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.shared_expert is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        w, idx = self.route(x)
        N, k = idx.shape
        I = self.experts.intermediate_size
        if N * k * 3 * I * self.hidden_size <= GATHER_MAX_ELEMENTS:
            out = self._routed_gather(x, w, idx)
        else:
            out = self._routed_grouped(x, w, idx)
        shared = self._shared(x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)

    def _routed_gather(self, x, w, idx) -> torch.Tensor:
        N, k = idx.shape
        gu = self.experts.gate_up_proj[idx]  # (N, k, 2I, H)
        dn = self.experts.down_proj[idx]  # (N, k, H, I)
        h = torch.einsum("nkih,nh->nki", gu, x)  # (N, k, 2I)
        g, u = h.chunk(2, dim=-1)
        y = torch.einsum("nkhi,nki->nkh", dn, F.silu(g) * u)  # (N, k, H)
        return (y * w[..., None]).sum(1)

    def _routed_grouped(self, x, w, idx) -> torch.Tensor:
        N, k = idx.shape
        out = torch.zeros_like(x)
        flat = idx.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tok = order // k  # token of each sorted slot
        wts = w.reshape(-1)[order]
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            t = tok[start:start + c]
            g, u = F.linear(x[t], self.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, self.experts.down_proj[e]) * wts[start:start + c, None]
            out.index_add_(0, t, y.to(out.dtype))
            start += c
        return out

    def forward_reference(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-token, per-expert loop (slow; for tests)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        w, idx = self.route(x)
        rows = []
        for n in range(x.shape[0]):
            acc = torch.zeros_like(x[n])
            for j in range(self.top_k):
                e = int(idx[n, j])
                g, u = (self.experts.gate_up_proj[e] @ x[n]).chunk(2)
                acc = acc + w[n, j] * (self.experts.down_proj[e] @ (F.silu(g) * u))
            rows.append(acc)
        out = torch.stack(rows)
        shared = self._shared(x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)
