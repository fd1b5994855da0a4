"""Shape checks shared by the fused kernels' wrappers: the kernels index with the shapes they assume, so a tensor of
another shape must be refused (ValueError naming it) before any launch, never read or written out of bounds."""
from __future__ import annotations

import torch


def check_shape(name: str, t: torch.Tensor, shape: tuple, what: str = "") -> None:
    """ValueError unless t.shape == shape; `what` names the dims, e.g. '(B, HV, K, V)'."""
    if tuple(t.shape) != tuple(shape):
        dims = f"{what} = " if what else ""
        raise ValueError(f"{name} must have shape {dims}{tuple(shape)}, got {tuple(t.shape)}")


def check_layout(layout) -> None:
    """A ProjLayout the kernels can run: HV a multiple of H."""
    if layout.H < 1 or layout.HV % layout.H:
        raise ValueError(f"the number of value heads HV={layout.HV} must be a multiple of the key heads H={layout.H}")
