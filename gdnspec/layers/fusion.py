"""Fused projection weights: the separate Linear layers that read the same input become row blocks of ONE buffer.

    w, b = fused_linear(owner, ["in_proj_qkvz", "in_proj_ba"])    # w (sum of out_features, in_features)
    y = F.linear(x, w, b)                                          # one GEMM / GEMV instead of several

The first call copies the weights into one contiguous buffer and re-points each Linear's parameter at its row block
(`param.data = view`: the Parameter objects stay the same, so an optimizer made before the fusion still updates the
numbers the fused path reads; a view, so no memory is duplicated and every other code path keeps using the same numbers); later calls return the
buffer while the parameters still are those views, and re-fuse when a weight was replaced (load_state_dict with
assign, .to(...), a tied or re-initialised weight). In-place updates (optimizer steps, copy_) reach the buffer by
construction. Like vLLM's merged column-parallel linears, but done lazily on the module that owns them.
"""
from __future__ import annotations

import torch
from torch import nn


def _is_view_of(p: torch.Tensor, buf: torch.Tensor, row: int) -> bool:
    return (p.device == buf.device and p.dtype == buf.dtype and p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and p.data_ptr() == buf[row:].data_ptr() and p.is_contiguous())


def _repoint(lin: nn.Module, name: str, view: torch.Tensor) -> None:
    """Make lin.<name> a view of the fused buffer. A normal parameter keeps its object (`.data = view`), so optimizers,
    EMA copies and anything else holding a reference keep reaching the numbers the model uses; a parameter made
    under torch.inference_mode (an inference tensor, which cannot take a normal tensor's data and cannot be trained)
    is replaced by a new Parameter."""
    p = getattr(lin, name)
    if p.is_inference():
        setattr(lin, name, nn.Parameter(view, requires_grad=p.requires_grad))
    else:
        p.data = view


def fused_linear(owner: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (sum out, in), bias or None) of the Linear children `names` of `owner`, fused as described above.
    All must share in_features, dtype, device and the presence of a bias."""
    linears = [getattr(owner, n) for n in names]
    key = "_fused_" + "_".join(names)
    cached = owner.__dict__.get(key)
    if cached is not None:
        w, b, rows = cached
        if all(_is_view_of(lin.weight, w, r) for lin, r in zip(linears, rows)) and (
                b is None or all(_is_view_of(lin.bias, b, r) for lin, r in zip(linears, rows))):
            return w, b
    if len({lin.in_features for lin in linears}) != 1 or len({lin.weight.dtype for lin in linears}) != 1:
        raise ValueError(f"cannot fuse {names}: in_features / dtypes differ")
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError(f"cannot fuse {names}: some have a bias and some do not")
    rows, r = [], 0
    for lin in linears:
        rows.append(r)
        r += lin.out_features
    with torch.inference_mode(False), torch.no_grad():
        w = torch.cat([lin.weight.detach() for lin in linears], dim=0).contiguous()
        b = torch.cat([lin.bias.detach() for lin in linears], dim=0).contiguous() if all(has_bias) else None
        for lin, r0 in zip(linears, rows):
            _repoint(lin, "weight", w[r0: r0 + lin.out_features])
            if b is not None:
                _repoint(lin, "bias", b[r0: r0 + lin.out_features])
    owner.__dict__[key] = (w, b, rows)
    return w, b
