"""Static-shape decode and speculative steps, free of host syncs, replayed from CUDA graphs on the GPU.

The eager engine (spec/engine.py) reshapes its batch every step; on a GPU its hundreds of small kernels per step
cost more in launch overhead than in work (fla's own decode call alone costs ~180 us of Python per call). Here
every buffer has a fixed shape per (batch bucket, tree size, KV capacity): the state, the root tokens, the tree,
the outputs. One step is a function of those buffers with no host sync, so it is captured once in a CUDA graph
and replayed; the host reads the small outputs (path tokens, counts, bonus) once per step.

    dec = StaticDecoder(model, batch_size=8, max_len=1024)         # plain decode (generate_autoregressive on CUDA)
    dec.load(state); logits = dec.step(next_ids)

    run = StaticSpecRunner(target, drafter, TreeConfig(...), batch_size=8, max_len=1024)
    run.load(target_state, draft_state, verified_ids); out = run.step(tree=None)

Sampling (sampling=True): per-row settings live in device buffers of shape (B,) - temperature (0 = greedy: exactly
the argmax / greedy acceptance), top_k, top_p (filtered=True only: they cost a sort of the vocabulary per row) - and
each row draws its uniforms from a counter-based stream (seed, counter) inside the step (sampling.counter_uniforms;
the counter advances in the step), so settings and seeds change without re-capture, the same seeds give the same
tokens, and a row's tokens never depend on its neighbours. `set_sampling` fills them:

    dec = StaticDecoder(model, batch_size=8, max_len=1024, sampling=True, filtered=True)
    dec.load(state); dec.set_sampling(temperature=[0.7, 0.0], top_p=[0.9, 1.0], seeds=row_seeds(seed, [0, 1]))
    tokens = dec.sample_step(ids)                                   # (8,) sampled in the step, no host sync

On the CPU the same functions run eagerly (use_graph=False), which is how the tests check them against the eager
engine. Padding rows of a bucket compute garbage that is never read.
"""
from __future__ import annotations

import os
import warnings

import torch

from gdnspec.cache import ModelState
from gdnspec.layers.layout import TokenLayout
from gdnspec.sampling import RowSampling, check_sampling_args, check_seed, stream_uniforms
from gdnspec.spec.accept import accept_greedy, accept_rows
from gdnspec.spec.drafters.base import propose_tree
from gdnspec.spec.tree import DraftTree, TreeConfig

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_bucket(n: int) -> int:
    """The smallest bucket holding n rows."""
    for b in BUCKETS:
        if n <= b:
            return b
    return n


def compile_enabled() -> bool:
    """GDNSPEC_COMPILE=1 compiles the static step functions with torch.compile (inductor fuses the many small ops
    of a step into few kernels) before they are captured in a CUDA graph. Off by default: compiling takes a while."""
    return os.environ.get("GDNSPEC_COMPILE", "0") == "1"


def _maybe_compile(fn):
    if not compile_enabled():
        return fn
    return torch.compile(fn, dynamic=False, fullgraph=False)


def prepare_fused(*models) -> None:
    """Fuse the projection weights of every model that has fused steps BEFORE a step is captured: fusing later (at the
    first fused step) re-points the weights, which makes every graph captured before it stale (rebuilt, see
    `weights_signature`) - so a prefill graph taken before the first decode step would be captured twice."""
    for m in models:
        fuse = getattr(m, "fuse_projections_", None)
        if fuse is not None and getattr(m, "fused_steps", False):
            fuse()


def weights_signature(*modules) -> tuple:
    """What a static step depends on besides its own buffers: every parameter and buffer tensor of `modules` (address,
    dtype, device), the flags that pick the step's path (fused_steps, gdn_backend) and the GDN layers' state storage
    dtypes (ssm_state_dtype: mamba_ssm_cache_dtype). A cached static step whose signature changed (model.to(dtype),
    load_state_dict(assign=True), a replaced weight, fused_steps toggled, mamba_ssm_cache_dtype set) must be
    rebuilt: its state buffers have the old dtype, and its CUDA graph would replay kernels that read the old tensors
    (freed once replaced). In-place updates (load_state_dict copying, optimizer steps) keep the signature and are
    seen by the graph. Computed after the step is built, so the weights that the first fused call fuses count. A
    module reached twice (the EAGLE drafter's target is the runner's target too) is walked once: ~0.2 ms for the
    bundle's EAGLE runner on the CPU, checked before every generate (0.6 ms with named_modules, the target twice)."""
    sig, seen = [], set()
    for root in modules:
        if not isinstance(root, torch.nn.Module) or id(root) in seen:
            continue
        ssm, tensors, stack = [], [], [root]
        while stack:  # depth first over _modules, without named_modules' recursive generators
            mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            d = mod.__dict__
            if "ssm_state_dtype" in d or hasattr(type(mod), "ssm_state_dtype"):  # no failing getattr
                ssm.append(mod.ssm_state_dtype)
            for group in (d["_parameters"], d["_buffers"]):
                for t in group.values():
                    if t is not None:
                        tensors.append((t.data_ptr(), t.dtype, t.device))
            stack.extend(c for c in reversed(d["_modules"].values()) if c is not None)
        sig.append((type(root).__name__, getattr(root, "fused_steps", None), getattr(root, "gdn_backend", None),
                    tuple(ssm)))
        sig.extend(tensors)
    return tuple(sig)


def _drafter_modules(drafter) -> list:
    return [v for v in vars(drafter).values() if isinstance(v, torch.nn.Module)]


class _StaticStep:
    """What every cached static step shares: it is built on fused weights and knows when it went stale."""

    def _modules(self) -> tuple:
        """The modules whose weights the step's buffers and graph depend on."""
        raise NotImplementedError

    def _sign(self) -> None:
        self.signature = weights_signature(*self._modules())

    def current(self) -> bool:
        """False once the weights or path flags of `_modules()` changed since this step was built (rebuild it; see
        `weights_signature`)."""
        return weights_signature(*self._modules()) == self.signature


class _RowSettings:
    """The per-row sampling buffers of a static step (module docstring): temperature, top_k, top_p (B,), seeds and
    counters (B,) int64. Padding rows are greedy."""

    def __init__(self, batch_size: int, vocab_size: int, device, *, filtered: bool):
        B = batch_size
        self.vocab_size = vocab_size
        self.temperature = torch.zeros(B, dtype=torch.float64, device=device)
        self.top_k = torch.full((B,), vocab_size, dtype=torch.long, device=device) if filtered else None
        self.top_p = torch.ones(B, dtype=torch.float64, device=device) if filtered else None
        self.seeds = torch.zeros(B, dtype=torch.long, device=device)
        self.counters = torch.zeros(B, dtype=torch.long, device=device)

    def sampling(self) -> RowSampling:
        return RowSampling(self.temperature, self.top_k, self.top_p, stream_uniforms(self.seeds, self.counters))

    def set(self, *, temperature, top_k, top_p, seeds, counters) -> None:
        """Settings of rows 0..n-1 (n = len(seeds)); each of temperature / top_k / top_p is one value for all rows or
        a list with one per row (None: off); seeds a list or (n,) tensor of ints in [0, 2**63); counters None (start at
        0) or (n,). The other rows become greedy padding. Raises naming the bad argument."""
        seeds_list = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        n = len(seeds_list)
        if n > self.temperature.shape[0]:
            raise ValueError(f"{n} rows of sampling settings for a step of {self.temperature.shape[0]} rows")
        for i, sd in enumerate(seeds_list):
            check_seed(sd, name=f"seeds[{i}]")

        def per_row(value, name):
            vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(vals) != n:
                raise ValueError(f"{name} has {len(vals)} entries for {n} rows")
            return vals

        temps, ks, ps = per_row(temperature, "temperature"), per_row(top_k, "top_k"), per_row(top_p, "top_p")
        for t, k, p in zip(temps, ks, ps):
            check_sampling_args(t, k, p)
        if self.top_k is None and any(k is not None for k in ks) or self.top_p is None and any(p is not None for p in ps):
            raise ValueError("this static step was built without top-k / top-p (filtered=False)")
        dev = self.temperature.device
        self.temperature.zero_()
        self.temperature[:n] = torch.tensor(temps, dtype=torch.float64, device=dev)
        if self.top_k is not None:
            self.top_k.fill_(self.vocab_size)
            self.top_k[:n] = torch.tensor([self.vocab_size if k is None else k for k in ks], dtype=torch.long, device=dev)
            self.top_p.fill_(1.0)
            self.top_p[:n] = torch.tensor([1.0 if p is None else p for p in ps], dtype=torch.float64, device=dev)
        self.seeds.zero_()
        self.seeds[:n] = torch.tensor(seeds_list, dtype=torch.long, device=dev)
        self.counters.zero_()
        if counters is not None:
            self.counters[:n] = torch.as_tensor(counters, dtype=torch.long).to(dev)


def _reset_padding_rows(state: ModelState, n: int) -> None:
    """Empty the KV caches of rows n.. (padding rows), so their lengths restart from 0 whenever a runner is reloaded."""
    for layer in state.layers:
        if hasattr(layer, "lengths"):
            layer.lengths[n:] = 0


def _zero_state_(state: ModelState) -> None:
    """Every tensor of every layer state to zero, in place (an empty state, keeping the buffers a graph reads)."""
    for layer in state.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor):
                t.zero_()


def _replay_chunks(buffers: list, sources: list, counts: torch.Tensor, run) -> int:
    """Feed sources (B, L, ...) through static buffers (B, C, ...) C columns at a time: per chunk, its w <= C columns
    are copied into the buffers' first w, counts is set to w (the columns past w keep an earlier chunk's values:
    counts masks them out) and `run()` (a graph replay, or the eager function) runs once. Returns the chunks run."""
    C, L = buffers[0].shape[1], sources[0].shape[1]
    chunks = 0
    for c0 in range(0, L, C):
        w = min(C, L - c0)
        for buf, src in zip(buffers, sources):
            buf[:, :w].copy_(src[:, c0:c0 + w])
        counts.fill_(w)
        run()
        chunks += 1
    return chunks


def _capture(fn, use_graph: bool, restore: list):
    """Warm up `fn` twice on a side stream, restore the states it advanced, capture it. Returns (graph or None, outputs).

    With GDNSPEC_COMPILE=1 the function is compiled first; if compiling or capturing the compiled function fails, the
    eager function is captured instead (with a warning)."""
    if not use_graph:
        return None, None
    compiled = _maybe_compile(fn)
    if compiled is not fn:
        try:
            return _capture_eager(compiled, restore)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager step
            warnings.warn(f"torch.compile of the static step failed ({type(err).__name__}: {err}); capturing it uncompiled")
    return _capture_eager(fn, restore)


def _capture_eager(fn, restore: list):
    saved = [s.clone() for s in restore]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    for s, snap in zip(restore, saved):
        s.copy_(snap)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    for s, snap in zip(restore, saved):  # capture records only, but keep the contract explicit
        s.copy_(snap)
    return graph, outputs


class _SamplingStep:
    """Per-row sampling settings of a static step built with sampling=True (`self.rows`, a _RowSettings; None
    otherwise): StaticDecoder and StaticSpecRunner."""

    rows: "_RowSettings | None"

    @property
    def counters(self) -> torch.Tensor:
        """(B,) int64: draws each row has taken from its stream, one per step (sampling steps)."""
        return self.rows.counters

    def set_sampling(self, *, temperature, top_k=None, top_p=None, seeds, counters=None) -> None:
        """Per-row settings and streams of rows 0..len(seeds)-1 (see _RowSettings.set); sampling steps only."""
        if self.rows is None:
            raise ValueError(f"this {type(self).__name__} was built with sampling=False")
        self.rows.set(temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, counters=counters)


class StaticDecoder(_StaticStep, _SamplingStep):
    """One plain decode step (T = 1) for `batch_size` rows with KV room for `max_len` positions."""

    def __init__(self, model, *, batch_size: int, max_len: int, use_graph: bool | None = None, sampling: bool = False,
                 filtered: bool = False):
        self.model = model
        prepare_fused(*self._modules())
        self.batch_size, self.max_len = batch_size, max_len
        self.state = model.new_state(batch_size, kv_capacity=max_len)
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
        self.rows = _RowSettings(batch_size, model.vocab_size, model.device, filtered=filtered) if sampling else None
        use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        restore = [self.state] + ([self.rows.counters] if sampling else [])
        self.graph, self.outputs = _capture(self._run, use_graph, restore)
        self._sign()

    def _modules(self) -> tuple:
        return (self.model,)

    def _run(self):
        out = self.model(self.ids, self.state, mode="fused_decode", logits_to_keep=1, validate=False, reserve_kv=False)
        logits = out.logits[:, -1]
        if self.rows is None:
            return logits, None
        tokens = self.rows.sampling().sample(logits)  # greedy rows: the argmax
        self.rows.counters.add_(1)
        return logits, tokens

    def load(self, state: ModelState, rows: list[int] | None = None) -> None:
        """Copy `state` (its rows in order) into rows `rows` (default: the first ones) of the static state."""
        rows = list(range(state.batch_size)) if rows is None else rows
        self.state.assign_rows_(rows, state)
        if rows == list(range(len(rows))):
            _reset_padding_rows(self.state, len(rows))

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (batch_size,) -> logits (batch_size, vocab) (a static buffer when graphed: copy what you keep)."""
        return self._step(ids)[0]

    def sample_step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (batch_size,) -> the next tokens (batch_size,), sampled inside the step with each row's settings and
        stream (sampling decoders; a static buffer when graphed: copy what you keep)."""
        if self.rows is None:
            raise ValueError("this StaticDecoder was built with sampling=False")
        return self._step(ids)[1]

    def _step(self, ids: torch.Tensor):
        self.ids.copy_(ids.view(-1, 1))
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.outputs


class StaticPrefill(_StaticStep):
    """The prefill of `batch_size` prompts of exactly `seq_len` tokens from an empty state, replayed from a CUDA graph.

    A short prompt's prefill is a few hundred small kernels (18 GDN layers of fla chunk kernels, norms, attention):
    on an H200 the host takes ~50 ms to launch them against ~6 ms of device work. Captured once per (batch, length),
    its replays cost the device time. The state buffers are static: copy what you keep (`run` returns clones).

        pre = StaticPrefill(model, batch_size=1, seq_len=128)
        state, last_logits, hidden = pre.run(ids)               # ids (1, 128); hidden (1, 128, hidden_size)

    Falls back to the eager forward (use_graph=False, or when capture fails: a warning says why).
    """

    def __init__(self, model, *, batch_size: int, seq_len: int, use_graph: bool | None = None):
        self.model = model
        prepare_fused(*self._modules())
        self.batch_size, self.seq_len = batch_size, seq_len
        self.state = model.new_state(batch_size, kv_capacity=seq_len)
        self.ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=model.device)
        use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        try:
            self.graph, self.outputs = _capture_eager(self._run, [self.state]) if use_graph else (None, None)
        except Exception as err:  # noqa: BLE001 - a kernel that cannot be captured: run eagerly
            warnings.warn(f"CUDA graph capture of the prefill failed ({type(err).__name__}: {err}); running it eagerly")
            torch.cuda.synchronize()
            self.graph, self.outputs = None, None
        self._sign()

    def _modules(self) -> tuple:
        return (self.model,)

    def _run(self):
        _zero_state_(self.state)  # from an empty state, inside the graph
        out = self.model(self.ids, self.state, logits_to_keep=1, validate=False, reserve_kv=False, prefix_len=0)
        return out.logits[:, -1], out.hidden_states

    def run(self, ids: torch.Tensor):
        """ids (batch_size, seq_len) -> (state, last logits (B, vocab), hidden states (B, T, hidden)), fresh copies."""
        self.ids.copy_(ids)
        if self.graph is None:
            logits, hidden = self._run()
        else:
            self.graph.replay()
            logits, hidden = self.outputs
        return self.state.clone(), logits.clone(), hidden.clone()


class StaticEagleBegin(_StaticStep):
    """An EAGLE head's prompt catch-up (EagleDrafter.begin: the head state over the prompt's (feature, next token)
    pairs) for one row in chunks of `chunk` pairs, each chunk ONE replay of a CUDA graph captured once per head.

    Eagerly a 64-pair chunk of the fused catch-up (EagleHead.catch_up_ids) is ~10 kernels behind ~1 ms of Python
    (its layout, checks and Triton launches): 2.4 ms of host time per 128-token prompt on an H200, against tens of
    us of device work. Replayed, any prompt length costs ceil(pairs / chunk) replays, with no capture per length.

        begin = StaticEagleBegin(head, target, chunk=64)
        state = begin.run(feats, ids)      # feats (1, L, H) head dtype, ids (1, L) long -> head ModelState (static)

    The returned state is the static buffer: copy its rows out before the next run. Only for heads on the fused
    catch-up path (EagleHead.fused_catch_up_ok) on CUDA.
    """

    def __init__(self, head, target, *, chunk: int, use_graph: bool | None = None):
        self.head, self.target, self.chunk = head, target, chunk
        dev = head.device
        self.state = head.new_state(1)
        self.feats = torch.zeros(1, chunk, head.hidden_size, dtype=head.dtype, device=dev)
        self.ids = torch.zeros(1, chunk, dtype=torch.long, device=dev)
        self.counts = torch.full((1,), chunk, dtype=torch.long, device=dev)
        use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self.graph = _capture_eager(self._run, [self.state])[0] if use_graph else None  # None: eager (the CPU tests)
        self._sign()

    def _modules(self) -> tuple:
        return (self.head, self.target.embed_tokens)  # catch_up_ids reads the target's embedding only

    @torch.no_grad()
    def _run(self):
        self.head.catch_up_ids(self.feats, self.ids, self.state, counts=self.counts, target=self.target)

    def run(self, feats: torch.Tensor, ids: torch.Tensor) -> ModelState:
        """The head state after the pairs (feats[:, i], ids[:, i]) of one row, from an empty state."""
        _zero_state_(self.state)
        _replay_chunks([self.feats, self.ids], [feats, ids], self.counts,
                       self._run if self.graph is None else self.graph.replay)
        return self.state


class StaticSpecRunner(_StaticStep, _SamplingStep):
    """Speculative step (propose -> verify -> accept -> commit -> draft advance) on static buffers.

    Drafters with `supports_cuda_graph` (the model drafters) run inside the step; others (n-gram, oracle) propose on
    the host and the runner takes their tree through `step(tree=...)`. sampling=False: greedy acceptance only (the
    step of before); sampling=True: per-row settings (`set_sampling`), greedy rows accepted exactly as greedy, the
    others by tree rejection sampling (accept.accept_rows), stochastic in-graph trees with config.sample_drafts.
    """

    def __init__(self, target, drafter, config: TreeConfig, *, batch_size: int, max_len: int, use_graph: bool | None = None,
                 sampling: bool = False, filtered: bool = False):
        self.target, self.drafter, self.config = target, drafter, config
        prepare_fused(*self._modules())
        B, N = batch_size, config.num_draft_tokens
        self.batch_size, self.num_nodes, self.max_len = B, N, max_len
        self.path_width = min(N, config.num_steps + 1)  # no drafter makes trees deeper than num_steps
        dev = target.device
        self.in_graph_drafter = bool(getattr(drafter, "supports_cuda_graph", False))
        capacity = max_len + N + 1
        self.target_state = target.new_state(B, kv_capacity=capacity)
        # KV room for a proposal's num_steps + 1 positions, or a catch-up chunk's (catch_up)
        draft_room = capacity + max(config.num_steps + 1, self.CATCH_UP_WIDTH)
        self.draft_state = drafter.new_static_state(B, kv_capacity=draft_room) if self.in_graph_drafter else None
        self.verified = torch.zeros(B, dtype=torch.long, device=dev)
        # host-drafted trees arrive as ONE copy of a packed (3, B, N) buffer [tokens | parents | valid] (pinned on the
        # host); the graph unpacks the validity mask and sets the roots
        self.tree_buf = torch.zeros(3, B, N, dtype=torch.long, device=dev)
        self.tree_buf[1, :, 0] = -1
        self.tree_buf[2, :, 0] = 1
        self.host_tree = torch.zeros(3, B, N, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.tree = DraftTree(self.tree_buf[0], self.tree_buf[1], torch.zeros(B, N, device=dev),
                              torch.ones(B, N, dtype=torch.bool, device=dev))
        self.needs_hidden = bool(getattr(drafter, "needs_target_hidden", False))
        self.conv_width = getattr(target.config, "linear_conv_kernel_dim", None)  # the layout's window index too
        self.rows = _RowSettings(B, target.vocab_size, dev, filtered=filtered) if sampling else None
        use_graph = dev.type == "cuda" if use_graph is None else use_graph
        restore = [self.target_state] + ([self.draft_state] if self.draft_state is not None else [])
        restore += [self.rows.counters] if sampling else []
        self.graph, self.outputs = _capture(self._run, use_graph, restore)
        self._plain = None  # (graph or None, outputs) of plain_step, captured on its first call
        self._catch = None  # (graph or None, outputs) of catch_up's chunk, captured on its first call
        self._sign()

    def _modules(self) -> tuple:
        return (self.target, *_drafter_modules(self.drafter))

    def plain_step(self):
        """One plain decode step of every row on this runner's own states, between its speculative steps (the adaptive
        fall-back, spec/policy.py): the target decodes `verified` (B,) and the next token (the argmax, or sampled with
        the rows' settings and streams, one draw per step like a speculative step) is written back to `verified`.
        Returns (tokens (B,) long, hidden (B, 1, H) at the decoded token or None when the drafter needs none): static
        buffers, overwritten by the next call. The drafter's state is not touched: the caller catches it up on the
        decoded tokens before the next speculative step. Graph runners capture it in a CUDA graph of its own on the
        first call (a few ms, once)."""
        graph, outputs = self.prepare_plain()
        if graph is None:
            return self._run_plain()
        graph.replay()
        return outputs

    def prepare_plain(self):
        """Capture plain_step's graph now (graph runners; a no-op after the first call): callers that time their steps
        call it first, so that the capture is not billed to a step. Returns (graph or None, outputs)."""
        if self._plain is None:
            restore = [self.target_state, self.verified] + ([self.rows.counters] if self.rows is not None else [])
            self._plain = _capture(self._run_plain, self.graph is not None, restore)
        return self._plain

    CATCH_UP_WIDTH = 16  # tokens one replay of the catch-up graph advances the in-graph drafter by (any count up to it)

    def catch_up(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> int:
        """Advance the in-graph drafter's state (every row) past tokens (B, k) long decoded by plain steps, with the
        target's hidden states at them (B, k, H) for drafters that read features: ceil(k / CATCH_UP_WIDTH) replays of
        one captured chunk (drafter.advance with counts, as the speculative step's advance), so any k costs the same
        kernels and never compiles a kernel for a new length. Returns the replays made. Raises ValueError for a
        host drafter or tokens of another batch size."""
        if not self.in_graph_drafter:
            raise ValueError(f"{type(self.drafter).__name__} drafts on the host: it catches up on its own state")
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(f"tokens must be ({self.batch_size}, k), got {tuple(tokens.shape)}")
        H = self.target.config.hidden_size
        if self.needs_hidden and (hidden is None or tuple(hidden.shape) != (*tokens.shape, H)):
            raise ValueError(f"{type(self.drafter).__name__} reads the target's hidden states: hidden must be "
                             f"{(*tokens.shape, H)}, got {None if hidden is None else tuple(hidden.shape)}")
        graph, _ = self.prepare_catch_up()
        buf_t, buf_h, counts = self._catch_in
        buffers, sources = ([buf_t], [tokens]) if buf_h is None else ([buf_t, buf_h], [tokens, hidden])
        return _replay_chunks(buffers, sources, counts, self._run_catch_up if graph is None else graph.replay)

    def prepare_catch_up(self):
        """Capture catch_up's chunk now (graph runners; a no-op after the first call). Returns (graph or None, None)."""
        if self._catch is None:
            if not self.in_graph_drafter:
                raise ValueError(f"{type(self.drafter).__name__} drafts on the host: no catch-up graph")
            B, C, dev = self.batch_size, self.CATCH_UP_WIDTH, self.verified.device
            H = self.target.config.hidden_size
            hid = torch.zeros(B, C, H, dtype=self.target.dtype, device=dev) if self.needs_hidden else None
            self._catch_in = (torch.zeros(B, C, dtype=torch.long, device=dev), hid,
                              torch.full((B,), C, dtype=torch.long, device=dev))
            self._catch = _capture(self._run_catch_up, self.graph is not None, [self.draft_state])
        return self._catch

    @torch.no_grad()
    def _run_catch_up(self):
        tokens, hidden, counts = self._catch_in
        self.drafter.advance(self.draft_state, tokens=tokens, counts=counts, target_hidden=hidden, sync_free=True)

    @torch.no_grad()
    def _run_plain(self):
        out = self.target(self.verified[:, None], self.target_state, mode="fused_decode", logits_to_keep=1,
                          validate=False, reserve_kv=False)
        logits = out.logits[:, -1]
        if self.rows is None:
            nxt = logits.argmax(-1)
        else:
            nxt = self.rows.sampling().sample(logits)  # greedy rows: the argmax
            self.rows.counters.add_(1)
        self.verified.copy_(nxt)
        return nxt, (out.hidden_states[:, -1:] if self.needs_hidden else None)

    @torch.no_grad()  # the drafter's tree comes from inference mode: a caller with autograd on must not record it
    def _run(self):
        tree = self.tree
        rs = self.rows.sampling() if self.rows is not None else None
        q = qi = None
        if self.in_graph_drafter:
            new = propose_tree(self.drafter, self.draft_state, self.verified, self.config, draft=rs, sync_free=True)
            # the proposed tree itself (graph-internal buffers): no copies into self.tree's (3 kernels)
            tree = DraftTree(new.tokens, new.parents, tree.scores, new.valid)
            q, qi = new.draft_probs, new.draft_index
        else:
            tree.valid.copy_(self.tree_buf[2] != 0)
            tree.tokens[:, 0] = self.verified
        layout = TokenLayout.from_parents(tree.parents, validate=False, conv_width=self.conv_width)
        ver = self.target.forward_tree(tree.tokens, state=self.target_state, layout=layout, validate=False)
        if rs is None:
            acc = accept_greedy(tree, ver.logits, layout, width=self.path_width)
        else:  # topk bounds the children of a node for every drafter (build_tree, n-gram trie, oracle chain)
            acc = accept_rows(DraftTree(tree.tokens, tree.parents, tree.scores, tree.valid, q, qi), ver.logits, layout,
                              sampling=rs, width=self.path_width, max_children=self.config.topk)
            self.rows.counters.add_(1)
        self.target.commit_tree(self.target_state, ver, path=acc.path, counts=acc.counts, reserve=False,
                                all_rows_accept=True, last=acc.last)  # accept: counts >= 1
        path_tokens = acc.path_tokens(tree)
        hidden = None
        if self.needs_hidden:
            H = ver.hidden_states.shape[-1]
            hidden = ver.hidden_states.gather(1, acc.path[..., None].expand(*acc.path.shape, H))
        if self.in_graph_drafter:
            self.drafter.advance(self.draft_state, tokens=path_tokens, counts=acc.counts, target_hidden=hidden, sync_free=True)
        self.verified.copy_(acc.bonus)
        # everything the host reads per step in one buffer: one device-to-host copy (B, path_width + 3)
        packed = acc.packed
        if packed is None:
            packed = torch.cat([path_tokens, acc.counts[:, None], acc.bonus[:, None], tree.valid[:, 1:].sum(-1)[:, None]],
                               dim=1)
        drafted = packed[:, -1]
        return path_tokens, acc.counts, acc.bonus, hidden, drafted, packed

    def load(self, target_state: ModelState, draft_state=None, verified: torch.Tensor | None = None) -> None:
        """Copy the rows of live states into the first rows of the static ones."""
        n = target_state.batch_size
        self.target_state.assign_rows_(list(range(n)), target_state)
        _reset_padding_rows(self.target_state, n)
        if self.in_graph_drafter and draft_state is not None:
            self.drafter.load_static_rows_(self.draft_state, list(range(n)), draft_state)
        if verified is not None:
            self.verified[:n] = verified

    def set_tree(self, tree: DraftTree) -> None:
        """Host-drafted tree for the first rows (its roots are replaced by the verified tokens inside the step); other
        rows and missing nodes become padding. A tree on the CPU costs one host-to-device copy."""
        n, m = tree.tokens.shape
        if m > self.num_nodes:
            raise ValueError(f"the tree has {m} nodes, this runner was built for {self.num_nodes}")
        h = self.host_tree
        h.zero_()
        h[1, :, 0] = -1
        h[2, :, 0] = 1
        h[0, :n, :m] = tree.tokens
        h[1, :n, :m] = tree.parents
        h[2, :n, :m] = tree.valid
        self.tree_buf.copy_(h, non_blocking=True)  # the host buffer is rewritten only after the step's output sync

    @property
    def packed(self) -> torch.Tensor:
        """(B, path_width + 3) long: path tokens | count | bonus | drafted nodes of the last step (a static buffer)."""
        return self._packed

    def step(self, tree: DraftTree | None = None):
        """Run one step; returns (path_tokens (B, path_width), counts (B,), bonus (B,), hidden or None, drafted (B,)) as
        static buffers; `packed` holds the same integers in one buffer."""
        if tree is not None:
            self.set_tree(tree)
        elif not self.in_graph_drafter:
            raise ValueError(f"{type(self.drafter).__name__} drafts on the host: pass its tree to step(tree=...)")
        out = self._run() if self.graph is None else (self.graph.replay(), self.outputs)[1]
        self._packed = out[5]
        self.last_outputs = out[:5]
        return out[:5]
