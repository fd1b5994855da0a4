"""Gated full attention of Qwen3-Next / Qwen3.5 with a KV cache and tree masks.

    q_proj(x) -> per head [query (D) | gate (D)];  k_proj, v_proj (GQA: H_kv heads)
    q, k <- RMSNorm(1 + w) per head;  partial RoPE on the first rotary_dim = D * partial_rotary_factor dims
    out   = o_proj(softmax(q k^T / sqrt(D) + mask) v * sigmoid(gate))

The T new tokens attend to the cached prefix of their row and to the new tokens their `TokenLayout` marks as
ancestors (a causal chain or a draft tree); positions are prefix length + depth. `forward_layout` never writes the
cache: it returns the new keys/values, and `commit` appends the chosen ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gdnspec.cache import KVCache
from gdnspec.layers.layout import TokenLayout
from gdnspec.layers.norm import RMSNorm

# scaled_dot_product_attention(enable_gqa=...) (torch >= 2.5): grouped heads without repeat_interleave
_HAS_ENABLE_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@dataclass(frozen=True)
class NodesInCache:
    """What the fused verify step (GatedAttention.forward_fused, write_lengths=False) hands to `commit` instead of the
    nodes' keys/values: node i's key/value sit in the cache at slot min(lengths, capacity - num_nodes) + i."""

    num_nodes: int

class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE on the first `rotary_dim` channels of each head."""

    def __init__(self, head_dim: int, *, partial_rotary_factor: float = 1.0, theta: float = 10000.0, device=None):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim (head_dim * partial_rotary_factor = {self.rotary_dim}) must be even")
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=device) / self.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, max_position: int | None = None) -> torch.Tensor:
        """x (B, heads, T, D); positions (B, T) long. max_position (optional): a host-known bound > every position,
        which spares a device read when the cached cos/sin table must be sized."""
        rd = self.rotary_dim
        if rd == 0:
            return x
        cs = self.cos_sin(x, positions, max_position=max_position)
        return self.reference(x, positions) if cs is None else self.rotate(x, cs)

    def cos_sin(self, x: torch.Tensor, positions: torch.Tensor, *, max_position: int | None = None):
        """(cos_sin (2, B, 1, T, D), perm (D,)) for tensors shaped like x, or None when the cache cannot be used."""
        entry = self._table(x, positions, max_position)
        if entry is None:
            return None
        table, perm = entry
        return table[:, positions][:, :, None], perm

    @staticmethod
    def rotate(x: torch.Tensor, cs) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin with the signed sin of the table; pass-through dims: cos 1, sin 0 (exact)."""
        cos_sin, perm = cs
        return x * cos_sin[0] + x.index_select(-1, perm) * cos_sin[1]

    def reference(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The uncached formula (float64 angles, rotate-half with cat); `forward` matches it exactly."""
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

    def _table(self, x: torch.Tensor, positions: torch.Tensor, max_position: int | None):
        """Cached ((2, P, D) table, perm (D,)): the table in x's dtype: [cos | 1] and [-sin, sin | 0] of positions 0 .. P-1, the angles
        computed in float64 exactly like `reference`; grown (doubling) on demand, rebuilt when inv_freq moves."""
        D = x.shape[-1]
        inv = self.inv_freq
        key = (x.dtype, x.device, D, inv.dtype, inv.device, inv.data_ptr())  # inv_freq is never changed in place
        cache = self.__dict__.setdefault("_tables", {})
        entry = cache.get(key)
        size = 0 if entry is None else entry[0].shape[1]
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if max_position is None:
            if capturing:
                return None
            max_position = int(positions.max()) + 1 if positions.numel() else 1
        if max_position <= size:
            return entry
        if capturing:  # computing a table inside a graph capture would leave it unfilled for eager use
            return None
        n = max(max_position, 2 * size, 256)
        rd, half = self.rotary_dim, self.rotary_dim // 2
        # built as normal tensors even inside torch.inference_mode (generation): a cached inference tensor would make
        # every later autograd forward (training after generating) fail when it saves the table for backward
        with torch.inference_mode(False), torch.no_grad():
            freqs = torch.arange(n, dtype=torch.float64, device=self.inv_freq.device)[:, None] * self.inv_freq  # (n, rd/2)
            cos, sin = freqs.cos().to(x.dtype).to(x.device), freqs.sin().to(x.dtype).to(x.device)
            table = torch.zeros(2, n, D, dtype=x.dtype, device=x.device)
            table[0, :, rd:] = 1
            table[0, :, :half], table[0, :, half:rd] = cos, cos
            table[1, :, :half], table[1, :, half:rd] = -sin, sin
            perm = torch.cat([torch.arange(rd).roll(half), torch.arange(rd, D)]).to(x.device)  # rotate_half, unsigned
        for old_key in [k for k in cache if k[:3] == key[:3]]:  # superseded tables of this dtype/device/width
            old = cache.pop(old_key)
            if old[0].is_cuda:  # keep it alive: a captured CUDA graph may still read it
                self.__dict__.setdefault("_retired_tables", []).append(old)
        cache[key] = table, perm
        return table, perm


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

    def forward_layout(self, hidden_states: torch.Tensor, cache: KVCache, layout: TokenLayout, *, static: bool = False
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, hidden) -> (out (B, T, hidden), (k_new, v_new) (B, H_kv, T, D)). The cache is only read.

        static=True keeps every shape independent of device values (no host sync; CUDA graphs): the whole cache
        capacity is attended (masked). Otherwise only the valid prefix (max(lengths) positions) is read."""
        x = hidden_states
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qg = self.q_proj(x).view(B, T, H, 2 * D)
        q, gate = qg[..., :D], qg[..., D:].reshape(B, T, H * D)
        q = self.q_norm(q).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, Hkv, D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        cap = cache.capacity
        static = static or (x.is_cuda and torch.cuda.is_current_stream_capturing())
        if layout.known_prefix is not None:  # the caller knows every row's prefix length (graph-captured prefill)
            n, uniform, static = layout.known_prefix, True, False
        elif static:
            n, uniform = cap, False
        else:  # one host read: the longest valid prefix, and whether every row has it
            lens = cache.lengths.tolist()
            n = max(lens, default=0)
            uniform = min(lens, default=0) == n
        # live rows always have lengths <= capacity; padding rows of a static batch bucket may count past it, and
        # the clamp keeps their (never read) positions inside the RoPE table without a host sync
        positions = cache.lengths.clamp(max=cap)[:, None] + layout.depth  # (B, T)
        cs = self.rotary.cos_sin(q, positions, max_position=cap + T)  # depth < T
        if cs is None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        elif self.rotary.rotary_dim:
            q, k = self.rotary.rotate(q, cs), self.rotary.rotate(k, cs)
        ck = cache.k[:, :, :n] if n < cap else cache.k
        cv = cache.v[:, :, :n] if n < cap else cache.v
        keys = torch.cat([ck if ck.dtype == k.dtype else ck.to(k.dtype), k], dim=2)  # (B, Hkv, n + T, D)
        values = torch.cat([cv if cv.dtype == v.dtype else cv.to(v.dtype), v], dim=2)
        if uniform and T == 1:  # every row sees its whole prefix and itself: no mask
            mask = None
        elif uniform and layout.is_chain and not static:  # causal prefill / chunk: flash attention, no dense mask
            attn = self._sdpa_causal(q, keys, values, n)
            attn = attn.transpose(1, 2).reshape(B, T, H * D)
            return self.o_proj(attn * torch.sigmoid(gate)), (k, v)
        elif uniform:
            mask = torch.cat([layout.ancestor_mask.new_ones(()).expand(B, T, n), layout.ancestor_mask], dim=-1)[:, None]
        else:
            prefix_ok = torch.arange(n, device=x.device)[None, :] < cache.lengths[:, None]  # (B, n)
            mask = torch.cat([prefix_ok[:, None, :].expand(B, T, n), layout.ancestor_mask], dim=-1)[:, None]  # (B, 1, T, n+T)
        attn = self._sdpa(q, keys, values, mask)  # (B, H, T, D)
        attn = attn.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(attn * torch.sigmoid(gate)), (k, v)

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q_proj | k_proj | v_proj as one (2*H*D + 2*Hkv*D, hidden) weight (and bias), see layers/fusion.py."""
        from gdnspec.layers.fusion import fused_linear

        return fused_linear(self, ["q_proj", "k_proj", "v_proj"])

    def forward_fused(self, x, cache: KVCache, layout: TokenLayout | None, *, write_lengths: bool,
                      reserve: bool = True):
        """T tokens per row, x (B, T, hidden) already normed (a tensor, or a NormedInput: ops/fused/normed.py, the norm
        folded into the qkv GEMV), in 4 kernels + o_proj: fused qkv GEMM, `attention_prep`
        (q/k norm + RoPE + K/V written at slots lengths + t), `tree_attention` (split-K with the ancestor mask of
        `layout`, None = causal chain, and the sigmoid gate). write_lengths=True (a causal step) then advances the
        lengths by T; otherwise (tree verify) the slots past the valid prefix are scratch and `commit` writes the
        accepted path. reserve=False: no host sync; the cache must have room for T more slots (CUDA graphs).
        Returns (out, (k_new, v_new) (B, Hkv, T, D) copies of the written slots, or Nones for a causal step); out is
        o_proj for `add_norm`: a ResidualProjection (run there with the residual add), or computed as (B, T, hidden)
        or float32 split-K partial sums (S, B, T, hidden) (gemv.linear_for_residual)."""
        from gdnspec.ops.fused.attention import attention_prep, tree_attention
        from gdnspec.ops.fused.normed import linear_in, output_projection

        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if reserve and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            cache.reserve(int(cache.lengths.max()) + T if cache.lengths.numel() else T)
        cap = cache.capacity
        w, b = self.fused_qkv()
        qkv = linear_in(x, w, b)  # (B, T, P)
        entry = self.rotary._table(qkv[..., :D], cache.lengths, cap + T)
        if entry is None:
            raise RuntimeError("the RoPE table must be built before CUDA graph capture (run one eager step first)")
        table, perm = entry
        depth = layout.depth if layout is not None else None
        q = attention_prep(qkv, num_heads=H, num_kv_heads=Hkv, head_dim=D, q_norm_weight=self.q_norm.weight,
                           k_norm_weight=self.k_norm.weight, eps=self.q_norm.eps, table=table, perm=perm,
                           lengths=cache.lengths, depth=depth, cache_k=cache.k, cache_v=cache.v)
        mask = None if layout is None or layout.is_chain else layout.ancestor_mask
        # verify: the nodes' keys/values stay in their cache slots; `commit` moves the accepted ones (kv_commit_path)
        kv = (None, None) if write_lengths else NodesInCache(T)
        attn = tree_attention(q, cache.k, cache.v, cache.lengths, mask, gate=qkv, scale=D**-0.5,
                              advance_lengths=write_lengths)
        return output_projection(attn, self.o_proj.weight, self.o_proj.bias), kv

    def _sdpa_causal(self, q, keys, values, prefix: int):
        """Causal attention of T queries after `prefix` cached positions (every row the same prefix): SDPA's causal
        kernels (flash / memory-efficient on CUDA), the causal diagonal aligned to the bottom right when prefix > 0."""
        H, Hkv = self.num_heads, self.num_kv_heads
        if Hkv != H:  # the causal flash kernels take equal head counts: expand the grouped keys (a view, then a copy)
            keys = keys.repeat_interleave(H // Hkv, dim=1)
            values = values.repeat_interleave(H // Hkv, dim=1)
        if prefix == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.head_dim**-0.5)
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(q.shape[2], keys.shape[2])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self.head_dim**-0.5)

    def _sdpa(self, q, keys, values, mask):
        H, Hkv = self.num_heads, self.num_kv_heads
        if Hkv != H:
            if _HAS_ENABLE_GQA:
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5,
                                                      enable_gqa=True)
            keys = keys.repeat_interleave(H // Hkv, dim=1)
            values = values.repeat_interleave(H // Hkv, dim=1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim**-0.5)

    def forward_state(self, hidden_states: torch.Tensor, cache: KVCache, layout: TokenLayout, *, reserve: bool = True
                      ) -> torch.Tensor:
        """Causal step: attend, then append all T new keys/values to the cache (in place). reserve=False: no host
        sync; the cache must have room (CUDA graphs)."""
        out, (k, v) = self.forward_layout(hidden_states, cache, layout, static=not reserve)
        T = hidden_states.shape[1]
        cache.write_(k, v, torch.full_like(cache.lengths, T), reserve=reserve)
        return out

    @staticmethod
    def commit(cache: KVCache, kv_new, path: torch.Tensor, counts: torch.Tensor, *, reserve: bool = True) -> None:
        """Append the keys/values of tree nodes path[b, :counts[b]] (B, L) long to row b, consecutive positions.

        kv_new: the nodes' (k, v) (B, Hkv, N, D) (module path), or NodesInCache from the fused verify, whose nodes
        are still in the cache's slots past the prefix: then one kernel moves them (ops/fused/attention.kv_commit_path)."""
        if isinstance(kv_new, NodesInCache):
            from gdnspec.ops.fused.attention import kv_commit_path

            if reserve and not (cache.k.is_cuda and torch.cuda.is_current_stream_capturing()):
                # the verify reserved capacity for its N nodes; a commit of L <= N nodes needs no more room
                if cache.lengths.numel() and int(cache.lengths.max()) + kv_new.num_nodes > cache.capacity:
                    raise RuntimeError("the KV cache lost the verify's node slots (capacity changed between verify and "
                                       "commit)")
            kv_commit_path(cache.k, cache.v, cache.lengths, path=path, counts=counts, num_nodes=kv_new.num_nodes)
            return
        k, v = kv_new
        B, Hkv, _, D = k.shape
        idx = path.clamp(min=0)[:, None, :, None].expand(B, Hkv, path.shape[1], D)
        cache.write_(k.gather(2, idx), v.gather(2, idx), counts, reserve=reserve)
