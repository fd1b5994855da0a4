"""flash-linear-attention GatedDeltaNet checkpoints: export with gdnspec's exporter, load back, compare.

Run: python -m pytest -q tests/test_hf_fla.py

fla's model cannot run on the CPU (its Triton kernels need a GPU driver), so the CPU reference is the model that was
exported: export_fla_checkpoint writes fla's layout (separate q/k/v/g/a/b projections, three short convs, plain-weight
norms, model.embeddings) and load_hf must convert it back to the same function. The fla-class comparison runs only
where CUDA and fla are available (test_against_fla_on_gpu, in a subprocess so fla is not blocked there).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from gdnspec import GDNConfig, GDNForCausalLM, generate_autoregressive
from gdnspec.models.hf import CheckpointError, export_fla_checkpoint, load_hf

from test_hf_qwen3_next import write_variant


def gdn_model(layout="qwen3_5", ratio=2, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = GDNConfig(vocab_size=80, hidden_size=32, num_hidden_layers=3, intermediate_size=40, linear_num_key_heads=2,
                    linear_num_value_heads=2 * ratio, linear_key_head_dim=8, linear_value_head_dim=12, gdn_layout=layout,
                    tie_word_embeddings=tie)
    model = GDNForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 3 + 0.5))
            elif name.endswith("dt_bias") or "norm" in name:
                p.add_(n * 0.3)
            elif "embed" in name or "lm_head" in name:
                p.copy_(n * 2.0 / 32 ** 0.5)
            else:
                p.copy_(n * 0.5 / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("layout,ratio,tie", [("qwen3_5", 2, False), ("qwen3_next", 2, True), ("qwen3_next", 1, False)])
def test_export_load_roundtrip(tmp_path, layout, ratio, tie):
    model = gdn_model(layout, ratio, tie)
    folder = export_fla_checkpoint(model, tmp_path / "fla")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "gated_deltanet" and cfg["num_v_heads"] == 2 * ratio and cfg["expand_v"] == 1.5
    keys = set(load_file(folder / "model.safetensors"))
    assert {"model.embeddings.weight", "model.layers.0.attn.q_conv1d.weight", "model.layers.0.attn.g_proj.weight",
            "model.layers.2.mlp_norm.weight"} <= keys
    loaded = load_hf(folder)[0]
    assert loaded.config.gdn_layout == "qwen3_5" and loaded.config.rms_norm_offset is False
    ids = torch.randint(0, 80, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        for mode in ("auto", "chunk"):
            # (1 + w) -> plain weight rounds once in float32: ~1 ulp of the norm weights
            torch.testing.assert_close(loaded(ids, mode=mode).logits, model(ids, mode=mode).logits, atol=1e-5, rtol=1e-5)
    assert ref.abs().max() > 2.0
    assert torch.equal(generate_autoregressive(loaded, ids[:, :5], 12), generate_autoregressive(model, ids[:, :5], 12))


def test_unsupported_options_and_tensors(tmp_path):
    folder = export_fla_checkpoint(gdn_model(), tmp_path / "fla")
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(folder / "model.safetensors")

    def variant(name, config=None, tensors=None):
        return write_variant(tmp_path / name, config or cfg, tensors if tensors is not None else sd)

    with pytest.raises(CheckpointError, match=r"use_gate=False.*allow_neg_eigval=True.*hybrid softmax-attention"):
        load_hf(variant("opts", dict(cfg, use_gate=False, allow_neg_eigval=True,
                                     attn={"layers": [1], "num_heads": 2, "num_kv_heads": 2})))
    with pytest.raises(CheckpointError, match="output_gate_activation='sigmoid'"):
        load_hf(variant("sig", dict(cfg, output_gate_activation="sigmoid")))
    with pytest.raises(CheckpointError, match=r"biases on k_conv1d are not supported \(model.layers.1.attn.k_conv1d.bias; conv_bias"):
        load_hf(variant("bias", tensors=dict(sd, **{"model.layers.1.attn.k_conv1d.bias": torch.zeros(16)})))
    no_v = {k: v for k, v in sd.items() if k != "model.layers.2.attn.v_conv1d.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.2.attn.v_conv1d.weight'\]"):
        load_hf(variant("nov", tensors=no_v))
    no_g = {k: v for k, v in sd.items() if k != "model.layers.0.attn.g_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors: \['layers.0.linear_attn.in_proj_z.weight'\]"):
        load_hf(variant("nog", tensors=no_g))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: \['model.layers.0.attn.q_norm.weight'\]"):
        load_hf(variant("extra", tensors=dict(sd, **{"model.layers.0.attn.q_norm.weight": torch.ones(8)})))
    with pytest.raises(ValueError, match="full_attention layers"):
        export_fla_checkpoint(GDNForCausalLM(GDNConfig(num_hidden_layers=2, full_attention_interval=2)), tmp_path / "x")


GPU_SCRIPT = textwrap.dedent("""
    import sys, torch
    import fla.models  # registers GatedDeltaNet with transformers
    from transformers import AutoModelForCausalLM
    from gdnspec.models.hf import load_hf
    folder = sys.argv[1]
    ref = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).cuda().eval()
    ours = load_hf(folder, device="cuda")[0]
    ids = torch.randint(0, ref.config.vocab_size, (2, 70), device="cuda")
    with torch.no_grad():
        d = (ref(ids).logits - ours(ids).logits).abs().max().item()
    print("maxdiff", d)
    assert d < 1e-3, d
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's model class needs a GPU")
def test_against_fla_on_gpu(tmp_path):
    has_fla = subprocess.run([sys.executable, "-c", "import fla.models"], capture_output=True).returncode == 0
    if not has_fla:
        pytest.skip("flash-linear-attention is not installed")
    folder = export_fla_checkpoint(gdn_model(), tmp_path / "fla")
    r = subprocess.run([sys.executable, "-c", GPU_SCRIPT, str(folder)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
