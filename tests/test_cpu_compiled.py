"""The compiled CPU drafter steps (gdnspec/models/cpu_compiled.py, GDNSPEC_CPU_COMPILE=1) against the module path.

A GDN-only model's decode step and an EAGLE head's expansion and catch-up, compiled by inductor, must equal the module-by-module
reference (model.fused_steps = False) in outputs AND states: float64 (tight) and float32, both projection layouts,
HV = 2H, K != V, B = 1 and 3, a norm offset; weights changed in place after compiling are seen; greedy speculative
decoding with the draft model and the EAGLE head (chain and tree) stays token-identical to plain decoding; the switch
rejects bad values by name; a failing compile warns once and falls back to the eager step with the same result;
what is not covered (a hybrid model, a head with a reduced draft vocabulary) runs eagerly with the right logits.
Needs a C++ compiler (inductor's CPU backend): skipped without one. ~1-2 min of compiling on 2 cores.

    python -m pytest -q tests/test_cpu_compiled.py
"""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import randomize_, tiny_config
from gdnspec.models import cpu_compiled
from gdnspec.models.lm import GDNForCausalLM

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile's CPU backend needs a C++ compiler")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def bound(dtype) -> float:
    return 1e-11 if dtype == torch.float64 else 5e-5


def states_rel(a, b) -> float:
    return max(max(rel(x.recurrent, y.recurrent), rel(x.conv, y.conv)) for x, y in zip(a.layers, b.layers))


@pytest.fixture
def compile_on(monkeypatch):
    """GDNSPEC_CPU_COMPILE=1; afterwards: the compiled steps ran (counted per function) and none fell back."""
    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "1")
    monkeypatch.setitem(cpu_compiled._STATE, "failed", None)
    calls = {}
    real = cpu_compiled._run

    def counting(name, fn, args):
        calls[name] = calls.get(name, 0) + 1
        return real(name, fn, args)

    monkeypatch.setattr(cpu_compiled, "_run", counting)
    yield calls
    assert cpu_compiled._STATE["failed"] is None, cpu_compiled._STATE["failed"]  # compiled, not the eager fallback
    assert calls, "no compiled step ran"


def _gdn_model(dtype, layout, **over):
    cfg = tiny_config(num_hidden_layers=2, full_attention_interval=0, gdn_layout=layout, **over)
    return randomize_(GDNForCausalLM(cfg, dtype=torch.float32), seed=5).to(dtype).eval()


CASES = [(torch.float64, "qwen3_next", {}, 3), (torch.float64, "qwen3_5", dict(rms_norm_offset=True), 1),
         (torch.float32, "qwen3_next", dict(linear_key_head_dim=12, linear_value_head_dim=8), 3)]


@pytest.mark.parametrize("dtype,layout,over,B", CASES)
@torch.inference_mode()
def test_compiled_decode_step_matches_module_path(compile_on, dtype, layout, over, B):
    model = _gdn_model(dtype, layout, **over)
    assert cpu_compiled.applies(model)
    g = torch.Generator().manual_seed(1)
    s_ref = model(torch.randint(0, model.vocab_size, (B, 5), generator=g)).state
    s = s_ref.clone()
    for step in range(3):
        if step == 2:  # an in-place weight update after compiling: the compiled step reads the weights as inputs
            with torch.no_grad():
                model.layers[0].linear_attn.out_proj.weight.mul_(1.5)
                model.layers[1].mlp.up_proj.weight.add_(0.1)
        ids = torch.randint(0, model.vocab_size, (B, 1), generator=g)
        model.fused_steps = False
        ref = model(ids, s_ref)
        model.fused_steps = True
        out = model(ids, s)
        assert rel(out.logits, ref.logits) < bound(dtype) and rel(out.hidden_states, ref.hidden_states) < bound(dtype)
        assert states_rel(s, s_ref) < bound(dtype), step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@torch.inference_mode()
def test_compiled_eagle_expansion_and_catch_up_match_module_path(compile_on, dtype):
    """test_cpu_fast's EAGLE check (B = 3; catch-ups of 1 and 3 pairs) with the compiled steps on."""
    from test_cpu_fast import check_eagle_steps_match_module_path

    check_eagle_steps_match_module_path(dtype)
    assert compile_on.get("eagle_step", 0) == 2 and compile_on.get("eagle_catch_up", 0) == 2, compile_on


@pytest.mark.parametrize("drafter", ["model", "eagle"])
@torch.inference_mode()
def test_greedy_speculative_output_equals_plain_with_compiled_drafters(compile_on, drafter):
    from gdnspec import generate_autoregressive
    from gdnspec.models.eagle import EagleHead, eagle_config_for
    from gdnspec.spec import SpeculativeEngine, TreeConfig
    from gdnspec.spec.drafters import EagleDrafter, ModelDrafter

    target = _gdn_model(torch.float64, "qwen3_next")
    if drafter == "model":
        d = ModelDrafter(randomize_(GDNForCausalLM(target.config, dtype=torch.float64), seed=9).eval())
    else:
        d = EagleDrafter(randomize_(EagleHead(eagle_config_for(target.config)), seed=3).double().eval(), target)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, target.vocab_size, (n,), generator=g) for n in (6, 9)]
    plain = generate_autoregressive(target, prompts, max_new_tokens=12)
    for cfg in (TreeConfig(builder="chain", num_steps=3, num_draft_tokens=4),
                TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)):
        out = SpeculativeEngine(target, d, cfg).generate(prompts, max_new_tokens=12)
        assert [list(map(int, o)) for o in out] == [list(map(int, p)) for p in plain], cfg
    assert compile_on.get("model_step" if drafter == "model" else "eagle_step", 0) > 0, compile_on


def test_switch_values(monkeypatch):
    from gdnspec.ops import check_env_switches

    for v, want in (("", False), ("0", False), ("1", True)):
        monkeypatch.setenv("GDNSPEC_CPU_COMPILE", v)
        assert cpu_compiled.enabled() is want
    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "true")
    with pytest.raises(ValueError, match="GDNSPEC_CPU_COMPILE"):
        check_env_switches()


@torch.inference_mode()
def test_a_failing_compile_warns_once_and_runs_the_eager_step(monkeypatch):
    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "1")
    monkeypatch.setitem(cpu_compiled._STATE, "failed", None)
    monkeypatch.setitem(cpu_compiled._STATE, "fns", {})

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = _gdn_model(torch.float64, "qwen3_next")
    ids = torch.tensor([[3], [5]])
    s0 = model(torch.randint(0, model.vocab_size, (2, 4))).state
    s1, s2 = s0.clone(), s0.clone()
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = model(ids, s1)
    assert not cpu_compiled.enabled()  # off for the rest of the process
    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "0")
    ref = model(ids, s2)
    assert torch.equal(out.logits, ref.logits) and states_rel(s1, s2) == 0.0
    # the EAGLE catch-up returns nothing: its failed compile must still run the eager catch-up
    from gdnspec.models.eagle import EagleHead, eagle_config_for

    head = randomize_(EagleHead(eagle_config_for(model.config)), seed=3).double().eval()
    g = torch.Generator().manual_seed(3)
    f, e = (torch.randn(2, 3, model.config.hidden_size, generator=g, dtype=torch.float64) for _ in range(2))
    h1, h2 = head.new_state(2), head.new_state(2)
    monkeypatch.setitem(cpu_compiled._STATE, "failed", None)
    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "1")
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        head.catch_up(f, e, h1, counts=torch.tensor([3, 2]), target=model)
    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "0")
    head.catch_up(f, e, h2, counts=torch.tensor([3, 2]), target=model)
    assert states_rel(h1, h2) == 0.0 and states_rel(h2, head.new_state(2)) > 0


@torch.inference_mode()
def test_what_the_compiled_steps_do_not_cover_runs_eagerly(monkeypatch):
    """A hybrid model (attention layers) and an EAGLE head with a reduced draft vocabulary are not compiled, and give
    the module path's results: the reduced head's logits are the full logits' draft_ids columns, not a full row."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for

    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "1")
    monkeypatch.setitem(cpu_compiled._STATE, "failed", None)
    hybrid = randomize_(GDNForCausalLM(tiny_config(num_hidden_layers=2, full_attention_interval=2),
                                       dtype=torch.float64), seed=5).eval()
    assert cpu_compiled.enabled() and not cpu_compiled.applies(hybrid)
    target = _gdn_model(torch.float64, "qwen3_next")
    head = randomize_(EagleHead(eagle_config_for(target.config)), seed=3).double().eval()
    V, B, H = target.vocab_size, 2, target.config.hidden_size
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(1))[: V // 3]
    head.set_draft_vocab(ids)
    assert not cpu_compiled.eagle_applies(head)
    g = torch.Generator().manual_seed(2)
    f, e = torch.randn(B, 1, H, generator=g, dtype=torch.float64), torch.randn(B, 1, H, generator=g, dtype=torch.float64)
    st = head.new_state(B)
    target.fused_steps = False
    head.set_draft_vocab(None)
    _, full = head.decode_step(f, e, st.clone(), target=target)
    head.set_draft_vocab(ids)
    target.fused_steps = True
    _, red = head.decode_step(f, e, st, target=target)
    assert red.shape == (B, ids.numel()) and rel(red, full[:, ids]) < 1e-11
