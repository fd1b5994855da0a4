"""Load local Hugging Face checkpoints of GDN models into gdnspec (no transformers import), and export fla ones.

    model, tokenizer, mtp = load_hf("/path/to/Qwen3-Next-80B-A3B-Instruct", dtype=torch.bfloat16, device="cuda")
    is_hf_folder(path)                      # config.json (model_type other than gdnspec) + safetensors weights
    export_fla_checkpoint(model, folder)    # an all-GDN GDNForCausalLM -> flash-linear-attention GatedDeltaNet folder

A folder holds config.json, model.safetensors or shards listed in model.safetensors.index.json, and optionally
tokenizer.json (returned as a `tokenizers.Tokenizer`, else None). Supported `model_type`s:
    qwen3_next                         Qwen3NextForCausalLM: in_proj_qkvz / in_proj_ba (our "qwen3_next" layout),
                                       gated attention, sparse MoE (experts per expert on disk, or fused), dense MLP
                                       where mlp_only_layers / decoder_sparse_step say, (1 + w) RMSNorms.
    qwen3_5_text, qwen3_5_moe_text     Qwen3.5 text models ("qwen3_5" layout: in_proj_qkv / z / b / a).
    qwen3_5, qwen3_5_moe               the text part of the Qwen3.5 VLM (text_config; `model.language_model.*`), with
                                       M-RoPE reduced to plain partial RoPE (exact for text-only positions).
    gated_deltanet                     flash-linear-attention GatedDeltaNetForCausalLM, converted at load time to the
                                       "qwen3_5" layout (q/k/v projections and short convs concatenated, g -> z),
                                       plain-weight RMSNorms (config.rms_norm_offset = False).
Qwen checkpoints' `mtp.*` weights (multi-token prediction: fc(concat(norm(embed), norm(hidden))) -> one
full-attention decoder layer -> norm, sharing the target's embedding and lm_head) come back as an `MTPModule`.
Unknown model types, unsupported options, missing / unexpected / wrongly shaped tensors raise errors naming them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gdnspec.models.config import GDNConfig

QWEN_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
FLA_TYPES = ("gated_deltanet",)
SUPPORTED_MODEL_TYPES = QWEN_TYPES + FLA_TYPES

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that gdnspec cannot load as it is (the message names the tensors / options)."""


def check_shapes(state: dict, own: dict, where) -> None:
    """Raise CheckpointError naming the tensors of `state` whose shape differs from the model's (`own`, its
    state_dict): a weights file that does not belong to its config.json."""
    bad = [f"{k} {tuple(v.shape)} (the config makes {tuple(own[k].shape)})" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{where}: tensors whose shape does not match config.json: {', '.join(bad[:5])}{more}")


# ---------------------------------------------------------------------------------------------------- files
def _read_json(path: Path) -> dict:
    """A JSON object file as a dict; CheckpointError naming the path when unreadable, not JSON or not an object."""
    try:
        text = path.read_text()
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})" if text.strip() else f"{path} is empty") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}: {text[:60]!r}")
    return data


def is_hf_folder(path) -> bool:
    """True for a folder with config.json whose model_type is not "gdnspec" and safetensors weights (supported or
    not: `load_hf` names an unsupported model_type)."""
    p = Path(path)
    cfg = p / "config.json"
    if not p.is_dir() or not cfg.is_file():
        return False
    if not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return False
    try:
        mt = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError):
        return False
    return isinstance(mt, str) and mt != "gdnspec"


class SafetensorsFolder:
    """Lazy name -> tensor access over model.safetensors or the shards of model.safetensors.index.json."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open = safe_open
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map'")
            self.file_of = {k: folder / v for k, v in weight_map.items()}
            missing = sorted({str(f.name) for f in self.file_of.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{index} lists shard files that are missing: {missing}")
        elif single.is_file():
            self.file_of = {k: single for k in self._handle(single).keys()}
        else:
            raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of[name]
        try:
            return self._handle(path).get_tensor(name)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends, without the file's path
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read (truncated or corrupted file?): "
                                  f"{type(e).__name__}: {e}") from None

    def _handle(self, path: Path):
        handles = self.__dict__.setdefault("_handles", {})
        if path not in handles:
            try:
                handles[path] = self._open(str(path), framework="pt").__enter__()
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                                      f"{type(e).__name__}: {e}") from None
        return handles[path]

    def close(self) -> None:
        handles = self.__dict__.get("_handles", {})
        for h in handles.values():
            h.__exit__(None, None, None)
        handles.clear()


# ---------------------------------------------------------------------------------------------------- configs
def _rope(c: dict, where: str) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from rope_parameters / legacy keys; only plain ("default") RoPE."""
    rp = c.get("rope_parameters") or {}
    legacy = c.get("rope_scaling") or {}
    for d in (rp, legacy):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in ("default", None):
            raise CheckpointError(f"{where}: rope_type {kind!r} is not supported (only plain RoPE)")
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    factor = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25))
    return float(theta), float(factor)


def _layer_types(c: dict, n: int) -> list[str]:
    lt = c.get("layer_types")
    if lt is None:
        k = int(c.get("full_attention_interval", 4))
        lt = ["linear_attention" if (i + 1) % k else "full_attention" for i in range(n)]
    return list(lt)


# Fields that both levels of a Qwen3.5 VLM config.json (Qwen3_5Config / Qwen3_5MoeConfig and their text_config) can
# hold, and which level transformers 5 takes for the text model: the text model is built from text_config alone (a
# text field written at the top level is an unused extra attribute), except
#   tie_word_embeddings  the top level's (default False): lm_head belongs to the top-level ForConditionalGeneration
#                        model, and PreTrainedModel ties by its own config; text_config's value is ignored.
#   dtype / torch_dtype  the top level's (from_pretrained(dtype="auto") reads config.dtype, else the weights' dtype).
#   bos / eos / pad ids  generation_config.json, else the top level's, else text_config's (see hf_generation_info).
VLM_TOP_LEVEL_DEFAULTS = {"tie_word_embeddings": False}


def _vlm_top_level(raw: dict) -> dict:
    """The text-model fields that transformers takes from the top level of a VLM config.json (with its defaults)."""
    return {k: raw.get(k, default) for k, default in VLM_TOP_LEVEL_DEFAULTS.items()}


def _qwen_config(raw: dict) -> tuple[GDNConfig, str]:
    """GDNConfig and the text model_type for a Qwen3-Next / Qwen3.5 config.json."""
    mt = raw["model_type"]
    c = raw
    if mt in ("qwen3_5", "qwen3_5_moe"):
        if not isinstance(raw.get("text_config"), dict):
            raise CheckpointError(f"config.json of model_type {mt!r} has no text_config")
        c = dict(raw["text_config"], **_vlm_top_level(raw))
        c.setdefault("model_type", mt + "_text")
        mt = mt + "_text"
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"{mt}: hidden_act {act!r} is not supported (only silu)")
    theta, factor = _rope(c, mt)
    n = int(c.get("num_hidden_layers", 48))
    is_next = mt == "qwen3_next"
    moe_text = mt == "qwen3_5_moe_text"
    kw = dict(
        vocab_size=int(c.get("vocab_size", 151936 if is_next else 248320)),
        hidden_size=int(c.get("hidden_size", 2048)),
        num_hidden_layers=n,
        layer_types=_layer_types(c, n),
        intermediate_size=0 if moe_text else int(c.get("intermediate_size", 5632)),
        linear_num_key_heads=int(c.get("linear_num_key_heads", 16)),
        linear_num_value_heads=int(c.get("linear_num_value_heads", 32)),
        linear_key_head_dim=int(c.get("linear_key_head_dim", 128)),
        linear_value_head_dim=int(c.get("linear_value_head_dim", 128)),
        linear_conv_kernel_dim=int(c.get("linear_conv_kernel_dim", 4)),
        gdn_layout="qwen3_next" if is_next else "qwen3_5",
        num_attention_heads=int(c.get("num_attention_heads", 16)),
        num_key_value_heads=int(c.get("num_key_value_heads", 2)),
        head_dim=int(c.get("head_dim") or 256),
        partial_rotary_factor=factor,
        rope_theta=theta,
        attention_bias=bool(c.get("attention_bias", False)),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        initializer_range=float(c.get("initializer_range", 0.02)),
        model_type=mt,
    )
    if is_next or moe_text:
        kw.update(
            num_experts=int(c.get("num_experts", 512 if is_next else 256)),
            num_experts_per_tok=int(c.get("num_experts_per_tok", 10 if is_next else 8)),
            moe_intermediate_size=int(c.get("moe_intermediate_size", 512)),
            shared_expert_intermediate_size=int(c.get("shared_expert_intermediate_size", 512)),
            norm_topk_prob=bool(c.get("norm_topk_prob", True)) if is_next else True,
            decoder_sparse_step=int(c.get("decoder_sparse_step", 1)) if is_next else 1,
            mlp_only_layers=list(c.get("mlp_only_layers") or []) if is_next else [],
        )
    try:
        return GDNConfig(**kw), mt
    except ValueError as e:
        raise CheckpointError(f"{mt}: {e}") from None


def _fla_config(c: dict) -> GDNConfig:
    """GDNConfig for a flash-linear-attention gated_deltanet config.json; unsupported options raise, named."""
    unsupported = []
    if c.get("use_gate", True) is not True:
        unsupported.append("use_gate=False (output RMSNorm without gate)")
    if c.get("use_short_conv", True) is not True:
        unsupported.append("use_short_conv=False")
    if c.get("allow_neg_eigval", False):
        unsupported.append("allow_neg_eigval=True (beta in (0, 2))")
    if c.get("attn") is not None:
        unsupported.append(f"attn={c['attn']!r} (hybrid softmax-attention layers)")
    if c.get("attnres_block_size") is not None:
        unsupported.append(f"attnres_block_size={c['attnres_block_size']!r}")
    if c.get("output_gate_activation", "swish") not in ("swish", "silu"):
        unsupported.append(f"output_gate_activation={c['output_gate_activation']!r}")
    if c.get("hidden_act", "swish") not in ("swish", "silu"):
        unsupported.append(f"hidden_act={c['hidden_act']!r}")
    if unsupported:
        raise CheckpointError("gated_deltanet checkpoint uses options gdnspec does not support: " + "; ".join(unsupported))
    H = int(c.get("hidden_size", 2048))
    K = int(c.get("head_dim", 256))
    nk = int(c.get("num_heads", 6))
    nv = int(c.get("num_v_heads") or nk)
    V = int(K * float(c.get("expand_v", 2.0)))
    inter = c.get("intermediate_size")
    if inter is None:
        ratio = c.get("hidden_ratio") or 4
        inter = 256 * ((int(H * ratio * 2 / 3) + 255) // 256)
    n = int(c.get("num_hidden_layers", 21))
    try:
        return GDNConfig(
            vocab_size=int(c.get("vocab_size", 32000)), hidden_size=H, num_hidden_layers=n,
            layer_types=["linear_attention"] * n, intermediate_size=int(inter),
            linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=K, linear_value_head_dim=V,
            linear_conv_kernel_dim=int(c.get("conv_size", 4)), gdn_layout="qwen3_5",
            rms_norm_eps=float(c.get("norm_eps", 1e-6)), tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            initializer_range=float(c.get("initializer_range", 0.02)), model_type="gated_deltanet", rms_norm_offset=False)
    except ValueError as e:
        raise CheckpointError(f"gated_deltanet: {e}") from None


def config_from_hf(raw: dict) -> GDNConfig:
    """GDNConfig for a Hugging Face config.json dict (raises CheckpointError for unsupported types / options)."""
    mt = raw.get("model_type")
    if mt is None:
        raise CheckpointError(f"config.json has no model_type (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if mt in QWEN_TYPES:
        return _qwen_config(raw)[0]
    if mt in FLA_TYPES:
        return _fla_config(raw)
    raise CheckpointError(f"unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


# ---------------------------------------------------------------------------------------------------- tensor mapping
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _collect(names: dict[str, str], src: SafetensorsFolder, expected: dict[str, torch.Size], where: str,
             convert=None) -> dict[str, torch.Tensor]:
    """Build our state dict from `names` (our name -> checkpoint name), fusing per-expert tensors.

    Checks every expected tensor is present with the expected shape; raises naming missing / unexpected / mismatched.
    `convert(our_name, checkpoint_names) -> tensor or None` handles model-specific fusions first.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected, missing, mismatched = [], [], []
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for ours, theirs in names.items():
        m = _EXPERT_RE.match(ours)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = theirs
        elif ours in expected:
            out[ours] = src.get(theirs)
        else:
            unexpected.append(theirs)
    for base, per in experts.items():
        gu_name, dn_name = base + ".gate_up_proj", base + ".down_proj"
        if gu_name not in expected:
            unexpected += [n for d in per.values() for n in d.values()]
            continue
        E = expected[gu_name][0]
        bad = sorted(set(per) - set(range(E)))
        if bad:
            unexpected += [n for e in bad for n in per[e].values()]
        lost = [f"{base}.{e}.{p}.weight" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")
                if p not in per.get(e, {})]
        if lost:
            missing += lost
            continue
        if gu_name in out or dn_name in out:
            raise CheckpointError(f"{where}: both fused and per-expert tensors given for {base}")
        gu, dn = [], []
        for e in range(E):
            g, u, d = (src.get(per[e][p]) for p in ("gate_proj", "up_proj", "down_proj"))
            if g.shape != u.shape:
                mismatched.append(f"{per[e]['up_proj']}: {tuple(u.shape)} vs gate_proj {tuple(g.shape)}")
                continue
            gu.append(torch.cat([g, u], 0))
            dn.append(d)
        if not mismatched:
            out[gu_name], out[dn_name] = torch.stack(gu), torch.stack(dn)
    for name, shape in expected.items():
        if name not in out:
            missing.append(name)
        elif tuple(out[name].shape) != tuple(shape):
            mismatched.append(f"{name}: checkpoint {tuple(out[name].shape)}, expected {tuple(shape)}")
    missing = sorted(set(missing) - set(out))
    msgs = []
    if missing:
        msgs.append(f"missing tensors: {missing}")
    if unexpected:
        msgs.append(f"unexpected tensors: {sorted(unexpected)}")
    if mismatched:
        msgs.append(f"mismatched shapes: {mismatched}")
    if msgs:
        raise CheckpointError(f"{where}: " + "; ".join(msgs))
    return out


def _qwen_names(keys: list[str]) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Split checkpoint keys into (model names, mtp names, ignored) as our-name -> checkpoint-name maps."""
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in keys) else "model."
    model, mtp, ignored = {}, {}, []
    for k in keys:
        if k.startswith("mtp."):
            mtp[k[len("mtp."):]] = k
        elif k.startswith(("model.visual.", "visual.")) or k.endswith("rotary_emb.inv_freq"):
            ignored.append(k)
        elif k == "lm_head.weight":
            model["lm_head.weight"] = k
        elif k.startswith(prefix):
            model[k[len(prefix):]] = k
        else:
            model["<unmapped>." + k] = k
    return model, mtp, ignored


_FLA_FUSED = {"in_proj_qkv.weight": ("q_proj", "k_proj", "v_proj"), "conv1d.weight": ("q_conv1d", "k_conv1d", "v_conv1d")}
_FLA_RENAME = {"g_proj": "in_proj_z", "a_proj": "in_proj_a", "b_proj": "in_proj_b", "o_norm": "norm", "o_proj": "out_proj"}


def _fla_state(src, expected: dict[str, torch.Size],
               where: str = "gated_deltanet checkpoint") -> dict[str, torch.Tensor]:
    """Rename the (non-fused) fla tensors onto our names and collect them (raises naming bad tensors)."""
    names = {}
    for k in src.keys():
        m = re.match(r"^model\.layers\.(\d+)\.(attn_norm|mlp_norm|attn|mlp)\.(.*)$", k)
        if k == "model.embeddings.weight":
            names["embed_tokens.weight"] = k
        elif k == "model.norm.weight":
            names["norm.weight"] = k
        elif k == "lm_head.weight":
            names["lm_head.weight"] = k
        elif m:
            i, part, rest = m.groups()
            if part == "attn_norm":
                names[f"layers.{i}.input_layernorm.{rest}"] = k
            elif part == "mlp_norm":
                names[f"layers.{i}.post_attention_layernorm.{rest}"] = k
            elif part == "mlp":
                names[f"layers.{i}.mlp.{rest}"] = k
            else:
                mod, _, leaf = rest.partition(".")
                names[f"layers.{i}.linear_attn.{_FLA_RENAME.get(mod, mod)}" + (f".{leaf}" if leaf else "")] = k
        else:
            names["<unmapped>." + k] = k
    return _collect(names, src, expected, where)


def _load_fla(src, expected, where: str = "gated_deltanet checkpoint"):
    """fla state with fused q|k|v projections and short convs; missing parts are named."""
    fused = {}
    missing = []
    for k in src.keys():
        m = re.match(r"^model\.layers\.(\d+)\.attn\.(q_proj|k_proj|v_proj|q_conv1d|k_conv1d|v_conv1d)\.(weight|bias)$", k)
        if m:
            i, mod, leaf = m.groups()
            if leaf == "bias":
                raise CheckpointError(f"gated_deltanet: biases on {mod} are not supported ({k}; conv_bias / qkv bias)")
            target = "in_proj_qkv.weight" if mod.endswith("proj") else "conv1d.weight"
            fused.setdefault(f"layers.{i}.linear_attn.{target}", {})[mod] = k
    rest_keys = [k for k in src.keys() if not any(k in d.values() for d in fused.values())]
    out = {}
    for ours, parts in fused.items():
        need = _FLA_FUSED[ours.split("linear_attn.")[1]]
        lost = [p for p in need if p not in parts]
        if lost:
            layer = ours.split(".linear_attn")[0].replace("layers.", "model.layers.")
            missing += [f"{layer}.attn.{p}.weight" for p in lost]
            continue
        out[ours] = torch.cat([src.get(parts[p]) for p in need], 0)
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {sorted(missing)}")
    sub = _SubFolder(src, rest_keys)
    expected_rest = {k: v for k, v in expected.items() if k not in out}
    out.update(_fla_state(sub, expected_rest, where))
    for name, t in list(out.items()):
        if name in expected and tuple(t.shape) != tuple(expected[name]):
            raise CheckpointError(f"{where}: mismatched shapes: {name}: checkpoint {tuple(t.shape)}, "
                                  f"expected {tuple(expected[name])}")
    return out


class _SubFolder:
    def __init__(self, src, keys):
        self.src, self._keys = src, list(keys)

    def keys(self):
        return self._keys

    def get(self, name):
        return self.src.get(name)


# ---------------------------------------------------------------------------------------------------- building
def _materialize(module: torch.nn.Module, state: dict[str, torch.Tensor], dtype, device, where: str, *,
                 rope_theta: float) -> None:
    """Load `state` into a meta-device module (assign), cast/move, and check nothing stayed on meta."""
    own = module.state_dict()
    bad = [f"{k} ({v.dtype})" for k, v in state.items()
           if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{where}: tensors stored with a non-float dtype where float weights belong: {bad}")
    check_shapes(state, own, where)
    cast = {}
    for k, v in state.items():  # tensors shared in `state` (tied weights) stay shared
        cast[id(v)] = cast.get(id(v)) if id(v) in cast else v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    state = {k: cast[id(v)] for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing tensors {sorted(missing)}, unexpected tensors {sorted(unexpected)}")
    from gdnspec.layers.attention import GatedAttention, RotaryEmbedding

    for m in module.modules():
        if isinstance(m, GatedAttention):
            old = m.rotary
            m.rotary = RotaryEmbedding(m.head_dim, partial_rotary_factor=old.rotary_dim / m.head_dim, theta=rope_theta,
                                       device=device)
            if m.rotary.rotary_dim != old.rotary_dim:
                raise RuntimeError("internal error: rotary dim changed while rebuilding")
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: tensors not loaded: {left}")


def _differing_lm_head(src: SafetensorsFolder, embed: str) -> bool:
    """Whether the checkpoint stores lm_head.weight next to the embedding `embed` with different values (then
    transformers does not tie them although the config says so, and uses both as stored)."""
    if "lm_head.weight" not in src or embed not in src:
        return False
    head, emb = src.get("lm_head.weight"), src.get(embed)
    return head.shape != emb.shape or not torch.equal(head, emb)


def _default_dtype(raw: dict, src: SafetensorsFolder, probe: str) -> torch.dtype:
    """The top level's dtype / torch_dtype (as transformers: a VLM's text_config dtype is not read), else the
    stored dtype of tensor `probe`."""
    for key in ("dtype", "torch_dtype"):
        if isinstance(raw.get(key), str) and raw[key] in _DTYPES:
            return _DTYPES[raw[key]]
    return src.get(probe).dtype if probe in src else torch.float32


def load_hf(path, *, dtype: torch.dtype | None = None, device=None):
    """Load a local Hugging Face folder -> (GDNForCausalLM, tokenizers.Tokenizer or None, MTPModule or None).

    dtype: None = the checkpoint's (config "dtype"/"torch_dtype", else the embedding's stored dtype).
    device: where the weights go (default CPU). The model is in eval mode with gradients off.
    """
    from gdnspec.models.lm import GDNForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such checkpoint folder: {folder}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json")
    raw = _read_json(folder / "config.json")
    try:
        config = config_from_hf(raw)
    except (TypeError, ValueError) as e:  # CheckpointError included: say which file
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    device = torch.device(device) if device is not None else torch.device("cpu")
    src = SafetensorsFolder(folder)
    try:
        is_fla = raw["model_type"] in FLA_TYPES
        probe = "model.embeddings.weight" if is_fla else next(
            (k for k in ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight") if k in src), "")
        dtype = dtype or _default_dtype(raw, src, probe)
        with torch.device("meta"):
            model = GDNForCausalLM(config, dtype=dtype)
        if config.tie_word_embeddings and _differing_lm_head(src, probe):
            config.tie_word_embeddings = False  # as transformers: both stored and different -> not tied
            with torch.device("meta"):
                model = GDNForCausalLM(config, dtype=dtype)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        tied = config.tie_word_embeddings
        if tied:
            expected.pop("lm_head.weight", None)
        where = f"{raw['model_type']} checkpoint {folder}"
        mtp_names: dict[str, str] = {}
        if is_fla:
            keys = [k for k in src.keys() if not (tied and k == "lm_head.weight")]
            state = _load_fla(_SubFolder(src, keys), expected, where)
        else:
            names, mtp_names, _ = _qwen_names(src.keys())
            if tied:
                names.pop("lm_head.weight", None)
            state = _collect(names, src, expected, where)
        if tied:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        _materialize(model, state, dtype, device, where, rope_theta=config.rope_theta)
        if tied:
            model.lm_head.weight = model.embed_tokens.weight
        model.eval().requires_grad_(False)
        mtp = None
        if mtp_names:
            mtp = _load_mtp(config, raw, src, mtp_names, dtype, device, where)
    finally:
        src.close()
    tok = None
    if (folder / "tokenizer.json").is_file():
        from gdnspec.models.checkpoint import load_tokenizer

        tok = load_tokenizer(folder / "tokenizer.json", vocab_size=config.vocab_size)
    return model, tok, mtp


def _load_mtp(config: GDNConfig, raw: dict, src, names: dict[str, str], dtype, device, where: str):
    from gdnspec.models.mtp import MTPModule

    layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"^layers\.(\d+)\.", n))})
    if layers != [0]:
        raise CheckpointError(f"{where}: MTP with layers {layers} is not supported (exactly one MTP layer, mtp.layers.0)")
    moe = any(n.startswith("layers.0.mlp.gate.") or ".mlp.experts." in n for n in names)
    with torch.device("meta"):
        mtp = MTPModule(config, moe=moe, dtype=dtype)
    expected = {k: v.shape for k, v in mtp.state_dict().items()}
    state = _collect(names, src, expected, where + " (mtp.*)")
    _materialize(mtp, state, dtype, device, where + " (mtp.*)", rope_theta=config.rope_theta)
    return mtp.eval().requires_grad_(False)


def hf_generation_info(path) -> dict:
    """bos/eos/pad token ids from generation_config.json or config.json (eos may be a list), for the CLI / bundle."""
    folder = Path(path)
    info: dict = {}
    for name in ("config.json", "generation_config.json"):
        f = folder / name
        if f.is_file():
            d = _read_json(f)
            d = {**(d.get("text_config") or {}), **d} if name == "config.json" else d
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if d.get(key) is not None:
                    info[key] = d[key]
    return info


# ---------------------------------------------------------------------------------------------------- export
def export_fla_checkpoint(model, folder) -> Path:
    """Write an all-GDN, dense-MLP GDNForCausalLM as a flash-linear-attention GatedDeltaNetForCausalLM folder.

    Qwen-style (1 + w) norms are written as plain weights (1 + w); the "qwen3_next" layout is de-interleaved.
    """
    from safetensors.torch import save_file

    cfg = model.config
    bad = [t for t in cfg.layer_types if t != "linear_attention"]
    if bad:
        raise ValueError("export_fla_checkpoint: the model has full_attention layers; fla GatedDeltaNet models hold GDN layers only")
    if cfg.num_experts > 0 or cfg.intermediate_size <= 0:
        raise ValueError("export_fla_checkpoint: fla GatedDeltaNet models need a dense MLP in every layer "
                         f"(num_experts={cfg.num_experts}, intermediate_size={cfg.intermediate_size})")
    K, V = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    expand_v = V / K
    if int(K * expand_v) != V:
        raise ValueError(f"export_fla_checkpoint: head_v_dim {V} is not representable as int(head_dim {K} * expand_v)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def plain(w: torch.Tensor) -> torch.Tensor:
        return (1.0 + w.float()).to(w.dtype) if cfg.rms_norm_offset else w

    sd: dict[str, torch.Tensor] = {"model.embeddings.weight": model.embed_tokens.weight,
                                   "model.norm.weight": plain(model.norm.weight)}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        la = layer.linear_attn
        # reuse the layer's own de-interleaving on the identity: rows of the projections in [q|k|v], z, b, a order
        w0 = la.out_proj.weight
        eye = torch.eye(la.hidden_size, dtype=w0.dtype, device=w0.device)[:, None, :]  # (H, 1, H)
        with torch.no_grad():
            mixed, z, b, a = la._project(eye)
        W_qkv = mixed[:, 0].T  # (conv_dim, H)
        q, k, v = W_qkv.split([la.key_dim, la.key_dim, la.value_dim], 0)
        conv = la.conv1d.weight  # (conv_dim, 1, W)
        cq, ck, cv = conv.split([la.key_dim, la.key_dim, la.value_dim], 0)
        sd.update({
            p + "attn_norm.weight": plain(layer.input_layernorm.weight),
            p + "attn.q_proj.weight": q, p + "attn.k_proj.weight": k, p + "attn.v_proj.weight": v,
            p + "attn.g_proj.weight": z[:, 0].reshape(la.hidden_size, -1).T,
            p + "attn.b_proj.weight": b[:, 0].T, p + "attn.a_proj.weight": a[:, 0].T,
            p + "attn.q_conv1d.weight": cq, p + "attn.k_conv1d.weight": ck, p + "attn.v_conv1d.weight": cv,
            p + "attn.A_log": la.A_log, p + "attn.dt_bias": la.dt_bias,
            p + "attn.o_norm.weight": la.norm.weight, p + "attn.o_proj.weight": la.out_proj.weight,
            p + "mlp_norm.weight": plain(layer.post_attention_layernorm.weight),
            p + "mlp.gate_proj.weight": layer.mlp.gate_proj.weight, p + "mlp.up_proj.weight": layer.mlp.up_proj.weight,
            p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
        })
    save_file({k: t.detach().contiguous().cpu() for k, t in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    dt = {v: k for k, v in _DTYPES.items()}[model.dtype]
    config = {
        "architectures": ["GatedDeltaNetForCausalLM"], "model_type": "gated_deltanet", "attn_mode": "chunk",
        "hidden_size": cfg.hidden_size, "expand_v": expand_v, "use_gate": True, "use_short_conv": True,
        "allow_neg_eigval": False, "conv_size": cfg.linear_conv_kernel_dim, "head_dim": K,
        "num_heads": cfg.linear_num_key_heads, "num_v_heads": cfg.linear_num_value_heads,
        "max_position_embeddings": 2048, "hidden_ratio": 4, "intermediate_size": cfg.intermediate_size,
        "hidden_act": "swish", "num_hidden_layers": cfg.num_hidden_layers, "norm_eps": cfg.rms_norm_eps, "attn": None,
        "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range, "fuse_norm": True,
        "fuse_swiglu": True, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": False,
        "vocab_size": cfg.vocab_size, "attnres_block_size": None, "output_gate_activation": "swish", "dtype": dt,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
