"""Parity of gdnspec's Hugging Face loader with transformers on tiny random Qwen3-Next checkpoints (CPU, float32).

Run: python -m pytest -q tests/test_hf_qwen3_next.py   (needs transformers; fla must NOT be importable - see below)

Checkpoints are made with transformers' own Qwen3NextForCausalLM (dense and MoE, value/key head ratio 1 and 2),
given O(1) random weights (HF's init leaves norms at 0/1 and logits near 0, which would hide bugs), saved with
save_pretrained and loaded with gdnspec.models.hf.load_hf. Compared: full-forward logits, prefill + cached decode
steps against transformers with its cache, and greedy continuations (transformers generate == gdnspec plain decoding
== gdnspec speculative decoding with the n-gram drafter and with a small draft model).

Tolerance 1e-4 (max abs, float32) on logits of magnitude ~5-15: both sides compute the same float32 math in a
different order (chunked vs recurrent delta rule, fused vs per-expert MoE, sdpa). Measured against gdnspec in float64
(genuine float64 arithmetic) both float32 implementations are off by ~1-3e-5 on these checkpoints, and their
difference is of the same size (test_float64_reference); any layout or formula mistake moves logits by >= 1e-2.
The random weights use gain 0.5 (std 0.5 / sqrt(fan_in)): with gain 1 these random nets amplify float32 rounding to
~1e-3 in BOTH implementations alike (then transformers' own float32 output is 1.7e-3 from float64), which says
nothing about the loader.

The helpers below (not tests) are shared with test_hf_qwen3_5.py, test_hf_fla.py and test_mtp.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# transformers picks fla's Triton kernels at import time whenever `import fla` works, and they fail on CPU: block it.
for _name in ("fla", "causal_conv1d"):
    if _name not in sys.modules:
        sys.modules[_name] = None

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from gdnspec import generate_autoregressive  # noqa: E402
from gdnspec.models.hf import CheckpointError, is_hf_folder, load_hf  # noqa: E402
from spec_helpers import noisy_copy  # noqa: E402
from gdnspec.spec import GDNSpeculativeWorker, NGramDrafter  # noqa: E402

ATOL = 1e-4
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, partial_rotary_factor=0.5, linear_conv_kernel_dim=4, linear_key_head_dim=8,
              linear_value_head_dim=12, linear_num_key_heads=2, max_position_embeddings=512, rope_theta=10000.0)


# ---------------------------------------------------------------------------------------------------- helpers
def randomize_hf_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) random weights: fan-in scaled projections, perturbed norms, sane gates, peaked logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 3 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(n * 0.5)
            elif "norm" in name:
                p.add_(n * 0.2)
            elif "embed" in name or name.startswith("lm_head"):  # same scale, so tied and untied logits are alike
                p.copy_(n * 2.0 / p.shape[-1] ** 0.5)
            elif "conv1d" in name:
                p.copy_(n / p.shape[-1] ** 0.5)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(n * 3.0 / p.shape[-1] ** 0.5)
            else:  # gain 0.5: with gain 1 the random 4-layer nets amplify float32 rounding ~50x (see module doc)
                p.copy_(n * 0.5 / p.shape[-1] ** 0.5)
    return model


def hf_next(ratio: int = 1, moe: bool = False, seed: int = 0, **overrides):
    C, M = transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM
    kw = dict(COMMON, linear_num_value_heads=2 * ratio, intermediate_size=40)
    if moe:
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                  mlp_only_layers=[1])
    else:
        kw.update(num_experts=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    return randomize_hf_(M(C(**kw)).eval(), seed)


def save(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


def vocab_of(hf) -> int:
    return getattr(hf.config, "text_config", hf.config).vocab_size


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def check_forward(hf, ours, T=70, B=2, seed=0):
    """Full-forward logits (T > 64 so transformers runs its chunked path); ours in auto, chunk and recurrent modes."""
    ids = torch.randint(0, vocab_of(hf), (B, T), generator=torch.Generator().manual_seed(seed))
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        diffs = {mode: (ours(ids, mode=mode).logits - ref).abs().max().item() for mode in ("auto", "recurrent", "chunk")}
    assert ref.abs().max() > 2.0  # logits are not degenerate
    assert max(diffs.values()) <= ATOL, f"max |logit diff| {diffs} > {ATOL}"
    return diffs


def check_cached_steps(hf, ours, P=9, steps=6, B=2, seed=1):
    """Prefill P tokens, then `steps` single-token steps with each side's cache; logits compared at every step."""
    ids = torch.randint(0, vocab_of(hf), (B, P + steps), generator=torch.Generator().manual_seed(seed))
    worst = 0.0
    with torch.no_grad():
        out = hf(ids[:, :P], use_cache=True)
        mine = ours(ids[:, :P])
        worst = max(worst, (out.logits - mine.logits).abs().max().item())
        cache, state = out.cache, mine.state
        for t in range(P, P + steps):
            out = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            got = ours(ids[:, t:t + 1], state).logits
            worst = max(worst, (out.logits - got).abs().max().item())
    assert worst <= ATOL, f"max |logit diff| over cached steps {worst:.3e} > {ATOL}"
    return worst


def write_variant(folder: Path, config: dict, tensors: dict) -> Path:
    """A checkpoint folder with the given config.json and safetensors (for error-path tests)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    return folder


def check_greedy(hf, ours, new_tokens=20, seed=2):
    """transformers generate == generate_autoregressive == speculative (n-gram drafter, small draft model)."""
    ids = torch.randint(0, vocab_of(hf), (2, 6), generator=torch.Generator().manual_seed(seed))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    assert ref.shape == (2, 6 + new_tokens)
    plain = generate_autoregressive(ours, ids, new_tokens)
    assert torch.equal(plain, ref), "gdnspec plain decoding differs from transformers generate"
    ngram = GDNSpeculativeWorker(target_model=ours, drafter=NGramDrafter(), topk=2, num_steps=3)
    assert torch.equal(ngram.generate(ids, new_tokens), ref), "speculative decoding (n-gram) differs"
    spec = GDNSpeculativeWorker(draft_model=noisy_copy(ours, noise=0.05, seed=7), target_model=ours, topk=2, num_steps=3)
    assert torch.equal(spec.generate(ids, new_tokens), ref), "speculative decoding (draft model) differs"
    assert spec.get_statistics()["total_accepted_tokens"] > 0  # the acceptance path ran
    return ref


# ---------------------------------------------------------------------------------------------------- tests
VARIANTS = {
    "dense_r1": dict(ratio=1),
    "dense_r2_tied": dict(ratio=2, tie_word_embeddings=True),
    "moe_r2": dict(ratio=2, moe=True),
    "moe_r1_sparse_step2_unnormed": dict(ratio=1, moe=True, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, kw in VARIANTS.items():
        hf = hf_next(**kw)
        folder = save(hf, tmp_path_factory.mktemp(name))
        out[name] = (hf, folder)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_cached_steps(checkpoints, variant):
    hf, folder = checkpoints[variant]
    assert is_hf_folder(folder)
    ours, tok, mtp = load_hf(folder)
    assert tok is None and mtp is None
    assert ours.config.gdn_layout == "qwen3_next"
    assert ours.config.layer_types == hf.config.layer_types
    check_forward(hf, ours)
    check_cached_steps(hf, ours)
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_float64_reference(checkpoints):
    """gdnspec in float64 vs transformers in float32: the float32 error itself is well under the tolerance."""
    hf, folder = checkpoints["moe_r2"]
    ours64 = load_hf(folder, dtype=torch.float64)[0]
    ids = torch.randint(0, vocab_of(hf), (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (hf_logits(hf, ids).double() - ours64(ids).logits).abs().max().item()
    assert err <= ATOL / 2, err


def test_moe_layer_placement(checkpoints):
    ours = load_hf(checkpoints["moe_r1_sparse_step2_unnormed"][1])[0]
    kinds = [type(layer.mlp).__name__ for layer in ours.layers]
    assert kinds == ["SwiGLUMLP", "SparseMoeBlock", "SwiGLUMLP", "SparseMoeBlock"]
    ours = load_hf(checkpoints["moe_r2"][1])[0]
    assert [type(layer.mlp).__name__ for layer in ours.layers] == ["SparseMoeBlock", "SwiGLUMLP", "SparseMoeBlock", "SparseMoeBlock"]


@pytest.mark.parametrize("variant", ["dense_r2_tied", "moe_r2"])
def test_greedy_continuations(checkpoints, variant):
    hf, folder = checkpoints[variant]
    ours = load_hf(folder)[0]
    check_greedy(hf, ours)


def test_moe_paths_match_reference(checkpoints):
    """The gather and grouped MoE paths against the per-token reference loop (and each other)."""
    from gdnspec.models import moe as moe_mod

    ours = load_hf(checkpoints["moe_r2"][1])[0]
    block = ours.layers[0].mlp
    x = torch.randn(3, 5, ours.config.hidden_size)
    with torch.no_grad():
        ref = block.forward_reference(x)
        gathered = block(x)
        old = moe_mod.GATHER_MAX_ELEMENTS
        moe_mod.GATHER_MAX_ELEMENTS = 0
        try:
            grouped = block(x)
        finally:
            moe_mod.GATHER_MAX_ELEMENTS = old
    torch.testing.assert_close(gathered, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, ref, atol=1e-5, rtol=1e-5)


def test_sharded_fused_experts_and_tokenizer(checkpoints, tmp_path):
    """A sharded save, a checkpoint holding fused experts (gate_up_proj / down_proj) and a tokenizer.json."""
    hf, _ = checkpoints["moe_r2"]
    sharded = save(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ours = load_hf(sharded)[0]
    check_forward(hf, ours, T=12)
    # fused experts, as in-memory transformers state / Qwen3.5-MoE hub files
    fused = tmp_path / "fused"
    save(hf, fused)
    sd = load_file(fused / "model.safetensors")
    for key in [k for k in sd if ".mlp.experts.0.gate_proj" in k]:
        base = key.split(".0.gate_proj")[0]
        E = hf.config.num_experts
        sd[base + ".gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{base}.{e}.gate_proj.weight"),
                                                             sd.pop(f"{base}.{e}.up_proj.weight")]) for e in range(E)])
        sd[base + ".down_proj"] = torch.stack([sd.pop(f"{base}.{e}.down_proj.weight") for e in range(E)])
    save_file(sd, fused / "model.safetensors", metadata={"format": "pt"})
    check_forward(hf, load_hf(fused)[0], T=12)
    # tokenizer.json
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(fused / "tokenizer.json"))
    tok = load_hf(fused)[1]
    assert tok.encode("hello world").ids == [1, 2]


def test_dtype_and_errors(checkpoints, tmp_path):
    hf, folder = checkpoints["moe_r2"]
    m16 = load_hf(folder, dtype=torch.bfloat16)[0]
    assert m16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m16.parameters())
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(folder / "model.safetensors")

    def variant(name, config=None, tensors=None):
        return write_variant(tmp_path / name, config or cfg, tensors if tensors is not None else sd)

    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load_hf(variant("llama", dict(cfg, model_type="llama")))
    missing = {k: v for k, v in sd.items() if k != "model.layers.0.linear_attn.in_proj_ba.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: \['layers.0.linear_attn.in_proj_ba.weight'\]"):
        load_hf(variant("missing", tensors=missing))
    lost_expert = {k: v for k, v in sd.items() if k != "model.layers.2.mlp.experts.3.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"layers.2.mlp.experts.3.up_proj.weight"):
        load_hf(variant("lost_expert", tensors=lost_expert))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: \['model.layers.0.foo.weight'\]"):
        load_hf(variant("unexpected", tensors=dict(sd, **{"model.layers.0.foo.weight": torch.zeros(2)})))
    bad = dict(sd, **{"model.norm.weight": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"mismatched shapes: \['norm.weight: checkpoint \(5,\), expected \(32,\)'\]"):
        load_hf(variant("shape", tensors=bad))
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        load_hf(variant("yarn", dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})))
    assert not is_hf_folder(tmp_path)
