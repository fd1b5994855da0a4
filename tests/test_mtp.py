"""MTP (multi-token prediction) weights of Qwen3-Next / Qwen3.5 checkpoints: loading, the module, the drafter.

Run: python -m pytest -q tests/test_mtp.py

transformers ignores `mtp.*`, so the tests add random mtp tensors to tiny saved checkpoints, load them with load_hf,
and compare MTPModule / MTPDrafter against `ref_mtp`, a from-scratch re-implementation written here (explicit
attention with partial RoPE and the output gate, explicit MoE routing), on the full sequence and step by step, for
chained and tree drafts (each tree node's score must equal the reference log-prob along its own path, which fails
if the per-node KV cache rows are mixed up). Finally the MTP drafter must be lossless in the speculative engine.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from test_hf_qwen3_next import hf_next, save
from test_hf_qwen3_5 import hf_35

from gdnspec import generate_autoregressive
from gdnspec.models.hf import CheckpointError, load_hf
from gdnspec.spec import GDNSpeculativeWorker, TreeConfig
from gdnspec.spec.drafters.mtp import MTPDrafter


def mtp_tensors(cfg, moe: bool, seed=0) -> dict[str, torch.Tensor]:
    """Random mtp.* tensors for a Hugging Face text config (per-expert layout for MoE)."""
    g = torch.Generator().manual_seed(seed)
    H, hd, na, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def w(*shape, gain=0.5):
        return torch.randn(*shape, generator=g) * gain / math.sqrt(shape[-1])

    def norm(n):
        return torch.randn(n, generator=g) * 0.2

    t = {"mtp.fc.weight": w(H, 2 * H), "mtp.pre_fc_norm_embedding.weight": norm(H), "mtp.pre_fc_norm_hidden.weight": norm(H),
         "mtp.norm.weight": norm(H)}
    p = "mtp.layers.0."
    t.update({p + "input_layernorm.weight": norm(H), p + "post_attention_layernorm.weight": norm(H),
              p + "self_attn.q_proj.weight": w(2 * na * hd, H), p + "self_attn.k_proj.weight": w(nkv * hd, H),
              p + "self_attn.v_proj.weight": w(nkv * hd, H), p + "self_attn.o_proj.weight": w(H, na * hd),
              p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
    if moe:
        E, I, S = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        t[p + "mlp.gate.weight"] = w(E, H, gain=3.0)
        for e in range(E):
            t.update({f"{p}mlp.experts.{e}.gate_proj.weight": w(I, H), f"{p}mlp.experts.{e}.up_proj.weight": w(I, H),
                      f"{p}mlp.experts.{e}.down_proj.weight": w(H, I)})
        t.update({p + "mlp.shared_expert.gate_proj.weight": w(S, H), p + "mlp.shared_expert.up_proj.weight": w(S, H),
                  p + "mlp.shared_expert.down_proj.weight": w(H, S), p + "mlp.shared_expert_gate.weight": w(1, H)})
    else:
        I = cfg.intermediate_size
        t.update({p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I)})
    return t


def with_mtp(hf, folder, moe, seed=0):
    save(hf, folder)
    sd = load_file(folder / "model.safetensors")
    mtp = mtp_tensors(hf.config, moe, seed)
    save_file({**sd, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    return {k[len("mtp."):]: v for k, v in mtp.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (mtp tensors without the "mtp." prefix, HF text config, loaded target, loaded MTPModule)."""
    out = {}
    for name, hf, moe in (("next_moe", hf_next(ratio=2, moe=True), True), ("35_dense", hf_35(ratio=1), False)):
        folder = tmp_path_factory.mktemp(name)
        W = with_mtp(hf, folder, moe=moe)
        target, _, mtp = load_hf(folder)
        out[name] = (W, hf.config, target, mtp)
    return out


# ---------------------------------------------------------------------------------------------------- reference
def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def ref_mtp(W, cfg, target, tokens, hidden_normed):
    """From-scratch MTP over one sequence of T pairs: tokens (T,), hidden_normed (T, H) -> (out (T, H), logp (T, V))."""
    eps = cfg.rms_norm_eps
    na, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rd = int(hd * cfg.rope_parameters["partial_rotary_factor"])
    theta = cfg.rope_parameters["rope_theta"]
    T = tokens.numel()
    e = target.embed_tokens.weight[tokens]
    x = torch.cat([rms(e, W["pre_fc_norm_embedding.weight"], eps), rms(hidden_normed, W["pre_fc_norm_hidden.weight"], eps)], -1)
    x = x @ W["fc.weight"].T
    p = "layers.0."
    h = rms(x, W[p + "input_layernorm.weight"], eps)
    qg = (h @ W[p + "self_attn.q_proj.weight"].T).view(T, na, 2 * hd)
    q, gate = rms(qg[..., :hd], W[p + "self_attn.q_norm.weight"], eps), qg[..., hd:].reshape(T, na * hd)
    k = rms((h @ W[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd), W[p + "self_attn.k_norm.weight"], eps)
    v = (h @ W[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd)
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # positions 0..T-1
    cos, sin = torch.cat([ang, ang], -1).cos().float()[:, None], torch.cat([ang, ang], -1).sin().float()[:, None]

    def rope(t):
        r, rest = t[..., :rd], t[..., rd:]
        rot = torch.cat([-r[..., rd // 2:], r[..., :rd // 2]], -1)
        return torch.cat([r * cos + rot * sin, rest], -1)

    q, k = rope(q), rope(k)
    rep = na // nkv
    out = torch.empty(T, na, hd)
    for i in range(T):
        for hh in range(na):
            s = (k[: i + 1, hh // rep] @ q[i, hh]) / math.sqrt(hd)
            out[i, hh] = torch.softmax(s, 0) @ v[: i + 1, hh // rep]
    x = x + (out.reshape(T, na * hd) * torch.sigmoid(gate)) @ W[p + "self_attn.o_proj.weight"].T
    h = rms(x, W[p + "post_attention_layernorm.weight"], eps)
    if p + "mlp.gate.weight" in W:
        probs = torch.softmax(h @ W[p + "mlp.gate.weight"].T, -1)
        top, idx = probs.topk(cfg.num_experts_per_tok, -1)
        top = top / top.sum(-1, keepdim=True)
        y = torch.zeros_like(h)
        for i in range(T):
            for j in range(idx.shape[1]):
                ee = int(idx[i, j])
                a = W[f"{p}mlp.experts.{ee}.gate_proj.weight"] @ h[i]
                b = W[f"{p}mlp.experts.{ee}.up_proj.weight"] @ h[i]
                y[i] += top[i, j] * (W[f"{p}mlp.experts.{ee}.down_proj.weight"] @ (F.silu(a) * b))
        sh = (F.silu(h @ W[p + "mlp.shared_expert.gate_proj.weight"].T) * (h @ W[p + "mlp.shared_expert.up_proj.weight"].T)
              ) @ W[p + "mlp.shared_expert.down_proj.weight"].T
        y = y + torch.sigmoid(h @ W[p + "mlp.shared_expert_gate.weight"].T) * sh
    else:
        y = (F.silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    out = rms(x + y, W["norm.weight"], eps)
    return out, torch.log_softmax(target.lm_head(out), -1)


def target_hidden(target, ids):
    with torch.no_grad():
        return target(ids[None]).hidden_states[0]  # (T, H) before the final norm


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["next_moe", "35_dense"])
def test_loaded_module_matches_reference(ckpts, name):
    W, cfg, target, mtp = ckpts[name]
    assert mtp is not None
    sd = mtp.state_dict()
    assert torch.equal(sd["fc.weight"], W["fc.weight"]) and torch.equal(sd["norm.weight"], W["norm.weight"])
    ids = torch.randint(0, cfg.vocab_size, (17,), generator=torch.Generator().manual_seed(3))
    h = target_hidden(target, ids)
    hn = target.norm(h)
    with torch.no_grad():
        ref_out, ref_lp = ref_mtp(W, cfg, target, ids[1:], hn[:-1])
        drafter = MTPDrafter(target, mtp)
        full = drafter.step(ids[None, 1:], h[None, :-1], mtp.new_state(1))[0]  # all 16 pairs at once
        kv = mtp.new_state(1)
        steps = torch.cat([drafter.step(ids[None, t + 1:t + 2], h[None, t:t + 1], kv)[0] for t in range(16)])
    torch.testing.assert_close(full, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(steps, ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(drafter.logprobs(full), ref_lp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["next_moe", "35_dense"])
@pytest.mark.parametrize("tree", [dict(topk=1, num_steps=3, builder="chain"), dict(topk=3, num_steps=3, num_draft_tokens=10)])
def test_drafts_match_reference_per_path(ckpts, name, tree):
    """Prompts of different lengths; every drafted node's score increment = reference log-prob along its own path."""
    W, cfg, target, mtp = ckpts[name]
    drafter = MTPDrafter(target, mtp)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (7, 1, 4)]
    hiddens = [target_hidden(target, p) for p in prompts]
    roots = torch.randint(0, cfg.vocab_size, (3,), generator=g)
    state = drafter.begin(prompts, target_hidden=hiddens)
    draft = drafter.propose(state, roots, TreeConfig(**tree))
    with torch.no_grad():
        for b, (p, h) in enumerate(zip(prompts, hiddens)):
            toks, hid = list(p[1:].tolist()), list(target.norm(h)[:-1])
            cache = {}  # node -> (tokens, hiddens) of the pairs up to and including that node

            def pairs(node):
                if node not in cache:
                    if node == 0:
                        cache[0] = (toks + [int(roots[b])], hid + [target.norm(h)[-1]])
                    else:
                        par = int(draft.parents[b, node])
                        pt, ph = pairs(par)
                        out, _ = ref_mtp(W, cfg, target, torch.tensor(pt), torch.stack(ph))
                        cache[node] = (pt + [int(draft.tokens[b, node])], ph + [out[-1]])
                return cache[node]

            for node in range(1, draft.num_nodes):
                if not draft.valid[b, node]:
                    continue
                par = int(draft.parents[b, node])
                pt, ph = pairs(par)
                _, lp = ref_mtp(W, cfg, target, torch.tensor(pt), torch.stack(ph))
                inc = float(draft.scores[b, node] - draft.scores[b, par])
                assert abs(inc - float(lp[-1, int(draft.tokens[b, node])])) < 1e-4, (b, node)
                # the drafted token is among the reference's top-k children of the parent
                assert int(draft.tokens[b, node]) in lp[-1].topk(tree["topk"]).indices.tolist()


def test_advance_equals_begin_on_longer_prompt(ckpts):
    """advance(tokens, counts, hidden) must leave the state begin() would build on the extended prompts."""
    W, cfg, target, mtp = ckpts["next_moe"]
    drafter = MTPDrafter(target, mtp)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (5, 5, 3)]
    committed = torch.randint(0, cfg.vocab_size, (3, 4), generator=g)  # root first, then accepted drafts
    counts = torch.tensor([4, 1, 0])
    full = [torch.cat([p, committed[b, :c]]) for b, (p, c) in enumerate(zip(prompts, counts.tolist()))]
    state = drafter.begin(prompts, target_hidden=[target_hidden(target, p) for p in prompts])
    hid = torch.zeros(3, 4, cfg.hidden_size)
    for b, c in enumerate(counts.tolist()):
        if c:
            hid[b, :c] = target_hidden(target, full[b])[-c:]
    drafter.advance(state, tokens=committed, counts=counts, target_hidden=hid)
    want = drafter.begin(full, target_hidden=[target_hidden(target, f) for f in full])
    kv, kw = state.kv.layers[0], want.kv.layers[0]
    assert torch.equal(kv.lengths, kw.lengths)
    for b, n in enumerate(kw.lengths.tolist()):
        torch.testing.assert_close(kv.k[b, :, :n], kw.k[b, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv.v[b, :, :n], kw.v[b, :, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.pending, want.pending, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["next_moe", "35_dense"])
@pytest.mark.parametrize("topk,num_steps,builder", [(1, 3, "chain"), (2, 3, "eagle2")])
def test_mtp_drafter_lossless(ckpts, name, topk, num_steps, builder):
    W, cfg, target, mtp = ckpts[name]
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (6, 3)]
    ref = generate_autoregressive(target, prompts, 14)
    worker = GDNSpeculativeWorker(target_model=target, drafter=MTPDrafter(target, mtp), topk=topk, num_steps=num_steps,
                                  builder=builder)
    out = worker.generate(prompts, 14)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert worker.get_statistics()["total_emitted_tokens"] == 2 * 13


def test_mtp_errors(ckpts, tmp_path):
    hf = hf_35(ratio=1)
    W = with_mtp(hf, tmp_path, moe=False)
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "mtp.fc.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"\(mtp\.\*\): missing tensors: \['fc.weight'\]"):
        load_hf(tmp_path)
    save_file({**sd, "mtp.layers.1.input_layernorm.weight": W["norm.weight"]}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="exactly one MTP layer"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="no mtp"):
        MTPDrafter(ckpts["35_dense"][2], None)
