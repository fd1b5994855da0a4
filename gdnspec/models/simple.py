"""`SimpleLMWithGDN`: the seed's model, embedding -> GDN layer(s) -> norm -> lm_head, one dtype throughout.

A `GDNForCausalLM` whose layers are all Gated DeltaNet and have no MLP (pre-norm residual blocks).
"""
from __future__ import annotations

import torch

from gdnspec.models.config import GDNConfig
from gdnspec.models.lm import GDNForCausalLM


class SimpleLMWithGDN(GDNForCausalLM):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_k_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        num_layers: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        if isinstance(num_k_heads, int) and isinstance(num_v_heads, int) and num_k_heads > 0 and num_v_heads % num_k_heads:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_k_heads ({num_k_heads})")
        config = GDNConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, intermediate_size=0,
            linear_num_key_heads=num_k_heads, linear_num_value_heads=num_v_heads,
            linear_key_head_dim=head_k_dim, linear_value_head_dim=head_v_dim,
        )
        super().__init__(config, dtype=dtype, device=device)

    @property
    def gdn_layer(self):
        """The first GDN layer (the seed's `model.gdn_layer`)."""
        return self.layers[0].linear_attn
