"""CPU linear layers through oneDNN with pre-packed weights, where that beats F.linear (MKL) for a step's shapes.

    y = linear(x, weight, bias, holder=module, name="w_in")   # x (..., K) float32 on the CPU, weight (N, K) -> (..., N)

A small model's CPU step is a chain of skinny products: 1 row at decode, N rows (the tree's nodes) at verify, a few
rows at a drafter's catch-up. On the 2-core AMD EPYC machines of this project (torch 2.13, 2 threads) MKL's sgemm
costs 1.0-1.1x its 1-row GEMV at 2 rows, 1.6-1.9x at 5 and 2.5-2.9x at 16 (hot weights), while oneDNN's inner product on a weight reordered once into its blocked
layout (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, the ops torch's inductor uses for frozen
CPU linears) costs a fixed ~30 us plus far less per row. Measured (us, MKL / packed oneDNN, weights cache-resident
"hot" and rotated past the L3 "cold", as a 67 MB model's are in a step; benchmarks/bench_cpu_linear.py,
results/stop17/cpu_linear_threads2.json):

    weight (N x K)   1 row hot / cold            5 rows hot / cold          16 rows hot / cold
    2048 x 384       79/62  269/138              131/89  289/169            200/196  358/274
    384 x 1024       36/50  93/80                89/65   118/103            129/122  155/163
    8192 x 384       364/173  1057/511           709/299  1225/582          1044/796  1538/1005
    384 x 256        12/33  39/42                21/36   49/49              32/50  62/64

so `packed_pays` takes oneDNN for weights of >= 180k elements at 2+ rows and >= 600k at one row, MKL otherwise
(a 180k threshold at one row too made the draft model's expansion 1.6 -> 1.8 ms: its small weights stay hot).
float32 only (oneDNN has no float64 inner product; float64 stays F.linear, the reference precision); both are
float32-accurate (max relative error against float64 ~7e-7 vs ~3e-7 for MKL on 1032 x 384), but they round
differently in the last bits. The packed copy is cached on `holder` per (weight storage, pointer, version counter, shape, strides;
out_perm tensor and its version), so an in-place weight update or a new tensor at the same address repacks (a
Parameter made a `.data` view of another buffer has its own version counter: pass the tensor that is updated, or
rebuild the holder when it changes, as models/cpu_fast.py does); weights without a version counter (inference tensors) are never packed (F.linear).
GDNSPEC_CPU_ONEDNN=0 turns the packed path off (A/B timing); any value but 0 / 1 / unset raises ValueError.

Cost: one packed copy of each weight that takes this path (default bundle: +70 MB peak), at most PACK_BUDGET_BYTES
per process (1 GiB; weights beyond it stay with F.linear, so a large float32 model on the CPU is not doubled).
Measured whole-process (`farm-bench -n 4`, `gdnspec eval --threads 2 --drafters eagle,model --shapes chain-4
--num-prompts 3`, paired A/B against GDNSPEC_CPU_ONEDNN=0): wall time 0.960x (every pair 0.91-0.985x). The full eval
(README, 6 prompts) gains more on plain decoding (+10%) than on speculative decoding (EAGLE +9-14%, the draft model
~0), so its speedup ratios fell slightly.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from gdnspec.ops._env import flag

__all__ = ["PACK_BUDGET_BYTES", "available", "enabled", "linear", "packed_linear", "packed_pays"]

PACK_BUDGET_BYTES = 1 << 30
_packed_bytes = 0  # bytes of the packed copies alive in this process (an entry gives them back when replaced / freed)


def available() -> bool:
    """oneDNN's packed linear ops exist in this torch build (CPU builds with mkldnn)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and ops is not None
                    and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def enabled() -> bool:
    """GDNSPEC_CPU_ONEDNN: unset / "" / 1 = on where available, 0 = off."""
    return flag("GDNSPEC_CPU_ONEDNN", default=True) and available()


def packed_pays(rows: int, N: int, K: int) -> bool:
    """Whether the packed oneDNN product beats F.linear for `rows` rows of an (N, K) weight (see the module table)."""
    return N * K >= (600_000 if rows <= 1 else 180_000)


def _dropped() -> None:
    return None


class _PackedEntry:
    """(key, packed weight) cached on a module. oneDNN's packed tensors are opaque (no storage): copy.deepcopy and
    pickling (torch.save of a whole module) would fail on them, so a copy or a pickle of the cache is None (the copy
    repacks on first use). `storage` is a weak reference to the weight's storage: a weight freed and replaced by
    another tensor at the same address (same data pointer, a fresh version counter) does not match. `perm` is the
    out_perm tensor itself (held: its address could be reused the same way) and `perm_version` its version."""

    __slots__ = ("key", "packed", "storage", "perm", "perm_version", "nbytes")

    def __init__(self, key, packed, storage, perm, nbytes: int):
        self.key, self.packed, self.storage = key, packed, storage
        self.perm, self.perm_version = perm, None if perm is None else perm._version
        self.nbytes = nbytes

    def __del__(self):  # a replaced or freed entry gives its bytes back to the packing budget
        global _packed_bytes
        _packed_bytes -= getattr(self, "nbytes", 0)

    def matches(self, key, w: torch.Tensor, perm: torch.Tensor | None) -> bool:
        return (self.key == key and self.storage() is w.untyped_storage() and self.perm is perm
                and (perm is None or self.perm_version == perm._version))

    def __reduce__(self):
        return (_dropped, ())


def _packed(holder, name: str, w: torch.Tensor, out_perm: torch.Tensor | None = None) -> torch.Tensor | None:
    """The oneDNN-packed copy of w (its rows in out_perm's order when given) cached on holder.__dict__[name]; None for
    weights without a version counter or beyond the packing budget."""
    global _packed_bytes
    if w.is_inference() or w.requires_grad and torch.is_grad_enabled():
        return None
    key = (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype)
    ent = holder.__dict__.get(name)
    if ent is None or not ent.matches(key, w, out_perm):
        nbytes = w.numel() * w.element_size()
        if _packed_bytes + nbytes > PACK_BUDGET_BYTES:
            return None
        _packed_bytes += nbytes
        with torch.no_grad():
            src = w.detach() if out_perm is None else w.detach().index_select(0, out_perm)
            ent = _PackedEntry(key, torch.ops.mkldnn._reorder_linear_weight(src.contiguous(), None),
                               weakref.ref(w.untyped_storage()), out_perm, nbytes)
        holder.__dict__[name] = ent
    return ent.packed


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, holder, name: str,
                  out_perm: torch.Tensor | None = None) -> torch.Tensor | None:
    """The oneDNN product of `linear` when it applies (float32 CPU tensors, no gradient needed, a shape that pays,
    the switch on, a packable weight within the budget), else None: callers with a fallback of their own (the LM
    head's cached-transpose forms) take it; `linear` falls back to F.linear."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2
            or weight.shape[1] != K or (bias is not None and bias.dtype != torch.float32) or rows == 0
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or not packed_pays(rows, weight.shape[0], K) or not enabled()):
        return None
    p = _packed(holder, name, weight, out_perm)
    if p is None:
        return None
    b = bias if bias is None or out_perm is None else bias.index_select(0, out_perm)
    return torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, holder, name: str,
           out_perm: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN with a packed weight cached on `holder` under `name` when the shape
    pays (`packed_pays`), x and weight are float32 CPU tensors and no gradient is needed; F.linear otherwise.
    x (..., K), weight (N, K), bias (N,) or None -> (..., N). out_perm (N,) long: return the output's columns in that
    order (y[..., out_perm]); the packed path packs the weight's rows in that order, so the reordering costs nothing
    (an index_select over the last dim of a multi-row output costs ~50 us on the CPU)."""
    y = packed_linear(x, weight, bias, holder=holder, name=name, out_perm=out_perm)
    if y is not None:
        return y
    y = F.linear(x, weight, bias)
    if out_perm is None:
        return y
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    return y.index_select(-1, out_perm) if rows == 1 else y[..., out_perm]
