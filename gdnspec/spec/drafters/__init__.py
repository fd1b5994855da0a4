"""Drafters: every draft source fills the same DraftTree (see base.py for the interface)."""
from gdnspec.spec.drafters.base import Drafter, DraftState, check_drafter
from gdnspec.spec.drafters.eagle import EagleDrafter
from gdnspec.spec.drafters.model import ModelDrafter
from gdnspec.spec.drafters.ngram import NGramDrafter
from gdnspec.spec.drafters.null import NullDrafter
from gdnspec.spec.drafters.oracle import OracleDrafter

__all__ = ["DraftState", "Drafter", "check_drafter", "EagleDrafter", "ModelDrafter", "NGramDrafter", "NullDrafter",
           "OracleDrafter"]
