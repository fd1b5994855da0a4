"""The GDNSPEC_* on/off switches: one reader, so that every switch takes the same values and fails the same way.

    from gdnspec.ops._env import flag
    on = flag("GDNSPEC_TREE_INDEX", default=True)     # unset / "" -> default; "0" / "1"; anything else raises
"""
from __future__ import annotations

import os

__all__ = ["flag", "cpu_compile"]


def flag(name: str, *, default: bool) -> bool:
    """The environment variable `name` as a bool: unset or "" = `default`, "1" = on, "0" = off. Any other value
    raises a ValueError naming the variable (a typo such as "true" must not silently run the other path)."""
    d = "1" if default else "0"
    v = os.environ.get(name) or d
    if v not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (unset = {d}), got {v!r}")
    return v == "1"


def cpu_compile() -> bool:
    """GDNSPEC_CPU_COMPILE (default 0): compile the covered CPU steps with torch.compile (models/cpu_compiled.py)."""
    return flag("GDNSPEC_CPU_COMPILE", default=False)
