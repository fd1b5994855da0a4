"""`GDNConfig`: the configuration of a hybrid Gated DeltaNet / gated-attention causal LM (Qwen3-Next style).

Field names follow Hugging Face's Qwen3NextConfig where they exist, so configs map one to one. `layer_types` lists
"linear_attention" (a Gated DeltaNet layer) or "full_attention" per layer; when it is None, every
`full_attention_interval`-th layer is full attention (0 = none). `intermediate_size = 0` means no MLP.

Sparse MoE (Qwen3-Next / Qwen3.5-MoE): with `num_experts > 0`, layer i uses a `SparseMoeBlock` (router over
num_experts experts of width moe_intermediate_size, top num_experts_per_tok, plus a sigmoid-gated shared expert of
width shared_expert_intermediate_size, 0 = none) iff i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step
== 0; other layers keep the dense MLP of width intermediate_size. `rms_norm_offset` picks the decoder/final norms'
form: True = x_hat * (1 + w) (Qwen), False = x_hat * w (flash-linear-attention models).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

LAYER_TYPES = ("linear_attention", "full_attention")
GDN_LAYOUTS = ("qwen3_next", "qwen3_5")
_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "full_attention_interval", "intermediate_size",
               "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
               "linear_conv_kernel_dim", "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
               "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step")
_FLOAT_FIELDS = ("partial_rotary_factor", "rope_theta", "rms_norm_eps", "initializer_range")
_BOOL_FIELDS = ("attention_bias", "tie_word_embeddings", "norm_topk_prob", "rms_norm_offset")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class GDNConfig:
    vocab_size: int = 1000
    hidden_size: int = 128
    num_hidden_layers: int = 2
    layer_types: list[str] | None = None
    full_attention_interval: int = 0
    intermediate_size: int = 256
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 2
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_conv_kernel_dim: int = 4
    gdn_layout: str = "qwen3_next"
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10000.0
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    model_type: str = "gdnspec"
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_offset: bool = True
    draft_vocab_size: int | None = None  # EAGLE heads (EAGLE-3's field): draft over this many target token ids only

    def __post_init__(self):
        self._check_types()
        if self.draft_vocab_size is not None and not (_is_int(self.draft_vocab_size)
                                                      and 1 <= self.draft_vocab_size <= self.vocab_size):
            raise ValueError(f"draft_vocab_size must be None or an int in [1, vocab_size={self.vocab_size}], got "
                             f"{self.draft_vocab_size!r}")
        if self.layer_types is None:
            n = self.full_attention_interval
            self.layer_types = ["full_attention" if n and (i + 1) % n == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]
        if not isinstance(self.layer_types, (list, tuple)):
            raise ValueError(f"layer_types must be None or a list of {LAYER_TYPES}, got {self.layer_types!r}")
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"layer_types entries must be one of {LAYER_TYPES}, got {bad}")
        self._check_ranges()
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not isinstance(self.mlp_only_layers, (list, tuple)) or not all(_is_int(i) for i in self.mlp_only_layers):
            raise ValueError(f"mlp_only_layers must be a list of layer indices, got {self.mlp_only_layers!r}")
        self.mlp_only_layers = [int(i) for i in self.mlp_only_layers]
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ValueError(f"moe_intermediate_size must be >= 1 when num_experts > 0, got {self.moe_intermediate_size}")
            if self.decoder_sparse_step < 1:
                raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")

    def _check_types(self) -> None:
        """Every field has its declared type (ints are not bools or floats, bools are real bools)."""
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (a bool), got {getattr(self, name)!r}")
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if self.gdn_layout not in GDN_LAYOUTS:
            raise ValueError(f"gdn_layout must be one of {GDN_LAYOUTS}, got {self.gdn_layout!r}")

    def _check_ranges(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.full_attention_interval < 0:
            raise ValueError(f"full_attention_interval must be >= 0 (every n-th layer full attention, 0 = none), "
                             f"got {self.full_attention_interval}")
        if self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be >= 0 (0 = no MLP), got {self.intermediate_size}")
        for name in ("num_experts", "shared_expert_intermediate_size", "num_experts_per_tok", "moe_intermediate_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "rms_norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.initializer_range < 0:
            raise ValueError(f"initializer_range must be >= 0, got {self.initializer_range}")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses the sparse MoE block (Hugging Face Qwen3-Next's rule)."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GDNConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GDNConfig fields: {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "GDNConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
