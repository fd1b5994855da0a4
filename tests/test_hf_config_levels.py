"""Qwen3.5 VLM folders as transformers publishes them: config fields that both levels of config.json can hold.

Run: python -m pytest -q tests/test_hf_config_levels.py   (helpers: tests/test_hf_qwen3_next.py)

Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration saved with tie_word_embeddings=True write `true`
at the top of config.json, `false` inside text_config, and no lm_head.weight. For every field that both levels can
hold, gdnspec takes the value transformers takes (gdnspec/models/hf.py, VLM_TOP_LEVEL_DEFAULTS): each test edits
one field on one level, loads the folder with transformers' from_pretrained and with gdnspec, and compares.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_hf_qwen3_next import COMMON, check_forward, randomize_hf_, save, transformers

from gdnspec.models.hf import CheckpointError, hf_generation_info, load_hf

VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4)


def hf_vlm(moe: bool, **top):
    text = dict(COMMON, linear_num_value_heads=4)
    if moe:
        C, M = transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
    else:
        C, M = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
        text.update(intermediate_size=40)
    torch.manual_seed(0)
    return randomize_hf_(M(C(text_config=text, vision_config=VISION, **top)).eval())


@pytest.fixture(scope="module", params=["dense", "moe"])
def tied_vlm(request, tmp_path_factory):
    model = hf_vlm(request.param == "moe", tie_word_embeddings=True)
    return model, save(model, tmp_path_factory.mktemp(f"vlm_tied_{request.param}"))


def edited(folder, tmp_path, name, edit):
    """A copy of `folder` whose config.json dict went through edit(cfg) (in place)."""
    out = tmp_path / name
    shutil.copytree(folder, out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def hf_load(folder):
    cls = transformers.AutoModelForImageTextToText
    return cls.from_pretrained(folder).eval()


def hf_tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_published_tied_folder(tied_vlm):
    """The folder as saved: true on top, false in text_config, no lm_head.weight; loads tied, logits match."""
    hf, folder = tied_vlm
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["text_config"]["tie_word_embeddings"] is False
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = load_hf(folder)[0]
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    check_forward(hf, ours, T=12)


@pytest.mark.parametrize("top, text", [(True, True), (True, False), (True, None), (False, True), (None, True)])
def test_tie_word_embeddings_levels(tied_vlm, tmp_path, top, text):
    """transformers ties by the top level only (default False); text_config's value is ignored. Untied without an
    lm_head.weight, transformers makes a random lm_head: gdnspec refuses (missing tensor) instead."""
    _, folder = tied_vlm

    def edit(cfg):
        for c, v in ((cfg, top), (cfg["text_config"], text)):
            c.pop("tie_word_embeddings", None) if v is None else c.update(tie_word_embeddings=v)

    variant = edited(folder, tmp_path, "v", edit)
    ref = hf_load(variant)
    if hf_tied(ref):
        ours = load_hf(variant)[0]
        assert ours.config.tie_word_embeddings
        check_forward(ref, ours, T=12)
    else:
        assert top is not True
        with pytest.raises(CheckpointError, match=r"missing tensors: \['lm_head.weight'\]"):
            load_hf(variant)


def test_tied_but_lm_head_stored_and_different(tmp_path):
    """Tied in config.json, but lm_head.weight stored with other values: transformers does not tie; neither do we."""
    hf = hf_vlm(False, tie_word_embeddings=False)
    folder = save(hf, tmp_path / "untied")
    variant = edited(folder, tmp_path, "v", lambda cfg: cfg.update(tie_word_embeddings=True))
    ref = hf_load(variant)
    assert not hf_tied(ref)
    ours = load_hf(variant)[0]
    assert not ours.config.tie_word_embeddings and ours.lm_head.weight is not ours.embed_tokens.weight
    check_forward(ref, ours, T=12)


@pytest.mark.parametrize("top, text", [("float64", "bfloat16"), (None, "bfloat16"), ("bfloat16", None)])
def test_dtype_levels(tied_vlm, tmp_path, top, text):
    """transformers' dtype="auto" reads the top level only, else the weights' dtype (float32 here)."""
    _, folder = tied_vlm

    def edit(cfg):
        for c, v in ((cfg, top), (cfg["text_config"], text)):
            c.pop("torch_dtype", None)
            c.pop("dtype", None) if v is None else c.update(dtype=v)

    variant = edited(folder, tmp_path, "v", edit)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(variant, dtype="auto")
    assert load_hf(variant)[0].dtype == ref.dtype == getattr(torch, top or "float32")


def test_text_fields_written_on_top_are_ignored(tied_vlm, tmp_path):
    """Text-model fields at the top level are unused extras for transformers: same logits, same shapes."""
    _, folder = tied_vlm
    junk = dict(vocab_size=7, hidden_size=8, num_hidden_layers=1, rms_norm_eps=0.5, head_dim=4, intermediate_size=8,
                num_attention_heads=1, num_key_value_heads=1, linear_num_value_heads=2, layer_types=["full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 3.0, "partial_rotary_factor": 1.0},
                hidden_act="gelu", attention_bias=True, num_experts=2, num_experts_per_tok=1)
    variant = edited(folder, tmp_path, "v", lambda cfg: cfg.update(junk))
    ref = hf_load(variant)
    check_forward(ref, load_hf(variant)[0], T=12)


@pytest.mark.parametrize("where", ["top", "text", "both", "generation_config"])
def test_special_token_ids_levels(tied_vlm, tmp_path, where):
    """bos / eos / pad ids: generation_config.json, else the top level, else text_config (transformers'
    GenerationConfig.from_model_config)."""
    _, folder = tied_vlm

    def edit(cfg):
        if where in ("top", "both"):
            cfg.update(eos_token_id=[5, 6], bos_token_id=1, pad_token_id=2)
        if where in ("text", "both"):
            cfg["text_config"].update(eos_token_id=7, bos_token_id=3, pad_token_id=4)

    variant = edited(folder, tmp_path, "v", edit)
    gen = variant / "generation_config.json"
    if where == "generation_config":
        gen.write_text(json.dumps({"eos_token_id": [9, 8], "bos_token_id": 0}))
    else:
        gen.unlink(missing_ok=True)
    ref = hf_load(variant).generation_config
    info = hf_generation_info(variant)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert info.get(key) == getattr(ref, key), key


def test_generation_config_eos_list_stops_like_transformers(tied_vlm, tmp_path):
    """generation_config.json eos_token_id [<|im_end|>-like, <|endoftext|>-like]: bundle.eos_token_id is the list;
    plain and speculative decoding stop at the first one emitted, where transformers' generate stops."""
    import gdnspec
    from gdnspec import GDNSpeculativeWorker, NGramDrafter, generate_autoregressive

    hf, folder = tied_vlm
    variant = edited(folder, tmp_path, "v", lambda cfg: None)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    free = generate_autoregressive(load_hf(variant)[0], ids, 16)[0, 6:].tolist()
    im_end = free[4]
    endoftext = next(t for t in range(96) if t not in free)
    (variant / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext], "pad_token_id": 0}))
    bundle = gdnspec.load(variant)
    assert bundle.eos_token_id == [im_end, endoftext]
    ref = hf_load(variant).generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
    assert ref.shape[1] == 6 + free.index(im_end) + 1  # transformers stopped at the first stop id
    plain = generate_autoregressive(bundle.model, ids, 16, eos_token_id=bundle.eos_token_id)
    spec = GDNSpeculativeWorker(target_model=bundle.model, drafter=NGramDrafter(), topk=2, num_steps=3).generate(
        ids, 16, eos_token_id=bundle.eos_token_id)
    assert torch.equal(plain, ref) and torch.equal(spec, ref)
