"""Static (CUDA-graph) decode and speculative steps, run eagerly on the CPU: padding rows of a batch bucket must stay
harmless however long a cached runner is reused."""
from __future__ import annotations

import pytest
import torch

from gdnspec.runtime import StaticDecoder

from spec_helpers import tiny_model


def test_padding_rows_of_a_reused_decoder_stay_in_range():
    model = tiny_model(seed=2, hybrid=True, dtype=torch.float32)
    dec = StaticDecoder(model, batch_size=2, max_len=16)
    prompt = torch.randint(0, model.vocab_size, (1, 3))
    state = model(prompt).state
    for _ in range(3):  # one live row, reused many times: the padding row's cache length keeps growing
        dec.load(state)
        ids = torch.zeros(2, dtype=torch.long)
        for _ in range(100):
            logits = dec.step(ids)
            ids = logits.argmax(-1)
        assert torch.isfinite(logits).all()
    live = model(prompt).state
    ref = model(torch.cat([prompt, torch.zeros(1, 1, dtype=torch.long)], 1)).logits[:, -1]
    dec.load(live)
    got = dec.step(torch.zeros(2, dtype=torch.long))[:1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # the live row is unaffected by the padding row


@torch.inference_mode()
def test_static_prefill_equals_eager_forward():
    """runtime.StaticPrefill (the graph-captured prefill on CUDA, run eagerly here) from zeroed static buffers, with
    the host-known empty prefix (flash-style causal attention, no device read) == model(ids): logits, hidden
    states and every state."""
    from conftest import randomize_, tiny_config

    from gdnspec import GDNForCausalLM
    from gdnspec.runtime import StaticPrefill

    model = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=4, full_attention_interval=2),
                                      dtype=torch.float64)).eval()
    ids = torch.randint(0, model.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    pre = StaticPrefill(model, batch_size=2, seq_len=7, use_graph=False)
    for _ in range(2):  # reusable: the buffers are zeroed inside the step
        state, logits, hidden = pre.run(ids)
        torch.testing.assert_close(logits, ref.logits[:, -1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hidden, ref.hidden_states, rtol=1e-10, atol=1e-10)
        for a, b in zip(state.layers, ref.state.layers):
            for name, t in vars(a).items():
                u = getattr(b, name)
                if name in ("k", "v"):
                    t, u = t[:, :, :7], u[:, :, :7]
                torch.testing.assert_close(t, u, rtol=1e-10, atol=1e-10)


@torch.inference_mode()
def test_a_cached_static_step_goes_stale_when_mamba_ssm_cache_dtype_changes():
    """The static steps' state buffers take the GDN state's storage dtype when they are built: changing
    mamba_ssm_cache_dtype afterwards must rebuild them (the cached plain decoder of generate_autoregressive(static=True)
    used to keep its old-dtype buffers and fail with "recurrent state must be torch.float16 ..., got torch.bfloat16")."""
    from gdnspec import generate_autoregressive

    model = tiny_model(seed=2, hybrid=True, dtype=torch.float32)
    prompt = [torch.randint(0, model.vocab_size, (4,), generator=torch.Generator().manual_seed(0))]
    ref = generate_autoregressive(model, prompt, 6, static=False)
    for dt in ("bfloat16", "float16", "float32"):
        model.mamba_ssm_cache_dtype = dt
        dec = StaticDecoder(model, batch_size=1, max_len=16)
        assert dec.current()
        out = generate_autoregressive(model, prompt, 6, static=True)
        assert out[0].shape == ref[0].shape  # prompt + 6 new tokens
        if dt == "float32":
            assert torch.equal(out[0], ref[0])
    model.mamba_ssm_cache_dtype = "bfloat16"
    assert not dec.current()  # built with float32 states


def test_weights_signature_sees_replaced_weights_flags_and_state_dtypes():
    """weights_signature (what a cached static step checks before every generate) changes when a parameter or buffer
    is replaced, when fused_steps or a GDN layer's ssm_state_dtype is set, and stays put for in-place updates."""
    from gdnspec.runtime.static import weights_signature

    model = tiny_model(seed=3, hybrid=True, dtype=torch.float32)
    sig = weights_signature(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place: the graph reads the same tensor
    assert weights_signature(model) == sig
    gdn = next(m for m in model.modules() if "ssm_state_dtype" in vars(m))
    gdn.ssm_state_dtype = torch.bfloat16
    assert weights_signature(model) != sig
    gdn.ssm_state_dtype = None
    assert weights_signature(model) == sig
    model.fused_steps = not model.fused_steps
    assert weights_signature(model) != sig
    model.fused_steps = not model.fused_steps
    layer = model.layers[0]
    old = layer.input_layernorm.weight
    layer.input_layernorm.weight = torch.nn.Parameter(old.detach().clone())  # replaced: a new tensor
    assert weights_signature(model) != sig
    layer.input_layernorm.weight = old
    assert weights_signature(model) == sig


def test_weights_signature_walks_a_shared_module_once_and_still_sees_the_others():
    """The runner signs (target, *drafter modules) and the EAGLE drafter holds the target too: it is walked once (the
    signature equals the target's alone plus the head's), and a replaced head weight still changes it."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.runtime.static import weights_signature

    model = tiny_model(seed=3, hybrid=True, dtype=torch.float32)
    head = EagleHead(eagle_config_for(model.config, intermediate_size=32))
    both = weights_signature(model, head, model)
    assert both == weights_signature(model, head) and len(both) == len(weights_signature(model)) + len(
        weights_signature(head))
    head.fc.weight = torch.nn.Parameter(head.fc.weight.detach().clone())
    assert weights_signature(model, head, model) != both


def test_assign_rows_takes_slices_only_for_matching_leading_rows():
    """ModelState.assign_rows_ copies slices for rows 0..k-1 when `other` has k rows (a runner's load) - the same
    result as the index path - and refuses a mismatch instead of broadcasting one row into several."""
    model = tiny_model(seed=3, hybrid=True, dtype=torch.float32)
    ids = torch.randint(0, model.vocab_size, (3, 5))
    src = model(ids).state
    a, b = model.new_state(4, kv_capacity=16), model.new_state(4, kv_capacity=16)
    a.assign_rows_([0, 1, 2], src)
    b.assign_rows_(torch.tensor([0, 1, 2]), src)
    for x, y in zip(a.layers, b.layers):
        for t, u in zip(vars(x).values(), vars(y).values()):
            assert torch.equal(t, u)
    one = model(ids[:1]).state
    for rows in ([0, 1, 2], torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="rows names"):
            a.assign_rows_(rows, one)


def test_kv_load_reads_no_lengths_when_the_capacity_fits(monkeypatch):
    """KVCache.assign_rows_ (a runner's load after a prefill) moves a cache whose capacity fits without reading its
    lengths to the host (no device sync), and the rows equal the source's valid prefixes; a source with more capacity
    takes the old path (its longest prefix, after growing the destination)."""
    from gdnspec.cache import KVCache

    g = torch.Generator().manual_seed(4)
    src = KVCache(torch.randn(2, 1, 6, 3, generator=g), torch.randn(2, 1, 6, 3, generator=g), torch.tensor([6, 2]))
    reads = []
    real_int = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(1) or real_int(t))
    for cap in (16, 4):  # fits, then does not (4 < 6: grown to the longest prefix)
        dst = KVCache(torch.zeros(3, 1, cap, 3), torch.zeros(3, 1, cap, 3), torch.zeros(3, dtype=torch.long))
        reads.clear()
        dst.assign_rows_(torch.tensor([2, 0]), src)
        assert (not reads) == (cap == 16), cap
        assert torch.equal(dst.lengths, torch.tensor([2, 0, 6]))
        for d, s in ((2, 0), (0, 1)):
            n = int(src.lengths[s])
            assert torch.equal(dst.k[d, :, :n], src.k[s, :, :n]) and torch.equal(dst.v[d, :, :n], src.v[s, :, :n])
