"""generate_autoregressive: batched == per-prompt, list inputs of different lengths, eos handling, greedy == a
hand-written argmax loop over full forwards, and clear errors for bad arguments.

Run: python -m pytest -q tests/test_generate.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import randomize_, tiny_config
from gdnspec import GDNForCausalLM, SimpleLMWithGDN, generate_autoregressive

F64 = torch.float64


@pytest.fixture(scope="module")
def model():
    """A float64 hybrid model with strong random weights: logit gaps are far above float64 noise, so batched and
    single-row argmax cannot flip on rounding."""
    torch.manual_seed(0)
    m = GDNForCausalLM(tiny_config(num_hidden_layers=3, full_attention_interval=2), dtype=F64).eval()
    return randomize_(m, scale=0.6)


def argmax_loop(model, prompt: torch.Tensor, n: int, eos=None) -> torch.Tensor:
    """The definition of greedy decoding: re-run the whole sequence each step (no state) and take the argmax."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            tok = model(seq[None]).logits[0, -1].argmax()
            seq = torch.cat([seq, tok[None]])
            if eos is not None and int(tok) == eos:
                break
    return seq


def test_greedy_equals_argmax_loop_tensor_input(model):
    prompts = torch.randint(0, model.vocab_size, (3, 5))
    out = generate_autoregressive(model, prompts, max_new_tokens=7)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompts)
    for i in range(3):
        assert torch.equal(out[i], argmax_loop(model, prompts[i], 7))
    assert len({tuple(r[5:].tolist()) for r in out}) > 1, "test needs rows that differ"


def test_list_input_different_lengths_equals_each_alone(model):
    prompts = [torch.randint(0, model.vocab_size, (n,)) for n in (3, 8, 1)]
    out = generate_autoregressive(model, prompts, max_new_tokens=6)
    assert isinstance(out, list) and [o.numel() for o in out] == [9, 14, 7]
    for p, o in zip(prompts, out):
        assert torch.equal(o[:p.numel()], p)
        alone = generate_autoregressive(model, p[None], max_new_tokens=6)[0]
        assert torch.equal(o, alone)
        assert torch.equal(o, argmax_loop(model, p, 6))


def test_eos_stops_sequence_and_pads_tensor_output(model):
    prompts = torch.randint(0, model.vocab_size, (2, 4))
    free = generate_autoregressive(model, prompts, max_new_tokens=8)
    eos = int(free[0, 4 + 2])  # row 0's third new token
    first = [next((j for j in range(4, 12) if int(free[i, j]) == eos), None) for i in range(2)]
    out = generate_autoregressive(model, prompts, max_new_tokens=8, eos_token_id=eos)
    assert out.shape[0] == 2
    for i in range(2):
        stop = first[i]
        if stop is None:
            assert torch.equal(out[i, :12], free[i])
        else:
            assert torch.equal(out[i, :stop + 1], free[i, :stop + 1]), "tokens up to and including eos unchanged"
            assert (out[i, stop + 1:] == eos).all(), "padding after eos is eos"
            assert torch.equal(out[i, :stop + 1], argmax_loop(model, prompts[i], 8, eos=eos))
    assert first[0] is not None and first[0] <= 6
    lists = generate_autoregressive(model, list(prompts), max_new_tokens=8, eos_token_id=eos)
    assert lists[0].numel() == first[0] + 1 and int(lists[0][-1]) == eos, "list output stops right after eos"


def test_max_new_tokens_zero_returns_prompts(model):
    prompts = torch.randint(0, model.vocab_size, (2, 3))
    assert torch.equal(generate_autoregressive(model, prompts, 0), prompts)
    lst = [torch.tensor([1, 2]), torch.tensor([3])]
    out = generate_autoregressive(model, lst, 0)
    assert all(torch.equal(a, b) for a, b in zip(out, lst))


def test_sampling_is_reproducible_with_generator_and_in_vocab(model):
    prompts = torch.randint(0, model.vocab_size, (2, 3))
    a = generate_autoregressive(model, prompts, 6, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    b = generate_autoregressive(model, prompts, 6, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 9)
    assert int(a.min()) >= 0 and int(a.max()) < model.vocab_size


def test_simple_lm_bf16_generates():
    torch.manual_seed(0)
    m = SimpleLMWithGDN(vocab_size=100, hidden_size=32, num_k_heads=2, num_v_heads=2, head_k_dim=8, head_v_dim=8)
    out = generate_autoregressive(m, torch.randint(0, 100, (2, 10)), max_new_tokens=5)
    assert out.shape == (2, 15)


def test_bad_arguments_raise_clear_errors(model):
    p = torch.randint(0, model.vocab_size, (1, 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_autoregressive(model, p, -1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_autoregressive(model, p, 2.5)
    with pytest.raises(ValueError, match="prompt 1"):
        generate_autoregressive(model, [torch.tensor([1]), torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="input_ids"):
        generate_autoregressive(model, [], 2)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_autoregressive(model, torch.tensor([[0, model.vocab_size]]), 2)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_autoregressive(model, [torch.tensor([-1])], 2)
    with pytest.raises(ValueError, match="input_ids"):
        generate_autoregressive(model, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(TypeError, match="input_ids"):
        generate_autoregressive(model, "hello", 2)
    with pytest.raises(ValueError, match="temperature"):
        generate_autoregressive(model, p, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate_autoregressive(model, p, 2, eos_token_id="</s>")
