"""The Gated DeltaNet token mixer of Qwen3-Next / Qwen3.5 (`Qwen3GatedDeltaNet`, the seed's name).

    x (B, T, hidden) -> projections -> causal depthwise conv1d (SiLU) over concat(q, k, v) -> q, k L2-normalised
    -> gated delta rule (g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b)) -> GatedRMSNorm(o, z) -> out_proj

Layouts (config `layout`):
    "qwen3_next": in_proj_qkvz and in_proj_ba, interleaved per key-head group: for each key head h the rows hold
                  q_h (K), k_h (K), v of its r = HV/H value heads (r*V), z of those heads (r*V); ba holds b (r), a (r).
    "qwen3_5":    separate in_proj_qkv (all q, all k, all v), in_proj_z, in_proj_b, in_proj_a.

Seed call contract:
    out, final_state = layer(hidden_states=x, mode="chunk", output_final_state=True)    # final_state (B, HV, K, V)
    out, _ = layer(hidden_states=x, mode="recurrent", initial_state=past_state)
A bare recurrent tensor loses the conv window (it is taken as zeros); pass a `GDNLayerState` as initial_state to
carry both, and the returned final state is then a `GDNLayerState` too. The model uses `forward_state`, which
advances a GDNLayerState in place, and `forward_tree` / `commit_tree` for speculative verification.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gdnspec.cache import GDNLayerState
from gdnspec.layers.layout import TokenLayout
from gdnspec.layers.norm import GatedRMSNorm
from gdnspec.ops.conv1d import causal_conv1d, causal_conv1d_update, tree_causal_conv1d, tree_conv_commit_state
from gdnspec.ops.gated_delta_rule import (
    TreeGDRCache,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_decode_step,
    tree_commit_state,
    tree_gated_delta_rule,
)
from gdnspec.ops.gated_delta_rule.common import l2norm, state_dtype_for

def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, without dispatching a no-op cast."""
    return x if x.dtype == dtype else x.to(dtype)


MODES = ("auto", "chunk", "recurrent", "fused_decode")
BACKENDS = ("torch", "triton", "auto")


def _use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """backend="torch" (default): the torch ops; "triton": the Triton kernels (error if they cannot run here);
    "auto": Triton when importable and the tensor is on CUDA (or TRITON_INTERPRET=1), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    from gdnspec.ops.gated_delta_rule import triton_tree

    ok = triton_tree.available(tensor)
    if backend == "triton" and not ok:
        raise RuntimeError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    return ok


LAYOUTS = ("qwen3_next", "qwen3_5")


def resolve_mode(mode: str, seq_len: int, device: torch.device | str | None = None) -> str:
    """mode="auto": T == 1 -> fused_decode everywhere. T >= 2: on CUDA always "chunk" (fla's chunked kernel, no Python
    loop over tokens); elsewhere the seed's rule, T > 128 -> chunk, otherwise recurrent (on the CPU the token loop is
    cheaper than the chunk form's 64 x 64 blocks for short inputs)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        if seq_len == 1:
            return "fused_decode"
        if device is not None and torch.device(device).type == "cuda":
            return "chunk"
        return "chunk" if seq_len > 128 else "recurrent"
    if mode == "fused_decode" and seq_len != 1:
        raise ValueError(f"mode='fused_decode' takes exactly one token, got seq_len={seq_len}")
    return mode


@dataclass
class GDNTreeCache:
    """What `commit_tree` needs after `forward_tree`: the tree-WY terms and the conv inputs/window index."""

    gdr: TreeGDRCache
    conv_input: torch.Tensor  # (B, N, conv_dim), or the projection rows (B, N, P) when conv_layout is set
    conv_window_index: torch.Tensor  # (B, N, W)
    conv_layout: object = None  # ops.fused.gdn_decode.ProjLayout of conv_input's projection rows, or None

    def conv_inputs(self) -> torch.Tensor:
        """The conv inputs (B, N, conv_dim), gathered from the projection rows when conv_layout is set."""
        if self.conv_layout is None:
            return self.conv_input
        return self.conv_input[..., self.conv_layout.conv_index(self.conv_input.device)]


class Qwen3GatedDeltaNet(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_k_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        *,
        conv_kernel_size: int = 4,
        layout: str = "qwen3_next",
        norm_eps: float = 1e-6,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        for name, val in (("hidden_size", hidden_size), ("num_k_heads", num_k_heads), ("num_v_heads", num_v_heads),
                          ("head_k_dim", head_k_dim), ("head_v_dim", head_v_dim), ("conv_kernel_size", conv_kernel_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if num_v_heads % num_k_heads != 0:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_k_heads ({num_k_heads})")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.hidden_size = hidden_size
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.key_dim = num_k_heads * head_k_dim
        self.value_dim = num_v_heads * head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = conv_kernel_size
        self.layout = layout
        # storage dtype of the recurrent state (None: float32, float64 for float64 models); see state_dtype and
        # GDNForCausalLM.mamba_ssm_cache_dtype
        self.ssm_state_dtype: torch.dtype | None = None
        kw = dict(dtype=dtype, device=device)
        if layout == "qwen3_next":
            self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False, **kw)
            self.in_proj_ba = nn.Linear(hidden_size, 2 * num_v_heads, bias=False, **kw)
        else:
            self.in_proj_qkv = nn.Linear(hidden_size, self.conv_dim, bias=False, **kw)
            self.in_proj_z = nn.Linear(hidden_size, self.value_dim, bias=False, **kw)
            self.in_proj_b = nn.Linear(hidden_size, num_v_heads, bias=False, **kw)
            self.in_proj_a = nn.Linear(hidden_size, num_v_heads, bias=False, **kw)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel_size, groups=self.conv_dim,
                                padding=conv_kernel_size - 1, bias=False, **kw)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads, **kw))
        self.A_log = nn.Parameter(torch.log(torch.empty(num_v_heads, **kw).uniform_(1, 16)))
        self.norm = GatedRMSNorm(head_v_dim, eps=norm_eps, **kw)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **kw)

    # ------------------------------------------------------------------ pieces shared by every mode
    @property
    def conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # (conv_dim, W)

    def state_dtype(self, act_dtype: torch.dtype) -> torch.dtype:
        """The recurrent state's storage dtype for activations of `act_dtype`: `ssm_state_dtype` when set (vLLM's
        --mamba-ssm-cache-dtype; not for float64 models), else float32 (float64 for float64). The state's maths
        always runs in float32 / float64: a 16-bit state is rounded once where it is stored."""
        if self.ssm_state_dtype is not None and act_dtype != torch.float64:
            return self.ssm_state_dtype
        return state_dtype_for(act_dtype)

    def new_state(self, batch_size: int, *, dtype: torch.dtype | None = None, device=None) -> GDNLayerState:
        """Zero state for `batch_size` sequences: recurrent (B, HV, K, V) in `state_dtype` (float32/64 by default),
        conv (B, conv_dim, W-1) in the activation dtype."""
        p = self.out_proj.weight
        act_dtype = dtype or p.dtype
        device = device or p.device
        rec = torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim,
                          dtype=self.state_dtype(act_dtype), device=device)
        conv = torch.zeros(batch_size, self.conv_dim, self.conv_kernel_size - 1, dtype=act_dtype, device=device)
        return GDNLayerState(rec, conv)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"hidden_states must be a tensor (B, T, hidden_size), got {getattr(x, 'shape', type(x))}")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states has hidden size {x.shape[-1]}, the layer expects {self.hidden_size}")

    def _check_state(self, state: GDNLayerState, batch_size: int, dtype: torch.dtype) -> None:
        want = (batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        if tuple(state.recurrent.shape) != want:
            raise ValueError(f"recurrent state must have shape (B, HV, K, V) = {want}, got {tuple(state.recurrent.shape)}")
        if state.recurrent.dtype != self.state_dtype(dtype):
            raise ValueError(f"recurrent state must be {self.state_dtype(dtype)} for {dtype} activations, got "
                             f"{state.recurrent.dtype}")
        want_conv = (batch_size, self.conv_dim, self.conv_kernel_size - 1)
        if tuple(state.conv.shape) != want_conv:
            raise ValueError(f"conv state must have shape (B, conv_dim, W-1) = {want_conv}, got {tuple(state.conv.shape)}")
        if state.conv.dtype != dtype:
            raise ValueError(f"conv state must be {dtype} (the activation dtype), got {state.conv.dtype}")

    def _project(self, x: torch.Tensor):
        """x (B, T, hidden) -> mixed qkv (B, T, conv_dim), z (B, T, HV, V), b (B, T, HV), a (B, T, HV)."""
        B, T, _ = x.shape
        H, HV, K, V = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        r = HV // H
        if self.layout == "qwen3_next":
            qkvz = self.in_proj_qkvz(x).view(B, T, H, 2 * K + 2 * r * V)
            q, k, v, z = torch.split(qkvz, [K, K, r * V, r * V], dim=-1)
            ba = self.in_proj_ba(x).view(B, T, H, 2 * r)
            b, a = torch.split(ba, [r, r], dim=-1)
            mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
            return mixed, z.reshape(B, T, HV, V), b.reshape(B, T, HV), a.reshape(B, T, HV)
        mixed = self.in_proj_qkv(x)
        z = self.in_proj_z(x).view(B, T, HV, V)
        return mixed, z, self.in_proj_b(x), self.in_proj_a(x)

    def _split_qkv(self, mixed: torch.Tensor):
        """mixed (B, T, conv_dim) -> q, k (B, T, H, K), v (B, T, HV, V)."""
        B, T, _ = mixed.shape
        q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (q.reshape(B, T, self.num_k_heads, self.head_k_dim), k.reshape(B, T, self.num_k_heads, self.head_k_dim),
                v.reshape(B, T, self.num_v_heads, self.head_v_dim))

    def _gates(self, b: torch.Tensor, a: torch.Tensor):
        """beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), both float32 (float64 for float64 models)."""
        cdt = state_dtype_for(a.dtype)
        beta = torch.sigmoid(_as(b, cdt))
        g = F.softplus(_as(a, cdt) + _as(self.dt_bias, cdt)) * -_as(self.A_log, cdt).exp()
        return g, beta

    def _split_qkv_normed(self, mixed: torch.Tensor):
        """mixed (B, T, conv_dim) -> q, k (B, T, H, K) L2-normalised per head, v (B, T, HV, V), all in the state dtype:
        one l2norm over q and k together (what the ops do per tensor with use_qk_l2norm=True)."""
        B, T, _ = mixed.shape
        H, kd = self.num_k_heads, self.key_dim
        mixed = _as(mixed, state_dtype_for(mixed.dtype))
        qk = l2norm(mixed[..., : 2 * kd].reshape(B, T, 2 * H, self.head_k_dim))  # (B, T, 2H, K)
        v = mixed[..., 2 * kd:].reshape(B, T, self.num_v_heads, self.head_v_dim)
        return qk[:, :, :H], qk[:, :, H:], v

    def _finish(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o, z (B, T, HV, V) -> (B, T, hidden)."""
        B, T = o.shape[:2]
        y = self.norm(o.to(z.dtype), z)
        return self.out_proj(y.reshape(B, T, self.value_dim))

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) from a zero state, differentiable (no in-place state writes): the training forward, with
        the WY solve and state products in float32 (autocast off) and no fla dispatch (its backward needs newer
        triton on Hopper). Same values as forward_state from an empty state."""
        mixed, z, b, a = self._project(x)
        g, beta = self._gates(b, a)
        mixed_c, _ = causal_conv1d(mixed, weight=self.conv_weight)
        q, k, v = self._split_qkv(mixed_c)
        dev = "cuda" if x.is_cuda else "cpu"
        with torch.autocast(dev, enabled=False):
            o, _ = chunk_gated_delta_rule(q.float(), k.float(), v.float(), g=g.float(), beta=beta.float(),
                                          use_qk_l2norm=True, allow_fla=False)
        return self._finish(o.to(z.dtype), z)

    # ------------------------------------------------------------------ fused decode step (issue 9)
    def proj_layout(self):
        """Where q, k, v, z, b, a of each key head sit in the fused in-projection row (`fused_in_proj`)."""
        from gdnspec.ops.fused.gdn_decode import ProjLayout

        make = ProjLayout.qwen3_next if self.layout == "qwen3_next" else ProjLayout.qwen3_5
        return make(self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim)

    def fused_in_proj(self) -> torch.Tensor:
        """The in-projection weights as one (P, hidden) matrix (row blocks in checkpoint order; see layers/fusion.py)."""
        from gdnspec.layers.fusion import fused_linear

        names = ["in_proj_qkvz", "in_proj_ba"] if self.layout == "qwen3_next" else \
            ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]
        return fused_linear(self, names)[0]

    def decode_fused(self, x, state: GDNLayerState):
        """One token per row, x (B, 1, hidden) already normed: a tensor, or a NormedInput (ops/fused/normed.py: the
        norm folded into the in-projection GEMV); `state` advanced IN PLACE. Three kernels: the fused in-projection
        GEMV, `gdn_decode_fused` (conv + gates + L2 norm + recurrence + gated RMSNorm), out_proj. Returns out_proj for
        `add_norm`: a ResidualProjection (run there with the residual add), or computed as (B, 1, hidden) or float32
        split-K partial sums (S, B, 1, hidden) (gemv.linear_for_residual). Same numbers as
        forward_state(mode="fused_decode") up to float rounding. A state with a pending gather
        (GDNLayerState.gathered) is read from its source rows by the decode kernel (gdn_decode's StateSource)."""
        from gdnspec.ops.fused.gdn_decode import StateSource, gdn_decode_fused
        from gdnspec.ops.fused.normed import linear_in, output_projection

        proj = linear_in(x, self.fused_in_proj())[:, 0]  # (B, P)
        source = None
        if state.pending is not None:  # GDNLayerState.gathered: the kernel reads the source rows, writes `state`
            src, rows = state.pending
            src.materialize_()
            source = StateSource(conv=src.conv, recurrent=src.recurrent, rows=rows)
        y = gdn_decode_fused(proj, layout=self.proj_layout(), conv_weight=self.conv_weight, conv_state=state.conv,
                             recurrent_state=state.recurrent, A_log=self.A_log, dt_bias=self.dt_bias,
                             norm_weight=self.norm.weight, norm_eps=self.norm.eps, source=source)  # (B, HV*V)
        if source is not None:
            state.take_pending()  # written now (kept pending if the step raised)
        return output_projection(y[:, None], self.out_proj.weight, self.out_proj.bias)

    def forward_tree_fused(self, x: torch.Tensor, state: GDNLayerState, layout: TokenLayout, *,
                           window_index: torch.Tensor, project_out: bool = True):
        """forward_tree in four kernels by default (GDNSPEC_TREE_FUSION=norm, measured fastest, see
        ops/fused/gdn_tree.tree_fusion), three where the in-projection takes the tree prep in its epilogue (B * N <=
        gdn_tree_proj.max_rows(): 8 rows in bf16 / fp16, 16 in float32: ops/fused/gdn_tree_proj.py); with "full" in three: fused in-projection GEMM,
        `gdn_tree_verify` (tree conv + gates + tree-WY + gated RMSNorm in one kernel), out_proj (for `add_norm`, as
        decode_fused); "norm": four, "off": five (gdn_tree_prep, tree-WY, gated_rms_norm_rows). x a tensor or a
        NormedInput (the in-projection then normalises on the fly, ops/fused/normed.py). window_index (B, N, W) from `tree_conv_window_index`, shared by all layers of one verify.
        Needs the Triton backend, a float32 or 16-bit state and N <= 64 (forward_tree otherwise). project_out=False:
        no out_proj launch and None for the output (a catch-up that only needs the cache for the commit)."""
        from gdnspec.ops.fused.gdn_tree import gdn_tree_verify, tree_fusion
        from gdnspec.ops.fused.gdn_tree_proj import tree_in_projection
        from gdnspec.ops.fused.normed import linear_in, output_projection

        L = self.proj_layout()
        kw = dict(layout=L, conv_weight=self.conv_weight, conv_state=state.conv, window_index=window_index,
                  A_log=self.A_log, dt_bias=self.dt_bias)
        # "norm" and few rows (B * N <= 8, 16 in float32): the tree prep in the in-projection's epilogue (gdn_tree_proj.py)
        both = tree_in_projection(x, self.fused_in_proj(), **kw) if tree_fusion() == "norm" else None
        if both is not None:
            proj, prep = both
        else:
            proj, prep = linear_in(x, self.fused_in_proj()), None  # (B, N, P); x a tensor or a NormedInput

        y, gdr, conv_input, conv_layout = gdn_tree_verify(
            proj, ancestor_mask=layout.ancestor_mask, recurrent_state=state.recurrent, norm_weight=self.norm.weight,
            norm_eps=self.norm.eps, prep=prep, **kw)

        out = output_projection(y, self.out_proj.weight, self.out_proj.bias) if project_out else None
        return out, GDNTreeCache(gdr=gdr, conv_input=conv_input, conv_window_index=window_index, conv_layout=conv_layout)

    # ------------------------------------------------------------------ causal forwards
    def forward_state(self, hidden_states: torch.Tensor, state: GDNLayerState | None, *, mode: str = "auto",
                      backend: str = "torch") -> tuple[torch.Tensor, GDNLayerState]:
        """Causal forward over T tokens from `state` (None = zeros). Advances `state` IN PLACE and returns it.

        backend ("torch" | "triton" | "auto") picks the fused Triton decode step for mode="fused_decode" only."""
        x = hidden_states
        self._check_input(x)
        B, T, _ = x.shape
        mode = resolve_mode(mode, T, x.device)
        if state is None:
            state = self.new_state(B, dtype=x.dtype, device=x.device)
        self._check_state(state, B, x.dtype)
        mixed, z, b, a = self._project(x)
        S = state.recurrent
        Sc = _as(S, state_dtype_for(x.dtype))  # the state's maths in float32 / float64 (a 16-bit state is upcast)
        if mode == "fused_decode" and _use_triton(backend, x) and S.dtype == torch.float32:
            from gdnspec.ops.gated_delta_rule.triton_decode import triton_gdn_decode_step

            y = triton_gdn_decode_step(mixed[:, 0], z[:, 0], b[:, 0], a[:, 0], conv_weight=self.conv_weight,
                                       conv_state=state.conv, recurrent_state=state.recurrent, A_log=self.A_log,
                                       dt_bias=self.dt_bias, norm_weight=self.norm.weight, num_k_heads=self.num_k_heads,
                                       head_k_dim=self.head_k_dim, norm_eps=self.norm.eps)  # (B, HV, V)
            return self.out_proj(y.reshape(B, 1, self.value_dim)), state
        g, beta = self._gates(b, a)
        if mode == "fused_decode":
            mixed_c = causal_conv1d_update(mixed[:, 0], weight=self.conv_weight, state=state.conv)  # (B, conv_dim)
            q, k, v = self._split_qkv_normed(mixed_c[:, None])
            o = gated_delta_rule_decode_step(q[:, 0], k[:, 0], v[:, 0], g=g[:, 0], beta=beta[:, 0], state=Sc,
                                             use_qk_l2norm=False)[:, None]
            if Sc is not S:  # a 16-bit state: the step ran on a float32 copy, stored rounded
                S.copy_(Sc)
        else:
            mixed_c, conv_final = causal_conv1d(mixed, weight=self.conv_weight, initial_state=state.conv, output_final_state=True)
            q, k, v = self._split_qkv(mixed_c)
            op = chunk_gated_delta_rule if mode == "chunk" else fused_recurrent_gated_delta_rule
            o, final = op(q, k, v, g=g, beta=beta, initial_state=Sc, output_final_state=True, use_qk_l2norm=True)
            state.conv.copy_(conv_final)
            state.recurrent.copy_(final)
        return self._finish(o, z), state

    def forward(
        self,
        hidden_states: torch.Tensor,
        mode: str = "auto",
        initial_state: torch.Tensor | GDNLayerState | None = None,
        output_final_state: bool = False,
    ):
        """Seed contract: returns (out (B, T, hidden), final state or None). Never modifies initial_state.

        initial_state: None, a recurrent tensor (B, HV, K, V) (conv window taken as zeros) or a GDNLayerState.
        The final state has the same kind as initial_state (a tensor when None was given).
        """
        self._check_input(hidden_states)
        B = hidden_states.shape[0]
        if isinstance(initial_state, GDNLayerState):
            state = initial_state.clone()
        else:
            state = self.new_state(B, dtype=hidden_states.dtype, device=hidden_states.device)
            if initial_state is not None:
                if not isinstance(initial_state, torch.Tensor):
                    raise TypeError(f"initial_state must be a tensor, a GDNLayerState or None, got {type(initial_state).__name__}")
                if tuple(initial_state.shape) != tuple(state.recurrent.shape):
                    raise ValueError(f"initial_state must have shape (B, HV, K, V) = {tuple(state.recurrent.shape)}, "
                                     f"got {tuple(initial_state.shape)}")
                if initial_state.dtype != state.recurrent.dtype:
                    raise ValueError(f"initial_state must be {state.recurrent.dtype}, got {initial_state.dtype}")
                state.recurrent.copy_(initial_state)
        out, state = self.forward_state(hidden_states, state, mode=mode)
        if not output_final_state:
            return out, None
        return out, (state if isinstance(initial_state, GDNLayerState) else state.recurrent)

    # ------------------------------------------------------------------ tree verification
    def forward_tree(self, hidden_states: torch.Tensor, state: GDNLayerState, layout: TokenLayout, *,
                     backend: str = "torch") -> tuple[torch.Tensor, GDNTreeCache]:
        """All N tree nodes in one pass; node i sees `state` and its ancestors only. `state` is only read.

        backend ("torch" | "triton" | "auto"): "triton" runs the tree-WY kernel (N <= 64, float32 or 16-bit state); its
        cache.gdr is then a TritonTreeCache, which `commit_tree` recognises."""
        x = hidden_states
        self._check_input(x)
        B, N, _ = x.shape
        self._check_state(state, B, x.dtype)
        mixed, z, b, a = self._project(x)
        g, beta = self._gates(b, a)
        mixed_c, window_index = tree_causal_conv1d(mixed, weight=self.conv_weight, parents=layout.parents, state=state.conv)
        if _use_triton(backend, x) and state.recurrent.dtype != torch.float64 and N <= 64:
            from gdnspec.ops.gated_delta_rule.triton_tree import triton_tree_gated_delta_rule

            q, k, v = self._split_qkv(mixed_c)  # the kernel normalises q, k itself
            o, gdr = triton_tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask,
                                                  initial_state=state.recurrent, use_qk_l2norm=True)
        else:
            q, k, v = self._split_qkv_normed(mixed_c)  # one l2norm for q and k: the op skips its own
            o, gdr = tree_gated_delta_rule(q, k, v, g=g, beta=beta, ancestor_mask=layout.ancestor_mask,
                                           initial_state=state.recurrent, use_qk_l2norm=False)  # upcasts a 16-bit S0
        return self._finish(o, z), GDNTreeCache(gdr=gdr, conv_input=mixed, conv_window_index=window_index)

    @staticmethod
    def commit_tree(state: GDNLayerState, cache: GDNTreeCache, node: torch.Tensor, *, backend: str = "torch") -> None:
        """Move `state` (in place) to the state after tree node `node` (B,) of each row.

        A TritonTreeCache (from forward_tree(backend="triton"/"auto")) is committed by the Triton kernels when they
        can run here, otherwise converted to the torch layout; backend="triton"/"auto" also commits a torch cache's
        state with the Triton kernels."""
        from gdnspec.ops.gated_delta_rule.triton_tree import TritonTreeCache

        gdr = cache.gdr
        is_triton_cache = isinstance(gdr, TritonTreeCache)
        use = _use_triton(backend if backend != "torch" or not is_triton_cache else "auto", state.recurrent)
        if use and state.recurrent.dtype != torch.float64 and state.recurrent.is_contiguous() and state.conv.is_contiguous():
            from gdnspec.ops.fused.gdn_tree import tree_fusion
            from gdnspec.ops.gated_delta_rule.triton_commit import triton_tree_commit

            if not is_triton_cache:
                gdr = TritonTreeCache.from_reference(gdr, gdr.k.shape[1])  # keys kept per value head
            # GDNSPEC_TREE_FUSION=norm (default) / full: one launch for the state and the conv window; off: two kernels
            triton_tree_commit(state=state.recurrent, conv_state=state.conv, cache=gdr, conv_input=cache.conv_input,
                               window_index=cache.conv_window_index, node=node, conv_layout=cache.conv_layout,
                               fused=tree_fusion() != "off")
            return
        gdr = gdr.to_reference() if is_triton_cache else gdr
        new_conv = tree_conv_commit_state(x=cache.conv_inputs(), state=state.conv, window_index=cache.conv_window_index,
                                          node=node)
        new_rec = tree_commit_state(initial_state=state.recurrent, cache=gdr, node=node)  # computed in the cache's dtype
        state.conv.copy_(new_conv)
        state.recurrent.copy_(new_rec)
