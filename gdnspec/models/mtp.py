"""The multi-token-prediction (MTP) module of Qwen3-Next / Qwen3.5 checkpoints (`mtp.*` weights).

    e   = embed_tokens(token_{t+1})                      # the TARGET's embedding (shared)
    h   = target.norm(hidden_t)                          # the target's final-normed hidden state at token t
    x   = fc(concat(pre_fc_norm_embedding(e), pre_fc_norm_hidden(h)))     # fc: (2H -> H), embedding half first
    x   = decoder layer (gated full attention + MLP / MoE, its own KV cache)
    out = norm(x);   logits = target.lm_head(out)         # predicts token_{t+2}; `out` feeds the next MTP step

Parameter names match the checkpoint after stripping "mtp.": pre_fc_norm_embedding, pre_fc_norm_hidden, fc,
layers.0.*, norm (all (1 + w) RMSNorms). The module holds no embedding / lm_head: callers pass embeddings and apply
the target's lm_head (see spec/drafters/mtp.py). Its state is a ModelState with one KVCache; entry i of the cache
belongs to the pair (hidden_i, token_{i+1}) and sits at RoPE position i.
"""
from __future__ import annotations

import torch
from torch import nn

from gdnspec.cache import ModelState
from gdnspec.layers import RMSNorm, TokenLayout
from gdnspec.models.config import GDNConfig


class MTPModule(nn.Module):
    def __init__(self, config: GDNConfig, *, moe: bool = False, dtype=None, device=None):
        super().__init__()
        from gdnspec.models.lm import DecoderLayer

        kw = dict(dtype=dtype, device=device)
        H = config.hidden_size
        self.config = config
        self.pre_fc_norm_embedding = RMSNorm(H, config.rms_norm_eps, offset=True, **kw)
        self.pre_fc_norm_hidden = RMSNorm(H, config.rms_norm_eps, offset=True, **kw)
        self.fc = nn.Linear(2 * H, H, bias=False, **kw)
        self.layers = nn.ModuleList([DecoderLayer(config, "full_attention", moe=moe, **kw)])
        self.norm = RMSNorm(H, config.rms_norm_eps, offset=True, **kw)

    def new_state(self, batch_size: int, *, kv_capacity: int = 0) -> ModelState:
        return ModelState([self.layers[0].self_attn.new_state(batch_size, capacity=kv_capacity)])

    def forward(self, input_embeds: torch.Tensor, hidden: torch.Tensor, state: ModelState, *,
                layout: TokenLayout | None = None) -> torch.Tensor:
        """input_embeds, hidden (B, T, H) (hidden already final-normed by the target) -> out (B, T, H) after norm.

        Appends the T new keys/values to `state` (a causal chain after the cached prefix; `layout` for other shapes).
        """
        if input_embeds.shape != hidden.shape:
            raise ValueError(f"input_embeds {tuple(input_embeds.shape)} and hidden {tuple(hidden.shape)} must match")
        B, T, _ = hidden.shape
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows, the input has {B}")
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(input_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        layout = layout or TokenLayout.chain(B, T, device=hidden.device)
        x = self.layers[0].forward_state(x, state.layers[0], layout, "auto")
        return self.norm(x)
