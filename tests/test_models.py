"""Models: GDNForCausalLM (GDN-only and hybrid, tied/untied) and SimpleLMWithGDN: outputs, prefill + decode ==
one forward, dtypes, ModelState row operations, and tree verify + commit vs per-path causal forwards.

Run: python -m pytest -q tests/test_models.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import path_to, random_parents, randomize_, tiny_config, tol
from gdnspec import GDNConfig, GDNForCausalLM, GDNLayerState, KVCache, ModelState, SimpleLMWithGDN, TokenLayout

F64 = torch.float64
CONFIGS = {
    "gdn_only": dict(num_hidden_layers=2),
    "hybrid": dict(num_hidden_layers=3, full_attention_interval=2),  # linear, full, linear
    "hybrid_tied_qwen3_5": dict(num_hidden_layers=2, full_attention_interval=2, tie_word_embeddings=True, gdn_layout="qwen3_5"),
    "no_mlp_tied": dict(num_hidden_layers=2, intermediate_size=0, tie_word_embeddings=True),
}


def make_model(name="hybrid", dtype=F64, seed=0, **over):
    torch.manual_seed(seed)
    cfg = tiny_config(**{**CONFIGS[name], **over})
    model = GDNForCausalLM(cfg, dtype=dtype)
    randomize_(model, seed=seed)
    return model.eval()


def logit_tol(dtype):
    """Logits of this model are O(1). float64: two algorithms agree to ~1e-13. float32: per-layer ~1e-6 relative,
    accumulated over 2-3 layers and the lm_head -> 1e-4."""
    return tol(dtype) if dtype == F64 else dict(atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", (F64, torch.float32))
@torch.no_grad()
def test_prefill_then_decode_equals_one_forward(name, dtype):
    model = make_model(name, dtype)
    if name.startswith("hybrid"):
        assert "full_attention" in model.config.layer_types and "linear_attention" in model.config.layer_types
    if "tied" in name:
        assert model.lm_head.weight is model.embed_tokens.weight
    else:
        assert model.lm_head.weight is not model.embed_tokens.weight
    B, T, k = 2, 9, 5
    ids = torch.randint(0, model.vocab_size, (B, T + k))
    full = model(ids, mode="chunk")
    out = model(ids[:, :T])
    state = out.state
    logits, hidden = [out.logits], [out.hidden_states]
    for t in range(T, T + k - 2):
        o = model(ids[:, t:t + 1], state)  # auto -> fused_decode
        assert o.state is state
        logits.append(o.logits)
        hidden.append(o.hidden_states)
    o = model(ids[:, T + k - 2:], state, mode="recurrent")  # a 2-token step
    logits.append(o.logits)
    hidden.append(o.hidden_states)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, **logit_tol(dtype))
    torch.testing.assert_close(torch.cat(hidden, 1), full.hidden_states, **logit_tol(dtype))
    for s, fs in zip(state.layers, full.state.layers):
        if isinstance(s, GDNLayerState):
            torch.testing.assert_close(s.recurrent, fs.recurrent, **logit_tol(dtype))
            torch.testing.assert_close(s.conv, fs.conv, **logit_tol(dtype))
        else:
            assert s.lengths.tolist() == [T + k] * B
            torch.testing.assert_close(s.k[:, :, :T + k], fs.k[:, :, :T + k], **logit_tol(dtype))


@torch.no_grad()
def test_long_prefill_auto_uses_chunk_and_matches_recurrent():
    model = make_model("hybrid")
    ids = torch.randint(0, model.vocab_size, (1, 131))
    a, r = model(ids), model(ids, mode="recurrent")
    torch.testing.assert_close(a.logits, r.logits, **tol(F64))


@torch.no_grad()
def test_output_fields_and_hidden_state_before_norm():
    model = make_model("hybrid")
    ids = torch.randint(0, model.vocab_size, (3, 6))
    out = model(ids)
    assert out.logits.shape == (3, 6, model.vocab_size)
    assert out.hidden_states.shape == (3, 6, model.config.hidden_size)
    assert isinstance(out.state, ModelState) and out.state.batch_size == 3
    assert [type(s) for s in out.state.layers] == [GDNLayerState, KVCache, GDNLayerState]
    torch.testing.assert_close(model.lm_head(model.norm(out.hidden_states)), out.logits, rtol=0, atol=0)
    last = model(ids, logits_to_keep=2)
    assert last.logits.shape == (3, 2, model.vocab_size)
    torch.testing.assert_close(last.logits, out.logits[:, -2:], **tol(F64))


@pytest.mark.parametrize("dtype", (F64, torch.float32, torch.bfloat16))
@torch.no_grad()
def test_dtypes_run_and_agree(dtype):
    """The same weights in each dtype. bf16 (8-bit mantissa) through 3 layers: 10% of the logit scale."""
    ref_model = make_model("hybrid")
    model = make_model("hybrid").to(dtype)
    ids = torch.randint(0, model.vocab_size, (2, 7))
    ref = ref_model(ids).logits
    out = model(ids)
    assert out.logits.dtype == dtype and out.hidden_states.dtype == dtype
    for s in out.state.layers:
        if isinstance(s, GDNLayerState):
            assert s.recurrent.dtype == (F64 if dtype == F64 else torch.float32) and s.conv.dtype == dtype
    scale = ref.abs().max().item()
    t = {F64: tol(F64), torch.float32: logit_tol(torch.float32), torch.bfloat16: dict(atol=0.1 * scale, rtol=0.1)}[dtype]
    torch.testing.assert_close(out.logits.to(F64), ref, **t)
    step = model(ids[:, :1], out.state)  # a decode step in that dtype
    assert torch.isfinite(step.logits.float()).all()


@torch.no_grad()
def test_simple_lm_default_bf16_single_dtype():
    """The seed's bf16/fp32 mismatch bug: embedding, GDN layer and lm_head must share one dtype, and forward works."""
    model = SimpleLMWithGDN(vocab_size=100, hidden_size=64, num_k_heads=2, num_v_heads=2, head_k_dim=16, head_v_dim=16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.embed_tokens.weight.dtype == model.gdn_layer.in_proj_qkvz.weight.dtype == model.lm_head.weight.dtype
    assert isinstance(model.gdn_layer, torch.nn.Module) and model.gdn_layer.num_v_heads == 2
    ids = torch.randint(0, 100, (2, 10))
    out = model(ids)
    assert out.logits.shape == (2, 10, 100) and out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()
    step = model(ids[:, -1:], out.state)
    assert step.logits.shape == (2, 1, 100)
    # the seed's recurrent-generation pattern: last logits of a step
    assert step.logits[:, -1, :].shape == (2, 100)


@pytest.mark.parametrize("dtype", (F64, torch.float32))
@torch.no_grad()
def test_simple_lm_prefill_decode_and_layers(dtype):
    torch.manual_seed(0)
    model = SimpleLMWithGDN(50, 32, 2, 4, 8, 8, num_layers=2, dtype=dtype).eval()
    randomize_(model)
    assert len(model.layers) == 2 and all(layer.mlp is None for layer in model.layers)
    ids = torch.randint(0, 50, (2, 12))
    full = model(ids).logits
    out = model(ids[:, :8])
    steps = [out.logits] + [model(ids[:, t:t + 1], out.state).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **logit_tol(dtype))


@torch.no_grad()
def test_model_state_select_assign_clone_round_trip():
    model = make_model("hybrid")
    ids = torch.randint(0, model.vocab_size, (3, 6))
    nxt = torch.randint(0, model.vocab_size, (3, 1))
    state = model(ids).state
    ref = model(nxt, state.clone()).logits  # (3, 1, vocab)
    sel = state.select([2, 0])
    assert sel.batch_size == 2
    torch.testing.assert_close(model(nxt[[2, 0]], sel.clone()).logits, ref[[2, 0]], **tol(F64))
    # assign into a fresh state at other rows, then step: rows behave like the originals
    fresh = model.new_state(3)
    fresh.assign_rows_([1, 2], sel)
    got = model(nxt[[0, 2, 0]], fresh).logits
    torch.testing.assert_close(got[1:], ref[[2, 0]], **tol(F64))
    alone = model(nxt[:1], model.new_state(1)).logits
    torch.testing.assert_close(got[:1], alone, **tol(F64))  # row 0 stayed the zero state
    # clone is deep, select copies
    c = state.clone()
    for layer in c.layers:
        (layer.recurrent if isinstance(layer, GDNLayerState) else layer.k).add_(1.0)
    sel2 = state.select(torch.tensor([1]))
    for layer in sel2.layers:
        (layer.recurrent if isinstance(layer, GDNLayerState) else layer.k).add_(1.0)
    torch.testing.assert_close(model(nxt, state).logits, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layers"):
        state.assign_rows_([0], ModelState(state.layers[:1]))


def _causal_last_logits(model, prefix_ids, tokens):
    return model(torch.cat([prefix_ids, tokens])[None]).logits[0, -1]


@pytest.mark.parametrize("kind,seed", [("random", 0), ("random", 3), ("chain", 1), ("star", 2)])
@torch.no_grad()
def test_forward_tree_and_commit_vs_per_path_forwards(kind, seed):
    """Hybrid model: logits of every tree node == a causal forward over prefix + that node's path; after
    commit_tree along a path, the next step's logits == a causal forward over prefix + path + next token."""
    model = make_model("hybrid", seed=seed)
    B, P, N = 2, 5, 8
    prefix = torch.randint(0, model.vocab_size, (B, P))
    tree_ids = torch.randint(0, model.vocab_size, (B, N))
    parents = random_parents(B, N, kind, seed=seed)
    layout = TokenLayout.from_parents(parents)
    state = model(prefix).state
    before = state.clone()
    ver = model.forward_tree(tree_ids, state=state, layout=layout)
    assert ver.logits.shape == (B, N, model.vocab_size)
    for b in range(B):
        for node in range(N):
            p = path_to(parents[b], node)
            torch.testing.assert_close(ver.logits[b, node], _causal_last_logits(model, prefix[b], tree_ids[b, p]), **tol(F64))
    for sb, s in zip(before.layers, state.layers):  # verify only reads the state
        assert torch.equal(sb.recurrent, s.recurrent) if isinstance(s, GDNLayerState) else torch.equal(sb.lengths, s.lengths)
    # commit a different node per row (path = root..node, counts = its length)
    nodes = [N - 1, 3 if kind != "chain" else 2]
    paths = [path_to(parents[b], nodes[b]) for b in range(B)]
    L = max(len(p) for p in paths)
    path = torch.tensor([p + [0] * (L - len(p)) for p in paths])
    counts = torch.tensor([len(p) for p in paths])
    model.commit_tree(state, ver, path=path, counts=counts)
    nxt = torch.randint(0, model.vocab_size, (B, 1))
    got = model(nxt, state).logits[:, -1]
    for b in range(B):
        ref = _causal_last_logits(model, prefix[b], torch.cat([tree_ids[b, paths[b]], nxt[b]]))
        torch.testing.assert_close(got[b], ref, **tol(F64))


@torch.no_grad()
def test_commit_tree_zero_counts_and_rows_argument():
    model = make_model("hybrid")
    B, P, N = 3, 4, 5
    prefix = torch.randint(0, model.vocab_size, (B, P))
    tree_ids = torch.randint(0, model.vocab_size, (B, N))
    parents = random_parents(B, N, "random", seed=4)
    state = model(prefix).state
    ver = model.forward_tree(tree_ids, state=state, layout=TokenLayout.from_parents(parents))
    nxt = torch.randint(0, model.vocab_size, (B, 1))
    # rows: commit only row 2 (path of node 4), with verify/path/counts given for that row only
    p2 = path_to(parents[2], 4)
    sub_ver = type(ver)(logits=ver.logits[2:], hidden_states=ver.hidden_states[2:],
                        layer_caches=[_row_cache(c, 2) for c in ver.layer_caches])
    s_rows = state.clone()
    model.commit_tree(s_rows, sub_ver, path=torch.tensor([p2]), counts=torch.tensor([len(p2)]), rows=torch.tensor([2]))
    # counts 0 for rows 0, 1: unchanged
    s_all = state.clone()
    path = torch.zeros(B, len(p2), dtype=torch.long)
    path[2] = torch.tensor(p2)
    model.commit_tree(s_all, ver, path=path, counts=torch.tensor([0, 0, len(p2)]))
    for s in (s_rows, s_all):
        got = model(nxt, s).logits[:, -1]
        for b in range(2):
            torch.testing.assert_close(got[b], _causal_last_logits(model, prefix[b], nxt[b]), **tol(F64))
        torch.testing.assert_close(got[2], _causal_last_logits(model, prefix[2], torch.cat([tree_ids[2, p2], nxt[2]])), **tol(F64))


def _row_cache(cache, b):
    if isinstance(cache, tuple):
        return tuple(t[b:b + 1] for t in cache)
    from gdnspec.layers import GDNTreeCache
    from gdnspec.ops.gated_delta_rule import TreeGDRCache
    g = cache.gdr
    return GDNTreeCache(gdr=TreeGDRCache(k=g.k[b:b + 1], v_new=g.v_new[b:b + 1], gamma=g.gamma[b:b + 1],
                                         ancestor_mask=g.ancestor_mask[b:b + 1]),
                        conv_input=cache.conv_input[b:b + 1], conv_window_index=cache.conv_window_index[b:b + 1])


def test_model_bad_inputs_raise_clear_errors():
    model = make_model("hybrid", dtype=torch.float32)
    ids = torch.randint(0, model.vocab_size, (2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[0, model.vocab_size]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="mode"):
        model(ids, mode="fast")
    with pytest.raises(ValueError, match="fused_decode"):
        model(ids, mode="fused_decode")
    with pytest.raises(ValueError, match="state"):
        model(ids, model.new_state(3))
    with pytest.raises(TypeError, match="state"):
        model(ids, state={"layers": []})
    with pytest.raises(ValueError, match="state"):
        model(ids, ModelState(model.new_state(2).layers[:2]))
    bad = model.new_state(2)
    bad.layers[0].recurrent = bad.layers[0].recurrent.double()
    with pytest.raises(ValueError, match="state"):
        model(ids, bad)
    with pytest.raises(ValueError, match="linear_num_value_heads"):
        GDNConfig(linear_num_key_heads=2, linear_num_value_heads=3)
    with pytest.raises(ValueError, match="layer_types"):
        GDNConfig(num_hidden_layers=2, layer_types=["linear_attention", "mamba"])
    with pytest.raises(ValueError, match="num_v_heads"):
        SimpleLMWithGDN(10, 16, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="input_ids"):
        model.forward_tree(torch.tensor([1, 2]), state=model.new_state(1), layout=TokenLayout.chain(1, 2))
    with pytest.raises(ValueError, match="input_ids"):
        model.forward_tree(torch.tensor([[1, 99]]), state=model.new_state(1), layout=TokenLayout.chain(1, 2))
    with pytest.raises(ValueError, match="layout"):
        model.forward_tree(ids, state=model.new_state(2), layout=TokenLayout.chain(2, 4))


def test_model_built_and_run_under_inference_mode():
    """Parameters created under inference_mode are inference tensors (no version counter): every path must work."""
    from gdnspec import GDNConfig, GDNForCausalLM, generate_autoregressive

    with torch.inference_mode():
        model = GDNForCausalLM(GDNConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, full_attention_interval=2,
                                         intermediate_size=32, linear_key_head_dim=8, linear_value_head_dim=8,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
        ids = torch.randint(0, 40, (2, 6))
        out = generate_autoregressive(model, ids, 4)
        assert out.shape == (2, 10)


@torch.inference_mode()
def test_chunked_prefill_equals_one_pass_and_cuda_auto_mode_is_chunk():
    """Long prompts are prefilled in chunks (model.prefill_chunk_size): logits, hidden states and every state
    (GDN recurrent + conv window, KV cache) equal one pass; on CUDA mode="auto" never takes the token loop."""
    from gdnspec.layers import resolve_mode

    cfg = tiny_config(num_hidden_layers=4, full_attention_interval=2)
    model = randomize_(GDNForCausalLM(cfg, dtype=torch.float64)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    model.prefill_chunk_size = 5
    out = model(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-10, atol=1e-10)
    for a, b in zip(out.state.layers, ref.state.layers):
        for name, t in vars(a).items():
            u = getattr(b, name)
            if name in ("k", "v"):
                t, u = t[:, :, :23], u[:, :, :23]
            torch.testing.assert_close(t, u, rtol=1e-10, atol=1e-10)
    last = model(ids, logits_to_keep=3)
    torch.testing.assert_close(last.logits, ref.logits[:, -3:], rtol=1e-10, atol=1e-10)
    assert resolve_mode("auto", 2, "cuda") == "chunk" and resolve_mode("auto", 128, "cuda") == "chunk"
    assert resolve_mode("auto", 2, "cpu") == "recurrent" and resolve_mode("auto", 129, "cpu") == "chunk"
    assert resolve_mode("auto", 1, "cuda") == "fused_decode"


@pytest.mark.parametrize("T,expected", [(31, "recurrent"), (32, "chunk")])
@torch.inference_mode()
def test_model_auto_mode_on_the_cpu_chunks_from_32_tokens(monkeypatch, T, expected):
    """A model forward on the CPU takes the chunked GDN form from CPU_CHUNK_MIN_TOKENS tokens (measured faster there),
    the token loop below; the layer API keeps the seed's rule (T > 128). Same result either way."""
    import gdnspec.layers.gated_deltanet as gdn_module
    from gdnspec.models.lm import CPU_CHUNK_MIN_TOKENS

    assert CPU_CHUNK_MIN_TOKENS == 32
    cfg = tiny_config(num_hidden_layers=2, full_attention_interval=2)
    model = randomize_(GDNForCausalLM(cfg, dtype=torch.float64)).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    ref = model(ids, mode="recurrent" if expected == "chunk" else "chunk")
    calls = []
    for name, tag in (("chunk_gated_delta_rule", "chunk"), ("fused_recurrent_gated_delta_rule", "recurrent")):
        orig = getattr(gdn_module, name)
        monkeypatch.setattr(gdn_module, name, lambda *a, _o=orig, _t=tag, **k: (calls.append(_t), _o(*a, **k))[1])
    out = model(ids)
    assert calls == [expected]
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-9, atol=1e-9)
    for a, b in zip(out.state.layers, ref.state.layers):
        for name, t in vars(a).items():
            torch.testing.assert_close(t, getattr(b, name), rtol=1e-9, atol=1e-9)
