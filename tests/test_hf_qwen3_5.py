"""Parity of gdnspec's loader with transformers on tiny random Qwen3.5 checkpoints (dense, MoE, the VLM's text part).

Run: python -m pytest -q tests/test_hf_qwen3_5.py   (helpers and the tolerance argument: tests/test_hf_qwen3_next.py)

Qwen3_5ForCausalLM (dense, value/key head ratio 1 and 2) and Qwen3_5MoeForCausalLM (every layer MoE, top-k always
renormalised) use the separate in_proj_qkv / z / b / a layout. Qwen3_5ForConditionalGeneration stores the text model
under model.language_model.* and uses interleaved M-RoPE, which for text-only input equals plain partial RoPE.
"""
from __future__ import annotations

import pytest
import torch

from test_hf_qwen3_next import (COMMON, check_cached_steps, check_forward, check_greedy, randomize_hf_, save,
                                transformers)

from gdnspec.models.hf import is_hf_folder, load_hf


def hf_35(ratio=1, moe=False, seed=0):
    kw = dict(COMMON, linear_num_value_heads=2 * ratio)
    if moe:
        C, M = transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
    else:
        C, M = transformers.Qwen3_5TextConfig, transformers.Qwen3_5ForCausalLM
        kw.update(intermediate_size=40)
    torch.manual_seed(seed)
    return randomize_hf_(M(C(**kw)).eval(), seed)


VARIANTS = {"dense_r1": dict(ratio=1), "dense_r2": dict(ratio=2), "moe_r2": dict(ratio=2, moe=True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: (hf := hf_35(**kw), save(hf, tmp_path_factory.mktemp(name))) for name, kw in VARIANTS.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_cached_steps(checkpoints, variant):
    hf, folder = checkpoints[variant]
    ours = load_hf(folder)[0]
    assert ours.config.gdn_layout == "qwen3_5"
    check_forward(hf, ours)
    check_cached_steps(hf, ours)
    if variant == "moe_r2":
        assert all(type(layer.mlp).__name__ == "SparseMoeBlock" for layer in ours.layers)
        assert ours.config.norm_topk_prob


@pytest.mark.parametrize("variant", ["dense_r2", "moe_r2"])
def test_greedy_continuations(checkpoints, variant):
    hf, folder = checkpoints[variant]
    check_greedy(hf, load_hf(folder)[0], new_tokens=16)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    text = dict(COMMON, linear_num_value_heads=4, intermediate_size=40,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                 "mrope_section": [1, 1, 0], "mrope_interleaved": True})
    text.pop("rope_theta"), text.pop("partial_rotary_factor")
    cfg = transformers.Qwen3_5Config(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                                                           num_heads=2, out_hidden_size=32, patch_size=4))
    torch.manual_seed(0)
    model = randomize_hf_(transformers.Qwen3_5ForConditionalGeneration(cfg).eval())
    return model, save(model, tmp_path_factory.mktemp("vlm"))


def test_vlm_text_part(vlm):
    """Hub-format Qwen3.5 (model_type qwen3_5, model.language_model.* keys, M-RoPE): logits and greedy match."""
    hf, folder = vlm
    assert is_hf_folder(folder)
    ours = load_hf(folder)[0]
    assert ours.config.model_type == "qwen3_5_text"
    check_forward(hf, ours)
    check_greedy(hf, ours, new_tokens=12)
