"""Drafters: every draft source fills the same DraftTree (see base.py for the interface)."""
from gdnspec.spec.drafters.base import Drafter, DraftState
from gdnspec.spec.drafters.model import ModelDrafter
from gdnspec.spec.drafters.ngram import NGramDrafter

__all__ = ["DraftState", "Drafter", "ModelDrafter", "NGramDrafter"]
