"""gdnspec: lossless tree speculative decoding for Gated DeltaNet (GDN) language models.

Public API (see README.md):
    models   GDNConfig, GDNForCausalLM, SimpleLMWithGDN, Qwen3GatedDeltaNet, GatedAttention
    state    GDNLayerState, KVCache, ModelState, TokenLayout
    decoding generate_autoregressive (plain), GDNSpeculativeWorker / SpeculativeEngine (speculative)
    drafting GDNDraftWorker, ModelDrafter, NGramDrafter, DraftTree, TreeConfig; verification GDNVerifyWorker
"""
from gdnspec.bundle import Bundle, load
from gdnspec.cache import GDNLayerState, KVCache, ModelState
from gdnspec.generate import generate_autoregressive
from gdnspec.layers import GatedAttention, Qwen3GatedDeltaNet, TokenLayout
from gdnspec.models import GDNConfig, GDNForCausalLM, SimpleLMWithGDN
from gdnspec.spec import (
    DraftTree,
    GDNDraftWorker,
    GDNSpeculativeWorker,
    GDNVerifyWorker,
    ModelDrafter,
    NGramDrafter,
    SpeculativeEngine,
    TreeConfig,
)

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "load",
    "DraftTree",
    "GDNDraftWorker",
    "GDNSpeculativeWorker",
    "GDNVerifyWorker",
    "ModelDrafter",
    "NGramDrafter",
    "SpeculativeEngine",
    "TreeConfig",
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
