"""EAGLE-style draft head for a GDN target: one GDN decoder layer over [target feature, next-token embedding].

    head = EagleHead(config)          # config.hidden_size = target hidden, one "linear_attention" layer, target vocab
    state = head.new_state(B)
    out, state = head(hidden, token_embeds, state)          # hidden, token_embeds, out: (B, T, H); state advanced
    logits = head.draft_logits(target, out)                 # = target.lm_head(target.norm(out))

At position t the input is (f_t = the target's last-layer hidden state of token x_t, before the final norm;
e_{t+1} = target.embed_tokens(x_{t+1})) and the output predicts f_{t+1}, whose logits give x_{t+2}. The input
is fc(concat(norm_e(e), norm_h(f))) (EAGLE-3 style norms); the head holds no embedding or lm_head: it reuses the
target's, so its checkpoint (model_type "gdnspec_eagle") needs the target to draft. Because the mixer is a GDN
layer, a drafting step costs the same at any context length. Training: gdnspec/train/distill.py.

Reduced draft vocabulary (the EAGLE-3 idea, optional): `head.set_draft_vocab(ids)` stores `draft_ids` (Vd,) int64,
the target token ids the head drafts over (config.draft_vocab_size = Vd, saved with the head). `decode_step` then
returns logits over those ids only, (B, Vd), from the matching rows of the target's lm_head (gathered once and
cached): the lm_head GEMV of every expansion reads Vd / vocab of the bytes. The drafter hands these logits to the
tree builder with the ids (spec/tree.DraftLogits), which ranks the Vd columns and maps them to the target's ids, and
puts the log-probabilities back on the target's ids (-inf elsewhere) where it needs q, so tree building, stochastic
drafts and the acceptance rule see a draft distribution q over the full vocabulary that is zero outside draft_ids:
verification is unchanged and stays exact. `gdnspec distill --kind eagle --draft-vocab N` keeps the N most frequent tokens of the
training data (the head is still trained against the full-vocabulary target distribution).
"""
from __future__ import annotations

import torch
from torch import nn

from gdnspec.cache import ModelState
from gdnspec.layers import RMSNorm
from gdnspec.models import cpu_compiled as _cpu_compiled
from gdnspec.models import cpu_fast as _cpu_fast
from gdnspec.models.config import GDNConfig
from gdnspec.models.lm import DecoderLayer


class EagleHead(nn.Module):
    def __init__(self, config: GDNConfig, *, dtype=None, device=None):
        super().__init__()
        if config.num_hidden_layers != 1 or list(config.layer_types) != ["linear_attention"]:
            raise ValueError(f"EagleHead needs num_hidden_layers=1 and layer_types=['linear_attention'], got "
                             f"{config.num_hidden_layers} and {config.layer_types}")
        config.model_type = "gdnspec_eagle"
        self.config = config
        H = config.hidden_size
        kw = dict(dtype=dtype, device=device)
        self.norm_e = RMSNorm(H, config.rms_norm_eps, **kw)
        self.norm_h = RMSNorm(H, config.rms_norm_eps, **kw)
        self.fc = nn.Linear(2 * H, H, bias=False, **kw)
        self.layer = DecoderLayer(config, "linear_attention", **kw)
        Vd = config.draft_vocab_size
        self.register_buffer("draft_ids", None if Vd is None else torch.arange(Vd, device=device))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, config.initializer_range)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Draft over the target token ids `ids` only (1-D, distinct, in [0, vocab_size); None: the whole vocabulary).
        Sets config.draft_vocab_size; the ids are saved with the head."""
        if ids is None:
            self.draft_ids = None
            self.config.draft_vocab_size = None
            self.__dict__.pop("_draft_lm_head", None)
            self.__dict__.pop("_draft_lm_head_t", None)
            return
        V = self.config.vocab_size
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() < 1 or ids.is_floating_point()
                or ids.is_complex() or ids.dtype == torch.bool):
            what = (f"a {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                    else f"{type(ids).__name__} {ids!r}")
            raise ValueError(f"draft vocabulary ids must be a non-empty 1-D integer tensor, got {what}")
        ids = ids.to("cpu", torch.long, copy=True)  # the head's own copy: editing the caller's tensor changes nothing
        if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != ids.numel():
            raise ValueError(f"draft vocabulary ids must be distinct token ids in [0, vocab_size={V}), got min "
                             f"{int(ids.min())}, max {int(ids.max())}, {ids.numel() - ids.unique().numel()} repeated")
        self.draft_ids = ids.to(self.device)
        self.config.draft_vocab_size = int(ids.numel())
        # the cached rows are keyed by the ids' data pointer and version: a new tensor may sit where a freed one did
        self.__dict__.pop("_draft_lm_head", None)
        self.__dict__.pop("_draft_lm_head_t", None)

    def draft_lm_head(self, target: nn.Module, *, transposed: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (Vd, H), bias or None) of the logits this head drafts with: the rows draft_ids of the target's
        lm_head (gathered once per weight version and cached on the head), or the lm_head itself without a reduced
        vocabulary. transposed=True: the weight as a contiguous (H, Vd or vocab) matrix, cached the same way (the CPU's
        one-row product `x @ W^T`, as layers/linear.VocabProjection does for the full vocabulary)."""
        w, b = target.lm_head.weight, target.lm_head.bias
        ids = self.draft_ids
        if ids is None and not transposed:
            return w, b
        if ids is not None and ids.device != w.device:
            raise ValueError(f"the head's draft_ids are on {ids.device}, the target's lm_head on {w.device}: move both")

        def build():
            rows = w if ids is None else w.index_select(0, ids)
            return (rows.t().contiguous() if transposed else rows), (b if b is None or ids is None else b.index_select(0, ids))

        sources = tuple(t for t in (w, ids, b) if t is not None)
        return _cpu_fast._cached(self, "_draft_lm_head_t" if transposed else "_draft_lm_head", sources, build)

    def head_logits(self, target: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Draft logits over this head's vocabulary (draft_ids, or all of the target's): (..., Vd or vocab)."""
        if self.draft_ids is None:
            return self.draft_logits(target, out)
        w, b = self.draft_lm_head(target)
        return torch.nn.functional.linear(target.norm(out if out.dtype == target.dtype else out.to(target.dtype)), w, b)

    def new_state(self, batch_size: int) -> ModelState:
        """Zero state: ModelState([GDNLayerState]) for the one layer."""
        return ModelState([self.layer.linear_attn.new_state(batch_size)])

    def _check(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> None:
        for name, t in (("hidden", hidden), ("token_embeds", token_embeds)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.hidden_size:
                raise ValueError(f"{name} must be a tensor (B, T, {self.hidden_size}), got {getattr(t, 'shape', type(t))}")
        if hidden.shape[:2] != token_embeds.shape[:2]:
            raise ValueError(f"hidden {tuple(hidden.shape)} and token_embeds {tuple(token_embeds.shape)} must share (B, T)")

    def fuse(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, H) x 2 -> fc(concat(norm_e(e), norm_h(f))) (B, T, H)."""
        dt = self.dtype
        e = token_embeds if token_embeds.dtype == dt else token_embeds.to(dt)
        x = torch.cat([self.norm_e(e), self.norm_h(hidden if hidden.dtype == dt else hidden.to(dt))], dim=-1)
        return self.fc(x)

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor, state: ModelState | None = None, *,
                mode: str = "auto") -> tuple[torch.Tensor, ModelState]:
        """Predicted next features (B, T, H) (pre-norm, like the target's hidden states); `state` advanced in place."""
        self._check(hidden, token_embeds)
        B = hidden.shape[0]
        if state is None:
            state = self.new_state(B)
        if not isinstance(state, ModelState) or len(state.layers) != 1:
            raise TypeError(f"state must be a one-layer ModelState (see EagleHead.new_state), got {type(state).__name__}")
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} sequences, hidden has batch size {B}")
        state.materialize_()  # a pending gather (ModelState.select_deferred) is read by the fused decode step only
        out = self.layer.forward_state(self.fuse(hidden, token_embeds), state.layers[0], None, mode)
        return out, state

    def forward_train(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Differentiable forward from a zero state (training): same values as forward(..., state=None)."""
        self._check(hidden, token_embeds)
        return self.layer.forward_train(self.fuse(hidden, token_embeds))

    def decode_step(self, hidden: torch.Tensor, token_embeds: torch.Tensor, state: ModelState, *, target: nn.Module
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafting step, one token per row: (features (B, 1, H) as `forward`, draft logits (B, Vd or vocab) as
        `head_logits`: over draft_ids when the head has a reduced vocabulary); `state` advanced in place.

        hidden, token_embeds (B, 1, H). With the target's fused steps (CUDA / Triton backend, float32 GDN state, no
        autograd) this is the target's fused decode layer (issue 9) around fc: norm_e and norm_h (one add_rms_norm
        each), the fc GEMV, the fused GDN layer and MLP (norms folded into the GEMVs, ops/fused/normed.py), the
        residual add in the down GEMV, the target's final norm folded into the lm_head GEMV: about 12 kernels. On the CPU (the target's CPU fast path applies, head and state in its float32/64
        dtype) the lean torch step of models/cpu_fast.eagle_decode_step. Otherwise `forward` + `draft_logits` (the
        reference; the same numbers up to rounding, tested in tests/test_eagle_fused.py, tests/test_cpu_fast.py)."""
        self._check(hidden, token_embeds)
        if hidden.shape[1] != 1:
            raise ValueError(f"decode_step takes one token per row, got T={hidden.shape[1]}")
        s = state.layers[0] if isinstance(state, ModelState) and len(state.layers) == 1 else None
        if isinstance(state, ModelState) and not self._fused_ok(hidden, s, target):
            state.materialize_()  # the fused step below reads a pending gather itself; the others need it copied
        if self._cpu_fast_ok(s, target):
            dt = self.dtype
            step = _cpu_compiled.eagle_decode_step if _cpu_compiled.eagle_applies(self) else _cpu_fast.eagle_decode_step
            return step(self, hidden if hidden.dtype == dt else hidden.to(dt),
                        token_embeds if token_embeds.dtype == dt else token_embeds.to(dt), state, target=target)
        if not self._fused_ok(hidden, s, target):
            out, state = self(hidden, token_embeds, state, mode="fused_decode")
            return out, self.head_logits(target, out[:, -1])
        from gdnspec.models.lm import add_norm

        dt = self.dtype
        e, _ = add_norm(self.norm_e, token_embeds if token_embeds.dtype == dt else token_embeds.to(dt), None)
        f, _ = add_norm(self.norm_h, hidden if hidden.dtype == dt else hidden.to(dt), None)
        return self._fused_rest(torch.cat([e, f], dim=-1), s, target)

    def decode_step_ids(self, hidden: torch.Tensor, token_ids: torch.Tensor, state: ModelState, *, target: nn.Module,
                        hidden_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_step` given the draft tokens' ids (B, 1) instead of their embeddings (what the drafter has). On
        the fused path the target's embedding lookup, norm_e, norm_h and their concat are ONE kernel
        (ops/fused/elementwise.eagle_input, the same numbers); elsewhere decode_step(hidden, embed(ids), ...).

        hidden_rows (B,) long: row b's feature is hidden[hidden_rows[b]] of hidden (R, 1, H) (a tree expansion's
        parents; gathered inside eagle_input on the fused path). `state` may hold a pending gather
        (ModelState.select_deferred): the fused GDN decode kernel reads it; any other path copies it in first."""
        s = state.layers[0] if isinstance(state, ModelState) and len(state.layers) == 1 else None
        if hidden_rows is not None:  # checked here: the paths below without eagle_input would not name it
            from gdnspec.ops.fused.elementwise import check_hidden_rows

            n = token_ids.shape[0] if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 2 else None
            check_hidden_rows(hidden_rows, n, hidden.device if isinstance(hidden, torch.Tensor) else None)
        if (self._fused_ok(hidden, s, target) and isinstance(hidden, torch.Tensor) and hidden.dim() == 3
                and hidden.shape[1] == 1 and hidden.dtype == self.dtype and isinstance(token_ids, torch.Tensor)
                and token_ids.dim() == 2 and token_ids.shape[1] == 1
                and (hidden_rows is not None or token_ids.shape[0] == hidden.shape[0])
                and not token_ids.is_floating_point() and target.embed_tokens.weight.dtype == self.dtype):
            from gdnspec.ops.fused.elementwise import eagle_input

            ne, nh = self.norm_e, self.norm_h
            if ne.eps == nh.eps and ne.offset == nh.offset:
                x = eagle_input(token_ids, target.embed_tokens.weight, hidden, w_e=ne.weight, w_h=nh.weight,
                                eps=ne.eps, offset=ne.offset, hidden_rows=hidden_rows)  # (B, 1, 2H)
                return self._fused_rest(x, s, target)
        if isinstance(state, ModelState):
            state.materialize_()
        if hidden_rows is not None:
            hidden = hidden.index_select(0, hidden_rows)
        return self.decode_step(hidden, target.embed_tokens(token_ids), state, target=target)

    def _fused_rest(self, x: torch.Tensor, s, target: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused decode step after the input norms: x (B, 1, 2H) = [norm_e(e) | norm_h(f)] -> fc GEMV, the
        fused GDN layer and MLP, the target's final norm folded into the lm_head GEMV: (features, logits)."""
        from gdnspec.models.lm import add_norm
        from gdnspec.ops.fused.gemv import small_linear
        from gdnspec.ops.fused.normed import linear_in

        x = small_linear(x[:, 0], self.fc.weight, self.fc.bias)[:, None]  # (B, 1, H)
        y, resid = self.layer.decode_fused(x, None, s, reserve_kv=False)
        xn, out = add_norm(target.norm, y, resid)  # out = resid + y in the down GEMV; target.norm folded into lm_head
        logits = linear_in(xn, *self.draft_lm_head(target))[:, 0]
        return out, logits

    def _cpu_fast_ok(self, s, target: nn.Module) -> bool:
        """The CPU fast path (models/cpu_fast.py) runs this head: the target's own steps take it (CPU, fused_steps,
        float32/64, no autograd), the head has the target's dtype and its GDN state that dtype too."""
        dt = self.dtype
        return (s is not None and hasattr(target, "_use_cpu_fast") and dt == target.dtype
                and _cpu_fast.applies(target, self.fc.weight) and s.recurrent.dtype == dt and s.conv.dtype == dt
                and not (torch.is_grad_enabled() and self.fc.weight.requires_grad))

    def _fused_ok(self, x: torch.Tensor, s, target: nn.Module) -> bool:
        """The target's fused steps can run this head: Triton backend, float32 GDN state, matching dtypes, no autograd."""
        return (s is not None and s.recurrent.dtype == torch.float32 and hasattr(target, "_use_fused")
                and self.dtype == target.dtype and target._use_fused(target._backend(x), x))

    def catch_up(self, hidden: torch.Tensor, token_embeds: torch.Tensor, state: ModelState, *, counts: torch.Tensor,
                 target: nn.Module) -> None:
        """Advance `state` in place over the pairs (hidden[:, i], token_embeds[:, i]) for i < counts[b] (>= 1) of each
        row, all rows in one pass (the drafter's catch-up after a verify): hidden, token_embeds (B, L, H); counts (B,).

        Fused (as decode_step): norm_e and norm_h (add_rms_norm), the fc GEMV, then the GDN mixer's fused tree step over
        a chain (in-projection GEMM, tree conv + gates, tree-WY, norm, out) and the Triton commit of each row's last
        pair, about 20 kernels (catch_up_ids: the lookup and both norms in one). On the CPU fast
        path (as decode_step) models/cpu_fast.eagle_catch_up: the lean tree terms without the output side. Otherwise the
        module path (forward_tree + commit_tree with the torch kernels), the reference; the MLP is skipped on both
        since the state depends on the mixer only."""
        from gdnspec.layers.layout import TokenLayout

        self._check(hidden, token_embeds)
        B, L, _ = hidden.shape
        state.materialize_()  # a catch-up advances the state in place: a pending gather is copied in first
        s = state.layers[0]
        if self._cpu_fast_ok(s, target):
            dt = self.dtype
            step = _cpu_compiled.eagle_catch_up if _cpu_compiled.eagle_applies(self, logits=False) else \
                _cpu_fast.eagle_catch_up
            step(self, hidden if hidden.dtype == dt else hidden.to(dt),
                 token_embeds if token_embeds.dtype == dt else token_embeds.to(dt), state, counts=counts)
            return
        if self._fused_ok(hidden, s, target) and L <= 64:
            from gdnspec.models.lm import add_norm

            dt = self.dtype
            e, _ = add_norm(self.norm_e, token_embeds if token_embeds.dtype == dt else token_embeds.to(dt), None)
            f, _ = add_norm(self.norm_h, hidden if hidden.dtype == dt else hidden.to(dt), None)
            self._catch_up_fused(torch.cat([e, f], dim=-1), s, counts)
            return
        x = self.fuse(hidden, token_embeds)
        layout = TokenLayout.chain(B, L, device=x.device)
        last = (counts.to(x.device) - 1).clamp(min=0)
        mixer = self.layer.linear_attn
        _, cache = mixer.forward_tree(self.layer.input_layernorm(x), s, layout)
        mixer.commit_tree(s, cache, last)

    def catch_up_ids(self, hidden: torch.Tensor, token_ids: torch.Tensor, state: ModelState, *,
                     counts: torch.Tensor, target: nn.Module, last: torch.Tensor | None = None) -> None:
        """`catch_up` given the tokens' ids (B, L) instead of their embeddings (what the drafter has). On the fused
        path the embedding lookup, norm_e, norm_h and their concat are ONE kernel for all B * L pairs
        (ops/fused/elementwise.eagle_input, the numbers of catch_up's two add_rms_norm launches, tested);
        elsewhere catch_up(hidden, embed(ids), ...). last: (counts - 1).clamp(min=0) on hidden's device when the
        caller has it (the drafter's advance uses it too: two launches less), else computed here."""
        if isinstance(state, ModelState):
            state.materialize_()  # a catch-up advances the state in place: a pending gather is copied in first
        if (isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[-1] == self.hidden_size
                and hidden.dtype == self.dtype and isinstance(token_ids, torch.Tensor)
                and tuple(token_ids.shape) == tuple(hidden.shape[:2]) and not token_ids.is_floating_point()
                and target.embed_tokens.weight.dtype == self.dtype
                and self.norm_e.eps == self.norm_h.eps and self.norm_e.offset == self.norm_h.offset
                and self.fused_catch_up_ok(hidden, state, target=target)):
            from gdnspec.ops.fused.elementwise import eagle_input

            ne, nh = self.norm_e, self.norm_h
            ids = token_ids if token_ids.device == hidden.device else token_ids.to(hidden.device)
            x = eagle_input(ids, target.embed_tokens.weight, hidden, w_e=ne.weight, w_h=nh.weight,
                            eps=ne.eps, offset=ne.offset)  # (B, L, 2H)
            self._catch_up_fused(x, state.layers[0], counts, last=last)
            return
        dev = target.embed_tokens.weight.device
        self.catch_up(hidden, target.embed_tokens(token_ids if token_ids.device == dev else token_ids.to(dev)),
                      state, counts=counts, target=target)

    def fused_catch_up_ok(self, hidden: torch.Tensor, state: ModelState, *, target: nn.Module) -> bool:
        """Whether catch_up / catch_up_ids take the fused path (the target's fused steps, ops/fused) for this head
        state and features hidden (B, L, H) with L <= 64."""
        s = state.layers[0] if isinstance(state, ModelState) and len(state.layers) == 1 else None
        return (isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[1] <= 64
                and self._fused_ok(hidden, s, target) and not self._cpu_fast_ok(s, target))

    def _catch_up_fused(self, x: torch.Tensor, s, counts: torch.Tensor, *, last: torch.Tensor | None = None) -> None:
        """The fused catch-up after the input norms: x (B, L, 2H) = [norm_e(e) | norm_h(f)] -> fc GEMV, the GDN mixer's
        fused tree step over a chain and the Triton commit of each row's counts[b] - 1-th pair (the MLP is skipped:
        the state depends on the mixer only)."""
        from gdnspec.layers.layout import TokenLayout
        from gdnspec.models.lm import add_norm
        from gdnspec.ops.fused.gemv import small_linear

        B, L, _ = x.shape
        x = small_linear(x, self.fc.weight, self.fc.bias)  # (B, L, H)
        layout = TokenLayout.chain(B, L, device=x.device)
        if last is None:
            last = (counts.to(x.device) - 1).clamp(min=0)
        mixer = self.layer.linear_attn
        xn, _ = add_norm(self.layer.input_layernorm, x, None)
        wi = layout.conv_window_index(self.config.linear_conv_kernel_dim)
        _, cache = mixer.forward_tree_fused(xn, s, layout, window_index=wi, project_out=False)  # the cache only
        mixer.commit_tree(s, cache, last, backend="triton")

    @staticmethod
    def draft_logits(target: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Draft logits from predicted features with the target's final norm and lm_head: (B, T, vocab)."""
        return target.lm_head(target.norm(out if out.dtype == target.dtype else out.to(target.dtype)))


def eagle_config_for(target_config: GDNConfig, *, intermediate_size: int | None = None, **overrides) -> GDNConfig:
    """An EagleHead config matching a target: same hidden, vocab, GDN head shapes; one linear_attention layer."""
    d = target_config.to_dict()
    d.update(num_hidden_layers=1, layer_types=["linear_attention"], full_attention_interval=0,
             model_type="gdnspec_eagle", tie_word_embeddings=False)
    if intermediate_size is not None:
        d["intermediate_size"] = intermediate_size
    d.update(overrides)
    return GDNConfig.from_dict(d)
