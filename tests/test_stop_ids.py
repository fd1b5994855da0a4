"""Stop ids: eos_token_id as one id or a list (a Hugging Face generation_config.json's form) in every entry point,
and a checkpoint's generation_config.json read by gdnspec.load (eos list, sampling defaults).

A list's first id plays <|im_end|> (emitted mid-continuation), the second <|endoftext|> (emitted later or never):
generation must stop at the first stop id each sequence emits, identically in plain decoding (eager and static),
speculative decoding (eager and static, model and n-gram drafters), SpecSession per sequence and the seed worker.
"""
from __future__ import annotations

import json

import pytest
import torch

import gdnspec
from gdnspec import GDNSpeculativeWorker, ModelDrafter, NGramDrafter, generate_autoregressive
from gdnspec.bundle import Bundle
from gdnspec.models.checkpoint import save_checkpoint
from gdnspec.spec import SpeculativeEngine, TreeConfig

from spec_helpers import noisy_copy, prompts_of, tiny_model, word_tokenizer


@pytest.fixture(scope="module")
def setup():
    target = tiny_model(seed=3, hybrid=True, init_scale=8.0, ratio=2)
    draft = noisy_copy(target, noise=0.05)
    prompts = prompts_of([5, 8, 6], target.vocab_size, seed=11)
    free = generate_autoregressive(target, prompts, 24, static=False)
    new = [f[p.numel():].tolist() for f, p in zip(free, prompts)]
    im_end = new[1][6]  # row 1 emits it mid-continuation
    later = [t for t in range(target.vocab_size) if t != im_end and t not in new[1][:8]]
    endoftext = next((t for t in later if t in new[0][8:]), later[0])
    return target, draft, prompts, new, [im_end, endoftext]


def expected(prompt, new_tokens, stops):
    """The prompt followed by the free continuation cut after its first stop id."""
    cut = next((i + 1 for i, t in enumerate(new_tokens) if t in stops), len(new_tokens))
    return torch.cat([prompt, torch.tensor(new_tokens[:cut])])


def all_outputs(target, draft, prompts, eos, budget=24):
    cfg = TreeConfig(topk=2, num_steps=3)
    return {
        "plain eager": generate_autoregressive(target, prompts, budget, eos_token_id=eos, static=False),
        "plain static": generate_autoregressive(target, prompts, budget, eos_token_id=eos, static=True),
        "spec eager (model)": SpeculativeEngine(target, ModelDrafter(draft), cfg).generate(prompts, budget, eos),
        "spec static (model)": SpeculativeEngine(target, ModelDrafter(draft), cfg, static=True).generate(
            prompts, budget, eos),
        "spec static (ngram)": SpeculativeEngine(target, NGramDrafter(), cfg, static=True).generate(prompts, budget, eos),
        "seed worker": GDNSpeculativeWorker(draft_model=draft, target_model=target, topk=2, num_steps=3).generate(
            prompts, budget, eos_token_id=eos),
    }


def test_list_stops_at_first_stop_id_everywhere(setup):
    target, draft, prompts, new, eos = setup
    assert eos[0] in new[1]
    want = [expected(p, n, eos) for p, n in zip(prompts, new)]
    assert want[1].numel() == prompts[1].numel() + 7  # stopped at the <|im_end|>-like id
    for name, out in all_outputs(target, draft, prompts, eos).items():
        for i, (o, w) in enumerate(zip(out, want)):
            assert torch.equal(o, w), f"{name}: sequence {i}"


def test_single_id_and_one_element_list_agree(setup):
    target, draft, prompts, _, eos = setup
    a = all_outputs(target, draft, prompts, eos[0], budget=12)
    b = all_outputs(target, draft, prompts, [eos[0]], budget=12)
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name])), name


def test_tensor_input_pads_with_first_stop_id(setup):
    target, draft, prompts, new, eos = setup
    ids = torch.stack([p[:5] for p in prompts])
    free = generate_autoregressive(target, ids, 16)
    stop = int(free[0, 5 + 3])
    out = generate_autoregressive(target, ids, 16, eos_token_id=[stop, 999])
    assert bool((out[0, 5 + 4:] == stop).all())
    spec = GDNSpeculativeWorker(draft_model=draft, target_model=target, topk=2, num_steps=3)
    assert torch.equal(spec.generate(ids, 16, eos_token_id=[stop, 999]), out)


@pytest.mark.parametrize("static", [False, True])
def test_session_per_sequence_stop_lists(setup, static):
    target, draft, prompts, new, eos = setup
    per_seq = [[new[0][2], new[0][9]], None, [eos[0]]]
    eng = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3), static=static)
    out = eng.generate(prompts, 24, eos_token_id=per_seq)
    session = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3)).session()
    ids = session.add(prompts, max_new_tokens=24, eos_token_id=per_seq)
    while session.active:
        session.step()
    for i, (p, n, stops) in enumerate(zip(prompts, new, per_seq)):
        want = expected(p, n, stops or [])
        assert torch.equal(out[i], want), i
        assert torch.equal(session.sequence(ids[i]), want), i
        assert torch.equal(generate_autoregressive(target, [p], 24, eos_token_id=stops)[0], want)


@pytest.mark.parametrize("bad", ["2", True, [-1], [1.5], [2, "x"], 2.0])
def test_bad_stop_ids_are_named(setup, bad):
    target, draft, prompts, _, _ = setup
    with pytest.raises(ValueError, match="eos_token_id"):
        generate_autoregressive(target, prompts, 4, eos_token_id=bad)
    with pytest.raises(ValueError, match="eos_token_id"):
        SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3)).generate(prompts, 4, bad)


def test_per_sequence_entries_must_match_the_batch(setup):
    target, draft, prompts, _, _ = setup
    session = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3)).session()
    with pytest.raises(ValueError, match="eos_token_id has 2 per-sequence entries for 3 sequences"):
        session.add(prompts, max_new_tokens=4, eos_token_id=[None, [1]])


# ---------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def folder(setup, tmp_path):
    target = setup[0]
    save_checkpoint(target, tmp_path / "ckpt", tokenizer=word_tokenizer(target.vocab_size))
    return tmp_path / "ckpt"


def test_bundle_reads_generation_config(setup, folder):
    target, _, prompts, new, eos = setup
    assert gdnspec.load(folder).eos_token_id == 1  # no generation_config.json: <|endoftext|> by name
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": True,
                                                               "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    bundle = gdnspec.load(folder, dtype=torch.float64)
    assert bundle.eos_token_id == eos
    assert bundle.sampling_args() == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert bundle.sampling_args(temperature=0.0, top_k=3) == {"temperature": 0.0, "top_k": 3, "top_p": 0.95}
    out = generate_autoregressive(bundle.model, prompts, 24, eos_token_id=bundle.eos_token_id)
    assert torch.equal(out[1], expected(prompts[1], new[1], eos))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    bundle = gdnspec.load(folder)
    assert bundle.eos_token_id == 2
    assert bundle.sampling_args() == {"temperature": 0.0, "top_k": None, "top_p": None}  # no do_sample: greedy


def test_sampling_defaults_follow_transformers():
    """do_sample true with fields left out: transformers' defaults (temperature 1, top_k 50, top_p off)."""
    b = Bundle(model=None, tokenizer=None, generation_config={"do_sample": True})
    assert b.sampling_args() == {"temperature": 1.0, "top_k": 50, "top_p": None}
    b = Bundle(model=None, tokenizer=None, generation_config={"do_sample": False, "temperature": 0.7})
    assert b.sampling_args() == {"temperature": 0.0, "top_k": None, "top_p": None}
    b = Bundle(model=None, tokenizer=None, generation_config={"do_sample": True, "temperature": 0, "top_k": 0,
                                                              "top_p": None})
    assert b.sampling_args() == {"temperature": 0.0, "top_k": None, "top_p": None}  # 0 is greedy, not 1.0


@pytest.mark.parametrize("text, match", [("{oops", "not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                         ('{"eos_token_id": "x"}', "eos_token_id"),
                                         ('{"do_sample": true, "top_p": "0.9"}', "top_p"),
                                         ('{"do_sample": true, "temperature": -1}', "temperature"),
                                         ('{"do_sample": true, "top_k": true}', "top_k"),
                                         ('{"do_sample": "true"}', "do_sample must be true or false")])
def test_bad_generation_config_names_the_file(folder, text, match):
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        gdnspec.load(folder)
    assert "generation_config.json" in str(e.value)


def test_tensor_stop_ids(setup):
    target, _, prompts, _, eos = setup
    a = generate_autoregressive(target, prompts, 12, eos_token_id=torch.tensor(eos))
    b = generate_autoregressive(target, prompts, 12, eos_token_id=eos)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bundle_eos_falls_back_to_config_json_then_tokenizer(tmp_path):
    """No generation_config.json: config.json's eos_token_id (top level, else text_config), else the tokenizer's."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": {"eos_token_id": [4, 5]}}))
    assert Bundle(model=None, tokenizer=None, path=tmp_path).eos_token_id == [4, 5]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "eos_token_id": 3,
                                                      "text_config": {"eos_token_id": [4, 5]}}))
    assert Bundle(model=None, tokenizer=None, path=tmp_path).eos_token_id == 3
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    assert Bundle(model=None, tokenizer=word_tokenizer(8), path=tmp_path).eos_token_id == 1  # <|endoftext|>
