"""Output containers of the models."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.cache import ModelState


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, vocab) (or the last `logits_to_keep` positions)
    hidden_states: torch.Tensor  # (B, T, hidden): output of the last decoder layer, BEFORE the final norm
    state: ModelState | None


@dataclass
class TreeVerifyOutput:
    logits: torch.Tensor | None  # (B, N, vocab); None from forward_tree(need_logits=False) on the fused path
    hidden_states: torch.Tensor | None  # (B, N, hidden), before the final norm; None with logits
    layer_caches: list  # per layer: GDNTreeCache, (k_new, v_new) or layers.attention.NodesInCache
