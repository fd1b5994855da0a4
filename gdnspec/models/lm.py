"""`GDNForCausalLM`: a hybrid Gated DeltaNet / gated-attention causal LM (Qwen3-Next style, dense SwiGLU MLP).

    embed -> [RMSNorm -> mixer (GDN or attention) -> +residual -> RMSNorm -> MLP -> +residual] x L -> RMSNorm -> lm_head

    out = model(input_ids, state=None)       # prefill or multi-token causal step; out.logits (B, T, vocab),
                                              # out.hidden_states (B, T, hidden) BEFORE the final norm, out.state
    tree = model.forward_tree(ids, state=state, layout=layout)   # verify a draft tree; reads state only
    model.commit_tree(state, tree, path=path, counts=counts)    # move state to the end of the accepted path

The given state is advanced in place by `forward` (a new one is made when None). Norms use (1 + weight) (plain
weight when config.rms_norm_offset is False). Layers marked by the config use the sparse MoE block (models/moe.py).
"""
from __future__ import annotations

import torch
from torch import nn

from gdnspec.cache import GDNLayerState, KVCache, ModelState
from gdnspec.layers import GatedAttention, Qwen3GatedDeltaNet, RMSNorm, SwiGLUMLP, TokenLayout
from gdnspec.layers.linear import VocabProjection
from gdnspec.ops.fused import normed as _normed
from gdnspec.models import cpu_compiled as _cpu_compiled
from gdnspec.models import cpu_fast as _cpu_fast
from gdnspec.models.config import GDNConfig
from gdnspec.models.moe import SparseMoeBlock
from gdnspec.models.outputs import CausalLMOutput, TreeVerifyOutput


def add_norm(norm: RMSNorm, y, resid: torch.Tensor | None):
    """(`norm(resid + y)`, the new residual stream `resid + y`) (resid None: y is the stream), ops/fused/normed.add_norm:
    y an output projection not run yet (ResidualProjection) runs here with the residual add in its epilogue and the
    norm comes back as a NormedInput, folded into the next GEMV (`linear_in`); otherwise one add_rms_norm kernel and a
    tensor (y may be a tensor or split-K partial sums, see ops/fused/elementwise.add_rms_norm)."""
    return _normed.add_norm(y, resid, weight=norm.weight, eps=norm.eps, offset=norm.offset)


class DecoderLayer(nn.Module):
    """One pre-norm block. The MLP is the sparse MoE block when `moe` is True (None: config.is_moe_layer(layer_idx),
    dense when layer_idx is None too), else the dense SwiGLU MLP (none when intermediate_size is 0)."""

    def __init__(self, config: GDNConfig, layer_type: str, *, layer_idx: int | None = None, moe: bool | None = None,
                 dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.layer_type = layer_type
        if moe is None:
            moe = layer_idx is not None and config.is_moe_layer(layer_idx)
        offset = config.rms_norm_offset
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=offset, **kw)
        if layer_type == "linear_attention":
            self.linear_attn = Qwen3GatedDeltaNet(
                config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads,
                config.linear_key_head_dim, config.linear_value_head_dim, conv_kernel_size=config.linear_conv_kernel_dim,
                layout=config.gdn_layout, norm_eps=config.rms_norm_eps, **kw)
        else:
            self.self_attn = GatedAttention(
                config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                partial_rotary_factor=config.partial_rotary_factor, rope_theta=config.rope_theta,
                norm_eps=config.rms_norm_eps, attention_bias=config.attention_bias, **kw)
        if moe:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=offset, **kw)
            self.mlp = SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                                      config.moe_intermediate_size,
                                      shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                                      norm_topk_prob=config.norm_topk_prob, **kw)
        elif config.intermediate_size > 0:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=offset, **kw)
            self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, **kw)
        else:
            self.mlp = None

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.mlp is None else h + self.mlp(self.post_attention_layernorm(h))

    def forward_state(self, h, state, layout: TokenLayout, mode: str, reserve_kv: bool = True, backend: str = "torch"):
        x = self.input_layernorm(h)
        if self.layer_type == "linear_attention":
            y, _ = self.linear_attn.forward_state(x, state, mode=mode, backend=backend)
        else:
            y = self.self_attn.forward_state(x, state, layout, reserve=reserve_kv)
        return self._mlp(h + y)

    def forward_train(self, h: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """h (B, T, hidden) from an empty state, differentiable (training and EAGLE distillation); same math as
        forward_state. layout: the causal chain (made when None) for attention layers."""
        x = self.input_layernorm(h)
        if self.layer_type == "linear_attention":
            y = self.linear_attn.forward_train(x)
        else:
            B, T, _ = h.shape
            layout = layout or TokenLayout.chain(B, T, device=h.device)
            y, _ = self.self_attn.forward_layout(x, self.self_attn.new_state(B, dtype=x.dtype, device=x.device), layout)
        return self._mlp(h + y)

    # ---------------------------------------------------------------- fused steps (issue 9): the residual stream is
    # carried beside the layer output so that each "h + y; norm(h)" folds into the GEMVs around it (ops/fused/normed.py:
    # the output projection adds the residual, the next input projection normalises), or is one add_rms_norm kernel.
    # Layer outputs y are ResidualProjections, tensors or split-K partial sums; normed inputs x NormedInputs or tensors
    def _mlp_fused(self, y, resid: torch.Tensor):
        if self.mlp is None:
            return y, resid
        x, resid = add_norm(self.post_attention_layernorm, y, resid)
        m = self.mlp.forward_fused(x) if isinstance(self.mlp, SwiGLUMLP) else self.mlp(_normed.materialize(x))
        return m, resid

    def decode_fused(self, y, resid: torch.Tensor | None, state, *, reserve_kv: bool):
        """One token per row: y the previous layer's output (B, 1, hidden) (the embedding when resid is None; else
        possibly a ResidualProjection or split-K partial sums, see above), resid the residual stream before it.
        Returns (this layer's output in the same forms, residual stream (B, 1, hidden)) for the next add_norm."""
        x, resid = add_norm(self.input_layernorm, y, resid)
        if self.layer_type == "linear_attention":
            y = self.linear_attn.decode_fused(x, state)
        else:
            y = self.self_attn.forward_fused(x, state, None, write_lengths=True, reserve=reserve_kv)[0]
        return self._mlp_fused(y, resid)

    def tree_fused(self, y: torch.Tensor, resid: torch.Tensor | None, state, layout: TokenLayout, *, backend: str,
                   static: bool, window_index: torch.Tensor | None = None, cache_only: bool = False):
        """forward_tree on the residual stream: (output, residual stream, layer cache for commit_tree). cache_only:
        only the cache is wanted (the last layer of a catch-up): no output projection of a GDN mixer, no MLP, and
        None for the output and the residual stream."""
        x, resid = add_norm(self.input_layernorm, y, resid)
        if self.layer_type == "linear_attention":
            fits = state.recurrent.dtype != torch.float64 and x.shape[1] <= 64 and window_index is not None
            if fits:
                y, cache = self.linear_attn.forward_tree_fused(x, state, layout, window_index=window_index,
                                                               project_out=not cache_only)
            else:
                y, cache = self.linear_attn.forward_tree(_normed.materialize(x), state, layout, backend=backend)
        else:
            y, cache = self.self_attn.forward_fused(x, state, layout, write_lengths=False, reserve=not static)
        if cache_only:
            return None, None, cache
        y, resid = self._mlp_fused(y, resid)
        return y, resid, cache

    def forward_tree(self, h, state, layout: TokenLayout, backend: str = "torch", static: bool = False):
        x = self.input_layernorm(h)
        if self.layer_type == "linear_attention":
            y, cache = self.linear_attn.forward_tree(x, state, layout, backend=backend)
        else:
            y, cache = self.self_attn.forward_layout(x, state, layout, static=static)
        return self._mlp(h + y), cache


# mode="auto" of a MODEL forward on the CPU takes the chunked GDN form from this many tokens per call (the layer API
# keeps the seed's rule, T > 128). Measured by benchmarks/bench_cpu_prefill_modes.py on the 2-core AMD EPYC
# (results/cpu_prefill_modes.json; default target, float32, 1 / 2 threads): token loop / chunk = 0.93 / 0.90 at
# T = 8, 1.07 / 1.03 at 16, 1.27 / 1.21 at 32, 1.59 / 1.85 at 128 (draft model: 1.08 / 1.49 at 32). Prompts,
# draft-model catch-ups and verifies of chains.
CPU_CHUNK_MIN_TOKENS = 32


class GDNForCausalLM(nn.Module):
    def __init__(self, config: GDNConfig, *, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList([DecoderLayer(config, t, layer_idx=i, **kw) for i, t in enumerate(config.layer_types)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=config.rms_norm_offset, **kw)
        self.lm_head = VocabProjection(config.hidden_size, config.vocab_size, bias=False, **kw)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # GDN kernels: "auto" = the Triton kernels on CUDA tensors (fused decode step, tree verify, commit), torch
        # elsewhere; "torch" or "triton" force one (gdnspec.layers.gated_deltanet.BACKENDS).
        self.gdn_backend = "auto"
        # fused decode / verify steps, used when no gradient is needed: the Triton kernels (gdnspec/ops/fused) when the
        # GDN backend is Triton; on the CPU (backend "torch", float32/float64) the lean torch path of
        # models/cpu_fast.py (decode step, tree verify). False keeps the module-by-module path everywhere (the
        # reference the fused steps are tested against)
        self.fused_steps = True
        # prompts longer than this are prefilled in chunks of this many tokens (bounded memory; same result up to
        # float rounding: GDN state, conv window and KV cache carry across chunks)
        self.prefill_chunk_size = 8192

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """embed_tokens(input_ids); on CUDA without autograd and for more than one token as a plain gather
        (weight[ids], the same values): F.embedding's index_select kernel took 7.5 us for 16 rows of the 1.7B
        config on an H200 against 1.5 us (one token: 2.0 against 2.9 us, so one token keeps F.embedding)."""
        w = self.embed_tokens.weight
        if w.is_cuda and input_ids.numel() > 1 and not (torch.is_grad_enabled() and w.requires_grad):
            return w[input_ids]
        return self.embed_tokens(input_ids)

    def _backend(self, tensor: torch.Tensor) -> str:
        if self.gdn_backend == "auto":
            from gdnspec.ops.gated_delta_rule.triton_tree import HAS_TRITON

            return "triton" if tensor.is_cuda and HAS_TRITON else "torch"
        return self.gdn_backend

    def fuse_projections_(self) -> None:
        """Fuse every layer's projection weights now (layers/fusion.py; views, no extra memory). The fused steps do it
        lazily at their first call; runtime's static steps call this before capturing a CUDA graph."""
        for layer in self.layers:
            if layer.layer_type == "linear_attention":
                layer.linear_attn.fused_in_proj()
            else:
                layer.self_attn.fused_qkv()
            if isinstance(layer.mlp, SwiGLUMLP):
                layer.mlp.fused_gate_up()

    def _use_fused(self, backend: str, h: torch.Tensor) -> bool:
        """The fused decode / verify steps run with the Triton backend, float32 or bf16/fp16 activations (GDN states
        float32, or 16-bit with `mamba_ssm_cache_dtype`) and no autograd."""
        if not self.fused_steps or backend != "triton" or h.dtype == torch.float64:
            return False
        return not (torch.is_grad_enabled() and self.embed_tokens.weight.requires_grad)

    def _use_cpu_fast(self, state: ModelState) -> bool:
        """The CPU fast path (models/cpu_fast.py) runs this step: fused_steps on, CPU, GDN backend "torch", float32 or
        float64 weights and states of that dtype, no autograd (GDNSPEC_CPU_FAST=0 turns it off)."""
        w = self.embed_tokens.weight
        return _cpu_fast.applies(self, w) and _cpu_fast.states_fit(self, state, w.dtype)

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()

    # ------------------------------------------------------------------ properties and state
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # mamba_ssm_cache_dtype's values -> GatedDeltaNet.ssm_state_dtype (None: the default float32 / float64)
    _SSM_STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    MAMBA_SSM_CACHE_DTYPES = tuple(_SSM_STATE_DTYPES)

    @property
    def mamba_ssm_cache_dtype(self) -> str:
        """Storage dtype of the GDN layers' recurrent states (vLLM's --mamba-ssm-cache-dtype): "float32" (default;
        float64 models keep float64) or "bfloat16" / "float16", which halve the state's memory and the bytes a decode
        or verify step moves for it (at batch 32 on the 1.7B config of bench_e2e the state is 1.2 GB, read and written
        every step). Every state update is still computed in float32; a 16-bit state is rounded where it is stored,
        once per decode step or per verify commit, so speculative and plain decoding round it at different points and
        their greedy outputs may differ at near-ties (as with bf16 activations). Applies to states made afterwards
        (`new_state`, the static steps built afterwards)."""
        dts = {getattr(layer.linear_attn, "ssm_state_dtype", None) for layer in self.layers
               if layer.layer_type == "linear_attention"}
        dt = next(iter(dts), None) if len(dts) == 1 else None
        return next((name for name, d in self._SSM_STATE_DTYPES.items() if d == dt), "float32")

    @mamba_ssm_cache_dtype.setter
    def mamba_ssm_cache_dtype(self, value: str) -> None:
        if value not in self.MAMBA_SSM_CACHE_DTYPES:
            raise ValueError(f"mamba_ssm_cache_dtype must be one of {self.MAMBA_SSM_CACHE_DTYPES}, got {value!r}")
        if value != "float32" and self.embed_tokens.weight.dtype == torch.float64:
            raise ValueError(f"mamba_ssm_cache_dtype={value!r}: a float64 model keeps float64 GDN states (the "
                             "reference path); convert the model to float32 / bf16 first")
        dt = self._SSM_STATE_DTYPES[value]
        for layer in self.layers:
            if layer.layer_type == "linear_attention":
                layer.linear_attn.ssm_state_dtype = dt

    def new_state(self, batch_size: int, *, kv_capacity: int = 0) -> ModelState:
        """Zero state for `batch_size` sequences (KV caches grow on demand; kv_capacity preallocates)."""
        layers = []
        for layer in self.layers:
            if layer.layer_type == "linear_attention":
                layers.append(layer.linear_attn.new_state(batch_size))
            else:
                layers.append(layer.self_attn.new_state(batch_size, capacity=kv_capacity))
        return ModelState(layers)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a LongTensor (B, T), got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if 0 in input_ids.shape:
            raise ValueError(f"input_ids must hold at least one sequence of at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def _check_state(self, state: ModelState, batch_size: int) -> None:
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState (see model.new_state), got {type(state).__name__}")
        if len(state.layers) != len(self.layers):
            raise ValueError(f"state has {len(state.layers)} layers, the model has {len(self.layers)}")
        for i, (layer, s) in enumerate(zip(self.layers, state.layers)):
            want = GDNLayerState if layer.layer_type == "linear_attention" else KVCache
            if not isinstance(s, want):
                raise TypeError(f"state.layers[{i}] must be a {want.__name__} for a {layer.layer_type} layer, got {type(s).__name__}")
        if state.batch_size != batch_size:
            raise ValueError(f"state holds {state.batch_size} sequences, input_ids has batch size {batch_size}")

    def _logits(self, h: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.norm(h))

    # ------------------------------------------------------------------ forwards
    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None, *, mode: str = "auto",
                logits_to_keep: int = 0, validate: bool = True, reserve_kv: bool = True,
                prefix_len: int | None = None) -> CausalLMOutput:
        """Causal forward of T tokens per row after `state` (advanced in place; created when None).

        mode picks the GDN algorithm ("auto", "chunk", "recurrent", "fused_decode"). "auto": one token -> the fused
        decode step; on CUDA every T >= 2 -> chunk; on the CPU T >= CPU_CHUNK_MIN_TOKENS (32) -> chunk, shorter ->
        the token loop (measured, see CPU_CHUNK_MIN_TOKENS). logits_to_keep = k > 0
        computes logits for the last k positions only. validate=False skips the input checks and reserve_kv=False
        the KV capacity check (both sync with the device; CUDA graph capture needs them off). prefix_len: the KV
        prefix length of every row when the caller knows it (0 for a fresh prefill), which spares the attention
        layers a device read (CUDA graph capture of a prefill, runtime.StaticPrefill).
        """
        if validate:
            self._check_ids(input_ids)  # before unpacking the shape, so a 1-D input gets the clear error
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
        B, T = input_ids.shape
        if state is None:
            state = self.new_state(B)
        if validate:
            self._check_state(state, B)
        if T == 1 and mode in ("auto", "fused_decode") and self._use_cpu_fast(state):
            state.materialize_()  # a pending gather (ModelState.select_deferred): only the fused step reads it
            step = _cpu_compiled.decode_step if _cpu_compiled.applies(self) else _cpu_fast.decode_step
            logits, h = step(self, input_ids, state)
            return CausalLMOutput(logits=logits, hidden_states=h, state=state)
        h = self._embed(input_ids)
        backend = self._backend(h)
        if mode == "auto" and T >= CPU_CHUNK_MIN_TOKENS and h.device.type == "cpu":
            mode = "chunk"
        if T == 1 and mode in ("auto", "fused_decode") and self._use_fused(backend, h):
            y, resid = h, None
            for layer, s in zip(self.layers, state.layers):
                y, resid = layer.decode_fused(y, resid, s, reserve_kv=reserve_kv)
            x, h = add_norm(self.norm, y, resid)
            logits = _normed.linear_in(x, self.lm_head.weight, self.lm_head.bias)
            return CausalLMOutput(logits=logits, hidden_states=h, state=state)
        state.materialize_()
        chunk = self.prefill_chunk_size
        capturing = h.is_cuda and torch.cuda.is_current_stream_capturing()
        if T > chunk and not capturing:  # long prompt: bounded activations and masks, same result
            hs = [self._forward_chain(h[:, s0: s0 + chunk], state, mode, reserve_kv, backend,
                                      None if prefix_len is None else prefix_len + s0) for s0 in range(0, T, chunk)]
            h = torch.cat(hs, dim=1)
        else:
            h = self._forward_chain(h, state, mode, reserve_kv, backend, prefix_len)
        return CausalLMOutput(logits=self._logits(h, logits_to_keep), hidden_states=h, state=state)

    def _forward_chain(self, h: torch.Tensor, state: ModelState, mode: str, reserve_kv: bool, backend: str,
                       prefix_len: int | None = None) -> torch.Tensor:
        B, T = h.shape[:2]
        layout = TokenLayout.chain(B, T, device=h.device, known_prefix=prefix_len)
        for layer, s in zip(self.layers, state.layers):
            h = layer.forward_state(h, s, layout, mode, reserve_kv, backend)
        return h

    def forward_tree(self, input_ids: torch.Tensor, *, state: ModelState, layout: TokenLayout, validate: bool = True,
                     need_logits: bool = True) -> TreeVerifyOutput:
        """Verify N tree nodes per row in one pass; node i sees the committed state and its ancestors only.

        input_ids (B, N); layout from the draft tree. `state` is only read; see `commit_tree`. validate=False also
        keeps every shape independent of device values (no host sync: attention reads the whole KV capacity).
        With the fused steps the N new keys/values are written into the KV cache at positions lengths .. lengths + N - 1
        (past the valid prefix, so the committed cache is unchanged); validate=True grows the capacity for that first,
        validate=False cannot (no host sync), so there every live row must have lengths + N <= capacity
        (runtime.StaticSpecRunner allocates max_len + N + 1): a row without that room would get wrong logits and have
        the last positions of its committed prefix overwritten.
        need_logits=False (a draft model's catch-up, which only commits): on the fused path the last layer stops after
        its mixer (no output projection, MLP, final norm or lm_head: up to ~7 launches less) and logits and
        hidden_states are None; the layer caches, hence the committed states, are the same.
        """
        if validate:
            self._check_ids(input_ids)  # before unpacking the shape, so a 1-D input gets the clear error
        B, N = input_ids.shape
        if validate:
            self._check_state(state, B)
        if tuple(layout.ancestor_mask.shape) != (B, N, N):
            raise ValueError(f"layout is for {tuple(layout.ancestor_mask.shape[:2])} nodes, input_ids is {(B, N)}")
        state.materialize_()  # a pending gather (ModelState.select_deferred) is read by the fused decode step only
        if self._use_cpu_fast(state):
            logits, h, caches = _cpu_fast.verify_step(self, input_ids, state, layout)
            return TreeVerifyOutput(logits=logits, hidden_states=h, layer_caches=caches)
        h = self._embed(input_ids)
        caches = []
        backend = self._backend(h)
        if self._use_fused(backend, h):
            y, resid = h, None
            wi = None
            if any(layer.layer_type == "linear_attention" for layer in self.layers):
                wi = layout.conv_window_index(self.config.linear_conv_kernel_dim)  # once for all layers
            last = len(self.layers) - 1
            for i, (layer, s) in enumerate(zip(self.layers, state.layers)):
                y, resid, cache = layer.tree_fused(y, resid, s, layout, backend=backend, static=not validate,
                                                   window_index=wi, cache_only=not need_logits and i == last)
                caches.append(cache)
            if not need_logits:
                return TreeVerifyOutput(logits=None, hidden_states=None, layer_caches=caches)
            x, h = add_norm(self.norm, y, resid)
            # the final norm folded into the lm_head GEMV where the last layer's output projection took the residual;
            # CUDA float32 takes the GEMV kernels' dispatch too (cuBLAS ran the bundle's 8192 x 384 head at 5 / 16 rows in
            # 9 / 15 us, gemv's tf32x3 tile ~6 us on an H200, results/stop22); bf16 / fp16 keep cuBLAS (not measured)
            logits = _normed.linear_in(x, self.lm_head.weight, self.lm_head.bias) \
                if isinstance(x, _normed.NormedInput) or (x.is_cuda and x.dtype == torch.float32) else self.lm_head(x)
            return TreeVerifyOutput(logits=logits, hidden_states=h, layer_caches=caches)
        for layer, s in zip(self.layers, state.layers):
            h, cache = layer.forward_tree(h, s, layout, backend, not validate)
            caches.append(cache)
        return TreeVerifyOutput(logits=self._logits(h, 0), hidden_states=h, layer_caches=caches)

    def commit_tree(self, state: ModelState, verify: TreeVerifyOutput, *, path: torch.Tensor, counts: torch.Tensor,
                    rows: torch.Tensor | None = None, reserve: bool = True, all_rows_accept: bool = False,
                    last: torch.Tensor | None = None) -> None:
        """Advance `state` over the accepted nodes path[b, :counts[b]] (B, L) of each row (node 0 = the root first).

        Rows with counts 0 are left unchanged. `rows` (optional) restricts the commit to those state rows, with
        `verify`, `path` and `counts` given for those rows only. reserve=False: no host sync (CUDA graphs); the KV
        caches must already have room for path.shape[1] more positions. all_rows_accept=True: the caller guarantees
        counts >= 1 in every row (the engines: the root is always accepted), which spares saving the GDN states.
        last: (B,) the last accepted node path[b, counts[b] - 1] when the caller has it (Acceptance.last).
        """
        state.materialize_()
        if rows is not None:
            sub = state.select(rows)
            self.commit_tree(sub, verify, path=path, counts=counts, all_rows_accept=all_rows_accept, last=last)
            state.assign_rows_(rows, sub)
            return
        if last is None:
            last = path.gather(1, (counts - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,) last accepted node
        if all_rows_accept and self._use_cpu_fast(state) and _cpu_fast.commits_fast(state, verify.layer_caches):
            _cpu_fast.commit_step(self, state, verify.layer_caches, path=path, counts=counts, last=last, reserve=reserve)
            return
        moved = None if all_rows_accept else counts > 0  # (B,) rows that accepted something
        for layer, s, cache in zip(self.layers, state.layers, verify.layer_caches):
            if layer.layer_type == "linear_attention":
                if all_rows_accept:
                    layer.linear_attn.commit_tree(s, cache, last, backend=self._backend(s.recurrent))
                    continue
                old = s.clone()  # rows with nothing accepted keep their state (no host sync to find them)
                layer.linear_attn.commit_tree(s, cache, last, backend=self._backend(s.recurrent))
                s.recurrent.copy_(torch.where(moved[:, None, None, None], s.recurrent, old.recurrent))
                s.conv.copy_(torch.where(moved[:, None, None], s.conv, old.conv))
            else:
                layer.self_attn.commit(s, cache, path, counts, reserve=reserve)
