"""The CPU fast path: the decode step, the tree verify and the drafters' steps with as few torch ops as the maths needs.

On the CPU every torch op costs microseconds of dispatch whatever its size, and a small model's step is hundreds of
small ops. The module-by-module path (`DecoderLayer.forward_state` / `forward_tree`, the reference) pays for generic
shape handling, casts, checks and per-layer recomputation of step constants. This module runs the same maths with:

- one GEMM per projection group, on the fused weight buffers of layers/fusion.py (views of one buffer, no copies):
  the GDN in-projection (qkvz|ba or qkv|z|b|a), attention q|k|v, MLP gate|up; where the checkpoint's row order
  interleaves heads (qwen3_next in-projection; q|gate per attention head) the output comes in [q | k | v | z | b | a]
  / [q | k | v | gate] order (q and k adjacent: normed and rotated together): from a weight packed in that row order
  where the product takes oneDNN (ops/cpu_linear.py: float32, shapes that pay), else one index_select of the output;
  pieces are split views;
- the single-token GDN step as: conv update (cat + one vecdot over the window), q/k L2 norm as ONE rms_norm
  (x * rsqrt(sum x^2 + eps) == rms_norm(x, eps / K) * K^-0.5 exactly), gates, the recurrence on the state in place
  (mul_, matmul, addcmul_, matmul), the q scale K^-0.5 folded into the gated RMSNorm's eps (rms_norm(c o, eps) ==
  rms_norm(o, eps / c^2) exactly), one out GEMM;
- the tree verify's tree-WY with q and k stacked ([Q; K] @ K^T and [Q; K] @ S0 in one matmul each) and one
  triangular solve on the V columns only (v_new = T beta (V - e^gamma K S0)), with the ancestor mask as float, its
  complement, and the conv window gather index built ONCE per verify and shared by every GDN layer;
- attention with the RoPE rows, masks and positions built once per step for all attention layers (when their rows'
  lengths agree), grouped query heads folded into the query length (no repeated keys), the decode token's key and
  value written straight into the cache;
- per-step constants ((1 + w) norm scales, -exp(A_log), the permuted weights) cached on the modules and rebuilt when a
  weight changes (a new tensor or an in-place update: data pointer and version counter are checked); weights that
  are inference tensors (made under torch.inference_mode) have no version counter and are re-derived at every call.

Where it applies (`applies`): CPU tensors, GDN backend "torch" (gdn_backend "auto" on the CPU), float32 or float64
weights and activations, no autograd, `model.fused_steps` True (the one switch for the fused steps: the Triton kernels
on CUDA, this path on the CPU) and the environment variable GDNSPEC_CPU_FAST not "0" (A/B timing through the CLI).
Entry points: `GDNForCausalLM.forward` (T == 1, mode "auto" / "fused_decode"), `GDNForCausalLM.forward_tree` (any N),
`EagleHead.decode_step` and `EagleHead.catch_up`; the draft model's expansion and catch-up go through the first two.
Results equal the module path up to float rounding (float64: ~1e-13 relative; tests/test_cpu_fast.py), states too.

Measured notes (2-core shared CPU, torch 2.13; op counts by benchmarks/bench_cpu_ops.py): on the default bundle most
of a decode step's time is aten::mm over the weights (memory-bound), and a verify of N = 16 nodes does 16x the
multiply-adds of a decode step, so op counts bound the host overhead, not the GEMM floor. F.rms_norm has no fused CPU
kernel here (it decomposes: ~15 us per call vs ~4 us for layer_norm). torch.compile (inductor, CPU) of the GDN decode
mixer written as a pure tensor function: ~30% less time for that piece, cold compile ~4-19 s, ~0.1 s from the warm
FX / inductor cache; compiling the module-taking functions here graph-breaks on the weight cache checks and ran
slower. Adopted as an opt-in switch (GDNSPEC_CPU_COMPILE=1 / --enable-torch-compile) for GDN-only models' decode step
and the EAGLE head's expansion only: models/cpu_compiled.py (pure tensor functions fed by this module's caches).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gdnspec.cache import GDNLayerState, KVCache
from gdnspec.layers.gated_deltanet import GDNTreeCache
from gdnspec.layers.layout import TokenLayout
from gdnspec.layers.mlp import SwiGLUMLP
from gdnspec.ops.cpu_linear import linear as _linear
from gdnspec.ops.gated_delta_rule.tree import TreeGDRCache

__all__ = ["applies", "decode_step", "verify_step", "eagle_decode_step", "eagle_catch_up", "gdn_tree_mixer"]

_FLOATS = (torch.float32, torch.float64)


def env_enabled() -> bool:
    """GDNSPEC_CPU_FAST=0 turns the CPU fast path off (the module path everywhere), for A/B timing."""
    return os.environ.get("GDNSPEC_CPU_FAST", "1") != "0"


def applies(model, h: torch.Tensor) -> bool:
    """Whether `model`'s steps on activations h take this path (see the module docstring)."""
    if not getattr(model, "fused_steps", False) or h.device.type != "cpu" or h.dtype not in _FLOATS:
        return False
    if model.dtype != h.dtype or model._backend(h) != "torch" or not env_enabled():
        return False
    return not (torch.is_grad_enabled() and model.embed_tokens.weight.requires_grad)


def states_fit(model, state, dtype: torch.dtype) -> bool:
    """Every layer state holds `dtype` (the module path would cast or refuse otherwise)."""
    for layer, s in zip(model.layers, state.layers):
        if isinstance(s, GDNLayerState):
            if s.recurrent.dtype != dtype or s.conv.dtype != dtype:
                return False
        elif s.k.dtype != dtype or s.v.dtype != dtype:
            return False
    return True


# --------------------------------------------------------------------------------------------- cached derived weights
def _ver(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # never matches a cached key (those hold normal tensors only)


def _cached(owner, name: str, sources, build):
    """build() cached on owner.__dict__[name], rebuilt when any of `sources` (tensors) is replaced (data pointer) or
    changed in place (version counter). Inference tensors (weights created under torch.inference_mode) have no version
    counter, so with such a source nothing is cached: build() runs at every call (correct, but it costs the copies
    every step; build models outside inference mode, as gdnspec.load does). The key is taken after build (building
    may re-point parameters, layers/fusion.py)."""
    ent = owner.__dict__.get(name)
    if ent is not None:
        key = ent[0]
        if len(key) == len(sources) and all(k[0] == t.data_ptr() and k[1] == _ver(t) for k, t in zip(key, sources)):
            return ent[1]
    with torch.no_grad():
        val = build()
    if not any(t.is_inference() for t in sources):
        owner.__dict__[name] = (tuple((t.data_ptr(), t._version) for t in sources), val)
    return val


def norm_scale(norm) -> torch.Tensor:
    """The multiplier of an RMSNorm in its weight dtype: 1 + weight (offset) or weight, cached."""
    w = norm.weight
    if not norm.offset:
        return w
    return _cached(norm, "_cpu_scale", (w,), lambda: (1.0 + w.detach()).contiguous())


def _shape_const(owner, key, build):
    """A tensor that depends on the module's shapes only (index orders, constant weights): cached for good."""
    consts = owner.__dict__.setdefault("_cpu_consts", {})
    if key not in consts:
        with torch.inference_mode(False), torch.no_grad():
            consts[key] = build()
    return consts[key]


def _gdn_perm(m, device):
    """Columns of a qwen3_next in-projection row in [q | k | v | z | b | a] order (None: qwen3_5, in order)."""
    if m.layout != "qwen3_next":
        return None
    L = m.proj_layout()
    return torch.cat([L.gather_index(p) for p in ("q", "k", "v", "z", "b", "a")]).to(device)


def _attn_perm(H: int, Hkv: int, D: int, device):
    """Columns of the fused q|k|v output ([q_h | gate_h] per head, k, v) in [q | k | v | gate] order."""
    qg = torch.arange(2 * H * D, device=device).view(H, 2, D)
    rest = torch.arange(2 * H * D, 2 * (H + Hkv) * D, device=device)
    return torch.cat([qg[:, 0].reshape(-1), rest, qg[:, 1].reshape(-1)])


class _GDNPack:
    """Derived tensors of one Qwen3GatedDeltaNet layer for the fast path. w_in is the fused in-projection buffer of
    layers/fusion.py (checkpoint row order, views: no copy); `perm` (None for qwen3_5, whose rows are in order already)
    reorders a projection row to [q | k | v | z | b | a]."""

    def __init__(self, m):
        H, HV, K, V = m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim
        self.H, self.HV, self.K, self.V, self.r = H, HV, K, V, HV // H
        self.CD, self.VD, self.HK = m.conv_dim, m.value_dim, m.key_dim
        self.W = m.conv_kernel_size
        w = self.w_in = m.fused_in_proj()
        self.perm = _shape_const(m, ("gdn_perm", w.device), lambda: _gdn_perm(m, w.device))
        dt = w.dtype
        self.conv_w = m.conv1d.weight.detach().squeeze(1)  # (CD, W), a view
        self.conv_wT = self.conv_w.t()  # (W, CD) for the tree conv, a view
        neg_exp_A = -m.A_log.detach().to(dt).exp()  # (HV,): g = -exp(A_log) * softplus(a + dt_bias)
        dt_bias = m.dt_bias.detach().to(dt)
        self.neg_exp_A3, self.dt_bias3 = neg_exp_A.view(HV, 1, 1), dt_bias.view(HV, 1, 1)  # decode
        self.neg_exp_A2, self.dt_bias2 = neg_exp_A.view(HV, 1), dt_bias.view(HV, 1)  # tree
        self.l2w = _shape_const(m, ("l2w", dt, w.device),  # the rms_norm weight that makes it the L2 norm
                                lambda: torch.full((K,), K**-0.5, dtype=dt, device=w.device))
        self.l2eps = 1e-6 / K  # l2norm's eps (ops/gated_delta_rule/common.l2norm) over K
        self.norm_w = m.norm.weight.detach()
        self.norm_eps = m.norm.eps * K  # the K^-0.5 query scale folded into the gated RMSNorm
        self.out_w = m.out_proj.weight.detach()
        self.out_b = None if m.out_proj.bias is None else m.out_proj.bias.detach()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> (..., P) with columns [q | k | v | z | b | a]."""
        return _linear(x, self.w_in, holder=self, name="_packed_in", out_perm=self.perm)


def gdn_pack(m) -> _GDNPack:
    names = ["in_proj_qkvz", "in_proj_ba"] if m.layout == "qwen3_next" else ["in_proj_qkv", "in_proj_z", "in_proj_b",
                                                                              "in_proj_a"]
    src = [getattr(m, n).weight for n in names] + [m.conv1d.weight, m.A_log, m.dt_bias, m.norm.weight,
                                                   m.out_proj.weight]
    return _cached(m, "_cpu_pack", src, lambda: _GDNPack(m))


class _AttnPack:
    """Derived tensors of one GatedAttention layer: the fused q|k|v weight buffer (layers/fusion.py, views), the
    column order `perm` that turns its output into [q (H*D) | k | v | gate (H*D)] (q and k adjacent: normed and
    rotated together), the q/k norm scales per head (H + Hkv, D)."""

    def __init__(self, m):
        H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
        self.H, self.Hkv, self.D, self.r = H, Hkv, D, H // Hkv
        self.w, self.b = m.fused_qkv()
        self.perm = _shape_const(m, ("attn_perm", self.w.device), lambda: _attn_perm(H, Hkv, D, self.w.device))
        sq, sk = 1.0 + m.q_norm.weight.detach(), 1.0 + m.k_norm.weight.detach()
        self.qk_scale = torch.cat([sq.expand(H, D), sk.expand(Hkv, D)]).contiguous()  # (H + Hkv, D)
        self.eps = m.q_norm.eps
        self.k_eps_same = m.k_norm.eps == m.q_norm.eps
        self.k_eps = m.k_norm.eps
        self.o_w = m.o_proj.weight.detach()
        self.o_b = None if m.o_proj.bias is None else m.o_proj.bias.detach()
        self.scale = D**-0.5

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> (..., (2H + 2Hkv) D) with columns [q | k | v | gate]."""
        return _linear(x, self.w, self.b, holder=self, name="_packed_qkv", out_perm=self.perm)


def attn_pack(m) -> _AttnPack:
    src = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.q_norm.weight, m.k_norm.weight, m.o_proj.weight]
    if m.q_proj.bias is not None:
        src += [m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]
    return _cached(m, "_cpu_pack", src, lambda: _AttnPack(m))


class _GateUp:
    """[gate | up] of a SwiGLUMLP: the fused view buffer `w` (layers/fusion.py), and the holder of its packed copy
    (ops/cpu_linear.py). Rebuilt (by _cached) when gate_proj / up_proj change: the Parameters are `.data` views of the
    buffer with version counters of their own, so an in-place update through them (load_state_dict, an optimizer
    step) moves their counters but not the buffer's, and a packed copy keyed on the buffer alone would go stale."""

    def __init__(self, mlp: SwiGLUMLP):
        self.w = mlp.fused_gate_up()


def _gate_up(mlp: SwiGLUMLP) -> _GateUp:
    return _cached(mlp, "_cpu_gate_up", (mlp.gate_proj.weight, mlp.up_proj.weight), lambda: _GateUp(mlp))


def mlp_weights(mlp: SwiGLUMLP) -> torch.Tensor:
    """[gate | up] as one (2I, hidden) matrix: the fused view buffer (layers/fusion.py), checked cheaply."""
    return _gate_up(mlp).w


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """The layer's MLP on normed x: [gate | up] GEMM, silu * up, down GEMM (5 ops); a MoE block runs as a module."""
    if not isinstance(mlp, SwiGLUMLP):
        return mlp(x)
    gu = _gate_up(mlp)
    g, u = _linear(x, gu.w, holder=gu, name="_packed").chunk(2, dim=-1)
    return _linear(F.silu(g) * u, mlp.down_proj.weight, holder=mlp, name="_packed_down")


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm_scale(norm), norm.eps)


# --------------------------------------------------------------------------------------------- GDN: one token per row
def gdn_decode(m, x: torch.Tensor, state: GDNLayerState) -> torch.Tensor:
    """The GDN mixer on one token per row: x (B, 1, hidden) normed, float32/64 -> (B, 1, hidden); state.conv
    (B, conv_dim, W-1) and state.recurrent (B, HV, K, V) advanced IN PLACE (same dtype as x)."""
    p = gdn_pack(m)
    B = x.shape[0]
    HV, K, V = p.HV, p.K, p.V
    mixed, z, ba = p.project(x).split([p.CD, p.VD, 2 * HV], dim=-1)  # (B, 1, .)
    conv = state.conv
    full = torch.cat([conv, mixed.mT], dim=-1)  # (B, CD, W)
    conv.copy_(full[:, :, 1:])
    mc = F.silu(torch.linalg.vecdot(full, p.conv_w))  # (B, CD)
    qk, v = mc.split([2 * p.HK, p.VD], dim=-1)
    qk = F.rms_norm(qk.view(B, 2 * p.H, K), (K,), p.l2w, p.l2eps)  # L2-normalised q and k heads
    if p.r > 1:
        qk = qk.repeat_interleave(p.r, dim=1)
    q, k = qk.view(B, 2, HV, 1, K).unbind(1)  # (B, HV, 1, K)
    b, a = ba.view(B, 2, HV, 1, 1).unbind(1)
    alpha = torch.exp(F.softplus(a + p.dt_bias3) * p.neg_exp_A3)  # (B, HV, 1, 1)
    S = state.recurrent
    S.mul_(alpha)
    u = (v.view(B, HV, 1, V) - k @ S) * torch.sigmoid(b)  # beta (v - S^T k)
    S.addcmul_(k.mT, u)  # S += k u^T
    o = q @ S  # (B, HV, 1, V), without the K^-0.5 of q (folded into the norm's eps)
    y = F.rms_norm(o, (V,), p.norm_w, p.norm_eps) * F.silu(z.view(B, HV, 1, V))
    return _linear(y.view(B, 1, p.VD), p.out_w, p.out_b, holder=p, name="_packed_out")


# --------------------------------------------------------------------------------------------- GDN: tree of N nodes
class TreeSetup:
    """What every GDN layer of one verify shares: the ancestor mask as float (B, 1, N, N), its complement, the conv
    window index (B, N, W) and its flat row index into the (B * (W-1+N), conv_dim) sequence."""

    def __init__(self, layout: TokenLayout, W: int, dtype: torch.dtype):
        anc = layout.ancestor_mask
        B, N = anc.shape[:2]
        self.B, self.N, self.W = B, N, W
        self.A = anc.to(dtype)[:, None]
        self.not_A = ~anc[:, None]
        self.anc = anc
        self.window_index = layout.conv_window_index(W)  # (B, N, W)
        off = torch.arange(B, device=anc.device)[:, None, None] * (W - 1 + N)
        self.flat = (self.window_index + off).view(-1)


def gdn_tree_mixer(m, x: torch.Tensor, state: GDNLayerState, setup: TreeSetup, *, need_output: bool = True):
    """The GDN mixer over tree nodes: x (B, N, hidden) normed -> (out (B, N, hidden) or None, GDNTreeCache for
    commit_tree). `state` is only read. need_output=False (a catch-up, which only commits) skips the output side."""
    p = gdn_pack(m)
    B, N = x.shape[:2]
    HV, K, V = p.HV, p.K, p.V
    mixed, z, ba = p.project(x).split([p.CD, p.VD, 2 * HV], dim=-1)  # (B, N, .)
    seq = torch.cat([state.conv.mT, mixed], dim=1)  # (B, W-1+N, CD)
    win = seq.view(-1, p.CD).index_select(0, setup.flat).view(B, N, p.W, p.CD)
    mc = F.silu((win * p.conv_wT).sum(2))  # (B, N, CD)
    qk, v = mc.split([2 * p.HK, p.VD], dim=-1)
    qk = F.rms_norm(qk.view(B, N, 2 * p.H, K), (K,), p.l2w, p.l2eps)
    if p.r > 1:
        qk = qk.repeat_interleave(p.r, dim=2)
    QK = qk.view(B, N, 2, HV, K).permute(0, 3, 2, 1, 4).reshape(B, HV, 2 * N, K)  # rows [q nodes | k nodes]
    b, a = ba.view(B, N, 2, HV).permute(2, 0, 3, 1).unbind(0)  # (B, HV, N)
    g = F.softplus(a + p.dt_bias2) * p.neg_exp_A2
    gamma = setup.A @ g[..., None]  # (B, HV, N, 1): sum of g along the path
    Gamma = (gamma - gamma.mT).masked_fill_(setup.not_A, float("-inf")).exp_()  # (B, HV, N, N)
    k = QK[:, :, N:]
    Y = (QK @ k.mT).view(B, HV, 2, N, N) * Gamma[:, :, None]  # [Q K^T; K K^T] * Gamma
    X = (QK @ state.recurrent).view(B, HV, 2, N, V) * gamma.exp()[:, :, None]  # e^gamma [Q S0; K S0]
    QKG, KKG = Y.unbind(2)
    qS, kS = X.unbind(2)
    beta = torch.sigmoid(b)[..., None]  # (B, HV, N, 1)
    rhs = (v.view(B, N, HV, V).transpose(1, 2) - kS) * beta
    v_new = torch.linalg.solve_triangular(KKG * beta, rhs, upper=False, unitriangular=True)  # (B, HV, N, V)
    cache = GDNTreeCache(gdr=TreeGDRCache(k=k, v_new=v_new, gamma=gamma.squeeze(-1), ancestor_mask=setup.anc),
                         conv_input=mixed, conv_window_index=setup.window_index)
    if not need_output:
        return None, cache
    o = qS + QKG @ v_new  # (B, HV, N, V), without q's K^-0.5 (folded into the norm's eps)
    y = F.rms_norm(o.transpose(1, 2), (V,), p.norm_w, p.norm_eps) * F.silu(z.view(B, N, HV, V))
    return _linear(y.reshape(B, N, p.VD), p.out_w, p.out_b, holder=p, name="_packed_out"), cache


# --------------------------------------------------------------------------------------------- GDN: commit
class CommitPlan:
    """What every GDN layer's commit shares: the accepted node last (B,) long, the complement of its path (B, 1, N)
    bool, its gamma column index (per value-head count HV) and the flat rows (B * (W-1),) of its new conv window in
    the (B * (W-1+N), conv_dim) sequence [old window | node inputs]."""

    def __init__(self, ancestor_mask: torch.Tensor, last: torch.Tensor, W: int):
        B, N = ancestor_mask.shape[:2]
        rows = torch.arange(B, device=last.device)
        self.B, self.N, self.W, self.last = B, N, W, last
        self.not_path = ~ancestor_mask[rows, last][:, None]  # (B, 1, N)
        self._gidx: dict = {}
        self._rows = rows
        self._flat = None

    def gamma_index(self, HV: int) -> torch.Tensor:
        idx = self._gidx.get(HV)
        if idx is None:
            idx = self._gidx[HV] = self.last.view(self.B, 1, 1).expand(self.B, HV, 1)
        return idx

    def conv_rows(self, window_index: torch.Tensor) -> torch.Tensor:
        if self._flat is None:
            B, N, W = self.B, self.N, self.W
            off = torch.arange(B, device=window_index.device)[:, None] * (W - 1 + N)
            self._flat = (window_index[self._rows, self.last, 1:] + off).view(-1)  # (B * (W-1),)
        return self._flat


def gdn_commit(state: GDNLayerState, cache: GDNTreeCache, plan: CommitPlan) -> None:
    """Qwen3GatedDeltaNet.commit_tree on this path: state (in place) <- the state after node plan.last of each row,
    S = e^gamma_a S0 + (k * e^(gamma_a - gamma) on the path)^T v_new and the path's newest W-1 conv inputs; the
    same maths as ops/gated_delta_rule/tree.tree_commit_state + ops/conv1d/tree.tree_conv_commit_state (the
    references; tests/test_cpu_fast.py), in ~10 ops instead of ~30. Needs the cache in the state's dtype."""
    gdr = cache.gdr
    B, HV, N, K = gdr.k.shape
    g_a = gdr.gamma.gather(2, plan.gamma_index(HV))  # (B, HV, 1)
    coeff = (g_a - gdr.gamma).masked_fill_(plan.not_path, float("-inf")).exp_()  # (B, HV, N)
    S = state.recurrent
    S.mul_(g_a.exp_()[..., None])
    S.add_((gdr.k * coeff[..., None]).mT @ gdr.v_new)
    x = cache.conv_inputs()  # (B, N, CD)
    conv = state.conv  # (B, CD, W-1)
    seq = torch.cat([conv.mT, x], dim=1).view(-1, x.shape[-1])  # (B * (W-1+N), CD)
    conv.copy_(seq.index_select(0, plan.conv_rows(cache.conv_window_index)).view(B, -1, x.shape[-1]).mT)


def commits_fast(state, caches) -> bool:
    """Whether every GDN layer cache of a verify is a torch TreeGDRCache in its state's dtype (the CPU verify's)."""
    for s, c in zip(state.layers, caches):
        if isinstance(s, GDNLayerState):
            if not (isinstance(c, GDNTreeCache) and isinstance(c.gdr, TreeGDRCache)
                    and c.gdr.k.dtype == s.recurrent.dtype and c.conv_input.dtype == s.conv.dtype):
                return False
    return True


def commit_step(model, state, caches, *, path: torch.Tensor, counts: torch.Tensor, last: torch.Tensor,
                reserve: bool = True) -> None:
    """GDNForCausalLM.commit_tree on this path for rows that all accept (counts >= 1): GDN layers through
    `gdn_commit` with one CommitPlan, attention layers through their module commit."""
    plan = None
    for layer, s, cache in zip(model.layers, state.layers, caches):
        if layer.layer_type == "linear_attention":
            if plan is None:
                plan = CommitPlan(cache.gdr.ancestor_mask, last, cache.conv_window_index.shape[-1])
            gdn_commit(s, cache, plan)
        else:
            layer.self_attn.commit(s, cache, path, counts, reserve=reserve)


# --------------------------------------------------------------------------------------------- attention
class _AttnStep:
    """Per-step attention constants shared by the layers whose caches hold the same lengths (and capacity): the host
    lengths and their max n, the RoPE rows cos / sin of the positions (None without rotary dims) and the rotate-half
    permutation, the key mask (None: every row sees all n + T keys), and for a decode step with rows of different
    lengths the (row, position) index of the new token's slot."""

    def __init__(self, lens: list[int], n: int, capacity: int, *, cos=None, sin=None, perm=None, mask=None,
                 rows=None, slots=None):
        self.lens, self.n, self.capacity = lens, n, capacity
        self.cos, self.sin, self.perm, self.mask, self.rows, self.slots = cos, sin, perm, mask, rows, slots


def _rope_rows(m, cache: KVCache, positions: torch.Tensor, max_position: int):
    """(cos, sin, perm) of the cached RoPE table at `positions` (any shape P): cos, sin (*P, D)."""
    table, perm = m.rotary._table(cache.k, positions, max_position)
    cos, sin = table[:, positions].unbind(0)
    return cos, sin, perm


def _decode_setup(m, cache: KVCache, lens: list[int]) -> _AttnStep:
    n = max(lens)
    lengths = cache.lengths
    st = _AttnStep(lens, n, cache.capacity)
    if m.rotary.rotary_dim:
        st.cos, st.sin, st.perm = _rope_rows(m, cache, lengths[:, None], n + 1)  # (B, 1, D): broadcast over heads
    if min(lens) != n:
        B = len(lens)
        st.mask = (torch.arange(n + 1, device=lengths.device) <= lengths[:, None]).view(B, 1, 1, n + 1)
        st.rows, st.slots = torch.arange(B, device=lengths.device), lengths.clone()  # before any layer advances
    return st


def _qk_rope(pa: _AttnPack, qk: torch.Tensor, st: _AttnStep) -> torch.Tensor:
    """qk (..., H + Hkv, D) -> q_norm / k_norm applied and rotated, both in one op chain."""
    if pa.k_eps_same:
        qk = F.rms_norm(qk, (pa.D,), None, pa.eps) * pa.qk_scale
    else:
        q, k = qk.split([pa.H, pa.Hkv], dim=-2)
        qk = torch.cat([F.rms_norm(q, (pa.D,), None, pa.eps), F.rms_norm(k, (pa.D,), None, pa.k_eps)], -2) * pa.qk_scale
    if st.cos is None:
        return qk
    return torch.addcmul(qk * st.cos, qk.index_select(-1, st.perm), st.sin)


def attn_decode(m, x: torch.Tensor, cache: KVCache, st: _AttnStep) -> torch.Tensor:
    """Gated attention of one token per row: x (B, 1, hidden) normed -> (B, 1, hidden); the token's key and value are
    written at position lengths and lengths advanced by one (IN PLACE)."""
    pa = attn_pack(m)
    B = x.shape[0]
    H, Hkv, D = pa.H, pa.Hkv, pa.D
    qk, v, gate = pa.project(x).split([(H + Hkv) * D, Hkv * D, H * D], dim=-1)
    q, k = _qk_rope(pa, qk.view(B, H + Hkv, D), st).split([H, Hkv], dim=1)  # (B, H, D), (B, Hkv, D)
    n = st.n
    if st.mask is None:  # every row holds n positions
        cache.k[:, :, n] = k
        cache.v[:, :, n] = v.view(B, Hkv, D)
    else:
        torch.ops.aten.index_put_(cache.k, [st.rows, None, st.slots], k)
        torch.ops.aten.index_put_(cache.v, [st.rows, None, st.slots], v.view(B, Hkv, D))
    cache.lengths.add_(1)
    # the r query heads of a key head attend as r query rows of that head (no repeated keys)
    attn = F.scaled_dot_product_attention(q.view(B, Hkv, pa.r, D), cache.k[:, :, : n + 1], cache.v[:, :, : n + 1],
                                          attn_mask=st.mask, scale=pa.scale)
    return _linear(attn.view(B, 1, H * D) * torch.sigmoid(gate), pa.o_w, pa.o_b, holder=pa, name="_packed_o")


def _tree_attn_setup(m, cache: KVCache, lens: list[int], layout: TokenLayout) -> _AttnStep:
    B, N = layout.depth.shape
    n = max(lens)
    lens_t = cache.lengths
    st = _AttnStep(lens, n, cache.capacity)
    if m.rotary.rotary_dim:
        pos = lens_t.clamp(max=cache.capacity)[:, None] + layout.depth  # (B, N)
        st.cos, st.sin, st.perm = _rope_rows(m, cache, pos[..., None], cache.capacity + N)  # (B, N, 1, D)
    if min(lens) == n:
        prefix = layout.ancestor_mask.new_ones(()).expand(B, N, n)
    else:
        prefix = (torch.arange(n, device=lens_t.device) < lens_t[:, None])[:, None].expand(B, N, n)
    mask = torch.cat([prefix, layout.ancestor_mask], dim=-1)  # (B, N, n + N)
    r = m.num_heads // m.num_kv_heads
    if r > 1:  # query rows (i, node) of each key head: the node's mask row for every i
        mask = mask.repeat(1, r, 1)
    st.mask = mask[:, None]
    return st


def attn_tree(m, x: torch.Tensor, cache: KVCache, st: _AttnStep):
    """Gated attention of N tree nodes per row: x (B, N, hidden) normed -> (out (B, N, hidden), (k, v) (B, Hkv, N, D)
    for `GatedAttention.commit`). The cache is only read."""
    pa = attn_pack(m)
    B, N = x.shape[:2]
    H, Hkv, D = pa.H, pa.Hkv, pa.D
    qk, v, gate = pa.project(x).split([(H + Hkv) * D, Hkv * D, H * D], dim=-1)
    q, k = _qk_rope(pa, qk.view(B, N, H + Hkv, D), st).split([H, Hkv], dim=2)  # (B, N, H, D), (B, N, Hkv, D)
    k, v = k.transpose(1, 2), v.view(B, N, Hkv, D).transpose(1, 2)  # (B, Hkv, N, D)
    n = st.n
    keys = torch.cat([cache.k[:, :, :n], k], dim=2)
    values = torch.cat([cache.v[:, :, :n], v], dim=2)
    qr = q.transpose(1, 2).reshape(B, Hkv, pa.r * N, D)
    attn = F.scaled_dot_product_attention(qr, keys, values, attn_mask=st.mask, scale=pa.scale)  # (B, Hkv, rN, D)
    attn = attn.view(B, H, N, D).transpose(1, 2).reshape(B, N, H * D)
    return _linear(attn * torch.sigmoid(gate), pa.o_w, pa.o_b, holder=pa, name="_packed_o"), (k, v)


# --------------------------------------------------------------------------------------------- whole steps
def _layer_setups(model, state, make, *, room: int = 0):
    """One shared per-step setup for the attention layers whose lengths agree (host lists; no device read besides
    one tolist per layer); `make(layer_module, cache, lens)` builds it. room > 0: first grow each KV cache so that
    every row has room for `room` more positions (a decode step writes its token in place)."""
    setups, shared = [], None
    for layer, s in zip(model.layers, state.layers):
        if layer.layer_type == "linear_attention":
            setups.append(None)
            continue
        lens = s.lengths.tolist()
        if room:
            s.reserve(max(lens) + room)
        if shared is None or shared.lens != lens or shared.capacity != s.capacity or not _same_rotary(
                shared_m, layer.self_attn):
            shared, shared_m = make(layer.self_attn, s, lens), layer.self_attn
        setups.append(shared)
    return setups


def _same_rotary(a, b) -> bool:
    """Two attention layers share RoPE rows: same head dim, rotary dims and frequencies, same GQA grouping."""
    if a is b:
        return True
    ra, rb = a.rotary, b.rotary
    key = (id(b), ra.inv_freq.data_ptr(), rb.inv_freq.data_ptr())
    memo = a.__dict__.setdefault("_cpu_same_rotary", {})
    if key not in memo:  # inv_freq is never changed in place (RotaryEmbedding)
        memo[key] = (a.head_dim == b.head_dim and a.num_heads == b.num_heads and a.num_kv_heads == b.num_kv_heads
                     and ra.rotary_dim == rb.rotary_dim and ra.inv_freq.shape == rb.inv_freq.shape
                     and bool(torch.equal(ra.inv_freq, rb.inv_freq)))
    return memo[key]


def decode_step(model, input_ids: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: input_ids (B, 1) long -> (logits (B, 1, vocab), hidden states (B, 1, hidden) before the
    final norm); `state` advanced IN PLACE. Same numbers as the module path's forward up to float rounding."""
    h = F.embedding(input_ids, model.embed_tokens.weight)
    setups = _layer_setups(model, state, _decode_setup, room=1)
    for layer, s, st in zip(model.layers, state.layers, setups):
        x = _rms(layer.input_layernorm, h)
        if st is None:
            h = h + gdn_decode(layer.linear_attn, x, s)
        else:
            h = h + attn_decode(layer.self_attn, x, s, st)
        if layer.mlp is not None:
            h = h + _mlp(layer.mlp, _rms(layer.post_attention_layernorm, h))
    return model.lm_head(_rms(model.norm, h)), h


def verify_step(model, input_ids: torch.Tensor, state, layout: TokenLayout):
    """Tree verify: input_ids (B, N) -> (logits (B, N, vocab), hidden (B, N, hidden), layer caches for commit_tree).
    `state` is only read. The GDN tree terms (mask, window index) are built once for all layers."""
    h = F.embedding(input_ids, model.embed_tokens.weight)
    setup = None
    if any(layer.layer_type == "linear_attention" for layer in model.layers):
        setup = TreeSetup(layout, model.config.linear_conv_kernel_dim, h.dtype)
    setups = _layer_setups(model, state, lambda m, c, lens: _tree_attn_setup(m, c, lens, layout))
    caches = []
    for layer, s, st in zip(model.layers, state.layers, setups):
        x = _rms(layer.input_layernorm, h)
        if st is None:
            y, cache = gdn_tree_mixer(layer.linear_attn, x, s, setup)
        else:
            y, cache = attn_tree(layer.self_attn, x, s, st)
        h = h + y
        if layer.mlp is not None:
            h = h + _mlp(layer.mlp, _rms(layer.post_attention_layernorm, h))
        caches.append(cache)
    return model.lm_head(_rms(model.norm, h)), h, caches


# --------------------------------------------------------------------------------------------- EAGLE head
def eagle_fuse(head, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
    """fc(cat(norm_e(e), norm_h(f))): (B, T, H) x 2 -> (B, T, H)."""
    x = torch.cat([_rms(head.norm_e, token_embeds), _rms(head.norm_h, hidden)], dim=-1)
    return _linear(x, head.fc.weight, head.fc.bias, holder=head, name="_packed_fc")


def eagle_decode_step(head, hidden: torch.Tensor, token_embeds: torch.Tensor, state, *, target):
    """EagleHead.decode_step on this path: hidden, token_embeds (B, 1, H) in the head's dtype -> (features (B, 1, H),
    draft logits (B, vocab)); the head's GDN state advanced IN PLACE."""
    layer = head.layer
    h = eagle_fuse(head, hidden, token_embeds)
    h = h + gdn_decode(layer.linear_attn, _rms(layer.input_layernorm, h), state.layers[0])
    if layer.mlp is not None:
        h = h + _mlp(layer.mlp, _rms(layer.post_attention_layernorm, h))
    x = _rms(target.norm, h[:, 0])
    if head.draft_ids is None:
        return h, target.lm_head(x)  # VocabProjection: one row times its cached transposed weight
    wt, b = head.draft_lm_head(target, transposed=True)  # (H, Vd): the same one-row product over draft_ids
    logits = x @ wt
    return h, logits if b is None else logits + b


_CHAIN_SETUPS: dict = {}


def chain_setup(B: int, L: int, W: int, dtype: torch.dtype, device) -> TreeSetup:
    """The TreeSetup of a causal chain of L tokens (cached per shape: catch-ups repeat a few shapes)."""
    key = (B, L, W, dtype, str(device))
    st = _CHAIN_SETUPS.get(key)
    if st is None:
        if len(_CHAIN_SETUPS) > 256:
            _CHAIN_SETUPS.clear()
        with torch.inference_mode(False):
            st = TreeSetup(TokenLayout.chain(B, L, device=device), W, dtype)
        _CHAIN_SETUPS[key] = st
    return st


def eagle_catch_up(head, hidden: torch.Tensor, token_embeds: torch.Tensor, state, *, counts: torch.Tensor) -> None:
    """EagleHead.catch_up on this path: the mixer's tree terms over the chain of L pairs (no output side, which the
    state does not depend on), then each row's commit after its counts[b]-th pair (>= 1)."""
    mixer = head.layer.linear_attn
    s = state.layers[0]
    x = _rms(head.layer.input_layernorm, eagle_fuse(head, hidden, token_embeds))
    B, L = x.shape[:2]
    setup = chain_setup(B, L, mixer.conv_kernel_size, x.dtype, x.device)
    _, cache = gdn_tree_mixer(mixer, x, s, setup, need_output=False)
    last = (counts.to(x.device) - 1).clamp(min=0)
    gdn_commit(s, cache, CommitPlan(setup.anc, last, mixer.conv_kernel_size))
