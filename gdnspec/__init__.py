"""gdnspec: lossless tree speculative decoding for Gated DeltaNet (GDN) language models.

Public API (see README.md):
    models   GDNConfig, GDNForCausalLM, SimpleLMWithGDN, Qwen3GatedDeltaNet, GatedAttention
    state    GDNLayerState, KVCache, ModelState, TokenLayout
    decoding generate_autoregressive (plain), GDNSpeculativeWorker / SpeculativeEngine (speculative)
    drafting GDNDraftWorker, ModelDrafter, NGramDrafter, DraftTree, TreeConfig; verification GDNVerifyWorker
"""
import importlib
import importlib.util
import os

# MKL's conditional-numerical-reproducibility mode, before torch's first MKL call: with MKL_CBWR unset, MKL picks a
# slower float32 GEMM path for small row counts on AMD CPUs. Measured on the 2-core AMD EPYC of benchmarks (2 threads,
# the default model): verify N = 5 / 16 11.1 / 13.7 ms instead of 13.4 / 15.7 ms, and `gdnspec eval --threads 2`
# n-gram 1.37x instead of 1.20x, EAGLE 0.97-1.00x instead of 0.87x; neutral at 1 thread and for M = 1 (decode). AUTO
# keeps MKL's best code path for the CPU and makes results run-to-run reproducible. A value the user set wins; it has
# no effect when MKL already ran in this process before gdnspec was imported.
os.environ.setdefault("MKL_CBWR", "AUTO")

# public name -> the module that defines it; imported on first use (PEP 562), so that `gdnspec` and the command line
# (`gdnspec ...`, `python -m gdnspec`) start without importing torch: the CLI checks its flags, and handles Ctrl-C,
# before the heavy imports
_EXPORTS = {
    "Bundle": "gdnspec.bundle", "load": "gdnspec.bundle",
    "GDNLayerState": "gdnspec.cache", "KVCache": "gdnspec.cache", "ModelState": "gdnspec.cache",
    "generate_autoregressive": "gdnspec.generate",
    "GatedAttention": "gdnspec.layers", "Qwen3GatedDeltaNet": "gdnspec.layers", "TokenLayout": "gdnspec.layers",
    "GDNConfig": "gdnspec.models", "GDNForCausalLM": "gdnspec.models", "SimpleLMWithGDN": "gdnspec.models",
    **{name: "gdnspec.spec" for name in ("DraftTree", "GDNDraftWorker", "GDNSpeculativeWorker", "GDNVerifyWorker",
                                         "ModelDrafter", "NGramDrafter", "SpeculativeEngine", "TreeConfig")},
}


def __getattr__(name: str):
    """gdnspec.<public name> or gdnspec.<submodule> (as after the eager imports this package once made): imports
    its module on first use."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'gdnspec' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


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
