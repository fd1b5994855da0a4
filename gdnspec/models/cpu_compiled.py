"""Compiled CPU decode steps (torch.compile, inductor C++ kernels) for the drafters' expansions.

    GDNSPEC_CPU_COMPILE=1 gdnspec eval ...        (or: gdnspec eval --enable-torch-compile ...)

On the 2-core CPU a small model's step is op-bound: the default bundle's draft model (2 GDN layers, hidden 256) runs
~100 torch ops per expansion, ~1.5 ms, of which its matrix products take ~0.4 ms. Written as one pure tensor function
(weights and states are arguments; no module attribute reads, no weight-cache checks inside) and compiled by
inductor, the elementwise chains fuse into a few C++ loops around the matrix products: the draft model's expansion
1.62 -> 0.96 ms, the EAGLE expansion 1.48 -> 1.18 ms, the EAGLE catch-up of 3 pairs 0.94 -> 0.59 ms (one row, 2
threads; `python benchmarks/bench_cpu_ops.py --compile`, benchmarks/results/stop20/cpu_ops_threads2_compile.json).
Steps covered:

- `decode_step`: `GDNForCausalLM.forward` on one token per row for models whose layers are all GDN with SwiGLU MLPs
  (the default draft model; a hybrid model such as the default target keeps the eager fast path: its decode is
  bound by streaming 67 MB of weights, and compiling its GDN layers and MLPs gained ~5%);
- `eagle_decode_step`: `EagleHead.decode_step` (full vocabulary heads; a reduced draft vocabulary stays eager);
- `eagle_catch_up`: `EagleHead.catch_up` (the head's state over the L committed pairs, then each row's commit).

Where: the CPU fast path applies (models/cpu_fast.py: CPU, float32/64, fused_steps, no autograd) and
GDNSPEC_CPU_COMPILE=1 (default 0: the first call per model compiles for ~2-10 s, the first call with another batch
size once more, for a graph with a dynamic batch dimension (torch.compile's default `dynamic=None`; one row stays its
own static graph); inductor caches the generated code on disk, so a later process starts in ~2-4 s). At most
`RECOMPILE_LIMIT` graphs per step function (models x dtypes x shapes); beyond that torch runs it eagerly. The
math is cpu_fast's (same ops, same order where it matters); results equal the eager fast path up to float rounding
(float64 ~1e-15; tests/test_cpu_compiled.py). If compiling fails (no C++ compiler), one warning is printed and the
eager fast path runs from then on.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from gdnspec.layers.gated_deltanet import Qwen3GatedDeltaNet
from gdnspec.layers.mlp import SwiGLUMLP
from gdnspec.models import cpu_fast as _cf
from gdnspec.ops._env import cpu_compile

__all__ = ["enabled", "applies", "decode_step", "eagle_applies", "eagle_decode_step", "eagle_catch_up",
           "RECOMPILE_LIMIT"]

RECOMPILE_LIMIT = 32  # compiled graphs per step function (batch sizes x models x dtypes) before torch runs it eagerly
DYNAMIC = None  # torch.compile's default: static shapes first, a dimension that changes is made dynamic (one recompile)
_STATE = {"failed": None, "fns": {}}


def enabled() -> bool:
    """GDNSPEC_CPU_COMPILE: "1" compiles the covered CPU steps, "0" / unset runs them eagerly; other values raise."""
    return cpu_compile() and _STATE["failed"] is None


# --------------------------------------------------------------------------------------------- pure step functions
def _gdn_layer(h, w, conv, S, c):
    """h (B, 1, hidden) + the GDN mixer of normed h (cpu_fast.gdn_decode's math); conv (B, CD, W-1) and S (B, HV, K, V)
    advanced in place. w: the layer's tensors, c: its constants (see `_layer_args`)."""
    wn, w_in, perm, conv_w, l2w, dtb, nea, norm_w, out_w, out_b = w
    H, HV, K, V, eps, l2eps, norm_eps = c
    B = h.shape[0]
    CD, VD = conv_w.shape[0], HV * V
    proj = F.linear(F.rms_norm(h, (h.shape[-1],), wn, eps), w_in)
    if perm is not None:
        proj = proj.index_select(-1, perm)
    mixed, z, ba = proj.split([CD, VD, 2 * HV], dim=-1)  # (B, 1, .)
    full = torch.cat([conv, mixed.mT], dim=-1)  # (B, CD, W)
    conv.copy_(full[:, :, 1:])
    mc = F.silu((full * conv_w).sum(-1))  # (B, CD)
    qk, v = mc.split([2 * H * K, VD], dim=-1)
    qk = F.rms_norm(qk.view(B, 2 * H, K), (K,), l2w, l2eps)  # L2-normalised q and k heads
    if HV != H:
        qk = qk.repeat_interleave(HV // H, dim=1)
    q, k = qk.view(B, 2, HV, 1, K).unbind(1)  # (B, HV, 1, K)
    b, a = ba.view(B, 2, HV, 1, 1).unbind(1)
    S.mul_(torch.exp(F.softplus(a + dtb) * nea))
    u = (v.view(B, HV, 1, V) - k @ S) * torch.sigmoid(b)  # beta (v - S^T k)
    S.add_(k.mT * u)  # S += k u^T
    o = q @ S  # (B, HV, 1, V); q's K^-0.5 is folded into the norm's eps
    y = F.rms_norm(o, (V,), norm_w, norm_eps) * F.silu(z.view(B, HV, 1, V))
    return h + F.linear(y.view(B, 1, VD), out_w, out_b)


def _mlp_block(h, w, eps):
    """h + SwiGLU MLP of rms_norm(h): w = (norm scale, [gate | up] (2I, hidden), down (hidden, I))."""
    wn, gu, down = w
    g, u = F.linear(F.rms_norm(h, (h.shape[-1],), wn, eps), gu).chunk(2, dim=-1)
    return h + F.linear(F.silu(g) * u, down)


def _model_step(ids, embed, layers, states, norm_w, consts):
    """ids (B, 1) -> (final-normed hidden, hidden (B, 1, hidden) before the final norm); states advanced in place.
    The LM head runs outside (VocabProjection: oneDNN on a packed weight, faster than inductor's product here)."""
    h = F.embedding(ids, embed)
    for (wg, wm), (conv, S), (cg, mlp_eps) in zip(layers, states, consts[0]):
        h = _gdn_layer(h, wg, conv, S, cg)
        if wm is not None:
            h = _mlp_block(h, wm, mlp_eps)
    return F.rms_norm(h, (h.shape[-1],), norm_w, consts[1]), h


def _fuse(hidden, emb, fuse, e_eps, h_eps):
    """EagleHead.fuse: fc(cat(norm_e(emb), norm_h(hidden))), (B, T, H) x 2 -> (B, T, H)."""
    ne, nh, fc_w, fc_b = fuse
    H = hidden.shape[-1]
    return F.linear(torch.cat([F.rms_norm(emb, (H,), ne, e_eps), F.rms_norm(hidden, (H,), nh, h_eps)], dim=-1),
                    fc_w, fc_b)


def _eagle_step(hidden, emb, fuse, layer, state, norm_w, consts):
    """EAGLE head expansion: (features (B, 1, H), final-normed features (B, H)); the head's GDN state advanced in
    place. The target's LM head runs outside, as in `_model_step`."""
    (wg, wm), (conv, S) = layer, state
    (cg, mlp_eps), e_eps, h_eps, t_eps = consts
    h = _gdn_layer(_fuse(hidden, emb, fuse, e_eps, h_eps), wg, conv, S, cg)
    if wm is not None:
        h = _mlp_block(h, wm, mlp_eps)
    return h, F.rms_norm(h[:, 0], (h.shape[-1],), norm_w, t_eps)


def _gdn_chain_commit(x, w, conv, S, anc, flat, last, c):
    """The GDN mixer's state side over a chain of L normed inputs x (B, L, hidden), then the commit after node
    last[b] of each row (cpu_fast.gdn_tree_mixer(need_output=False) + gdn_commit): conv (B, CD, W-1) and S
    (B, HV, K, V) advanced in place. anc (B, L, L) bool, flat (B * L * W,) the window rows into [old window | inputs]."""
    _, w_in, perm, conv_w, l2w, dtb, nea, _, _, _ = w
    H, HV, K, V, _, l2eps, _ = c
    B, L = x.shape[:2]
    CD, VD, W = conv_w.shape[0], HV * V, conv_w.shape[1]
    proj = F.linear(x, w_in)
    if perm is not None:
        proj = proj.index_select(-1, perm)
    mixed, _, ba = proj.split([CD, VD, 2 * HV], dim=-1)  # (B, L, .)
    seq = torch.cat([conv.mT, mixed], dim=1).reshape(-1, CD)  # (B * (W-1+L), CD)
    win = seq.index_select(0, flat).view(B, L, W, CD)
    mc = F.silu((win * conv_w.t()).sum(2))  # (B, L, CD)
    k = F.rms_norm(mc[..., H * K: 2 * H * K].reshape(B, L, H, K), (K,), l2w, l2eps)  # the keys only: no output side
    if HV != H:
        k = k.repeat_interleave(HV // H, dim=2)
    k = k.transpose(1, 2)  # (B, HV, L, K)
    v = mc[..., 2 * H * K:].view(B, L, HV, V).transpose(1, 2)  # (B, HV, L, V)
    b, a = ba.view(B, L, 2, HV).permute(2, 0, 3, 1).unbind(0)  # (B, HV, L)
    g = F.softplus(a + dtb.view(HV, 1)) * nea.view(HV, 1)
    A = anc.to(x.dtype)[:, None]  # (B, 1, L, L)
    gamma = (A @ g[..., None]).squeeze(-1)  # (B, HV, L): sum of g along the path
    Gamma = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~anc[:, None], float("-inf")).exp()
    beta = torch.sigmoid(b)[..., None]
    rhs = (v - (k @ S) * gamma.exp()[..., None]) * beta
    v_new = torch.linalg.solve_triangular((k @ k.mT) * Gamma * beta, rhs, upper=False, unitriangular=True)
    rows = torch.arange(B, device=x.device)
    g_a = gamma.gather(2, last.view(B, 1, 1).expand(B, HV, 1))  # (B, HV, 1)
    coeff = (g_a - gamma).masked_fill(~anc[rows, last][:, None], float("-inf")).exp()
    S.mul_(g_a.exp()[..., None])
    S.add_((k * coeff[..., None]).mT @ v_new)
    keep = flat.view(B, L, W)[rows, last, 1:].reshape(-1)  # the last node's window without its oldest input
    conv.copy_(seq.index_select(0, keep).view(B, W - 1, CD).mT)


def _eagle_catch_up(hidden, emb, fuse, layer, state, anc, flat, last, consts):
    """EAGLE catch-up over L pairs (B, L, H): fuse, input norm, the mixer's state side and each row's commit."""
    (wg, _), (conv, S) = layer, state
    (cg, _), e_eps, h_eps, _ = consts
    x = F.rms_norm(_fuse(hidden, emb, fuse, e_eps, h_eps), (hidden.shape[-1],), wg[0], cg[4])
    _gdn_chain_commit(x, wg, conv, S, anc, flat, last, cg)


# --------------------------------------------------------------------------------------------- binding and dispatch
def _compiled(name: str, fn):
    fns = _STATE["fns"]
    if name not in fns:
        import torch._dynamo

        cfg = torch._dynamo.config
        for attr in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(cfg, attr) and getattr(cfg, attr) < RECOMPILE_LIMIT:
                setattr(cfg, attr, RECOMPILE_LIMIT)
        fns[name] = torch.compile(fn, dynamic=DYNAMIC)
    return fns[name]


def _run(name: str, fn, args):
    """The compiled `fn(*args)`; on a compile failure: one warning, compiling off for the process, None (the caller
    runs its eager step; the compiled call failed before running, so no state was touched)."""
    try:
        return _compiled(name, fn)(*args)
    except Exception as e:  # noqa: BLE001 - inductor raises many types (no compiler, codegen); the eager path is exact
        _STATE["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"GDNSPEC_CPU_COMPILE=1 but torch.compile failed ({_STATE['failed']}); running the eager CPU "
                      "steps from now on", RuntimeWarning, stacklevel=3)
        return None


def _layer_supported(layer) -> bool:
    return (layer.layer_type == "linear_attention" and isinstance(layer.linear_attn, Qwen3GatedDeltaNet)
            and (layer.mlp is None or isinstance(layer.mlp, SwiGLUMLP)))


def _layer_args(layer):
    """((GDN tensors, MLP tensors or None), (GDN constants, MLP eps)) of a decoder layer, from cpu_fast's caches."""
    m = layer.linear_attn
    p = _cf.gdn_pack(m)
    wg = (_cf.norm_scale(layer.input_layernorm), p.w_in, p.perm, p.conv_w, p.l2w, p.dt_bias3, p.neg_exp_A3, p.norm_w,
          p.out_w, p.out_b)
    cg = (p.H, p.HV, p.K, p.V, layer.input_layernorm.eps, p.l2eps, p.norm_eps)
    if layer.mlp is None:
        return (wg, None), (cg, 0.0)
    post = layer.post_attention_layernorm
    return (wg, (_cf.norm_scale(post), _cf.mlp_weights(layer.mlp), layer.mlp.down_proj.weight)), (cg, post.eps)


def applies(model) -> bool:
    """Whether `decode_step` covers `model` (the caller has checked the CPU fast path): switch on, every layer GDN with
    a SwiGLU MLP (or none)."""
    if not enabled():
        return False
    ok = model.__dict__.get("_cpu_compile_ok")
    if ok is None:
        ok = model.__dict__["_cpu_compile_ok"] = all(_layer_supported(layer) for layer in model.layers)
    return ok


def decode_step(model, input_ids: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """cpu_fast.decode_step, compiled: input_ids (B, 1) long -> (logits (B, 1, vocab), hidden (B, 1, hidden)); `state`
    (GDN layer states of the model's dtype) advanced IN PLACE."""
    args = [_layer_args(layer) for layer in model.layers]
    layers = tuple(a[0] for a in args)
    consts = (tuple(a[1] for a in args), model.norm.eps)
    states = tuple((s.conv, s.recurrent) for s in state.layers)
    args = (input_ids, model.embed_tokens.weight, layers, states, _cf.norm_scale(model.norm), consts)
    out = _run("model_step", _model_step, args)
    if out is None:
        return _cf.decode_step(model, input_ids, state)
    x, h = out
    return model.lm_head(x), h


def _fuse_args(head):
    """(norm_e scale, norm_h scale, fc weight, fc bias) of an EAGLE head, for `_fuse`."""
    return _cf.norm_scale(head.norm_e), _cf.norm_scale(head.norm_h), head.fc.weight, head.fc.bias


def eagle_applies(head, *, logits: bool = True) -> bool:
    """Whether `eagle_decode_step` (logits=True) / `eagle_catch_up` (logits=False) covers `head` (the caller has
    checked the CPU fast path): switch on, its one layer GDN with a SwiGLU MLP (or none), and for the expansion a full
    vocabulary (a reduced one, draft_ids, stays eager)."""
    return enabled() and (not logits or head.draft_ids is None) and _layer_supported(head.layer)


def eagle_decode_step(head, hidden: torch.Tensor, token_embeds: torch.Tensor, state, *, target):
    """cpu_fast.eagle_decode_step, compiled: hidden, token_embeds (B, 1, H) in the head's dtype -> (features (B, 1, H),
    draft logits (B, vocab)); the head's GDN state advanced IN PLACE."""
    wl, cl = _layer_args(head.layer)
    s = state.layers[0]
    consts = (cl, head.norm_e.eps, head.norm_h.eps, target.norm.eps)
    args = (hidden, token_embeds, _fuse_args(head), wl, (s.conv, s.recurrent), _cf.norm_scale(target.norm), consts)
    out = _run("eagle_step", _eagle_step, args)
    if out is None:
        return _cf.eagle_decode_step(head, hidden, token_embeds, state, target=target)
    h, x = out
    return h, target.lm_head(x)


def eagle_catch_up(head, hidden: torch.Tensor, token_embeds: torch.Tensor, state, *, counts: torch.Tensor) -> None:
    """cpu_fast.eagle_catch_up, compiled: the head's GDN state advanced IN PLACE over the pairs (hidden[:, i],
    token_embeds[:, i]) (B, L, H), i < counts[b] (>= 1)."""
    B, L = hidden.shape[:2]
    setup = _cf.chain_setup(B, L, head.layer.linear_attn.conv_kernel_size, hidden.dtype, hidden.device)
    wl, cl = _layer_args(head.layer)
    s = state.layers[0]
    last = (counts.to(hidden.device) - 1).clamp(min=0)
    _run("eagle_catch_up", _eagle_catch_up, (hidden, token_embeds, _fuse_args(head), wl, (s.conv, s.recurrent),
                                              setup.anc, setup.flat, last, (cl, head.norm_e.eps, head.norm_h.eps, 0.0)))
    if _STATE["failed"] is not None:  # this call's compile failed (it returns nothing either way): run it eagerly
        _cf.eagle_catch_up(head, hidden, token_embeds, state, counts=counts)
