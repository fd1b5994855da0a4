"""Training pipeline tests (CPU, small): corpus split, tokenizer, train forward, a few steps, distillation, EagleHead.

Run: cd /work/main && python -m pytest -x -q tests/test_train.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gdnspec.models import GDNConfig, GDNForCausalLM
from gdnspec.models.eagle import EagleHead, eagle_config_for
from gdnspec.train.data import (Document, TokenData, build_dataset, collect_documents, encode_documents, is_heldout,
                                split_documents)
from gdnspec.train.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, train_tokenizer
from gdnspec.train.train import TrainConfig, lm_train_forward, make_config, train_lm

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\n\nprint(os.path.join('a', 'b'))  # ünïcode ✓\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        sub = root / f"pkg{i % 4}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text(TEXTS[i % len(TEXTS)] * (3 + i % 5) + f"X{i} = {i}\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_skip.py").write_text("assert False\n")
    return root


@pytest.fixture(scope="module")
def dataset(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    build_dataset(out, vocab_size=400, heldout_fraction=0.2, include_stdlib=False, extra_paths=[corpus_dir], verbose=False)
    return TokenData.load(out)


def test_collect_sorted_skips_test_dirs_and_split_is_by_file(corpus_dir):
    docs = collect_documents(include_stdlib=False, extra_paths=[corpus_dir])
    names = [d.name for d in docs]
    assert names == sorted(names) and len(names) == 40
    assert not any("/tests/" in n for n in names)
    train, held = split_documents(docs, 0.2)
    assert {d.name for d in train}.isdisjoint(d.name for d in held)
    assert len(train) + len(held) == 40 and 0 < len(held) < 40
    # deterministic: same names, same split, whatever the order or the content
    shuffled = [Document(d.name, "other text") for d in reversed(docs)]
    _, held2 = split_documents(shuffled, 0.2)
    assert sorted(d.name for d in held2) == sorted(d.name for d in held)
    assert all(is_heldout(d.name, 0.2) for d in held)
    assert split_documents(docs, 0.0)[1] == []


def test_stdlib_collection_skips_tests_and_site_packages():
    docs = collect_documents(include_stdlib=True)
    names = [d.name for d in docs]
    assert len(names) > 100 and names == sorted(names)
    assert not any(part in ("test", "tests", "site-packages") for n in names for part in n.split("/"))
    assert all(n.startswith("stdlib/") and n.endswith(".py") for n in names)


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = train_tokenizer(TEXTS * 5, vocab_size=300)
    assert tok.get_vocab_size() <= 300 and tok.token_to_id(EOS_TOKEN) == 0
    for text in TEXTS + ["  weird\tspacing\n\n\r\n", "日本語 and emoji 🐍", ""]:
        assert tok.decode(tok.encode(text).ids) == text
    tok.save(str(tmp_path / "tokenizer.json"))
    tok2 = load_tokenizer(tmp_path)
    assert tok2.encode(TEXTS[1]).ids == tok.encode(TEXTS[1]).ids
    arr = encode_documents(tok, [Document("a", TEXTS[0]), Document("b", TEXTS[1])], eos_id(tok))
    assert arr.dtype == np.uint16 and (arr == 0).sum() == 2 and arr[-1] == 0


def test_dataset_folder_and_batches(dataset):
    assert dataset.train.dtype == np.uint16 and dataset.train.size > 500 and dataset.heldout.size > 50
    assert dataset.vocab_size <= 400
    g = torch.Generator().manual_seed(0)
    x, y = dataset.sample_batch(3, 16, generator=g)
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    batches = list(dataset.heldout_batches(2, 8))
    assert all(bx.shape[1] == 8 and torch.equal(bx[:, 1:], by[:, :-1]) for bx, by in batches)


def _tiny(vocab, **kw):
    return make_config("tiny", vocab, kw)


def test_train_forward_matches_model_forward():
    torch.manual_seed(0)
    model = GDNForCausalLM(_tiny(97, linear_value_head_dim=8))
    ids = torch.randint(0, 97, (2, 70))
    with torch.no_grad():
        ref = model(ids, mode="chunk")
        ref_rec = model(ids, mode="recurrent")
    logits, hidden = lm_train_forward(model, ids)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ref.hidden_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_rec.logits, atol=1e-4, rtol=1e-4)
    logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_few_training_steps_reduce_the_loss(dataset, tmp_path):
    torch.manual_seed(0)
    model = GDNForCausalLM(_tiny(dataset.vocab_size))
    tc = TrainConfig(steps=25, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, eval_tokens=256, log_every=100)
    from gdnspec.train.train import heldout_loss
    before = heldout_loss(model, dataset, seq_len=32, batch_size=4, max_tokens=256, device="cpu")
    summary = train_lm(model, dataset, tc, out_dir=tmp_path / "ckpt", device="cpu", tokenizer=dataset.tokenizer_path)
    assert summary["steps"] == 25
    assert summary["final_heldout"] < before - 0.5
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (tmp_path / "ckpt" / "tokenizer.json").exists()


def _head(hidden=32, vocab=50):
    tcfg = GDNConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, intermediate_size=48,
                     linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                     tie_word_embeddings=True)
    target = GDNForCausalLM(tcfg)
    return target, EagleHead(eagle_config_for(tcfg))


def test_eagle_head_shapes_and_state_continuity():
    torch.manual_seed(0)
    target, head = _head()
    B, T, H = 2, 9, 32
    hidden, emb = torch.randn(B, T, H), torch.randn(B, T, H)
    with torch.no_grad():
        out_all, st_all = head(hidden, emb, head.new_state(B))
        st = head.new_state(B)
        steps = [head(hidden[:, t:t + 1], emb[:, t:t + 1], st)[0] for t in range(T)]
        out_split, st_split = head(hidden[:, :4], emb[:, :4], head.new_state(B))
        out_rest, _ = head(hidden[:, 4:], emb[:, 4:], st_split)
        out_chunk, _ = head(hidden, emb, None, mode="chunk")
        out_train = head.forward_train(hidden, emb)
    assert out_all.shape == (B, T, H)
    torch.testing.assert_close(torch.cat(steps, 1), out_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.layers[0].recurrent, st_all.layers[0].recurrent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.layers[0].conv, st_all.layers[0].conv)
    torch.testing.assert_close(torch.cat([out_split, out_rest], 1), out_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_chunk, out_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_train, out_all, atol=1e-5, rtol=1e-5)
    assert EagleHead.draft_logits(target, out_all).shape == (B, T, 50)
    assert not any(n.startswith(("embed", "lm_head")) for n in head.state_dict())


def test_eagle_head_rejects_bad_config_and_inputs():
    target, head = _head()
    with pytest.raises(ValueError, match="num_hidden_layers=1"):
        EagleHead(target.config)
    with pytest.raises(ValueError, match="token_embeds"):
        head(torch.randn(1, 3, 32), torch.randn(1, 3, 16))


def test_short_distill_runs_improve_the_drafters(dataset, tmp_path):
    from gdnspec.train.distill import distill_eagle, distill_model, eval_eagle, eval_model_draft

    torch.manual_seed(0)
    target = GDNForCausalLM(_tiny(dataset.vocab_size))
    train_lm(target, dataset, TrainConfig(steps=20, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_tokens=128,
                                          log_every=100), device="cpu")
    target.eval()
    kw = dict(seq_len=32, batch_size=4, max_tokens=256, device=torch.device("cpu"))
    tc = TrainConfig(steps=20, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_tokens=256, log_every=100)

    draft = GDNForCausalLM(make_config("tiny-draft", dataset.vocab_size))
    kl0 = eval_model_draft(target, draft, dataset, **kw)["heldout_kl"]
    s = distill_model(target, draft, dataset, tc, out_dir=tmp_path / "draft", device="cpu")
    assert s["final_heldout"] < kl0

    head = EagleHead(eagle_config_for(target.config, intermediate_size=32))
    e0 = eval_eagle(head, target, dataset, steps=2, **kw)["heldout_kl"]
    s = distill_eagle(target, head, dataset, tc, out_dir=tmp_path / "eagle", device="cpu", steps=2)
    e1 = eval_eagle(head, target, dataset, steps=2, **kw)["heldout_kl"]
    assert s["final_heldout"] < e0[0] and e1[1] < e0[1]
    assert (tmp_path / "eagle" / "config.json").exists()
