"""Bad input tried as a new user would: each kind gets one clear error at the boundary, naming the argument / field /
file / tensor and what was expected (issue 12). CPU, tiny models."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gdnspec
from gdnspec import GDNConfig, GDNSpeculativeWorker, ModelDrafter, NGramDrafter, generate_autoregressive
from gdnspec.layers import GatedAttention, Qwen3GatedDeltaNet
from gdnspec.layers.norm import GatedRMSNorm, RMSNorm
from gdnspec.models.checkpoint import save_checkpoint
from gdnspec.models.hf import CheckpointError
from gdnspec.spec import GDNDraftWorker, GDNVerifyWorker, SpeculativeEngine, TreeConfig

from spec_helpers import noisy_copy, tiny_model

BASE = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, intermediate_size=48, linear_num_key_heads=2,
            linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, partial_rotary_factor=0.5)


def tiny_config(**kw) -> GDNConfig:
    return GDNConfig(**dict(BASE, **kw))


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0)


PROMPT = torch.tensor([[1, 2, 3, 4]])


# ---------------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_raise_instead_of_emitting_token_0(target, value):
    broken = noisy_copy(target, noise=0.0)
    with torch.no_grad():
        broken.layers[0].mlp.down_proj.weight[0, 0] = value
    for static in (False, True):
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            generate_autoregressive(broken, PROMPT, 8, static=static)
    for drafter in (NGramDrafter(), ModelDrafter(target)):
        for static in (False, True):
            eng = SpeculativeEngine(broken, drafter, TreeConfig(topk=2, num_steps=2), static=static)
            with pytest.raises(FloatingPointError, match="non-finite logits"):
                eng.generate(PROMPT, 8)
    assert torch.equal(generate_autoregressive(broken, PROMPT, 0), PROMPT)  # nothing generated: nothing checked


# ---------------------------------------------------------------------------------------------------- GDNConfig
@pytest.mark.parametrize("field, value", [
    ("full_attention_interval", -1), ("full_attention_interval", 1.5), ("num_attention_heads", 0),
    ("tie_word_embeddings", "no"), ("rope_theta", 0), ("rope_theta", -1), ("rope_theta", math.nan),
    ("rms_norm_eps", -1), ("rms_norm_eps", math.nan), ("vocab_size", 1.5), ("num_key_value_heads", 0),
    ("head_dim", 0), ("partial_rotary_factor", 0.0), ("partial_rotary_factor", 1.5), ("partial_rotary_factor", -0.5),
    ("hidden_size", True), ("num_key_value_heads", 3), ("attention_bias", 1), ("gdn_layout", "mamba"),
    ("layer_types", "full_attention"), ("mlp_only_layers", [0.5]), ("initializer_range", math.inf),
])
def test_config_field_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_valid_config_edges_still_accepted():
    assert tiny_config(partial_rotary_factor=1.0, full_attention_interval=0).layer_types == ["linear_attention"] * 2
    assert tiny_config(full_attention_interval=1).layer_types == ["full_attention"] * 2


# ---------------------------------------------------------------------------------------------------- layers / forward
@pytest.mark.parametrize("eps", [-1, 0, math.nan, "1e-6"])
def test_layer_norm_eps(eps):
    with pytest.raises(ValueError, match="norm_eps"):
        Qwen3GatedDeltaNet(32, 2, 2, 8, 8, norm_eps=eps)
    with pytest.raises(ValueError, match="norm_eps"):
        GatedAttention(32, 2, 1, 16, norm_eps=eps)
    with pytest.raises(ValueError, match="norm_eps"):
        RMSNorm(8, eps)
    with pytest.raises(ValueError, match="norm_eps"):
        GatedRMSNorm(8, eps)


@pytest.mark.parametrize("keep", [-1, 1.5, True])
def test_logits_to_keep(target, keep):
    with pytest.raises(ValueError, match="logits_to_keep"):
        target(PROMPT, logits_to_keep=keep)


@pytest.mark.parametrize("shape", [(0, 4), (2, 0), (0, 0)])
def test_empty_forward_dims(target, shape):
    with pytest.raises(ValueError, match="input_ids must hold at least one sequence of at least one token"):
        target(torch.zeros(shape, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- prompts / args
def test_float_prompt_to_session_add_raises_not_truncates(target):
    session = SpeculativeEngine(target, NGramDrafter(), TreeConfig(topk=2, num_steps=2)).session()
    with pytest.raises(ValueError, match="prompt 0 must hold integer token ids"):
        session.add([torch.tensor([1.5, 2.7])], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 must hold integer token ids"):
        session.add([torch.tensor([1, 2]), torch.tensor([1.0, 2.0])], max_new_tokens=4)
    assert not session.sequences  # nothing half-added


@pytest.mark.parametrize("prompts", [[None], [[1, 2], None], [torch.tensor([1, 2]), "ab"], [[1, None]]])
def test_prompt_list_holding_none_or_junk(target, prompts):
    with pytest.raises(ValueError, match=r"prompt \d"):
        generate_autoregressive(target, prompts, 2)
    with pytest.raises(ValueError, match=r"prompt \d"):
        GDNSpeculativeWorker(target_model=target, drafter=NGramDrafter()).generate(prompts, 2)


@pytest.mark.parametrize("kw, name", [(dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
                                      (dict(temperature="0.7"), "temperature"), (dict(temperature=1.0, top_p="0.5"), "top_p"),
                                      (dict(temperature=1.0, top_p=math.nan), "top_p"), (dict(temperature=1.0, top_k=True), "top_k"),
                                      (dict(temperature=1.0, top_k=2.0), "top_k")])
def test_sampling_args(target, kw, name):
    with pytest.raises(ValueError, match=name):
        generate_autoregressive(target, PROMPT, 2, **kw)
    with pytest.raises(ValueError, match=name):
        GDNSpeculativeWorker(target_model=target, drafter=NGramDrafter()).generate(PROMPT, 2, **kw)


def test_max_new_tokens_bool(target):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_autoregressive(target, PROMPT, True)


@pytest.mark.parametrize("bad", ["x", 123, None.__class__, torch.nn.Linear(2, 2)])
def test_targets_that_are_not_models(target, bad):
    with pytest.raises(TypeError, match="target_model must be a gdnspec language model"):
        GDNSpeculativeWorker(target_model=bad, drafter=NGramDrafter())
    with pytest.raises(TypeError, match="target must be a gdnspec language model"):
        SpeculativeEngine(bad, NGramDrafter(), TreeConfig())
    with pytest.raises(TypeError, match="model must be a gdnspec language model"):
        generate_autoregressive(bad, PROMPT, 2)
    with pytest.raises(TypeError, match="target_model must be a gdnspec language model"):
        GDNVerifyWorker(bad)


def test_drafters_that_are_not_drafters(target):
    with pytest.raises(TypeError, match="drafter must be a drafter"):
        GDNSpeculativeWorker(target_model=target, drafter="ngram")
    with pytest.raises(TypeError, match=r"ModelDrafter\(model\)"):
        SpeculativeEngine(target, target, TreeConfig())  # a model where a drafter belongs: says how to wrap it
    with pytest.raises(TypeError, match="draft_model must be a gdnspec language model"):
        GDNSpeculativeWorker(target_model=target, draft_model="x")
    with pytest.raises(TypeError, match="draft_model must be a gdnspec language model"):
        GDNDraftWorker("x")
    with pytest.raises(TypeError, match="draft_model must be a gdnspec language model"):
        ModelDrafter(NGramDrafter())
    with pytest.raises(TypeError, match="config must be a TreeConfig"):
        SpeculativeEngine(target, NGramDrafter(), {"topk": 2})


def test_unknown_session_ids(target):
    session = SpeculativeEngine(target, NGramDrafter(), TreeConfig(topk=2, num_steps=2)).session()
    (sid,) = session.add(PROMPT, max_new_tokens=4)
    for call in (lambda: session.drop([999]), lambda: session.sequence(999), lambda: session.drop([sid, 999])):
        with pytest.raises(KeyError, match="no sequence with id 999 in this session") as e:
            call()
        assert str(e.value).startswith("no sequence")  # a message, not a bare key
    assert sid in session.active  # the failed drop([sid, 999]) dropped nothing
    with pytest.raises(TypeError, match="seq_ids must be a list"):
        session.drop(sid)


# ---------------------------------------------------------------------------------------------------- gdnspec.load args
def test_load_argument_errors():
    with pytest.raises(TypeError, match="path must be a folder path"):
        gdnspec.load(123)
    with pytest.raises(ValueError, match="device must be None or a torch device.*'bogus'"):
        gdnspec.load(device="bogus")
    with pytest.raises(ValueError, match="dtype must be None or a floating-point dtype.*torch.int64"):
        gdnspec.load(dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype must be None or a floating-point dtype.*'int8'"):
        gdnspec.load(dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            gdnspec.load(device="cuda")


def test_load_accepts_dtype_names():
    bundle = gdnspec.load(dtype="float16")
    assert bundle.model.dtype == torch.float16
    assert gdnspec.load(dtype="torch.bfloat16").model.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def native(tmp_path):
    """A gdnspec layout: target/ (with a tokenizer) and draft/ side by side."""
    from tokenizers import Tokenizer, models

    model = tiny_model(seed=1, dtype=torch.float32)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(model.vocab_size)}, unk_token="w0"))
    save_checkpoint(model, tmp_path / "target", tokenizer=tok)
    save_checkpoint(tiny_model(seed=2, dtype=torch.float32), tmp_path / "draft")
    return tmp_path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_target_weights_name_the_file(native):
    truncate(native / "target" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"target/model.safetensors is not a readable safetensors file"):
        gdnspec.load(native)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_draft_says_it_was_the_draft(native, damage):
    weights = native / "draft" / "model.safetensors"
    truncate(weights) if damage == "truncate" else weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"the draft model checkpoint in .*draft could not be loaded: .*draft/model.safetensors"):
        gdnspec.load(native)


@pytest.mark.parametrize("text, match", [("{nope", "is not valid JSON"), ("", "is empty"), ("[1, 2]", "must hold a JSON object"),
                                         ("null", "must hold a JSON object")])
def test_malformed_config_json_names_the_path(native, text, match):
    (native / "target" / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as e:
        gdnspec.load(native)
    assert "target/config.json" in str(e.value)


def test_malformed_draft_config_says_draft(native):
    (native / "draft" / "config.json").write_text(json.dumps({"model_type": "gdnspec", "vocab_size": -3}))
    with pytest.raises(CheckpointError, match=r"draft model checkpoint .*draft/config.json: vocab_size must be >= 1"):
        gdnspec.load(native)


def test_missing_model_type_is_named(native):
    cfg = json.loads((native / "target" / "config.json").read_text())
    cfg.pop("model_type")
    (native / "target" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"target/config.json has no model_type"):
        gdnspec.load(native)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_int_or_bool_weights_name_the_tensor(native, dtype):
    path = native / "target" / "model.safetensors"
    sd = load_file(path)
    sd["layers.0.mlp.up_proj.weight"] = sd["layers.0.mlp.up_proj.weight"].to(dtype)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"non-float dtype .*layers.0.mlp.up_proj.weight"):
        gdnspec.load(native)


def test_garbage_tokenizer_names_the_file(native):
    (native / "target" / "tokenizer.json").write_text("this is not a tokenizer")
    with pytest.raises(CheckpointError, match=r"target/tokenizer.json is not a valid tokenizer.json"):
        gdnspec.load(native)


def test_tokenizer_larger_than_the_vocab(native):
    from tokenizers import Tokenizer, models

    n = tiny_model(seed=1).vocab_size
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(n + 5)}, unk_token="w0")).save(
        str(native / "target" / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=rf"tokenizer has {n + 5} tokens but the model's vocab_size is {n}"):
        gdnspec.load(native)


def test_a_sound_folder_still_loads(native):
    bundle = gdnspec.load(native)
    assert set(bundle.drafters) == {"ngram", "model"} and bundle.tokenizer is not None


# ---------------------------------------------------------------------------------------------------- HF folders
@pytest.fixture
def hf_folder(tmp_path):
    from gdnspec.models.hf import export_fla_checkpoint

    model = tiny_model(seed=4, dtype=torch.float32)
    return export_fla_checkpoint(model, tmp_path / "fla")


def test_hf_truncated_weights_and_bad_configs(hf_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_folder, broken)
    truncate(broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"broken/model.safetensors is not a readable safetensors file"):
        gdnspec.load(broken)
    for text, match in (("[]", "must hold a JSON object"), ("", "is empty"), ("{x", "is not valid JSON")):
        (hf_folder / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=match):
            gdnspec.load(hf_folder)


def test_hf_int_weights_name_the_tensor(hf_folder):
    sd = load_file(hf_folder / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int64)
    save_file(sd, hf_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"non-float dtype .*norm.weight"):
        gdnspec.load(hf_folder)


def test_hf_config_null_field_or_no_model_type_names_the_file(hf_folder):
    from gdnspec.models.hf import load_hf

    cfg = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps(dict(cfg, hidden_size=None)))
    with pytest.raises(CheckpointError, match=r"fla/config.json: "):
        load_hf(hf_folder)
    cfg.pop("model_type")
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"fla/config.json: config.json has no model_type"):
        load_hf(hf_folder)


# ---------------------------------------------------------------------------------------------------- found later
def test_weights_of_the_wrong_shape_name_the_file_and_tensor(native):
    """A weights file of another config: torch's multi-line 'size mismatch' RuntimeError without the file."""
    path = native / "target" / "model.safetensors"
    sd = load_file(path)
    sd["layers.0.mlp.up_proj.weight"] = sd["layers.0.mlp.up_proj.weight"][:5].clone()
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"target/model.safetensors: tensors whose shape does not match "
                                              r"config.json: layers.0.mlp.up_proj.weight \(5, 32\)"):
        gdnspec.load(native)


def test_hf_weights_of_the_wrong_shape_name_the_tensor(hf_folder):
    sd = load_file(hf_folder / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"][:3].clone()
    save_file(sd, hf_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"checkpoint .*fla: mismatched shapes: .*norm.weight: checkpoint \(3,\)"):
        gdnspec.load(hf_folder)


def test_tree_topk_larger_than_the_vocabulary(target):
    """topk beyond the vocabulary failed deep inside the drafter ('selected index k out of range')."""
    too_many = target.vocab_size + 1
    with pytest.raises(ValueError, match=rf"topk \({too_many}, children per tree node\) is larger than the vocabulary"):
        SpeculativeEngine(target, ModelDrafter(noisy_copy(target)), TreeConfig(topk=too_many))
    with pytest.raises(ValueError, match=r"topk .* is larger than the draft model's vocabulary"):
        GDNDraftWorker(noisy_copy(target), topk=too_many)
    worker = GDNSpeculativeWorker(draft_model=noisy_copy(target), target_model=target, topk=target.vocab_size)
    assert worker.generate([torch.tensor([1, 2, 3])], 3)[0].numel() == 6  # topk == vocab still works


def test_generator_that_is_not_a_generator(target):
    """generator='x' failed inside torch.multinomial at the first sampled token."""
    prompt = [torch.tensor([1, 2, 3])]
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator, got str"):
        generate_autoregressive(target, prompt, 3, temperature=1.0, generator="x")
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator, got int"):
        SpeculativeEngine(target, NGramDrafter(), TreeConfig(), temperature=1.0, generator=0)
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator"):
        GDNSpeculativeWorker(target_model=target, drafter=NGramDrafter()).generate(prompt, 3, temperature=1.0,
                                                                                    generator="x")


@pytest.mark.parametrize("kw", [dict(topk=True), dict(num_steps=True), dict(num_draft_tokens=True), dict(topk=2.0)])
def test_tree_config_counts_are_ints_not_bools(kw):
    with pytest.raises(ValueError, match=rf"{next(iter(kw))} must be an int >= "):
        TreeConfig(**kw)


@pytest.fixture
def layout(tmp_path):
    """target/ (hidden 32), draft/ (hidden 48, same vocabulary) and eagle/ (for the target) side by side."""
    from gdnspec.models.eagle import EagleHead, eagle_config_for

    target = tiny_model(seed=1, dtype=torch.float32)
    save_checkpoint(target, tmp_path / "target")
    save_checkpoint(tiny_model(seed=2, dtype=torch.float32, hidden=48), tmp_path / "draft")
    save_checkpoint(EagleHead(eagle_config_for(target.config, intermediate_size=40)), tmp_path / "eagle")
    return tmp_path


def test_a_drafter_folder_loaded_as_the_target(layout):
    """--model .../draft: the sibling EAGLE head (the real target's) made the whole load fail ('EAGLE head hidden
    size 32 != target hidden size 48'); it is left out, with the reason, and the draft model runs on its own."""
    assert set(gdnspec.load(layout).drafters) == {"ngram", "model", "eagle"}
    bundle = gdnspec.load(layout / "draft")
    assert set(bundle.drafters) == {"ngram"} and bundle.model.config.hidden_size == 48
    assert bundle.skipped["eagle"].endswith("does not fit this model: its hidden size (32) differs from the "
                                            "target's (48)")
    with pytest.raises(CheckpointError, match=r"eagle holds an EAGLE head \(a drafter\), not a language model"):
        gdnspec.load(layout / "eagle")


def test_a_child_drafter_that_does_not_fit_names_its_folder(layout):
    shutil.move(str(layout / "eagle"), str(layout / "draft" / "eagle"))
    with pytest.raises(CheckpointError, match=r"the EAGLE head in .*draft/eagle does not fit the target in .*draft: "
                                              r"its hidden size \(32\) differs"):
        gdnspec.load(layout / "draft")
