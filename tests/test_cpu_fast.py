"""The CPU fast path (gdnspec/models/cpu_fast.py) against the module-by-module path (model.fused_steps = False):
decode steps, tree verifies and commits, outputs AND states, float64 (tight) and float32, at awkward shapes (B = 1, 3
with uneven KV lengths; N = 1, 2, 5, 17; chains, stars, random trees; GQA; HV = 2H; K != V; both projection layouts);
the EAGLE head's expansion and catch-up; greedy speculative decoding token-identical to plain decoding.

Run: python -m pytest -q tests/test_cpu_fast.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import path_to, random_parents, randomize_, tiny_config
from gdnspec.layers.layout import TokenLayout
from gdnspec.models.lm import GDNForCausalLM


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def bound(dtype) -> float:
    return 1e-11 if dtype == torch.float64 else 5e-5


def states_rel(a, b) -> float:
    worst = 0.0
    for la, lb in zip(a.layers, b.layers):
        for name, ta in vars(la).items():
            tb = getattr(lb, name)
            if name == "lengths":
                assert torch.equal(ta, tb)
                continue
            if name in ("k", "v"):
                n = int(la.lengths.max())
                ta, tb = ta[:, :, :n], tb[:, :, :n]
            worst = max(worst, rel(ta, tb))
    return worst


SHAPES = {
    "hv2h_gqa": {},  # HV = 2H, K != V, GQA 4:2
    "mha_hv_eq_h": dict(linear_num_value_heads=2, num_key_value_heads=4),
    "k_gt_v": dict(linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=8),
    "full_rope_mqa": dict(partial_rotary_factor=1.0, num_key_value_heads=1),
}


def _model(dtype, layout, over):
    cfg = tiny_config(num_hidden_layers=4, full_attention_interval=2, gdn_layout=layout, **over)
    return randomize_(GDNForCausalLM(cfg, dtype=torch.float32)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["qwen3_next", "qwen3_5"])
@pytest.mark.parametrize("shape", list(SHAPES))
@torch.inference_mode()
def test_fast_steps_match_module_path(dtype, layout, shape):
    model = _model(dtype, layout, SHAPES[shape])
    g = torch.Generator().manual_seed(1)
    V = model.vocab_size
    for B in (1, 3):
        model.fused_steps = False
        s_ref = model(torch.randint(0, V, (B, 6), generator=g)).state
        if B == 3:  # rows with different KV lengths (masked prefix, per-row slots)
            for s in s_ref.layers:
                if hasattr(s, "lengths"):
                    s.lengths[1] -= 2
        s = s_ref.clone()
        for _ in range(3):
            ids = torch.randint(0, V, (B, 1), generator=g)
            model.fused_steps = False
            ref = model(ids, s_ref)
            model.fused_steps = True
            assert model._use_cpu_fast(s)
            out = model(ids, s)
            assert rel(out.logits, ref.logits) < bound(dtype) and rel(out.hidden_states, ref.hidden_states) < bound(dtype)
            assert states_rel(s, s_ref) < bound(dtype)
        for kind, N in (("random", 5), ("chain", 2), ("star", 4), ("random", 1), ("random", 17)):
            parents = random_parents(B, N, kind, seed=N)
            lay = TokenLayout.from_parents(parents)
            ids = torch.randint(0, V, (B, N), generator=g)
            model.fused_steps = False
            ref = model.forward_tree(ids, state=s_ref, layout=lay)
            model.fused_steps = True
            out = model.forward_tree(ids, state=s, layout=lay)
            assert rel(out.logits, ref.logits) < bound(dtype), (kind, N)
            assert rel(out.hidden_states, ref.hidden_states) < bound(dtype), (kind, N)
            node = torch.randint(0, N, (B,), generator=g)
            paths = [path_to(parents[b], int(node[b])) for b in range(B)]
            L = max(map(len, paths))
            path = torch.tensor([p + [0] * (L - len(p)) for p in paths])
            counts = torch.tensor([len(p) for p in paths])
            model.fused_steps = False  # the module commit (the reference) against the fast one (cpu_fast.commit_step)
            model.commit_tree(s_ref, ref, path=path, counts=counts, all_rows_accept=True)
            model.fused_steps = True
            model.commit_tree(s, out, path=path, counts=counts, all_rows_accept=True)
            assert states_rel(s, s_ref) < bound(dtype), (kind, N)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,N,HV,K,V,W,kind", [(1, 5, 2, 8, 12, 4, "random"), (3, 17, 4, 12, 8, 4, "random"),
                                               (3, 1, 2, 8, 8, 2, "chain"), (2, 6, 6, 16, 24, 3, "star")])
@torch.inference_mode()
def test_gdn_commit_matches_the_reference_commits(dtype, B, N, HV, K, V, W, kind):
    """cpu_fast.gdn_commit against tree_commit_state + tree_conv_commit_state: recurrent state and conv window."""
    from gdnspec.cache import GDNLayerState
    from gdnspec.layers.gated_deltanet import GDNTreeCache
    from gdnspec.models import cpu_fast
    from gdnspec.ops.conv1d.tree import tree_conv_commit_state, tree_conv_window_index
    from gdnspec.ops.gated_delta_rule.tree import TreeGDRCache, tree_commit_state

    g = torch.Generator().manual_seed(N + HV)
    parents = random_parents(B, N, kind, seed=N)
    anc = TokenLayout.from_parents(parents).ancestor_mask
    CD = 40
    gdr = TreeGDRCache(k=torch.randn(B, HV, N, K, generator=g, dtype=dtype),
                       v_new=torch.randn(B, HV, N, V, generator=g, dtype=dtype),
                       gamma=-torch.rand(B, HV, N, generator=g, dtype=dtype).cumsum(-1), ancestor_mask=anc)
    cache = GDNTreeCache(gdr=gdr, conv_input=torch.randn(B, N, CD, generator=g, dtype=dtype),
                         conv_window_index=tree_conv_window_index(parents, W))
    S0 = torch.randn(B, HV, K, V, generator=g, dtype=dtype)
    c0 = torch.randn(B, CD, W - 1, generator=g, dtype=dtype)
    node = torch.randint(0, N, (B,), generator=g)
    st = GDNLayerState(S0.clone(), c0.clone())
    cpu_fast.gdn_commit(st, cache, cpu_fast.CommitPlan(anc, node, W))
    want_S = tree_commit_state(initial_state=S0, cache=gdr, node=node)
    want_c = tree_conv_commit_state(x=cache.conv_input, state=c0, window_index=cache.conv_window_index, node=node)
    assert rel(st.recurrent, want_S) < bound(dtype)
    assert torch.equal(st.conv, want_c)  # a copy of inputs: exact


@torch.inference_mode()
def test_fast_path_switches_and_falls_back(monkeypatch):
    model = _model(torch.float32, "qwen3_next", {})
    s = model.new_state(2)
    assert model._use_cpu_fast(s)
    model.fused_steps = False
    assert not model._use_cpu_fast(s)
    model.fused_steps = True
    monkeypatch.setenv("GDNSPEC_CPU_FAST", "0")
    assert not model._use_cpu_fast(s)
    monkeypatch.delenv("GDNSPEC_CPU_FAST")
    s.layers[0].conv = s.layers[0].conv.double()  # a state of another dtype: the module path (which checks it)
    assert not model._use_cpu_fast(s)
    with pytest.raises(ValueError):
        model(torch.zeros(2, 1, dtype=torch.long), s)
    with torch.inference_mode(False), torch.enable_grad():
        assert not model._use_cpu_fast(model.new_state(1))  # autograd: the module path
    bf = _model(torch.float32, "qwen3_next", {}).to(torch.bfloat16)
    assert not bf._use_cpu_fast(bf.new_state(1))


@pytest.mark.parametrize("inference_weights", [False, True])
def test_cached_weights_follow_updates(inference_weights):
    """The permuted / fused weights and norm scales are rebuilt after in-place updates and replaced weights (weights
    made under inference mode have no version counter: they are re-derived every step)."""
    if inference_weights:
        with torch.inference_mode():
            model = _model(torch.float64, "qwen3_next", {})
    else:
        model = _model(torch.float64, "qwen3_next", {})
    with torch.inference_mode():
        _check_cached_weights_follow_updates(model)


def _check_cached_weights_follow_updates(model):
    ids = torch.tensor([[3], [7]])
    state0 = model(torch.randint(0, model.vocab_size, (2, 4))).state

    def both():
        model.fused_steps = False
        ref = model(ids, state0.clone()).logits
        model.fused_steps = True
        return rel(model(ids, state0.clone()).logits, ref)

    assert both() < 1e-11
    with torch.no_grad():
        model.layers[0].linear_attn.in_proj_qkvz.weight.mul_(1.5)
        model.layers[1].self_attn.k_proj.weight.add_(0.1)
        model.layers[1].self_attn.q_norm.weight.add_(0.2)
        model.layers[0].linear_attn.A_log.add_(0.3)
        model.layers[0].mlp.up_proj.weight.mul_(-1.0)
        model.norm.weight.add_(0.5)
    assert both() < 1e-11
    lin = model.layers[2].linear_attn
    lin.in_proj_ba.weight = torch.nn.Parameter(torch.randn_like(lin.in_proj_ba.weight))
    model.layers[3].self_attn.q_proj.weight = torch.nn.Parameter(torch.randn_like(model.layers[3].self_attn.q_proj.weight))
    assert both() < 1e-11


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.inference_mode()
def test_eagle_expansion_and_catch_up_match_module_path(dtype):
    check_eagle_steps_match_module_path(dtype)


def check_eagle_steps_match_module_path(dtype):
    """An EAGLE head's expansions and catch-ups (counts 1, L, L - 1) on the fast steps against the module path;
    also run by tests/test_cpu_compiled.py with the compiled steps on."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for

    target = _model(dtype, "qwen3_next", {})
    head = randomize_(EagleHead(eagle_config_for(target.config)), seed=3).to(dtype).eval()
    g = torch.Generator().manual_seed(2)
    B, H = 3, target.config.hidden_size
    st_ref = head.new_state(B)
    head(torch.randn(B, 5, H, generator=g).to(dtype), torch.randn(B, 5, H, generator=g).to(dtype), st_ref)
    st = st_ref.clone()
    for _ in range(2):
        f, e = torch.randn(B, 1, H, generator=g).to(dtype), torch.randn(B, 1, H, generator=g).to(dtype)
        target.fused_steps = False
        ref = head.decode_step(f, e, st_ref, target=target)
        target.fused_steps = True
        assert head._cpu_fast_ok(st.layers[0], target)
        out = head.decode_step(f, e, st, target=target)
        assert rel(out[0], ref[0]) < bound(dtype) and rel(out[1], ref[1]) < bound(dtype)
        assert states_rel(st, st_ref) < bound(dtype)
    for L in (1, 3):
        f, e = torch.randn(B, L, H, generator=g).to(dtype), torch.randn(B, L, H, generator=g).to(dtype)
        counts = torch.tensor([1, L, max(1, L - 1)])
        target.fused_steps = False
        head.catch_up(f, e, st_ref, counts=counts, target=target)
        target.fused_steps = True
        head.catch_up(f, e, st, counts=counts, target=target)
        assert states_rel(st, st_ref) < bound(dtype)


@torch.inference_mode()
def test_greedy_speculative_output_equals_plain_decoding_on_the_fast_path():
    from gdnspec import generate_autoregressive
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec import SpeculativeEngine, TreeConfig
    from gdnspec.spec.drafters import EagleDrafter, ModelDrafter, NGramDrafter

    model = _model(torch.float32, "qwen3_next", {})
    draft = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=1), dtype=torch.float32), seed=5).eval()
    head = randomize_(EagleHead(eagle_config_for(model.config)), seed=4).eval()
    prompts = [torch.tensor([1, 2, 3, 4, 1, 2, 3]), torch.tensor([5, 6, 7])]
    ref = generate_autoregressive(model, prompts, 16)
    model.fused_steps = False
    assert all(torch.equal(a, b) for a, b in zip(generate_autoregressive(model, prompts, 16), ref))
    model.fused_steps = True
    for drafter in (NGramDrafter(), ModelDrafter(draft), EagleDrafter(head, model)):
        for cfg in (TreeConfig(topk=2, num_steps=3, num_draft_tokens=6), TreeConfig(builder="chain", num_steps=4)):
            out = SpeculativeEngine(model, drafter, cfg).generate(prompts, 16)
            assert all(torch.equal(a, b) for a, b in zip(out, ref)), type(drafter).__name__


def test_fast_path_cuts_ops_on_the_default_bundle():
    """The op counts of benchmarks/bench_cpu_ops.py: the fast path runs far fewer top-level torch ops per step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gdnspec
    from bench_cpu_ops import build_steps, count_ops

    bundle = gdnspec.load()  # outside inference mode (as the CLI): version-tracked weights, cached derived tensors
    with torch.inference_mode():
        steps, models = build_steps(bundle, prompt_len=16)
        counts = {}
        for mode in ("module", "fast"):
            for m in models:
                m.fused_steps = mode == "fast"
            counts[mode] = {name: count_ops(make())[0] for name, make in steps.items()
                            if name in ("decode", "verify_N16", "eagle_expansion", "eagle_catch_up_3")}
        for m in models:
            m.fused_steps = True
    for name, fast in counts["fast"].items():
        assert fast < 0.75 * counts["module"][name], (name, counts)
