"""A tree expansion's state gather inside the decode kernels (issue 10, "drafting that costs little"): the fused GDN
decode step reading its states from source rows (gdn_decode's StateSource), EAGLE's parent features gathered in
eagle_input (hidden_rows), and the pending gathers of ModelState.select_deferred that carry both into the drafters'
propose, against the copies they replace (index_select + the in-place step), through the Triton interpreter.

Run: python -m pytest -q tests/test_state_gather.py
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules, randomize_, rel_err, tiny_config  # noqa: E402

interpreter_modules(["gdnspec.ops.gated_delta_rule.triton_tree", "gdnspec.ops.gated_delta_rule.triton_commit",
                     "gdnspec.ops.gated_delta_rule.triton_decode"])
ew, gd = interpreter_modules(["gdnspec.ops.fused.elementwise", "gdnspec.ops.fused.gdn_decode",
                              "gdnspec.ops.fused.attention", "gdnspec.ops.fused.gemv", "gdnspec.ops.fused.gdn_tree",
                              "gdnspec.ops.fused.topk", "gdnspec.ops.tree_build"])[:2]
from gdnspec.cache import GDNLayerState, KVCache, ModelState  # noqa: E402
from gdnspec.models.lm import GDNForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_env")


def _layer_inputs(g, *, H, HV, K, V, W, dtype):
    L = gd.ProjLayout.qwen3_next(H, HV, K, V)
    CD = 2 * H * K + HV * V
    return L, CD, dict(layout=L, conv_weight=(torch.randn(CD, W, generator=g) * 0.5).to(dtype),
                       A_log=torch.rand(HV, generator=g).log(), dt_bias=torch.randn(HV, generator=g) * 0.5,
                       norm_weight=(1 + 0.2 * torch.randn(V, generator=g)).to(dtype), norm_eps=1e-6)


@pytest.mark.parametrize("rows,R,dtype,ssm", [([2, 0, 2, 1], 3, torch.float32, torch.float32),  # a repeated parent
                                              (None, 5, torch.float32, torch.float32),  # rows 0 .. B-1 of 5
                                              ([1, 1, 0, 3], 4, torch.bfloat16, torch.bfloat16),
                                              ("strided", 4, torch.float32, torch.float32)])  # a non-contiguous view
def test_gdn_decode_reads_its_source_rows(rows, R, dtype, ssm):
    """gdn_decode_fused(source=StateSource(conv, recurrent, rows)) == index_select of the source rows, then the
    in-place step: output AND written states; the written buffers start as NaN (never read) and the source is not
    touched. Value blocks of 4 and 8 columns: several programs per head read the same source row."""
    g = torch.Generator().manual_seed(R)
    B, H, HV, K, V, W = 4, 2, 4, 8, 12, 4
    L, CD, kw = _layer_inputs(g, H=H, HV=HV, K=K, V=V, W=W, dtype=dtype)
    src_c = torch.randn(R, CD, W - 1, generator=g).to(dtype)
    src_S = (torch.randn(R, HV, K, V, generator=g) * 0.3).to(ssm)
    keep_c, keep_S = src_c.clone(), src_S.clone()
    idx = None if rows is None else (torch.tensor([3, 9, 0, 9, 3, 9, 1, 9])[::2] if rows == "strided"
                                     else torch.tensor(rows))
    for block_v in (4, 8):
        proj = torch.randn(B, L.width, generator=g).to(dtype)
        pick = torch.arange(B) if idx is None else idx
        c_ref, S_ref = src_c[pick].clone(), src_S[pick].clone()
        y_ref = gd.gdn_decode_reference(proj, conv_state=c_ref, recurrent_state=S_ref, **kw)
        y_inplace = gd.gdn_decode_fused(proj, conv_state=src_c[pick].clone(), recurrent_state=src_S[pick].clone(),
                                        block_v=block_v, **kw)
        c = torch.full((B, CD, W - 1), float("nan"), dtype=dtype)
        S = torch.full((B, HV, K, V), float("nan"), dtype=ssm)
        y = gd.gdn_decode_fused(proj, conv_state=c, recurrent_state=S, block_v=block_v,
                                source=gd.StateSource(conv=src_c, recurrent=src_S, rows=idx), **kw)
        assert torch.equal(y, y_inplace)  # the same kernel arithmetic: bit for bit
        assert torch.equal(c, c_ref)  # the rolled window is a copy
        tol = 2e-6 if dtype == ssm == torch.float32 else 2e-2
        assert rel_err(y, y_ref) < tol and rel_err(S, S_ref) < tol
        assert torch.equal(src_c, keep_c) and torch.equal(src_S, keep_S)
        # the torch reference with a source (the path of float64 and of CPUs without Triton) agrees too
        c2, S2 = torch.empty_like(c), torch.empty_like(S)
        y2 = gd.gdn_decode_reference(proj, conv_state=c2, recurrent_state=S2,
                                     source=gd.StateSource(conv=src_c, recurrent=src_S, rows=idx), **kw)
        assert torch.equal(y2, y_ref) and torch.equal(c2, c_ref) and torch.equal(S2, S_ref)


def test_state_source_errors_name_the_field():
    g = torch.Generator().manual_seed(0)
    B, H, HV, K, V, W = 2, 1, 2, 8, 8, 4
    L, CD, kw = _layer_inputs(g, H=H, HV=HV, K=K, V=V, W=W, dtype=torch.float32)
    proj = torch.randn(B, L.width, generator=g)
    c, S = torch.zeros(B, CD, W - 1), torch.zeros(B, HV, K, V)
    good_c, good_S = torch.zeros(3, CD, W - 1), torch.zeros(3, HV, K, V)
    cases = [
        (gd.StateSource(conv=good_c, recurrent=good_S, rows=torch.tensor([0, 1], dtype=torch.int32)), "source.rows"),
        (gd.StateSource(conv=good_c, recurrent=good_S, rows=torch.tensor([0, 1, 2])), "source.rows"),
        (gd.StateSource(conv=good_c[:, :-1], recurrent=good_S), "source.conv"),
        (gd.StateSource(conv=good_c, recurrent=good_S.double()), "source.recurrent"),
        (gd.StateSource(conv=good_c, recurrent=good_S[:2]), "hold 3 and 2 rows"),
        (gd.StateSource(conv=good_c[:1], recurrent=good_S[:1]), "source holds 1 rows"),
        (gd.StateSource(conv=c, recurrent=S, rows=torch.tensor([1, 0])), "race"),
    ]
    for source, match in cases:
        with pytest.raises(ValueError, match=match):
            gd.gdn_decode_fused(proj, conv_state=c, recurrent_state=S, source=source, **kw)
    with pytest.raises(ValueError, match="source must be a StateSource"):
        gd.gdn_decode_fused(proj, conv_state=c, recurrent_state=S, source=(good_c, good_S), **kw)


def test_pending_gathers_materialize_as_select():
    """GDNLayerState.gathered / ModelState.select_deferred equal select / clone once materialised, and every
    other use of a pending state (select, clone, cat, assign_rows_ either way) copies it in first; attention
    layers are copied at once."""
    g = torch.Generator().manual_seed(1)
    src = GDNLayerState(torch.randn(4, 2, 3, 5, generator=g), torch.randn(4, 6, 3, generator=g))
    rows = torch.tensor([3, 3, 0])
    for use in ("materialize", "select", "clone", "cat", "assign_into", "assign_from"):
        p = GDNLayerState.gathered(src, rows)
        assert p.pending is not None and p.batch_size == 3
        want = src.select(rows)
        if use == "materialize":
            got = p.materialize_()
        elif use == "select":
            got = p.select(torch.tensor([0, 1, 2]))
        elif use == "clone":
            got = p.clone()
        elif use == "cat":
            got = GDNLayerState.cat([p])
        elif use == "assign_into":
            p.assign_rows_(torch.tensor([1]), src.select(torch.tensor([2])))
            want.recurrent[1], want.conv[1] = src.recurrent[2], src.conv[2]
            got = p
        else:
            got = src.clone()
            got.assign_rows_(torch.tensor([0, 1, 2]), p)
            got = got.select(torch.tensor([0, 1, 2]))
        assert p.pending is None, use
        assert torch.equal(got.recurrent, want.recurrent) and torch.equal(got.conv, want.conv), use
    whole = GDNLayerState.gathered(src, None).materialize_()
    assert torch.equal(whole.recurrent, src.recurrent) and whole.recurrent.data_ptr() != src.recurrent.data_ptr()
    kv = KVCache(torch.randn(4, 1, 8, 2, generator=g), torch.randn(4, 1, 8, 2, generator=g), torch.tensor([1, 2, 3, 4]))
    ms = ModelState([src, kv]).select_deferred(rows)
    assert ms.layers[0].pending is not None and torch.equal(ms.layers[1].lengths, torch.tensor([4, 4, 1]))
    ms.materialize_()
    assert ms.layers[0].pending is None and torch.equal(ms.layers[0].conv, src.conv[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eagle_input_gathers_its_hidden_rows(dtype):
    """eagle_input(hidden_rows=r) == eagle_input(hidden[r]) bit for bit (the same kernel arithmetic); a bad
    hidden_rows names the argument."""
    g = torch.Generator().manual_seed(2)
    H, V = 40, 19
    table = torch.randn(V, H, generator=g).to(dtype)
    hidden = (torch.randn(6, 1, H, generator=g) * 2).to(dtype)
    we, wh = torch.randn(H, generator=g) * 0.2, torch.randn(H, generator=g) * 0.2
    ids = torch.tensor([[1], [18], [3], [3]])
    for rows in (torch.tensor([5, 0, 5, 2]), torch.tensor([5, 1, 0, 1, 5, 3, 2, 4])[::2]):  # and a strided view
        got = ew.eagle_input(ids, table, hidden, w_e=we, w_h=wh, eps=1e-6, offset=True, hidden_rows=rows)
        want = ew.eagle_input(ids, table, hidden[rows], w_e=we, w_h=wh, eps=1e-6, offset=True)
        assert got.shape == (4, 1, 2 * H) and torch.equal(got, want)
    for bad in (rows.int(), rows[:3], [5, 0, 5, 2]):
        with pytest.raises(ValueError, match="hidden_rows must be"):
            ew.eagle_input(ids, table, hidden, w_e=we, w_h=wh, eps=1e-6, offset=True, hidden_rows=bad)


def _fused_pair():
    torch.manual_seed(7)
    target = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=2, full_attention_interval=0),
                                       dtype=torch.float32)).eval()
    target.gdn_backend = "triton"
    draft = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=2, full_attention_interval=0),
                                      dtype=torch.float32)).eval()
    draft.gdn_backend = "triton"
    return target, draft


@pytest.mark.parametrize("kind", ["eagle", "model"])
@pytest.mark.parametrize("builder", ["eagle2", "chain"])
@torch.inference_mode()
def test_drafters_gather_in_their_kernels_and_propose_the_same_trees(kind, builder, monkeypatch):
    """With the fused steps, the EAGLE and draft-model proposals run no state copy at all (no pending gather is
    ever materialised, no clone) and propose the same trees, with the same scores, as with the copies the kernels
    replace (select_deferred swapped for select / clone); the committed state is left as it was."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec import TreeConfig
    from gdnspec.spec.drafters import EagleDrafter, ModelDrafter

    target, draft = _fused_pair()
    prompts = [torch.randint(0, target.vocab_size, (n,)) for n in (5, 7, 4)]
    if kind == "eagle":
        head = randomize_(EagleHead(eagle_config_for(target.config, intermediate_size=32))).eval()
        drafter = EagleDrafter(head, target)
        hid = [target(p[None]).hidden_states[0] for p in prompts]
        st = drafter.begin(prompts, target_hidden=hid)
        committed = st.head_state
    else:
        drafter = ModelDrafter(draft)
        st = drafter.begin(prompts)
        committed = st.model_state
    keep = committed.clone()
    cfg = TreeConfig(topk=3, num_steps=3, num_draft_tokens=8) if builder == "eagle2" else \
        TreeConfig(builder="chain", num_steps=3)
    roots = torch.tensor([p[-1].item() for p in prompts])

    copies = []
    real_materialize = GDNLayerState.materialize_
    monkeypatch.setattr(GDNLayerState, "materialize_",
                        lambda self: copies.append(self.pending is not None) or real_materialize(self))
    fast = drafter.propose(st, roots, cfg, sync_free=True)
    assert not any(copies), "a pending gather was copied instead of read by the decode kernel"
    for a, b in zip(committed.layers, keep.layers):
        assert torch.equal(a.recurrent, b.recurrent) and torch.equal(a.conv, b.conv)

    monkeypatch.setattr(ModelState, "select_deferred",
                        lambda self, rows: self.clone() if rows is None else self.select(rows))
    slow = drafter.propose(st, roots, cfg, sync_free=True)
    assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.parents, slow.parents)
    assert rel_err(fast.scores.nan_to_num(neginf=0.0), slow.scores.nan_to_num(neginf=0.0)) < 1e-6


@pytest.mark.parametrize("last_layer", ["linear_attention", "full_attention"])
@torch.inference_mode()
def test_cache_only_verify_commits_the_same_states(last_layer):
    """forward_tree(need_logits=False) (a draft model's catch-up: the last layer stops after its mixer, no lm_head)
    gives the same layer caches as the full verify, so committing a chain from it leaves the same states; logits and
    hidden states are None. The EAGLE head's catch-up skips its mixer's output projection the same way and equals
    the module path (test_fused_steps' EAGLE tests)."""
    from gdnspec.layers.layout import TokenLayout

    torch.manual_seed(11)
    types = ["linear_attention", "full_attention", last_layer]
    model = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=3, layer_types=types, full_attention_interval=0),
                                      dtype=torch.float32)).eval()
    model.gdn_backend = "triton"
    B, L = 2, 4
    state = model(torch.randint(0, model.vocab_size, (B, 5))).state
    tokens = torch.randint(0, model.vocab_size, (B, L))
    counts = torch.tensor([4, 2])
    path = torch.arange(L).expand(B, L)
    states = []
    for need in (True, False):
        st = state.clone()
        ver = model.forward_tree(tokens, state=st, layout=TokenLayout.chain(B, L), need_logits=need)
        assert (ver.logits is None) == (not need) and (ver.hidden_states is None) == (not need)
        model.commit_tree(st, ver, path=path, counts=counts)
        states.append(st)
    for a, b in zip(*(s.layers for s in states)):
        for name in ("recurrent", "conv", "k", "v", "lengths"):
            if hasattr(a, name):
                assert torch.equal(getattr(a, name), getattr(b, name)), name


def _nan_gathers(monkeypatch):
    """GDNLayerState.gathered with its uninitialised buffers filled with NaN: a pending gather read before it is
    copied (or read by the kernel) then poisons the drafts instead of passing by luck."""
    real = GDNLayerState.gathered

    def gathered(source, rows):
        st = real(source, rows)
        st.recurrent.fill_(float("nan"))
        st.conv.fill_(float("nan"))
        return st

    monkeypatch.setattr(GDNLayerState, "gathered", staticmethod(gathered))


@pytest.mark.parametrize("path", ["triton", "cpu_fast", "module"])
@pytest.mark.parametrize("kind", ["eagle", "model", "hybrid_model"])
@torch.inference_mode()
def test_pending_gathers_are_never_read_uncopied(path, kind, monkeypatch):
    """On every path a drafter's step can take (the fused kernels, the CPU fast path, the module path with
    GDNSPEC_CPU_FAST=0), with a GDN-only or hybrid draft model or the EAGLE head, sync-free (graph) or not (the model
    drafter's CPU trace), proposals from NaN-filled pending gathers equal those from select / clone copies: every
    pending state is copied in or read from its source before use."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec import TreeConfig
    from gdnspec.spec.drafters import EagleDrafter, ModelDrafter

    if path == "module":
        monkeypatch.setenv("GDNSPEC_CPU_FAST", "0")
    backend = "triton" if path == "triton" else "torch"
    torch.manual_seed(13)
    target = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=2, full_attention_interval=0),
                                       dtype=torch.float32)).eval()
    target.gdn_backend = backend
    prompts = [torch.randint(0, target.vocab_size, (n,)) for n in (6, 4)]
    if kind == "eagle":
        drafter = EagleDrafter(randomize_(EagleHead(eagle_config_for(target.config, intermediate_size=32))).eval(),
                               target)
        hid = [target(p[None]).hidden_states[0] for p in prompts]
        begin = lambda: drafter.begin(prompts, target_hidden=hid)  # noqa: E731
    else:
        types = ["linear_attention", "full_attention"] if kind == "hybrid_model" else None
        cfg = tiny_config(num_hidden_layers=2, full_attention_interval=0, **({"layer_types": types} if types else {}))
        draft = randomize_(GDNForCausalLM(cfg, dtype=torch.float32)).eval()
        draft.gdn_backend = backend
        drafter = ModelDrafter(draft)
        begin = lambda: drafter.begin(prompts)  # noqa: E731
    roots = torch.tensor([p[-1].item() for p in prompts])
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)
    for sync_free in (True, False):
        with monkeypatch.context() as m:
            _nan_gathers(m)
            fast = drafter.propose(begin(), roots, cfg, sync_free=sync_free)
        with monkeypatch.context() as m:
            m.setattr(ModelState, "select_deferred", lambda self, rows: self.clone() if rows is None else self.select(rows))
            slow = drafter.propose(begin(), roots, cfg, sync_free=sync_free)
        assert torch.isfinite(fast.scores[fast.valid]).all(), (path, kind, sync_free)
        assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.parents, slow.parents), (path, kind)


def test_a_failed_step_keeps_the_gather_pending():
    """A decode step that refuses its source (rows of the wrong dtype) leaves the state's gather pending, so the
    state is not silently left uninitialised; materialize_ then still copies it in (index_select takes int32)."""
    torch.manual_seed(2)
    model = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=1, full_attention_interval=0),
                                      dtype=torch.float32)).eval()
    model.gdn_backend = "triton"
    src = model.new_state(3).layers[0]
    src.recurrent.normal_()
    st = GDNLayerState.gathered(src, torch.tensor([2, 0], dtype=torch.int32))
    x = torch.randn(2, 1, model.config.hidden_size)
    with pytest.raises(ValueError, match="source.rows"):
        model.layers[0].linear_attn.decode_fused(x, st)
    assert st.pending is not None
    st.materialize_()
    assert st.pending is None and torch.equal(st.recurrent, src.recurrent[[2, 0]])


def test_decode_step_ids_names_bad_hidden_rows():
    from gdnspec.models.eagle import EagleHead, eagle_config_for

    target = GDNForCausalLM(tiny_config(num_hidden_layers=1, full_attention_interval=0), dtype=torch.float32).eval()
    head = EagleHead(eagle_config_for(target.config, intermediate_size=32)).eval()
    H = target.config.hidden_size
    hidden, ids = torch.randn(3, 1, H), torch.tensor([[1], [2]])
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32), [0, 1]):
        with pytest.raises(ValueError, match="hidden_rows must be"):
            head.decode_step_ids(hidden, ids, head.new_state(2), target=target, hidden_rows=bad)
