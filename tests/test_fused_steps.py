"""The fused decode / verify kernels (gdnspec/ops/fused) against their torch references on the CPU through the Triton
interpreter (TRITON_INTERPRET=1), at awkward shapes (odd head dims, HV = 2H, GQA, B not a power of two, chains, stars,
random trees, N = 1, 2, 17), outputs AND states; then whole fused model steps against the module-by-module path.

Run: python -m pytest -q tests/test_fused_steps.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules, random_parents, randomize_, rel_err, tiny_config  # noqa: E402
from gdnspec.layers.layout import TokenLayout  # noqa: E402

interpreter_modules(["gdnspec.ops.gated_delta_rule.triton_tree", "gdnspec.ops.gated_delta_rule.triton_commit",
                     "gdnspec.ops.gated_delta_rule.triton_decode"])
ew, gd, at, gm, gt = interpreter_modules(["gdnspec.ops.fused.elementwise", "gdnspec.ops.fused.gdn_decode",
                                          "gdnspec.ops.fused.attention", "gdnspec.ops.fused.gemv",
                                          "gdnspec.ops.fused.gdn_tree"])
from gdnspec.models.lm import GDNForCausalLM  # noqa: E402  (calls the kernels through their modules: reload-safe)

pytestmark = pytest.mark.usefixtures("interpret_env")
rel = rel_err


def bound(dtype) -> float:
    return 2e-6 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_res,offset", [(True, True), (False, False), (True, False)])
def test_add_rms_norm_and_silu_mul(dtype, with_res, offset):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 37, generator=g).to(dtype)
    r = torch.randn(3, 1, 37, generator=g).to(dtype) if with_res else None
    w = (torch.randn(37, generator=g) * 0.3).to(dtype)
    y, h = ew.add_rms_norm(x, residual=r, weight=w, eps=1e-6, offset=offset)
    y_ref, h_ref = ew.add_rms_norm_reference(x, residual=r, weight=w, eps=1e-6, offset=offset)
    # the residual sum is rounded like x + r (exact in float32; the interpreter truncates float32 -> bf16 casts,
    # where the GPU rounds to nearest, so bf16 is compared to rounding)
    assert torch.equal(h, h_ref) if dtype == torch.float32 else rel(h, h_ref) < 1e-2
    assert rel(y, y_ref) < bound(dtype)
    gu = torch.randn(5, 2, 2 * 19, generator=g).to(dtype)
    assert rel(ew.silu_mul(gu), ew.silu_mul_reference(gu)) < bound(dtype)


@pytest.mark.parametrize("M", [1, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_linear_matches_f_linear(M, dtype):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 300, generator=g).to(dtype)
    w = (torch.randn(37, 300, generator=g) / 17).to(dtype)
    b = torch.randn(37, generator=g).to(dtype)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert rel(gm.small_linear(x, w, b), ref) < bound(dtype)
    assert rel(gm.small_linear(x[None], w), ref[None] - b.float()) < bound(dtype)  # leading dims kept


@pytest.mark.parametrize("S", [2, 3])
def test_split_k_partials_summed_by_add_rms_norm(S):
    g = torch.Generator().manual_seed(S)
    x = torch.randn(3, 1, 600, generator=g)
    w = torch.randn(40, 600, generator=g) / 25
    r = torch.randn(3, 1, 40, generator=g)
    nw = torch.randn(40, generator=g) * 0.2
    parts = gm.small_linear_partials(x, w, S)
    assert parts.shape[0] == S and parts.shape[1:] == (3, 1, 40) and parts.dtype == torch.float32
    y, h = ew.add_rms_norm(parts, residual=r, weight=nw, eps=1e-6, offset=True)
    y_ref, h_ref = ew.add_rms_norm_reference(torch.nn.functional.linear(x, w), residual=r, weight=nw, eps=1e-6,
                                             offset=True)
    assert rel(h, h_ref) < 2e-6 and rel(y, y_ref) < 2e-6


GDN_CASES = [  # (B, H, HV, K, V, W, layout, dtype)
    (3, 2, 4, 12, 20, 4, "qwen3_next", torch.float32),
    (1, 1, 1, 16, 16, 4, "qwen3_5", torch.float32),
    (3, 2, 4, 12, 20, 3, "qwen3_5", torch.bfloat16),
    (2, 3, 3, 8, 24, 4, "qwen3_next", torch.bfloat16),
]


@pytest.mark.parametrize("B,H,HV,K,V,W,layout,dtype,ssm", [(*c, torch.float32) for c in GDN_CASES]
                         + [(*GDN_CASES[0], torch.bfloat16), (*GDN_CASES[3], torch.float16)])
def test_gdn_decode_fused_matches_reference(B, H, HV, K, V, W, layout, dtype, ssm):
    """...with a float32 or a 16-bit stored state (both compute in float32 and round the stored state alike)."""
    g = torch.Generator().manual_seed(B + H + K)
    L = (gd.ProjLayout.qwen3_next if layout == "qwen3_next" else gd.ProjLayout.qwen3_5)(H, HV, K, V)
    CD = 2 * H * K + HV * V
    conv_w = (torch.randn(CD, W, generator=g) * 0.5).to(dtype)
    A_log = torch.rand(HV, generator=g).log()
    dt_bias = torch.randn(HV, generator=g) * 0.5
    nw = (1 + 0.2 * torch.randn(V, generator=g)).to(dtype)
    cs0 = torch.randn(B, CD, W - 1, generator=g).to(dtype)
    S0 = (torch.randn(B, HV, K, V, generator=g) * 0.3).to(ssm)
    cs_ref, S_ref = cs0.clone(), S0.clone()
    cs, S = cs0.clone(), S0.clone()
    for step in range(3):  # several steps: the rolled windows and states feed the next step
        proj = torch.randn(B, L.width, generator=g).to(dtype)
        y_ref = gd.gdn_decode_reference(proj, layout=L, conv_weight=conv_w, conv_state=cs_ref, recurrent_state=S_ref,
                                        A_log=A_log, dt_bias=dt_bias, norm_weight=nw, norm_eps=1e-6)
        # value-column blocks of 4 and 8: several programs per value head (masked last block when V % block_v);
        # every launch must leave the arrival counters at zero for the next one
        y = gd.gdn_decode_fused(proj, layout=L, conv_weight=conv_w, conv_state=cs, recurrent_state=S, A_log=A_log,
                                dt_bias=dt_bias, norm_weight=nw, norm_eps=1e-6, block_v=(8, 4, None)[step])
        # a 16-bit state: one float32 rounding difference may flip a stored bf16 / fp16 value, so the next steps agree
        # to the state's precision
        assert rel(y, y_ref) < (bound(dtype) if ssm == torch.float32 else 2e-2), step
        assert torch.equal(cs, cs_ref), step  # the window is a copy: exact
        assert S.dtype == ssm and rel(S, S_ref) < (2e-6 if dtype == ssm == torch.float32 else 1e-2), step
        assert not gd._arrival_counters(B * H, proj.device)[: B * H].any(), step


@pytest.mark.parametrize("B,N,H,HV,K,V,W,layout,kind,dtype", [
    (3, 5, 2, 4, 12, 20, 4, "qwen3_next", "random", torch.float32),
    (2, 17, 1, 2, 16, 8, 4, "qwen3_5", "chain", torch.float32),
    (1, 6, 2, 2, 8, 24, 3, "qwen3_5", "star", torch.bfloat16),
    (2, 1, 2, 4, 8, 8, 4, "qwen3_next", "chain", torch.bfloat16),
])
def test_gdn_tree_prep_and_norm_match_reference(B, N, H, HV, K, V, W, layout, kind, dtype):
    from gdnspec.ops.conv1d.tree import tree_conv_window_index

    g = torch.Generator().manual_seed(N + K)
    L = (gd.ProjLayout.qwen3_next if layout == "qwen3_next" else gd.ProjLayout.qwen3_5)(H, HV, K, V)
    CD = 2 * H * K + HV * V
    proj = torch.randn(B, N, L.width, generator=g).to(dtype)
    kw = dict(layout=L, conv_weight=(torch.randn(CD, W, generator=g) * 0.5).to(dtype),
              conv_state=torch.randn(B, CD, W - 1, generator=g).to(dtype),
              window_index=tree_conv_window_index(random_parents(B, N, kind, seed=N), W),
              A_log=torch.rand(HV, generator=g).log(), dt_bias=torch.randn(HV, generator=g) * 0.5)
    got = gt.gdn_tree_prep(proj, **kw)
    want = gt.gdn_tree_prep_reference(proj, **kw)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "mixed"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert (torch.equal(a, b) if name == "mixed" else rel(a, b) < bound(dtype)), name
    o = torch.randn(B, N, HV, V, generator=g).to(dtype)
    nw = (1 + 0.2 * torch.randn(V, generator=g)).to(dtype)
    assert rel(gt.gated_rms_norm_rows(o, proj, layout=L, weight=nw, eps=1e-6),
               gt.gated_rms_norm_rows_reference(o, proj, layout=L, weight=nw, eps=1e-6)) < bound(dtype)


class _LaunchSpy:
    """Stands in for a Triton kernel: records the BLOCKED constexpr of each launch, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.blocked = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.blocked.append(kwargs.get("BLOCKED", "not passed"))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("blocked", ["1", "0"])
@pytest.mark.parametrize("fusion", ["full", "off"])
def test_tree_solve_switch_reaches_the_verify_kernels(blocked, fusion, monkeypatch):
    """GDNSPEC_TREE_BLOCKED_SOLVE reaches the BLOCKED constexpr of gdn_tree's fused verify kernel ("full") and of the
    tree-WY kernel ("off"), and gdn_tree_verify matches its reference with either solve (N = 17 chain: the last merge
    level joins node 16 to the first 16)."""
    from gdnspec.ops.conv1d.tree import tree_conv_window_index

    monkeypatch.setenv("GDNSPEC_TREE_BLOCKED_SOLVE", blocked)
    B, N, H, HV, K, V, W = 2, 17, 1, 2, 16, 24, 4
    g = torch.Generator().manual_seed(17)
    L = gd.ProjLayout.qwen3_5(H, HV, K, V)
    CD = 2 * H * K + HV * V
    parents = random_parents(B, N, "chain")
    kw = dict(layout=L, conv_weight=torch.randn(CD, W, generator=g) * 0.5,
              conv_state=torch.randn(B, CD, W - 1, generator=g), window_index=tree_conv_window_index(parents, W),
              A_log=torch.rand(HV, generator=g).log(), dt_bias=torch.randn(HV, generator=g) * 0.5,
              ancestor_mask=TokenLayout.from_parents(parents).ancestor_mask,
              recurrent_state=torch.randn(B, HV, K, V, generator=g) * 0.3,
              norm_weight=1 + 0.2 * torch.randn(V, generator=g), norm_eps=1e-6)
    proj = torch.randn(B, N, L.width, generator=g)
    if fusion == "full":
        spy = _LaunchSpy(gt._gdn_tree_verify_kernel)
        monkeypatch.setattr(gt, "_gdn_tree_verify_kernel", spy)
    else:  # the tree-WY kernel as the function gdn_tree calls sees it (its module's globals)
        tree_fn = gt.triton_tree_gated_delta_rule
        spy = _LaunchSpy(tree_fn.__globals__["_tree_verify_kernel"])
        monkeypatch.setitem(tree_fn.__globals__, "_tree_verify_kernel", spy)
    y_ref, gdr_ref, _ = gt.gdn_tree_verify_reference(proj, **kw)
    y, gdr, _, _ = gt.gdn_tree_verify(proj, fusion=fusion, precision="ieee", **kw)
    assert spy.blocked == [blocked == "1"]
    assert rel(y, y_ref) < 1e-5 and rel(gdr.to_reference().v_new, gdr_ref.v_new) < 1e-5


def test_gdn_decode_fused_refuses_bad_shapes():
    L = gd.ProjLayout.qwen3_5(2, 4, 8, 8)
    proj = torch.zeros(2, L.width + 1)
    with pytest.raises(ValueError, match="columns"):
        gd.gdn_decode_fused(proj, layout=L, conv_weight=torch.zeros(64, 4), conv_state=torch.zeros(2, 64, 3),
                            recurrent_state=torch.zeros(2, 4, 8, 8), A_log=torch.zeros(4), dt_bias=torch.zeros(4),
                            norm_weight=torch.ones(8), norm_eps=1e-6)


ATT_CASES = [  # (B, T, H, Hkv, D, rotary_fraction, kind, dtype)
    (3, 1, 4, 2, 24, 0.5, "decode", torch.float32),
    (3, 5, 4, 2, 24, 0.5, "random", torch.float32),
    (2, 17, 2, 2, 16, 1.0, "random", torch.float32),
    (3, 2, 6, 2, 16, 0.25, "chain", torch.bfloat16),
    (1, 6, 4, 1, 32, 0.5, "star", torch.bfloat16),
]


@pytest.mark.parametrize("B,T,H,Hkv,D,frac,kind,dtype", ATT_CASES)
def test_attention_prep_and_tree_attention_match_reference(B, T, H, Hkv, D, frac, kind, dtype):
    from gdnspec.layers.attention import RotaryEmbedding

    g = torch.Generator().manual_seed(T * 7 + D)
    cap = 40
    P = 2 * H * D + 2 * Hkv * D
    qkv = torch.randn(B, T, P, generator=g).to(dtype)
    lengths = torch.tensor([0, 7, cap - T + 3][:B])  # empty, middle, and a padding row past capacity - T
    rot = RotaryEmbedding(D, partial_rotary_factor=frac)
    table, perm = rot._table(qkv[..., :D], None, cap + T)
    qn, kn = (0.2 * torch.randn(D, generator=g)).to(dtype), (0.2 * torch.randn(D, generator=g)).to(dtype)
    if kind == "decode":
        mask, depth = None, torch.zeros(B, 1, dtype=torch.long)
    else:
        lay = TokenLayout.from_parents(random_parents(B, T, kind, seed=T))
        mask, depth = lay.ancestor_mask, lay.depth
    positions = lengths.clamp(max=cap)[:, None] + depth
    slots = lengths.clamp(max=cap - T)[:, None] + torch.arange(T)
    lengths0 = lengths.clone()
    ck0 = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    cv0 = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    kw = dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, q_norm_weight=qn, k_norm_weight=kn, eps=1e-6, table=table,
              perm=perm)
    ck_r, cv_r, ck, cv = ck0.clone(), cv0.clone(), ck0.clone(), cv0.clone()
    q_ref = at.attention_prep_reference(qkv, cache_k=ck_r, cache_v=cv_r, positions=positions, slots=slots, **kw)
    q = at.attention_prep(qkv, cache_k=ck, cache_v=cv, lengths=lengths, depth=None if kind == "decode" else depth,
                          **kw)
    assert rel(q, q_ref) < bound(dtype)
    assert rel(ck, ck_r) < bound(dtype) and torch.equal(cv, cv_r)
    gate = qkv[..., : 2 * H * D].reshape(B, T, H, 2 * D)[..., D:].reshape(B, T, H * D)
    out_ref = at.tree_attention_reference(q_ref, ck_r, cv_r, lengths.clamp(max=cap - T), mask, gate=gate, scale=D**-0.5)
    for splits in (1, 3):
        out = at.tree_attention(q, ck, cv, lengths, mask, gate=qkv, scale=D**-0.5, num_splits=splits,
                                advance_lengths=splits == 3)
        assert rel(out, out_ref) < (1e-5 if dtype == torch.float32 else 2e-2), splits
    assert torch.equal(lengths, lengths0 + T)  # advanced once, by the last call, inside its kernel
    for bm, warps in ((16, 2), (64, 4)):  # explicit tiles (sweeps): 16 rows = several row blocks at T * G > 16
        out = at.tree_attention(q, ck, cv, lengths0.clone(), mask, gate=qkv, scale=D**-0.5, block_m=bm,
                                num_warps=warps)
        assert rel(out, out_ref) < (1e-5 if dtype == torch.float32 else 2e-2), bm
    with pytest.raises(ValueError, match="block_m"):
        at.tree_attention(q, ck, cv, lengths0.clone(), mask, gate=qkv, scale=D**-0.5, block_m=24)
    with pytest.raises(ValueError, match="num_warps"):
        at.tree_attention(q, ck, cv, lengths0.clone(), mask, gate=qkv, scale=D**-0.5, num_warps=0)


def _hybrid(dtype, layout="qwen3_next"):
    cfg = tiny_config(num_hidden_layers=4, full_attention_interval=2, gdn_layout=layout)
    model = randomize_(GDNForCausalLM(cfg, dtype=torch.float32)).to(dtype).eval()
    model.gdn_backend = "triton"
    return model


def _states_close(a, b, tol_):
    for la, lb in zip(a.layers, b.layers):
        for name, ta in vars(la).items():
            tb = getattr(lb, name)
            if name == "lengths":
                assert torch.equal(ta, tb)
            elif name in ("k", "v"):
                n = int(la.lengths.max())
                assert rel(ta[:, :, :n], tb[:, :, :n]) < tol_, name
            else:
                assert rel(ta, tb) < tol_, name


@pytest.mark.parametrize("layout,splits,norm_gemv,tree_fusion,ssm", [("qwen3_next", "0", "0", "off", "float32"),
                                                                      ("qwen3_5", "2", "0", "off", "float32"),
                                                                      ("qwen3_next", "2", "1", "full", "float32"),
                                                                      ("qwen3_5", "0", "1", "norm", "float32"),
                                                                      ("qwen3_next", "0", "0", "norm", "bfloat16"),
                                                                      ("qwen3_5", "0", "0", "off", "float16")])
@torch.inference_mode()
def test_fused_decode_and_verify_steps_match_module_path(layout, splits, norm_gemv, tree_fusion, ssm, monkeypatch):
    """...also with a 16-bit recurrent state (mamba_ssm_cache_dtype): both paths compute in float32 and round the
    stored state at the same points, so they agree to a rounding of the state."""
    monkeypatch.setenv("GDNSPEC_GEMV_SPLITS", splits)  # "2": every output projection as split-K partial sums
    monkeypatch.setenv("GDNSPEC_NORM_GEMV", norm_gemv)  # the opt-in kernel sequences, whole model against the module path
    monkeypatch.setenv("GDNSPEC_TREE_FUSION", tree_fusion)
    monkeypatch.setenv("GDNSPEC_SILU_GEMV", "1" if splits == "2" else "0")  # opt-in: SiLU-mul in the down GEMV
    model = _hybrid(torch.float32, layout)
    model.mamba_ssm_cache_dtype = ssm
    tol = 1e-5 if ssm == "float32" else 2e-2
    g = torch.Generator().manual_seed(3)
    B = 3
    prompt = torch.randint(0, model.vocab_size, (B, 6), generator=g)
    model.fused_steps = False
    s_ref = model(prompt).state
    s = s_ref.clone()
    for _ in range(3):
        ids = torch.randint(0, model.vocab_size, (B, 1), generator=g)
        model.fused_steps = False
        ref = model(ids, s_ref, mode="fused_decode")
        model.fused_steps = True
        out = model(ids, s, mode="fused_decode")
        assert rel(out.logits, ref.logits) < tol and rel(out.hidden_states, ref.hidden_states) < tol
        _states_close(s, s_ref, tol)
        assert all(t.recurrent.dtype == getattr(torch, ssm) for t in s.layers if hasattr(t, "recurrent"))
    for kind, N in (("random", 5), ("chain", 2), ("star", 4), ("random", 1)):
        parents = random_parents(B, N, kind, seed=N)
        lay = TokenLayout.from_parents(parents)
        ids = torch.randint(0, model.vocab_size, (B, N), generator=g)
        model.fused_steps = False
        ref = model.forward_tree(ids, state=s_ref, layout=lay)
        model.fused_steps = True
        out = model.forward_tree(ids, state=s, layout=lay)
        assert rel(out.logits, ref.logits) < tol, kind
        path = torch.stack([torch.tensor([0, *([1] if N > 1 else [0])]) for _ in range(B)])
        counts = torch.tensor([2 if N > 1 and parents[b, 1] == 0 else 1 for b in range(B)])
        model.commit_tree(s_ref, ref, path=path, counts=counts)
        model.commit_tree(s, out, path=path, counts=counts)
        _states_close(s, s_ref, tol)


@torch.inference_mode()
def test_fused_greedy_generation_equals_module_path():
    from gdnspec import generate_autoregressive
    from gdnspec.spec import SpeculativeEngine, TreeConfig
    from gdnspec.spec.drafters import NGramDrafter

    model = _hybrid(torch.float32)
    prompt = [torch.tensor([1, 2, 3, 4, 1, 2, 3]), torch.tensor([5, 6, 7])]
    model.fused_steps = False
    ref = generate_autoregressive(model, prompt, 12)
    model.fused_steps = True
    out = generate_autoregressive(model, prompt, 12, static=True)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    eng = SpeculativeEngine(model, NGramDrafter(), TreeConfig(topk=2, num_steps=3, num_draft_tokens=6))
    spec = eng.generate(prompt, 12)
    assert all(torch.equal(a, b) for a, b in zip(spec, ref))


# ---------------------------------------------------------------------------------------------- review (issue 9)
def _fused_buffers(model):
    """Every fused weight buffer cached by layers/fusion.py: (owner, names, (w, b, rows))."""
    out = []
    for m in model.modules():
        for key, val in vars(m).items():
            if key.startswith("_fused_"):
                out.append((m, key[len("_fused_"):], val))
    return out


def test_fusion_keeps_parameter_objects_so_an_earlier_optimizer_still_trains_the_model():
    from gdnspec.train.train import lm_train_forward, make_optimizer

    model = _hybrid(torch.float32)
    params_before = dict(model.named_parameters())
    opt = make_optimizer(model, 0.05, 0.0)  # made before the first fused step, as in a train loop with generation evals
    ids = torch.randint(0, model.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :1])  # fused decode step: fuses the projections
    assert _fused_buffers(model), "the fused step did not fuse any weights"
    params_after = dict(model.named_parameters())
    moved = [n for n, p in params_after.items() if p is not params_before[n]]
    assert not moved, f"fusion replaced parameter objects (an existing optimizer no longer reaches them): {moved}"
    w0 = model.layers[0].linear_attn.in_proj_qkvz.weight.detach().clone()
    opt.zero_grad()
    lm_train_forward(model, ids)[0].float().pow(2).mean().backward()
    opt.step()
    assert not torch.equal(w0, model.layers[0].linear_attn.in_proj_qkvz.weight.detach())
    gdn = model.layers[0].linear_attn
    cached = vars(gdn)["_fused_in_proj_qkvz_in_proj_ba"][0]
    w = gdn.fused_in_proj()
    assert w is cached, "the optimizer step re-fused the weights (the parameters are no longer views of the buffer)"
    assert torch.equal(w, torch.cat([gdn.in_proj_qkvz.weight, gdn.in_proj_ba.weight]).detach())


@torch.inference_mode()
def _decode_logits(model, state, ids):
    return model(ids, state).logits


def test_fused_weights_follow_load_state_dict_and_to_dtype_and_save(tmp_path):
    from gdnspec.models.checkpoint import save_checkpoint

    model = _hybrid(torch.float32)
    other = randomize_(GDNForCausalLM(model.config), seed=5).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.vocab_size, (2, 4), generator=g)
    ids = torch.randint(0, model.vocab_size, (2, 1), generator=g)
    with torch.inference_mode():
        model.fused_steps = False
        s0 = model(prompt).state
    model.fused_steps = True
    _decode_logits(model, s0.clone(), ids)  # fuse
    for assign in (False, True):  # copy into the views / replace the parameters (re-fused on the next call)
        model.load_state_dict(other.state_dict(), assign=assign)
        model.fused_steps = False
        ref = _decode_logits(model, s0.clone(), ids)
        model.fused_steps = True
        assert rel(_decode_logits(model, s0.clone(), ids), ref) < 1e-5, assign
    save_checkpoint(model, tmp_path / "ckpt")  # views of a shared buffer serialise
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in other.state_dict().items())


def test_training_after_an_inference_mode_fused_step():
    """Generation runs under torch.inference_mode; tensors it caches on the modules (RoPE tables, fused weights) must
    not be inference tensors, or the next training forward fails ('Inference tensors cannot be saved for backward')."""
    from gdnspec.train.train import lm_train_forward

    model = _hybrid(torch.float32)
    ids = torch.randint(0, model.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :3])  # prefill (module path) and
        model(ids[:, :1])  # a fused decode step
    loss = lm_train_forward(model, ids)[0].float().pow(2).mean()
    loss.backward()
    assert model.layers[1].self_attn.q_proj.weight.grad is not None


def _bad_shape_calls():
    """(name, call, pattern): each call passes one tensor of a wrong shape (or layout) to a fused kernel's wrapper;
    every one must raise ValueError naming that tensor before any launch (the kernels index with the shapes they
    assume: a wrong one would read or write out of bounds)."""
    from gdnspec.ops.conv1d.tree import tree_conv_window_index

    B, H, HV, K, V, W = 2, 2, 4, 8, 8, 4
    L = gd.ProjLayout.qwen3_5(H, HV, K, V)
    CD = 2 * H * K + HV * V
    dec = dict(layout=L, conv_weight=torch.zeros(CD, W), conv_state=torch.zeros(B, CD, W - 1),
               recurrent_state=torch.zeros(B, HV, K, V), A_log=torch.zeros(HV), dt_bias=torch.zeros(HV),
               norm_weight=torch.ones(V), norm_eps=1e-6)
    proj = torch.zeros(B, L.width)

    def decode(**bad):
        return lambda: gd.gdn_decode_fused(proj, **{**dec, **bad})

    N = 3
    tproj = torch.zeros(B, N, L.width)
    wi = tree_conv_window_index(random_parents(B, N, "chain"), W)
    prep = dict(layout=L, conv_weight=torch.zeros(CD, W), conv_state=torch.zeros(B, CD, W - 1), window_index=wi,
                A_log=torch.zeros(HV), dt_bias=torch.zeros(HV))

    def tree_prep(**bad):
        return lambda: gt.gdn_tree_prep(tproj, **{**prep, **bad})

    def norm_rows(o=torch.zeros(B, N, HV, V), p=tproj, w=torch.ones(V)):
        return lambda: gt.gated_rms_norm_rows(o, p, layout=L, weight=w, eps=1e-6)

    Ha, Hkv, D, T, cap = 4, 2, 16, 2, 12
    P = 2 * Ha * D + 2 * Hkv * D
    from gdnspec.layers.attention import RotaryEmbedding

    table, perm = RotaryEmbedding(D, partial_rotary_factor=0.5)._table(torch.zeros(1, D), None, cap + T)
    ap = dict(num_heads=Ha, num_kv_heads=Hkv, head_dim=D, q_norm_weight=torch.zeros(D), k_norm_weight=torch.zeros(D),
              eps=1e-6, table=table, perm=perm, lengths=torch.tensor([0, 3]), depth=None,
              cache_k=torch.zeros(B, Hkv, cap, D), cache_v=torch.zeros(B, Hkv, cap, D))
    qkv = torch.zeros(B, T, P)

    def aprep(**bad):
        return lambda: at.attention_prep(qkv, **{**ap, **bad})

    q = torch.zeros(B, T, Ha, D)
    ta = dict(cache_k=torch.zeros(B, Hkv, cap, D), cache_v=torch.zeros(B, Hkv, cap, D), lengths=torch.tensor([0, 3]),
              ancestor_mask=None, gate=qkv, scale=0.25)

    def tattn(q=q, **bad):
        kw = {**ta, **bad}
        return lambda: at.tree_attention(q, kw.pop("cache_k"), kw.pop("cache_v"), kw.pop("lengths"),
                                         kw.pop("ancestor_mask"), **kw)

    x = torch.zeros(3, 1, 40)
    return [
        ("decode conv_weight", decode(conv_weight=torch.zeros(CD - 4, W)), "conv_weight"),
        ("decode A_log", decode(A_log=torch.zeros(HV - 1)), "A_log"),
        ("decode dt_bias", decode(dt_bias=torch.zeros(HV - 1)), "dt_bias"),
        ("decode norm_weight", decode(norm_weight=torch.ones(V - 3)), "norm_weight"),
        ("decode HV % H", lambda: gd.gdn_decode_fused(
            torch.zeros(B, gd.ProjLayout.qwen3_5(2, 3, K, V).width),
            **{**dec, "layout": gd.ProjLayout.qwen3_5(2, 3, K, V), "conv_weight": torch.zeros(2 * 2 * K + 3 * V, W),
               "conv_state": torch.zeros(B, 2 * 2 * K + 3 * V, W - 1), "recurrent_state": torch.zeros(B, 3, K, V),
               "A_log": torch.zeros(3), "dt_bias": torch.zeros(3)}), "HV"),
        ("tree_prep conv_weight", tree_prep(conv_weight=torch.zeros(CD - 4, W)), "conv_weight"),
        ("tree_prep A_log", tree_prep(A_log=torch.zeros(HV - 1)), "A_log"),
        ("norm_rows o", norm_rows(o=torch.zeros(B, N, HV, V - 1)), r"o must"),
        ("norm_rows proj", norm_rows(p=torch.zeros(B, N, L.width - 2)), "proj"),
        ("norm_rows weight", norm_rows(w=torch.ones(V - 1)), "weight"),
        ("prep lengths", aprep(lengths=torch.tensor([0])), "lengths"),
        ("prep depth", aprep(depth=torch.zeros(B, T + 1, dtype=torch.long)), "depth"),
        ("prep cache batch", aprep(cache_k=torch.zeros(B - 1, Hkv, cap, D), cache_v=torch.zeros(B - 1, Hkv, cap, D)),
         "cache"),
        ("prep cache_v", aprep(cache_v=torch.zeros(B, Hkv, cap - 1, D)), "cache_v"),
        ("prep q_norm_weight", aprep(q_norm_weight=torch.zeros(D - 2)), "q_norm_weight"),
        ("prep perm", aprep(perm=perm[:-2]), "perm"),
        ("attn cache batch", tattn(cache_k=torch.zeros(B - 1, Hkv, cap, D), cache_v=torch.zeros(B - 1, Hkv, cap, D)),
         "cache"),
        ("attn cache_v", tattn(cache_v=torch.zeros(B, Hkv, cap - 2, D)), "cache_v"),
        ("attn cache head dim", tattn(cache_k=torch.zeros(B, Hkv, cap, D // 2), cache_v=torch.zeros(B, Hkv, cap, D // 2)),
         "head dim"),
        ("attn non-contiguous cache", tattn(cache_k=torch.zeros(B, cap, Hkv, D).transpose(1, 2)), "contiguous"),
        ("attn lengths", tattn(lengths=torch.tensor([1])), "lengths"),
        ("attn gate", tattn(gate=qkv[..., : 2 * Ha * D - D]), "gate"),
        # the kernel reads the mask's bytes: an int64 / float mask would be read at the wrong offsets
        ("attn mask dtype", tattn(ancestor_mask=torch.ones(B, T, T, dtype=torch.long).tril()), "bool"),
        ("attn block_m float", tattn(block_m=16.0), "block_m"),
        ("small_linear bias", lambda: gm.small_linear(x, torch.zeros(30, 40), torch.zeros(29)), "bias"),
        ("add_rms_norm partials weight", lambda: ew.add_rms_norm(
            torch.zeros(2, 3, 1, 40), residual=torch.zeros(3, 1, 40), weight=torch.zeros(39), eps=1e-6, offset=True),
         "weight"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_shape_calls())), ids=[c[0] for c in _bad_shape_calls()])
def test_fused_kernels_refuse_shapes_they_cannot_run(case):
    name, call, pattern = _bad_shape_calls()[case]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_split_k_partials_refuse_more_rows_than_one_tile():
    """small_linear_partials tiles at most 32 rows (split_count never asks for more): a direct call with more rows
    must raise, not leave the rows past the tile as uninitialised memory."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 300, generator=g)
    x = torch.randn(33, 300, generator=g)
    with pytest.raises(ValueError, match="33"):
        gm.small_linear_partials(x, w, 2)
    parts = gm.small_linear_partials(x[:32], w, 2)
    assert rel(parts.sum(0), torch.nn.functional.linear(x[:32], w)) < 2e-6


@torch.inference_mode()
def test_cached_static_steps_are_rebuilt_after_model_to_dtype():
    """generate / the engine cache their static steps per model (CUDA graphs on the GPU, which read the weights and
    state buffers they were captured with). After model.to(dtype) the cached steps must be rebuilt: before, the
    cached decoder's float32 state buffers made the float16 fused step raise (and on CUDA a graph would replay
    kernels reading the freed float32 weights)."""
    from gdnspec import generate_autoregressive
    from gdnspec.spec import SpeculativeEngine, TreeConfig
    from gdnspec.spec.drafters import NGramDrafter

    model = _hybrid(torch.float32)
    prompt = [torch.tensor([1, 2, 3, 4, 1, 2, 3])]
    eng = SpeculativeEngine(model, NGramDrafter(), TreeConfig(topk=2, num_steps=2, num_draft_tokens=4), static=True)
    generate_autoregressive(model, prompt, 3, static=True)
    eng.generate(prompt, 3)
    model.to(torch.float16)
    want = generate_autoregressive(model, prompt, 3, static=False)
    assert torch.equal(generate_autoregressive(model, prompt, 3, static=True)[0], want[0])
    assert torch.equal(eng.generate(prompt, 3)[0][: want[0].numel()], want[0])


@pytest.mark.parametrize("over", [
    dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=8,
         mlp_only_layers=[1]),  # MoE layers (the MoE block runs unfused between fused kernels) and a dense one
    dict(intermediate_size=0, attention_bias=True, num_attention_heads=8, num_key_value_heads=1, head_dim=6,
         partial_rotary_factor=1.0),  # no MLP: the residual stream skips a norm; biased qkv / o_proj; GQA 8
    dict(linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=5, linear_value_head_dim=7,
         gdn_layout="qwen3_5", rms_norm_offset=False, tie_word_embeddings=True),  # HV = 4H, odd head dims
], ids=["moe", "nomlp-bias-gqa8", "hv4h-odd-qwen3_5"])
@torch.inference_mode()
def test_fused_steps_match_module_path_on_awkward_models(over):
    cfg = tiny_config(num_hidden_layers=2, full_attention_interval=2, **over)
    model = randomize_(GDNForCausalLM(cfg)).eval()
    model.gdn_backend = "triton"
    g = torch.Generator().manual_seed(7)
    B = 3
    model.fused_steps = False
    s_ref = model(torch.randint(0, model.vocab_size, (B, 5), generator=g)).state
    s = s_ref.clone()
    ids = torch.randint(0, model.vocab_size, (B, 1), generator=g)
    ref = model(ids, s_ref)
    model.fused_steps = True
    out = model(ids, s)
    assert rel(out.logits, ref.logits) < 1e-5 and rel(out.hidden_states, ref.hidden_states) < 1e-5
    _states_close(s, s_ref, 1e-5)
    parents = random_parents(B, 5, "random", seed=4)
    lay = TokenLayout.from_parents(parents)
    ids = torch.randint(0, model.vocab_size, (B, 5), generator=g)
    model.fused_steps = False
    ref = model.forward_tree(ids, state=s_ref, layout=lay)
    model.fused_steps = True
    out = model.forward_tree(ids, state=s, layout=lay)
    assert rel(out.logits, ref.logits) < 1e-5 and rel(out.hidden_states, ref.hidden_states) < 1e-5
    path = torch.tensor([[0, 1] if parents[b, 1] == 0 else [0, 0] for b in range(B)])
    counts = torch.tensor([2 if parents[b, 1] == 0 else 1 for b in range(B)])
    model.commit_tree(s_ref, ref, path=path, counts=counts)
    model.commit_tree(s, out, path=path, counts=counts)
    _states_close(s, s_ref, 1e-5)


@torch.inference_mode()
def test_a_static_prefill_is_built_on_fused_weights_and_goes_stale_when_a_weight_is_replaced():
    """Fusion re-points the projection weights at one buffer and frees their old storage, which a CUDA graph captured
    before it would keep reading. The static steps therefore fuse BEFORE capturing (runtime.prepare_fused), so the
    first fused decode step leaves an earlier prefill current; replacing a weight afterwards makes it stale, so
    graph_prefill recaptures it."""
    from gdnspec.runtime import StaticPrefill

    model = _hybrid(torch.float32)
    pre = StaticPrefill(model, batch_size=1, seq_len=4, use_graph=False)
    assert pre.current()
    model(torch.tensor([[3]]))  # first fused decode step: the weights were fused already
    assert pre.current()
    mlp = model.layers[0].mlp
    mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight.detach().clone())
    assert not pre.current()
    assert StaticPrefill(model, batch_size=1, seq_len=4, use_graph=False).current()


@pytest.mark.parametrize("layout", ["qwen3_next", "qwen3_5"])
@torch.inference_mode()
def test_eagle_fused_decode_step_matches_reference_and_drafts_the_same_tree(layout):
    """EagleHead.decode_step's fused path (issue 10: a drafting step in the target's fused decode kernels) equals
    forward + draft_logits, output, logits AND state; a whole EAGLE tree proposal is then the same tree."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec import TreeConfig
    from gdnspec.spec.drafters import EagleDrafter

    model = _hybrid(torch.float32, layout)
    torch.manual_seed(5)
    head = EagleHead(eagle_config_for(model.config)).eval()
    randomize_(head)
    B, H = 3, model.config.hidden_size
    hidden, emb = torch.randn(B, 1, H), torch.randn(B, 1, H)
    s_ref = head.new_state(B)
    s_ref.layers[0].recurrent.normal_()
    s_ref.layers[0].conv.normal_()
    s = s_ref.clone()
    for _ in range(2):
        model.fused_steps = False
        out_ref, lg_ref = head.decode_step(hidden, emb, s_ref, target=model)
        model.fused_steps = True
        out, lg = head.decode_step(hidden, emb, s, target=model)
        assert lg.shape == (B, model.vocab_size) and out.shape == (B, 1, H)
        assert rel(out, out_ref) < 1e-5 and rel(lg, lg_ref) < 1e-5
        _states_close(s, s_ref, 1e-5)
    drafter = EagleDrafter(head, model)
    prompts = [torch.randint(0, model.vocab_size, (n,)) for n in (5, 7, 4)]
    hid = [model(p[None]).hidden_states[0] for p in prompts]
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)
    trees = []
    for fused in (False, True):
        model.fused_steps = fused
        st = drafter.begin(prompts, target_hidden=hid)
        trees.append(drafter.propose(st, torch.tensor([1, 2, 3]), cfg))
    model.fused_steps = True
    assert torch.equal(trees[0].tokens, trees[1].tokens) and torch.equal(trees[0].parents, trees[1].parents)
    # the catch-up after a verify (EagleHead.catch_up): fused tree step + Triton commit == module path + torch commit,
    # rows accepting 1, 3 and 2 of 3 pairs
    st0 = drafter.begin(prompts, target_hidden=hid)
    tokens = torch.randint(0, model.vocab_size, (B, 3))
    h3, counts = torch.randn(B, 3, H), torch.tensor([1, 3, 2])
    states = []
    for fused in (False, True):
        model.fused_steps = fused
        st = st0.clone()
        drafter.advance(st, tokens=tokens, counts=counts, target_hidden=h3)
        states.append(st)
    model.fused_steps = True
    _states_close(states[1].head_state, states[0].head_state, 1e-5)
    assert torch.equal(states[1].last_feature, states[0].last_feature)


@pytest.mark.parametrize("H,dtype,offset", [(48, torch.float32, True), (200, torch.bfloat16, False),
                                            (384, torch.float32, False)])
def test_eagle_input_kernel_is_lookup_norms_and_concat(H, dtype, offset):
    """elementwise.eagle_input (the EAGLE head's embedding lookup + norm_e + norm_h + concat in one launch) equals its
    reference and the two add_rms_norm launches it replaces, bit for bit; bad shapes name the argument."""
    g = torch.Generator().manual_seed(H)
    V, B = 37, 5
    table = torch.randn(V, H, generator=g).to(dtype)
    hidden = (torch.randn(B, 1, H, generator=g) * 3).to(dtype)
    ids = torch.tensor([[0], [36], [5], [5], [17]])
    we, wh = torch.randn(H, generator=g) * 0.2, torch.randn(H, generator=g) * 0.2
    x = ew.eagle_input(ids, table, hidden, w_e=we, w_h=wh, eps=1e-6, offset=offset)
    assert x.shape == (B, 1, 2 * H) and x.dtype == dtype
    two = torch.cat([ew.add_rms_norm(table[ids], residual=None, weight=we, eps=1e-6, offset=offset)[0],
                     ew.add_rms_norm(hidden, residual=None, weight=wh, eps=1e-6, offset=offset)[0]], -1)
    assert torch.equal(x, two)
    ref = ew.eagle_input_reference(ids, table, hidden, w_e=we, w_h=wh, eps=1e-6, offset=offset)
    assert rel(x, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="ids must be integer token ids"):
        ew.eagle_input(ids[:3], table, hidden, w_e=we, w_h=wh, eps=1e-6, offset=offset)
    with pytest.raises(ValueError, match="table must be"):
        ew.eagle_input(ids, table[:, :-1], hidden, w_e=we, w_h=wh, eps=1e-6, offset=offset)
    with pytest.raises(ValueError, match="w_h must have shape"):
        ew.eagle_input(ids, table, hidden, w_e=we, w_h=wh[:-1], eps=1e-6, offset=offset)


@torch.inference_mode()
def test_eagle_decode_step_ids_equals_decode_step_of_the_embeddings():
    """EagleHead.decode_step_ids (the drafter's call: lookup folded into the input kernel on the fused path) gives
    the same features, logits and state as decode_step on the target's embeddings, fused and module path."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for

    model = _hybrid(torch.float32)
    torch.manual_seed(6)
    head = EagleHead(eagle_config_for(model.config)).eval()
    randomize_(head)
    B, H = 4, model.config.hidden_size
    hidden, ids = torch.randn(B, 1, H), torch.randint(0, model.vocab_size, (B, 1))
    s0 = head.new_state(B)
    s0.layers[0].recurrent.normal_()
    for fused in (True, False):
        model.fused_steps = fused
        s1, s2 = s0.clone(), s0.clone()
        o1, l1 = head.decode_step_ids(hidden, ids, s1, target=model)
        o2, l2 = head.decode_step(hidden, model.embed_tokens(ids), s2, target=model)
        assert torch.equal(o1, o2) and torch.equal(l1, l2)
        assert torch.equal(s1.layers[0].recurrent, s2.layers[0].recurrent)
        assert torch.equal(s1.layers[0].conv, s2.layers[0].conv)
    model.fused_steps = True


@torch.inference_mode()
def test_eagle_catch_up_ids_equals_catch_up_of_the_embeddings():
    """EagleHead.catch_up_ids (the drafter's catch-up: lookup and both input norms in one eagle_input launch on the
    fused path) leaves the same state as catch_up on the target's embeddings, bit for bit, fused and module path;
    rows accepting 1, 3 and 2 of 3 pairs."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for

    model = _hybrid(torch.float32)
    torch.manual_seed(8)
    head = EagleHead(eagle_config_for(model.config)).eval()
    randomize_(head)
    B, L, H = 3, 3, model.config.hidden_size
    hidden, ids, counts = torch.randn(B, L, H), torch.randint(0, model.vocab_size, (B, L)), torch.tensor([1, 3, 2])
    s0 = head.new_state(B)
    s0.layers[0].recurrent.normal_()
    s0.layers[0].conv.normal_()
    for fused in (True, False):
        model.fused_steps = fused
        s1, s2 = s0.clone(), s0.clone()
        head.catch_up_ids(hidden, ids, s1, counts=counts, target=model)
        head.catch_up(hidden, model.embed_tokens(ids), s2, counts=counts, target=model)
        assert torch.equal(s1.layers[0].recurrent, s2.layers[0].recurrent)
        assert torch.equal(s1.layers[0].conv, s2.layers[0].conv)
        assert not torch.equal(s1.layers[0].recurrent, s0.layers[0].recurrent)
    model.fused_steps = True


@torch.inference_mode()
def test_eagle_begin_fused_catch_up_equals_module_prefill():
    """EagleDrafter.begin on the fused path runs the prompt pairs through the fused catch-up in chunks of
    PREFILL_CHUNK (64) pairs; the head state and last feature equal the module forward's (float32, 1e-5), for a prompt
    longer than one chunk, a short one and a one-token prompt (no pairs)."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec.drafters import EagleDrafter

    model = _hybrid(torch.float32)
    torch.manual_seed(9)
    head = EagleHead(eagle_config_for(model.config)).eval()
    randomize_(head)
    drafter = EagleDrafter(head, model)
    prompts = [torch.randint(0, model.vocab_size, (n,)) for n in (70, 5, 1)]
    model.fused_steps = False
    hid = [model(p[None]).hidden_states[0] for p in prompts]
    states = []
    for fused in (False, True):
        model.fused_steps = fused
        if fused:
            assert head.fused_catch_up_ok(hid[0][None, :64], head.new_state(1), target=model)
        states.append(drafter.begin(prompts, target_hidden=hid))
    model.fused_steps = True
    _states_close(states[1].head_state, states[0].head_state, 1e-5)
    assert torch.equal(states[1].last_feature, states[0].last_feature)
    assert not torch.equal(states[1].head_state.layers[0].recurrent[0], torch.zeros_like(
        states[1].head_state.layers[0].recurrent[0]))


@torch.inference_mode()
def test_static_eagle_begin_equals_module_prefill():
    """runtime.StaticEagleBegin (EagleDrafter.begin's graphed chunks on CUDA, run eagerly here): chunks of 16 pairs
    with counts, the state zeroed before each prompt, equal the module forward's head state (float32, 1e-5) for
    prompts shorter than, equal to, one past and several chunks long, run one after another (a short prompt after a
    long one must not inherit its state or its stale padding pairs)."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.runtime import StaticEagleBegin
    from gdnspec.spec.drafters import EagleDrafter

    model = _hybrid(torch.float32)
    torch.manual_seed(10)
    head = EagleHead(eagle_config_for(model.config)).eval()
    randomize_(head)
    drafter = EagleDrafter(head, model)
    static = StaticEagleBegin(head, model, chunk=16, use_graph=False)
    for n in (41, 6, 17, 18, 2):
        p = torch.randint(0, model.vocab_size, (n,))
        model.fused_steps = False
        hid = model(p[None]).hidden_states[0]
        want = drafter.begin([p], target_hidden=[hid]).head_state
        model.fused_steps = True
        got = static.run(hid[None, :-1].to(head.dtype), p[None, 1:])
        _states_close(got, want, 1e-5)
        assert not torch.equal(got.layers[0].recurrent, torch.zeros_like(got.layers[0].recurrent))
    model.fused_steps = True


@pytest.mark.parametrize("B,Hkv,D,N,L,dtype", [(3, 1, 12, 5, 3, torch.float32), (2, 2, 16, 1, 1, torch.float32),
                                               (4, 3, 20, 17, 6, torch.bfloat16), (1, 2, 8, 4, 4, torch.float32)])
def test_kv_commit_path_matches_reference(B, Hkv, D, N, L, dtype):
    """The verify's node keys/values move from slots base + path[j] to base + j (j < counts), lengths += counts; rows
    near the capacity (base clamped), counts 0 and full paths included. Checked against the torch reference and
    against an explicit per-row loop."""
    g = torch.Generator().manual_seed(B * 100 + N)
    cap = 8 + N
    ck = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    cv = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    lengths = torch.randint(0, cap - N + 1, (B,), generator=g)
    lengths[0] = cap - N  # the last row that still fits
    paths, counts = [], []
    for b in range(B):
        nodes = sorted(torch.randperm(N, generator=g)[: L - 1].add(0).tolist()) if N > 1 else []
        path = [0] + [n for n in nodes if n > 0][: L - 1]
        c = int(torch.randint(0, len(path) + 1, (1,), generator=g))
        path += [path[-1]] * (L - len(path))
        paths.append(path)
        counts.append(c)
    path, counts = torch.tensor(paths), torch.tensor(counts)
    counts[-1] = min(L, 1 + (N > 1))
    expect_k, expect_v = ck.clone(), cv.clone()
    for b in range(B):
        base = min(int(lengths[b]), cap - N)
        for j in range(int(counts[b])):
            expect_k[b, :, base + j] = ck[b, :, base + path[b, j]]
            expect_v[b, :, base + j] = cv[b, :, base + path[b, j]]
    results = []
    for fn in (at.kv_commit_path_reference, at.kv_commit_path):
        k2, v2, n2 = ck.clone(), cv.clone(), lengths.clone()
        fn(k2, v2, n2, path=path, counts=counts, num_nodes=N)
        assert torch.equal(n2, lengths + counts)
        for b in range(B):  # slots up to the new length are exact copies; later slots are never read
            n = int(n2[b])
            assert torch.equal(k2[b, :, :n], expect_k[b, :, :n]) and torch.equal(v2[b, :, :n], expect_v[b, :, :n])
        results.append((k2, v2))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with pytest.raises(ValueError, match="num_nodes"):
        at.kv_commit_path(ck, cv, lengths.clone(), path=path, counts=counts, num_nodes=cap + 1)
