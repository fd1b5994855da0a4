"""Layers: the Gated DeltaNet token mixer, gated full attention, norms, MLP, and the token layout (chain / tree)."""
from gdnspec.layers.attention import GatedAttention, RotaryEmbedding
from gdnspec.layers.gated_deltanet import GDNTreeCache, Qwen3GatedDeltaNet, resolve_mode
from gdnspec.layers.layout import TokenLayout
from gdnspec.layers.mlp import SwiGLUMLP
from gdnspec.layers.norm import GatedRMSNorm, RMSNorm

__all__ = ["GDNTreeCache", "GatedAttention", "GatedRMSNorm", "Qwen3GatedDeltaNet", "RMSNorm", "RotaryEmbedding",
           "SwiGLUMLP", "TokenLayout", "resolve_mode"]
