"""Gated full attention of Qwen3-Next / Qwen3.5 with a KV cache and tree masks.

    q_proj(x) -> per head [query (D) | gate (D)];  k_proj, v_proj (GQA: H_kv heads)
    q, k <- RMSNorm(1 + w) per head;  partial RoPE on the first rotary_dim = D * partial_rotary_factor dims
    out   = o_proj(softmax(q k^T / sqrt(D) + mask) v * sigmoid(gate))

The T new tokens attend to the cached prefix of their row and to the new tokens their `TokenLayout` marks as
ancestors (a causal chain or a draft tree); positions are prefix length + depth. `forward_layout` never writes the
cache: it returns the new keys/values, and `commit` appends the chosen ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gdnspec.cache import KVCache
from gdnspec.layers.layout import TokenLayout
from gdnspec.layers.norm import RMSNorm


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE on the first `rotary_dim` channels of each head."""

    def __init__(self, head_dim: int, *, partial_rotary_factor: float = 1.0, theta: float = 10000.0, device=None):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim (head_dim * partial_rotary_factor = {self.rotary_dim}) must be even")
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=device) / self.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, heads, T, D); positions (B, T) long."""
        rd = self.rotary_dim
        if rd == 0:
            return x
        freqs = positions.to(torch.float64)[..., None] * self.inv_freq  # (B, T, rd/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, rd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        half = rd // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class GatedAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        partial_rotary_factor: float = 0.25,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        attention_bias: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim * 2, bias=attention_bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=attention_bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=attention_bias, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=attention_bias, **kw)
        self.q_norm = RMSNorm(head_dim, norm_eps, offset=True, **kw)
        self.k_norm = RMSNorm(head_dim, norm_eps, offset=True, **kw)
        self.rotary = RotaryEmbedding(head_dim, partial_rotary_factor=partial_rotary_factor, theta=rope_theta, device=device)

    def new_state(self, batch_size: int, *, dtype=None, device=None, capacity: int = 0) -> KVCache:
        p = self.o_proj.weight
        shape = (batch_size, self.num_kv_heads, capacity, self.head_dim)
        dtype, device = dtype or p.dtype, device or p.device
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(batch_size, dtype=torch.long, device=device))

    def forward_layout(self, hidden_states: torch.Tensor, cache: KVCache, layout: TokenLayout
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, hidden) -> (out (B, T, hidden), (k_new, v_new) (B, H_kv, T, D)). The cache is only read."""
        x = hidden_states
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qg = self.q_proj(x).view(B, T, H, 2 * D)
        q, gate = qg[..., :D], qg[..., D:].reshape(B, T, H * D)
        q = self.q_norm(q).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, Hkv, D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        positions = cache.lengths[:, None] + layout.depth  # (B, T)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        cap = cache.capacity
        keys = torch.cat([cache.k.to(k.dtype), k], dim=2)  # (B, Hkv, cap + T, D)
        values = torch.cat([cache.v.to(v.dtype), v], dim=2)
        prefix_ok = torch.arange(cap, device=x.device)[None, :] < cache.lengths[:, None]  # (B, cap)
        mask = torch.cat([prefix_ok[:, None, :].expand(B, T, cap), layout.ancestor_mask], dim=-1)[:, None]  # (B, 1, T, cap+T)
        if Hkv != H:
            keys = keys.repeat_interleave(H // Hkv, dim=1)
            values = values.repeat_interleave(H // Hkv, dim=1)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=D**-0.5)  # (B, H, T, D)
        attn = attn.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(attn * torch.sigmoid(gate)), (k, v)

    def forward_state(self, hidden_states: torch.Tensor, cache: KVCache, layout: TokenLayout, *, reserve: bool = True
                      ) -> torch.Tensor:
        """Causal step: attend, then append all T new keys/values to the cache (in place). reserve=False: no host
        sync; the cache must have room (CUDA graphs)."""
        out, (k, v) = self.forward_layout(hidden_states, cache, layout)
        T = hidden_states.shape[1]
        cache.write_(k, v, torch.full_like(cache.lengths, T), reserve=reserve)
        return out

    @staticmethod
    def commit(cache: KVCache, kv_new: tuple[torch.Tensor, torch.Tensor], path: torch.Tensor, counts: torch.Tensor, *,
               reserve: bool = True) -> None:
        """Append the keys/values of tree nodes path[b, :counts[b]] (B, L) long to row b, consecutive positions."""
        k, v = kv_new
        B, Hkv, _, D = k.shape
        idx = path.clamp(min=0)[:, None, :, None].expand(B, Hkv, path.shape[1], D)
        cache.write_(k.gather(2, idx), v.gather(2, idx), counts, reserve=reserve)
