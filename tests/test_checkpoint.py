"""Checkpoint folder round trips (CPU): identical logits, tied weights, EAGLE heads, tokenizer, errors.

Run: cd /work/main && python -m pytest -x -q tests/test_checkpoint.py
"""
from __future__ import annotations

import json

import pytest
import torch

from gdnspec.models import GDNConfig, GDNForCausalLM
from gdnspec.models.checkpoint import load_checkpoint, load_extra, save_checkpoint
from gdnspec.models.eagle import EagleHead, eagle_config_for
from gdnspec.train.tokenizer import train_tokenizer


def _config(tie=True):  # vocab 272 holds the 270-token tokenizer of the round trip (a larger one is refused)
    return GDNConfig(vocab_size=272, hidden_size=32, num_hidden_layers=3, full_attention_interval=3, intermediate_size=48,
                     linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=tie)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_identical_logits(tmp_path, tie):
    torch.manual_seed(0)
    model = GDNForCausalLM(_config(tie)).eval()
    _perturb(model)
    tok = train_tokenizer(["def f(x):\n    return x\n"] * 3, vocab_size=270)
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok, extra={"note": "hi"})
    loaded, tok2 = load_checkpoint(tmp_path / "ck")
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert tok2.encode("return x").ids == tok.encode("return x").ids
    assert load_extra(tmp_path / "ck") == {"note": "hi"}
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "gdnspec"
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_half_precision_save_and_dtype_on_load(tmp_path):
    torch.manual_seed(1)
    model = GDNForCausalLM(_config()).eval()
    _perturb(model)
    save_checkpoint(model, tmp_path / "ck", dtype=torch.float16)
    loaded, tok = load_checkpoint(tmp_path / "ck")
    assert tok is None and loaded.dtype == torch.float32
    ref = GDNForCausalLM(_config()).eval()
    ref.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=0, rtol=0)
    loaded16, _ = load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    assert loaded16.dtype == torch.bfloat16


def test_eagle_round_trip(tmp_path):
    torch.manual_seed(2)
    target = GDNForCausalLM(_config())
    head = EagleHead(eagle_config_for(target.config, intermediate_size=40)).eval()
    _perturb(head)
    save_checkpoint(head, tmp_path / "eagle")
    assert json.loads((tmp_path / "eagle" / "config.json").read_text())["model_type"] == "gdnspec_eagle"
    loaded, _ = load_checkpoint(tmp_path / "eagle")
    assert isinstance(loaded, EagleHead)
    h, e = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(h, e)[0], head(h, e)[0], atol=0, rtol=0)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
    model = GDNForCausalLM(_config())
    save_checkpoint(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["hidden_size"] = 48
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "ck")
    cfg["hidden_size"], cfg["model_type"] = 32, "llama"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type"):
        load_checkpoint(tmp_path / "ck")


def test_shipped_default_checkpoints_load_and_fit_together():
    from gdnspec.models.checkpoint import default_checkpoint_dir

    if not (default_checkpoint_dir("target") / "model.safetensors").exists():
        pytest.skip("no shipped checkpoints in gdnspec/assets/default")
    target, tok = load_checkpoint(default_checkpoint_dir("target"))
    draft, tok_d = load_checkpoint(default_checkpoint_dir("draft"))
    head, tok_e = load_checkpoint(default_checkpoint_dir("eagle"))
    assert isinstance(target, GDNForCausalLM) and isinstance(draft, GDNForCausalLM) and isinstance(head, EagleHead)
    assert tok.to_str() == tok_d.to_str() == tok_e.to_str()
    assert target.vocab_size == draft.vocab_size == head.config.vocab_size == tok.get_vocab_size()
    assert head.hidden_size == target.config.hidden_size
    ids = torch.tensor([tok.encode("def main():\n    return 0\n").ids])
    with torch.no_grad():
        out = target(ids)
        pred, _ = head(out.hidden_states[:, :-1], target.embed_tokens(ids[:, 1:]))
        assert torch.isfinite(head.draft_logits(target, pred)).all() and torch.isfinite(draft(ids).logits).all()
