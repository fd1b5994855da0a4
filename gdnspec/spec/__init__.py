"""Speculative decoding for GDN models: draft trees, drafters, verification, acceptance, the loop, seed workers."""
from gdnspec.spec.accept import Acceptance, accept_greedy, accept_sampling
from gdnspec.spec.drafters import ModelDrafter, NGramDrafter
from gdnspec.spec.engine import SpeculativeEngine, SpecSession
from gdnspec.spec.stats import SpecStats
from gdnspec.spec.tree import DraftTree, TreeConfig, build_tree
from gdnspec.spec.workers import GDNDraftWorker, GDNSpeculativeWorker, GDNVerifyWorker

__all__ = ["Acceptance", "DraftTree", "GDNDraftWorker", "GDNSpeculativeWorker", "GDNVerifyWorker", "ModelDrafter", "NGramDrafter", "SpecSession", "SpecStats", "SpeculativeEngine",
           "TreeConfig", "accept_greedy", "accept_sampling", "build_tree"]
