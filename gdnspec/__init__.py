"""gdnspec: lossless tree speculative decoding for Gated DeltaNet (GDN) language models.

Public API (see README.md):
    GDNConfig, GDNForCausalLM, SimpleLMWithGDN, Qwen3GatedDeltaNet, GDNLayerState, KVCache, ModelState,
    generate_autoregressive
"""
from gdnspec.cache import GDNLayerState, KVCache, ModelState
from gdnspec.generate import generate_autoregressive
from gdnspec.layers import GatedAttention, Qwen3GatedDeltaNet, TokenLayout
from gdnspec.models import GDNConfig, GDNForCausalLM, SimpleLMWithGDN

__version__ = "0.1.0"

__all__ = [
    "GDNConfig",
    "GDNForCausalLM",
    "GDNLayerState",
    "GatedAttention",
    "KVCache",
    "ModelState",
    "Qwen3GatedDeltaNet",
    "SimpleLMWithGDN",
    "TokenLayout",
    "generate_autoregressive",
]
