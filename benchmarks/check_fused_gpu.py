"""GPU check of the fused decode / verify steps against the module-by-module path (float32 and bf16).

    python benchmarks/check_fused_gpu.py        # prints one line per check, exit code 1 on a failure
    python benchmarks/check_fused_gpu.py --only-tree-build   # the tree builder kernels against the torch builder
    python benchmarks/check_fused_gpu.py --only-state-gather # the drafters' state gather in the kernels vs copies

float32: greedy plain decoding (CUDA graphs) and speculative decoding (n-gram drafter) must equal the unfused eager
path token for token; decode / verify logits and committed states are compared by relative error. bf16: relative
errors only (near-ties may flip a greedy token; see the README). PDL (ops/pdl.py): the fused decode and verify steps
launched with programmatic dependent launch must give BIT-identical logits to plain launches (GDNSPEC_PDL=0), in
float32 and bf16, on the tiny model and (bf16, B = 2) on the 1.5B config of bench_e2e (a race would show up as a difference).
Tree solve: both inverses of tree-WY's (I + L) against float64 at the 1.7B GDN shapes (check_tree_solve).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import _env, build_model  # noqa: E402

from gdnspec import generate_autoregressive  # noqa: E402
from gdnspec.layers.layout import TokenLayout  # noqa: E402
from gdnspec.spec import SpeculativeEngine, TreeConfig  # noqa: E402
from gdnspec.models.eagle import EagleHead, eagle_config_for  # noqa: E402
from gdnspec.spec.drafters import EagleDrafter, NGramDrafter  # noqa: E402


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def compare_steps(model, g, B: int, prompt_len: int):
    """Prefill B random prompts module by module, then 4 decode steps and one 8-node verify both fused and module by
    module from the same state. Returns (logit rel errors, fused state, module state, module verify, fused verify)."""
    prompt = torch.randint(0, model.vocab_size, (B, prompt_len), device="cuda", generator=g)
    model.fused_steps = False
    s_ref = model(prompt).state
    s = s_ref.clone()
    errs = []
    for _ in range(4):
        ids = torch.randint(0, model.vocab_size, (B, 1), device="cuda", generator=g)
        model.fused_steps = False
        ref = model(ids, s_ref)
        model.fused_steps = True
        errs.append(rel(model(ids, s).logits, ref.logits))
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 6], device="cuda").expand(B, 8).contiguous()
    lay = TokenLayout.from_parents(parents)
    ids = torch.randint(0, model.vocab_size, (B, 8), device="cuda", generator=g)
    model.fused_steps = False
    ref = model.forward_tree(ids, state=s_ref, layout=lay)
    model.fused_steps = True
    out = model.forward_tree(ids, state=s, layout=lay)
    errs.append(rel(out.logits, ref.logits))
    return errs, s, s_ref, ref, out


@torch.inference_mode()
def main() -> int:
    failed = 0
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model("tiny", "cuda").to(dtype)
        g = torch.Generator(device="cuda").manual_seed(0)
        B = 3
        errs, _, _, _, _ = compare_steps(model, g, B, 37)
        prompt = torch.randint(0, model.vocab_size, (B, 37), device="cuda", generator=g)
        bound = 1e-4 if dtype == torch.float32 else 5e-2
        ok = max(errs) < bound
        failed += not ok
        print(f"{dtype}: decode/verify logits rel err max {max(errs):.2e} (bound {bound:.0e}) {'ok' if ok else 'FAIL'}")
        if dtype == torch.float32:
            prompts = [prompt[0, :20], prompt[1], prompt[2, :5]]
            model.fused_steps = False
            want = generate_autoregressive(model, prompts, 40, static=False)
            model.fused_steps = True
            got = generate_autoregressive(model, prompts, 40)
            spec = SpeculativeEngine(model, NGramDrafter(), TreeConfig(topk=2, num_steps=3, num_draft_tokens=6),
                                     static=True).generate(prompts, 40)
            same = all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(a, b) for a, b in zip(spec, want))
            failed += not same
            print(f"float32 greedy: fused plain (graph) and speculative == unfused eager: {'ok' if same else 'FAIL'}")
            # EAGLE head (random weights) in the graph: fused expansion (EagleHead.decode_step) and catch-up
            # (EagleHead.catch_up) against the module path; outputs must equal plain greedy decoding either way
            torch.manual_seed(3)
            head = EagleHead(eagle_config_for(model.config), dtype=dtype, device="cuda").eval()
            outs = {}
            for fused in (False, True):
                model.fused_steps = fused
                for cfg_name, cfg in (("chain-4", TreeConfig(builder="chain", num_steps=4)),
                                      ("tree-4x5", TreeConfig(topk=4, num_steps=5, num_draft_tokens=16))):
                    outs[fused, cfg_name] = SpeculativeEngine(model, EagleDrafter(head, model), cfg,
                                                              static=True).generate(prompts, 40)
            model.fused_steps = True
            same = all(torch.equal(a, b) for o in outs.values() for a, b in zip(o, want))
            failed += not same
            print(f"float32 greedy: EAGLE speculative (graph, fused and unfused head) == plain: {'ok' if same else 'FAIL'}")
            # reduced draft vocabulary (models/eagle.py): every other token id; fused head in the graph
            head.set_draft_vocab(torch.arange(0, model.vocab_size, 2, device="cuda"))
            got = SpeculativeEngine(model, EagleDrafter(head, model), TreeConfig(topk=4, num_steps=5, num_draft_tokens=16),
                                    static=True).generate(prompts, 40)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            failed += not same
            print(f"float32 greedy: EAGLE with a reduced draft vocabulary (graph) == plain: {'ok' if same else 'FAIL'}")
    return (failed + check_tree_solve() + check_tree_index() + check_tree_build() + check_state_gather()
            + check_ssm_state_dtype() + check_pdl())


def check_ssm_state_dtype() -> int:
    """A bf16 recurrent state (mamba_ssm_cache_dtype): the fused decode / verify / commit kernels against the module
    path with the same state dtype (both compute in float32 and round the stored state at the same points), tiny
    model in float32 and bf16 activations."""
    failed = 0
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model("tiny", "cuda").to(dtype)
        model.mamba_ssm_cache_dtype = "bfloat16"
        g = torch.Generator(device="cuda").manual_seed(2)
        B = 3
        errs, s, s_ref, ref, out = compare_steps(model, g, B, 21)
        path, counts = torch.tensor([[0, 1, 3]] * B, device="cuda"), torch.tensor([3, 2, 1], device="cuda")
        model.commit_tree(s_ref, ref, path=path, counts=counts)
        model.commit_tree(s, out, path=path, counts=counts)
        errs += [rel(a.recurrent, b.recurrent) for a, b in zip(s.layers, s_ref.layers) if hasattr(a, "recurrent")]
        bf16 = all(t.recurrent.dtype == torch.bfloat16 for t in s.layers if hasattr(t, "recurrent"))
        ok = bf16 and max(errs) < 2e-2
        failed += not ok
        print(f"bf16 GDN state, {dtype} model: fused decode / verify / commit vs module path rel err max "
              f"{max(errs):.2e} (bound 2e-2), states bf16: {bf16}: {'ok' if ok else 'FAIL'}")
    return failed


def check_tree_solve(device: str = "cuda", shape=(2, 16, 32, 128, 128), nodes=(4, 16, 17, 33)) -> int:
    """Both inverses of tree-WY's (I + L) (GDNSPEC_TREE_BLOCKED_SOLVE 1 / 0) in triton_tree_gated_delta_rule against
    the float64 torch reference at the 1.7B GDN shapes (B, H, HV, K, V), chains and trees, nearly repeated keys (the
    worst case of check_tree_solve_stability.py), beta near 1; IEEE / tf32x3 / mixed precision. The blocked solve must
    stay within 2x of substitution's error (plus 1e-6) and within 1e-5 in IEEE."""
    import torch.nn.functional as F

    from gdnspec.ops.gated_delta_rule import triton_tree as tt
    from gdnspec.ops.gated_delta_rule.tree import tree_gated_delta_rule

    B, H, HV, K, V = shape
    g = torch.Generator(device=device).manual_seed(7)
    failed = 0
    for N in nodes:
        for kind in ("chain", "tree"):
            par = torch.tensor([-1] + [i - 1 if kind == "chain" else max(0, i - 1 - (i % 3)) for i in range(1, N)],
                               device=device).expand(B, N)
            mask = TokenLayout.from_parents(par).ancestor_mask
            rnd = lambda *sz: torch.randn(*sz, device=device, generator=g)  # noqa: E731
            q, k = rnd(B, N, H, K), (rnd(B, 1, H, K) + 0.05 * rnd(B, N, H, K)).contiguous()
            v, S0 = rnd(B, N, HV, V), rnd(B, HV, K, V)
            gg = F.logsigmoid(rnd(B, N, HV) + 2)
            beta = 0.5 + 0.49 * torch.rand(B, N, HV, device=device, generator=g)
            o_ref, _ = tree_gated_delta_rule(q.double(), k.double(), v.double(), g=gg.double(), beta=beta.double(),
                                             ancestor_mask=mask, initial_state=S0.double(), use_qk_l2norm=True)
            errs = {}
            for blocked in ("1", "0"):
                for prec in ("ieee", "tf32x3", "mixed") if device == "cuda" else ("ieee",):
                    with _env(("GDNSPEC_TREE_BLOCKED_SOLVE", blocked)):
                        o, _ = tt.triton_tree_gated_delta_rule(q, k, v, g=gg, beta=beta, ancestor_mask=mask,
                                                               initial_state=S0, use_qk_l2norm=True, precision=prec)
                    errs[blocked, prec] = rel(o, o_ref)
            ok = errs["1", "ieee"] < 1e-5 and all(errs["1", p] <= 2 * errs["0", p] + 1e-6 for _, p in errs)
            failed += not ok
            print(f"tree solve N={N} {kind}: " + "  ".join(f"{'blocked' if b == '1' else 'subst'}/{p} {e:.1e}"
                                                          for (b, p), e in errs.items()) + f": {'ok' if ok else 'FAIL'}")
    return failed


def check_tree_index() -> int:
    """The verify step's index kernels (ops/tree_index.py) on CUDA against their torch forms: random, chain and star
    trees with padding nodes, N = 1 .. 64, B = 5."""
    from gdnspec.ops import tree_index
    from gdnspec.ops.conv1d.tree import tree_conv_window_index
    from gdnspec.spec.accept import _accept_greedy_torch
    from gdnspec.spec.tree import DraftTree

    g = torch.Generator().manual_seed(5)
    bad = 0
    for N in (1, 2, 5, 16, 17, 33, 64):
        for kind in ("random", "chain", "star"):
            B = 5
            par = torch.full((B, N), -1, dtype=torch.long)
            for i in range(1, N):
                par[:, i] = {"chain": i - 1, "star": 0}.get(kind, -1)
                if kind == "random":
                    par[:, i] = torch.randint(0, i, (B,), generator=g)
            tokens, target = torch.randint(0, 3, (B, N), generator=g), torch.randint(0, 3, (B, N), generator=g)
            valid = torch.rand(B, N, generator=g) > 0.2
            valid[:, 0] = True
            ref = TokenLayout.from_parents_reference(par)
            mask, depth, window = tree_index.tree_layout(par.cuda(), conv_width=4)
            bad += not (torch.equal(mask.cpu(), ref.ancestor_mask) and torch.equal(depth.cpu(), ref.depth)
                        and torch.equal(window.cpu(), tree_conv_window_index(par, 4)))
            want = _accept_greedy_torch(DraftTree(tokens, par, torch.zeros(B, N), valid), target, ref, width=N)
            got = tree_index.greedy_accept(target.cuda(), tokens=tokens.cuda(), parents=par.cuda(), valid=valid.cuda(),
                                           ancestor_mask=mask, depth=depth, width=N, extra=True)
            bad += not all(torch.equal(a.cpu(), w) for a, w in zip(got[:3], (want.path, want.counts, want.bonus)))
            bad += not torch.equal(got[4].cpu(), tokens.gather(1, want.path))
    print(f"tree index kernels (layout, window index, greedy accept) == torch forms on CUDA, 21 tree shapes: "
          f"{'ok' if not bad else f'FAIL ({bad})'}")
    return int(bad > 0)


def check_tree_build() -> int:
    """The tree builder's kernels (ops/tree_build.py) on CUDA against the torch builder (GDNSPEC_TREE_BUILD=0):
    eagle2 trees and chains from a fixed random log-prob table (float32), B = 1 / 5, topk 1 .. 5, sync-free and not."""
    from gdnspec.spec.tree import TreeConfig as TC, build_tree

    g = torch.Generator().manual_seed(7)
    table = torch.log_softmax(3 * torch.randn(64, 64, generator=g), -1).cuda()
    table[table < -6] = float("-inf")  # some children impossible (-inf candidates)
    bad = n = 0
    for cfg in (TC(topk=4, num_steps=5, num_draft_tokens=16), TC(topk=2, num_steps=3, num_draft_tokens=7),
                TC(topk=5, num_steps=5, num_draft_tokens=64), TC(topk=1, num_steps=1, num_draft_tokens=2),
                TC(builder="chain", num_steps=4), TC(builder="chain", num_steps=6, num_draft_tokens=5)):
        for B in (1, 5):
            roots = torch.randint(0, 64, (B,), generator=g).cuda()
            for sync_free in (True, False):
                trees = []
                for flag in ("1", "0"):
                    os.environ["GDNSPEC_TREE_BUILD"] = flag
                    trees.append(build_tree(roots, lambda t, s: table[t], cfg, sync_free=sync_free))
                os.environ.pop("GDNSPEC_TREE_BUILD", None)
                (a, ia), (b, ib) = trees
                n += 1
                bad += not (all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "parents", "scores", "valid"))
                            and torch.equal(ia, ib))
    print(f"tree builder kernels (frontier, best-N selection, chain) == torch builder on CUDA, {n} trees: "
          f"{'ok' if not bad else f'FAIL ({bad})'}")
    return int(bad > 0)


def check_state_gather(device: str = "cuda") -> int:
    """The tree expansions' state gather in the kernels (gdn_decode StateSource, eagle_input hidden_rows,
    ModelState.select_deferred) on CUDA: the shipped bundle's EAGLE and draft-model proposals (float32, sync-free, as
    in the graph step) equal those with the copies the kernels replace (select / clone), tree-4x5 and chain-4, and the
    fused decode step from source rows equals index_select + the in-place step bit for bit."""
    from gdnspec.bundle import load
    from gdnspec.cache import ModelState

    bundle = load(device=device, dtype=torch.float32)
    target = bundle.model
    g = torch.Generator(device=device).manual_seed(3)
    prompts = [torch.randint(0, target.vocab_size, (n,), device=device, generator=g) for n in (9, 14, 5)]
    with torch.inference_mode():
        hid = [target(p[None]).hidden_states[0] for p in prompts]
    roots = torch.stack([p[-1] for p in prompts])
    drafters = {k: bundle.drafters[k] for k in ("eagle", "model")}
    bad = n = 0
    real = ModelState.select_deferred
    for name, drafter in drafters.items():
        st = drafter.begin(prompts, target_hidden=hid) if name == "eagle" else drafter.begin(prompts)
        committed = (st.head_state if name == "eagle" else st.model_state).clone()
        for cfg in (TreeConfig(topk=4, num_steps=5, num_draft_tokens=16), TreeConfig(builder="chain", num_steps=4)):
            trees = []
            for eager in (False, True):
                if eager:
                    ModelState.select_deferred = lambda self, rows: self.clone() if rows is None else self.select(rows)
                try:
                    with torch.inference_mode():
                        trees.append(drafter.propose(st, roots, cfg, sync_free=True))
                finally:
                    ModelState.select_deferred = real
            n += 1
            bad += not all(torch.equal(getattr(trees[0], f).nan_to_num(), getattr(trees[1], f).nan_to_num())
                           for f in ("tokens", "parents", "valid", "scores"))
        now = st.head_state if name == "eagle" else st.model_state  # proposals only read the committed state
        bad += not all(torch.equal(a.recurrent, b.recurrent) and torch.equal(a.conv, b.conv)
                       for a, b in zip(now.layers, committed.layers) if hasattr(a, "recurrent"))
    layer = target.layers[0].linear_attn
    st = target.new_state(5).layers[0]
    bad += _gather_step_differs(layer, st, g, device)
    print(f"state gather in the kernels == select / clone copies on {device} ({n} bundle proposals, the committed "
          f"states untouched, one decode step): {'ok' if not bad else f'FAIL ({bad})'}")
    return int(bad > 0)


@torch.inference_mode()
def _gather_step_differs(layer, st, g, device: str) -> int:
    """1 when the fused decode step from source rows differs from index_select + the in-place step (bitwise)."""
    from gdnspec.ops.fused import gdn_decode as gd

    st.recurrent.normal_(generator=g)
    st.conv.normal_(generator=g)
    rows = torch.tensor([4, 0, 4, 2], device=device)
    proj = torch.randn(4, layer.proj_layout().width, device=device, generator=g)
    kw = dict(layout=layer.proj_layout(), conv_weight=layer.conv_weight, A_log=layer.A_log, dt_bias=layer.dt_bias,
              norm_weight=layer.norm.weight, norm_eps=layer.norm.eps)
    c_ref, S_ref = st.conv[rows].clone(), st.recurrent[rows].clone()
    y_ref = gd.gdn_decode_fused(proj, conv_state=c_ref, recurrent_state=S_ref, **kw)
    c, S = torch.full_like(c_ref, float("nan")), torch.full_like(S_ref, float("nan"))
    y = gd.gdn_decode_fused(proj, conv_state=c, recurrent_state=S, source=gd.StateSource(st.conv, st.recurrent, rows), **kw)
    return int(not (torch.equal(y, y_ref) and torch.equal(c, c_ref) and torch.equal(S, S_ref)))


def check_pdl() -> int:
    """PDL on == PDL off, bitwise: 4 fused decode steps + one tree verify (fresh launches, eager), same kernels and
    GEMV tiles (gemv_tile's table; with GDNSPEC_GEMV_AUTOTUNE=1 the autotuner's cache key ignores PDL), so any difference is a missing wait."""
    from gdnspec.ops import pdl

    if not pdl.enabled(torch.empty(1, device="cuda")):
        print("PDL: not available on this GPU / Triton (sm_90+ and gdc_wait needed): skipped")
        return 0
    failed = 0
    for size, dtype, B in (("tiny", torch.float32, 3), ("tiny", torch.bfloat16, 3), ("1.5b", torch.bfloat16, 2)):
        model = build_model(size, "cuda").to(dtype)
        model.fused_steps = True
        g = torch.Generator(device="cuda").manual_seed(1)
        prompt = torch.randint(0, model.vocab_size, (B, 33), device="cuda", generator=g)
        steps = [torch.randint(0, model.vocab_size, (B, 1), device="cuda", generator=g) for _ in range(4)]
        parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 6, 7, 7, 8, 9, 0, 12, 13, 4], device="cuda")
        lay = TokenLayout.from_parents(parents.expand(B, 16).contiguous())
        tree = torch.randint(0, model.vocab_size, (B, 16), device="cuda", generator=g)
        s0 = model(prompt).state
        res = {}
        for flag in ("0", "1", "0", "1"):
            os.environ["GDNSPEC_PDL"] = flag
            s = s0.clone()
            outs = [model(ids, s).logits for ids in steps]
            outs.append(model.forward_tree(tree, state=s, layout=lay).logits)
            torch.cuda.synchronize()
            got = torch.cat([o.reshape(-1) for o in outs])
            res.setdefault(flag, []).append(got)
        os.environ.pop("GDNSPEC_PDL", None)
        same = all(torch.equal(r, res["0"][0]) for rs in res.values() for r in rs)
        failed += not same
        print(f"PDL on == off, bitwise, {size} {dtype} B={B}: 4 decode steps + verify N=16: "
              f"{'ok' if same else 'FAIL'}")
    return failed


if __name__ == "__main__":
    if sys.argv[1:] == ["--only-tree-build"]:  # the builder check alone (seconds)
        sys.exit(check_tree_build())
    if sys.argv[1:] == ["--only-state-gather"]:  # the expansions' state gather alone (seconds)
        sys.exit(check_state_gather())
    sys.exit(main())
