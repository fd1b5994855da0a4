"""The speculative decoding loop: draft -> verify -> accept -> commit, for a batch of sequences.

    engine = SpeculativeEngine(target, drafter, TreeConfig(topk=4, num_steps=4, num_draft_tokens=16))
    out = engine.generate(prompts, max_new_tokens=128)            # same forms as generate_autoregressive

    session = engine.session()                                    # slot pool: add / step / drop between steps
    ids = session.add(prompts, max_new_tokens=64, eos_token_id=[2, 7])   # stop ids: for all, or one entry per prompt
    ids += session.add([p3], max_new_tokens=32, temperature=0.8, top_p=0.9, seed=7)   # its own sampling settings
    while session.active: session.step()                          # step(speculate=False): one plain decode step

One step for the active rows:
    tree = drafter.propose(draft_state, verified_ids, config)     # node 0 = root = verified id
    ver  = target.forward_tree(tree.tokens, state, layout)        # ONE target pass; the state is only read
    acc  = accept_greedy / accept_sampling                         # path + bonus token per row
    target.commit_tree(state, ver, path, counts)                  # recurrent + conv state, KV compaction
    drafter.advance(draft_state, path tokens, counts, hidden)     # draft catch-up
Finished rows (eos or max_new_tokens) are dropped from every state so they stop costing work.

Sampling settings are per sequence (`add`'s temperature / top_k / top_p / seed; what is left out takes the engine's):
rows with equal settings are accepted together, a seeded row on its own with its own generator (spec/rows.py), so
its tokens do not depend on its batch neighbours.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from gdnspec.cache import ModelState
from gdnspec.concurrency import exclusive, static_lock
from gdnspec.generate import (check_finite, check_generation_args, check_model, graph_prefill, normalize_prompts,
                              pack_outputs, stop_ids)
from gdnspec.sampling import (RowSampling, base_seed, check_generator, check_sampling_args, check_seed,
                              generator_uniforms, row_seeds, sample_next)
from gdnspec.spec.accept import Acceptance, accept_greedy, accept_sampling
from gdnspec.spec.drafters.base import check_drafter, propose_tree
from gdnspec.spec.policy import StepPolicy
from gdnspec.spec.rows import SeqSampling, accept_grouped, sample_grouped
from gdnspec.spec.sizing import TreeSizer
from gdnspec.spec.stats import SpecStats
from gdnspec.spec.tree import DraftTree, TreeConfig


class UnknownSequenceError(KeyError):
    """A sequence id that the session never returned from add()."""

    def __str__(self) -> str:
        return str(self.args[0])


class _EngineDefault:
    """add()'s default for a sampling setting: the engine's own."""

    def __repr__(self) -> str:
        return "<the engine's>"


ENGINE_DEFAULT = _EngineDefault()


@dataclass
class _Sequence:
    prompt: torch.Tensor
    max_new_tokens: int
    stop_ids: tuple[int, ...]  # ends at the first of them
    new_tokens: list[int] = field(default_factory=list)
    done: bool = False
    sampling: SeqSampling | None = None  # None: the engine's settings (read at each step)
    verify_steps: int = 0  # speculative steps of this sequence
    plain_steps: int = 0  # plain decode steps (step(speculate=False))
    draft_tokens: int = 0  # drafted tree nodes offered to the target (root excluded)
    accepted_tokens: int = 0  # of them accepted

    def spec_summary(self) -> dict:
        """This sequence's speculative statistics (as SpecStats.as_dict's means, for one sequence)."""
        return {"verify_steps": self.verify_steps, "plain_steps": self.plain_steps, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens,
                "mean_accept_length": (self.accepted_tokens + self.verify_steps) / max(self.verify_steps, 1),
                "acceptance_rate": self.accepted_tokens / max(self.draft_tokens, 1)}

    def emit(self, tokens: list[int]) -> list[int]:
        """Append tokens up to eos / the budget; returns what was appended."""
        out = []
        for t in tokens:
            if self.done:
                break
            self.new_tokens.append(t)
            out.append(t)
            if len(self.new_tokens) >= self.max_new_tokens or t in self.stop_ids:
                self.done = True
        return out


def per_sequence(value, n: int, name: str) -> list:
    """An int/None for every sequence, or a list with one entry per sequence."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} sequences")
        return list(value)
    return [value] * n


def per_sequence_stops(value, n: int) -> list[tuple[int, ...]]:
    """Stop ids for each of n sequences. `value`: None, one id, or a list of ids (the same stops for every sequence,
    the Hugging Face meaning of a list), or a list with one entry per sequence (None / an id / a list of ids) holding
    at least one None or list entry (so [[2], [5]] gives sequence 0 stop id 2 and sequence 1 stop id 5)."""
    if isinstance(value, (list, tuple)) and any(v is None or isinstance(v, (list, tuple)) for v in value):
        if len(value) != n:
            raise ValueError(f"eos_token_id has {len(value)} per-sequence entries for {n} sequences")
        return [stop_ids(v, name=f"eos_token_id[{i}]") for i, v in enumerate(value)]
    return [stop_ids(value)] * n


def trim_tree(tree: DraftTree) -> DraftTree:
    """Drop trailing node columns that are padding in every row (saves verify work on CPU)."""
    used = tree.valid.any(0).nonzero()
    n = int(used.max()) + 1 if used.numel() else 1
    if n == tree.num_nodes:
        return tree
    return tree.first_nodes(n)


class SpeculativeEngine:
    def __init__(self, target, drafter, config: TreeConfig, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, trim_trees: bool = True,
                 static: bool | None = None, seed: int | None = None, adaptive: bool = False,
                 size_trees: bool | None = None):
        """seed: an int seeding the engine's own generator (instead of `generator`). Static runs draw one int from
        the generator and give each sequence its own counter-based stream (sampling.counter_uniforms).
        config.sample_drafts (with temperature > 0) drafts stochastic trees, accepted with their q (accept.py).
        adaptive=True: `generate` makes each step speculative or plain, whichever is measured faster per token for
        the batch size (spec/policy.StepPolicy; `policy.summary()` says how often each ran), so that speculation that
        does not pay falls back to plain decoding. Greedy output is unchanged; seeded sampled output depends on the
        choices. Static (CUDA-graph) runs switch too: their plain steps replay a decode graph of the same runner, in
        bursts of up to `SpecSession.PLAIN_BURST` steps between host syncs, and the drafter catches up on their
        tokens (replays of one captured chunk, StaticSpecRunner.catch_up) before the next speculative step.
        adaptive=True also sizes each eager step's tree (spec/sizing.TreeSizer, `sizer.summary()`): how deep the
        drafter drafts and how many of its best nodes are verified, from the drafter's path probabilities and the
        measured costs; CUDA-graph steps keep the configured shape, and stochastic trees (config.sample_drafts at
        temperature > 0) are not sized. size_trees: True / False turns that sizing on / off on its own (None:
        follows adaptive); seeded sampled output is reproducible only with it off (the cut follows measured times)."""
        check_model(target, "target")
        check_drafter(drafter)
        if not isinstance(config, TreeConfig):
            raise TypeError(f"config must be a TreeConfig, got {type(config).__name__}")
        check_sampling_args(temperature, top_k, top_p)
        check_generator(generator)
        check_seed(seed, generator=generator)
        if seed is not None:
            generator = torch.Generator(device=target.device).manual_seed(seed)
        if config.sample_drafts and temperature > 0 and not getattr(drafter, "supports_draft_sampling", False):
            raise ValueError(f"sample_drafts=True needs a drafter that samples its trees (model, EAGLE, MTP drafters); "
                             f"{type(drafter).__name__} drafts deterministically (use sample_drafts=False)")
        dv = getattr(drafter, "vocab_size", None)
        if dv is not None and dv != target.vocab_size:
            raise ValueError(f"draft vocab_size ({dv}) differs from the target's ({target.vocab_size}): they must share a tokenizer")
        if config.topk > target.vocab_size:
            raise ValueError(f"topk ({config.topk}, children per tree node) is larger than the vocabulary "
                             f"({target.vocab_size} tokens)")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        if size_trees is not None and not isinstance(size_trees, bool):
            raise TypeError(f"size_trees must be None or a bool, got {size_trees!r}")
        self.target, self.drafter, self.config = target, drafter, config
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.trim_trees = trim_trees
        self.stats = SpecStats()
        # a NullDrafter only makes plain steps: its policy must not count (or time) any step as speculative
        self.policy = StepPolicy(speculative=not getattr(drafter, "plain", False)) if adaptive else None
        size_trees = adaptive if size_trees is None else size_trees
        self.sizer = TreeSizer() if size_trees and not getattr(drafter, "plain", False) else None
        # static=None: fixed-shape steps replayed from CUDA graphs (gdnspec.runtime) on CUDA
        self.static = target.device.type == "cuda" if static is None else static
        self._runners: dict = {}

    def session(self) -> "SpecSession":
        return SpecSession(self)

    def generate(self, input_ids, max_new_tokens, eos_token_id=None):
        """Same forms as generate_autoregressive; max_new_tokens may also be a per-sequence list, and eos_token_id
        per-sequence entries (see per_sequence_stops)."""
        prompts, as_tensor = normalize_prompts(input_ids, vocab_size=self.target.vocab_size)
        budgets = per_sequence(max_new_tokens, len(prompts), "max_new_tokens")
        stops = per_sequence_stops(eos_token_id, len(prompts))
        for m in budgets:
            check_generation_args(m, None)
        session = self.session()
        ids = session.add(prompts, max_new_tokens=budgets, eos_token_id=[list(s) for s in stops])
        if self.static and session.active:
            longest = max(p.numel() + m for p, m in zip(prompts, budgets))
            session.run_static(max_len=-(-(longest + 1) // 256) * 256)
        while session.active:
            if self.policy is None:
                session.step()
            else:
                session.adaptive_step(self.policy)
        pad = next((s[0] for s in stops if s), None)
        return pack_outputs([session.sequence(i) for i in ids], as_tensor, pad)

    def runner(self, batch_size: int, max_len: int):
        """The cached static runner for (batch bucket, max_len) (captured in a CUDA graph on first use on CUDA)."""
        from gdnspec.runtime import StaticSpecRunner

        sampling, filtered = self.temperature > 0, self.top_k is not None or self.top_p is not None
        key = (batch_size, max_len) if not sampling else (batch_size, max_len, filtered)
        if key not in self._runners or not self._runners[key].current():  # rebuilt when the weights changed since
            self._runners.pop(key, None)
            self._runners[key] = StaticSpecRunner(self.target, self.drafter, self.config, batch_size=batch_size,
                                                  max_len=max_len, sampling=sampling, filtered=filtered)
        return self._runners[key]

    def draft_sampling(self, batch: int) -> RowSampling | None:
        """The settings + uniforms a stochastic tree of `batch` rows is drawn with (None: deterministic drafts)."""
        if self.temperature == 0 or not self.config.sample_drafts:
            return None
        dev = self.target.device
        return RowSampling.constant(batch, dev, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                    uniforms=generator_uniforms(self.generator, batch, dev))

    # ------------------------------------------------------------------ the stages of one step
    def accept(self, tree: DraftTree, logits: torch.Tensor, layout) -> Acceptance:
        if self.temperature == 0:
            return accept_greedy(tree, logits, layout)
        return accept_sampling(tree, logits, layout, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               generator=self.generator)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=self.generator)


def _advance_all(drafter, state, tokens: torch.Tensor, hidden: torch.Tensor | None, **kw) -> None:
    """drafter.advance past every token of tokens (B, P), the same P for every row (the catch-up of plain steps)."""
    counts = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    drafter.advance(state, tokens=tokens, counts=counts, target_hidden=hidden, **kw)


def _wait(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer read next includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StaticCatchUp:
    """The drafter's catch-up that plain steps of a static run leave pending (as `SpecSession._pending_tokens` for
    eager plain steps): the tokens each plain step decoded, (B, k) chunks on the device (and (n, k) on the host for
    host drafters), with the target's hidden states at them for drafters that read features. `flush` runs it as ONE
    chain advance: in-graph drafters on the runner's own draft state (eagerly, in place, as the graph's advance
    does), others on the session's."""

    def __init__(self, drafter, runner, on_host: bool):
        self.drafter, self.runner, self.on_host = drafter, runner, on_host
        self.tokens: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []
        self.steps = 0

    def __len__(self) -> int:
        return self.steps

    def add(self, tokens: torch.Tensor, hidden: list[torch.Tensor], host: torch.Tensor | None) -> None:
        self.tokens.append(tokens)
        self.hidden.extend(hidden)
        if host is not None:
            self.host.append(host)
        self.steps += tokens.shape[1]

    def flush(self, session: "SpecSession", n: int) -> int:
        """Advance the drafter past every pending token; returns how many plain steps it caught up on."""
        steps, drafter = self.steps, self.drafter
        if not steps:
            return 0
        hidden = torch.cat(self.hidden, 1) if self.hidden else None  # (B, P, H)
        if self.runner.in_graph_drafter:  # every row of the runner, as its graph advances them: replays of one graph
            self.runner.catch_up(torch.cat(self.tokens, 1), hidden)
        elif self.on_host:
            _advance_all(drafter, session.draft_state, torch.cat(self.host, 1), None)
        else:
            _advance_all(drafter, session.draft_state, torch.cat(self.tokens, 1)[:n],
                         None if hidden is None else hidden[:n])
        self.tokens, self.hidden, self.host, self.steps = [], [], [], 0
        return steps

    def settle(self, session: "SpecSession", n: int, policy) -> None:
        """flush, its device work waited for, its time charged to the plain steps it caught up on (policy.charge).
        A graph catch-up costs one replay per chunk whatever the count in it: it is billed to the steps its chunks
        hold (what a steady run of plain steps pays per step), not only to the few steps of a short burst."""
        t0 = time.perf_counter()
        steps = self.flush(session, n)
        _wait(self.runner.verified.device)
        C = self.runner.CATCH_UP_WIDTH
        billed = -(-steps // C) * C if self.runner.in_graph_drafter else steps  # whole chunks, as catch_up replays
        policy.charge(n, False, time.perf_counter() - t0, billed)


class _AsyncTokens:
    """A static step's packed tokens copied to the host without blocking (pinned memory and an event on CUDA), so
    that the next step can be replayed before the host waits for them."""

    def __init__(self, shape: tuple, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(shape, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def copy(self, packed: torch.Tensor) -> None:
        self.host.copy_(packed, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def wait(self) -> torch.Tensor:
        if self.cuda:
            self.event.synchronize()
        return self.host


class SpecSession:
    """Active sequences of one engine: row r of every state belongs to sequence `rows[r]`.

    A session belongs to one thread at a time (a concurrent add / step / drop / run_static from another thread raises
    RuntimeError); an engine may serve many sessions, in as many threads."""

    def __init__(self, engine: SpeculativeEngine):
        self._busy, self._owner = threading.Lock(), None
        self.engine = engine
        self.sequences: dict[int, _Sequence] = {}
        self.rows: list[int] = []
        self.target_state = None
        self._draft_state = None
        # plain steps leave the drafter's catch-up pending (tokens (B, 1) and target hidden (B, 1, H) per step): it
        # runs as ONE chain advance when the drafter's state is next read (a speculative step, a change of rows), so
        # a run of plain steps costs what plain decoding costs (the adaptive fall-back)
        self._pending_tokens: list[torch.Tensor] = []
        self._pending_hidden: list[torch.Tensor] = []
        self.verified: torch.Tensor | None = None  # (rows,) next root token per row
        self._next_id = 0

    MAX_PENDING = 32  # plain steps whose catch-up may wait (bounds the catch-up chain and the stored hidden states)
    # the same for in-graph drafters of a static run, whose catch-up is replays of one graph chunk (runner.catch_up):
    # a long run of plain steps (speculation losing) pays no catch-up until a speculative step is chosen again
    MAX_PENDING_GRAPH = 256

    @property
    def draft_state(self):
        """The drafter's state, caught up on every committed token (a pending catch-up of plain steps runs first)."""
        if self._pending_tokens:
            self._flush_drafter()
        return self._draft_state

    @draft_state.setter
    def draft_state(self, value) -> None:
        self._draft_state = value
        self._pending_tokens, self._pending_hidden = [], []

    def _flush_drafter(self) -> None:
        tokens = torch.cat(self._pending_tokens, dim=1)  # (B, P)
        hidden = torch.cat(self._pending_hidden, dim=1) if self._pending_hidden else None
        self._pending_tokens, self._pending_hidden = [], []
        _advance_all(self.engine.drafter, self._draft_state, tokens, hidden)

    @property
    def active(self) -> list[int]:
        return list(self.rows)

    def _get(self, seq_id) -> _Sequence:
        try:
            return self.sequences[seq_id]
        except (KeyError, TypeError):
            known = sorted(self.sequences)
            raise UnknownSequenceError(f"no sequence with id {seq_id!r} in this session (ids are what add() returned: "
                                       f"{known[:8]}{' ...' if len(known) > 8 else ''})") from None

    def sequence(self, seq_id: int) -> torch.Tensor:
        """The prompt followed by the tokens emitted so far for sequence `seq_id` (an id returned by `add`)."""
        s = self._get(seq_id)
        return torch.cat([s.prompt, torch.tensor(s.new_tokens, dtype=torch.long)]).to(self.engine.target.device)

    def _samplings(self, n: int, temperature, top_k, top_p, seed) -> list[SeqSampling | None]:
        """Per-sequence settings of add(); None where all four are left out (the engine's, read at each step)."""
        eng = self.engine
        given = [per_sequence(v, n, name) for v, name in
                 ((temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p"))]
        seeds = per_sequence(seed, n, "seed")
        out = []
        for t, k, p, s in zip(*given, seeds):
            if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
                raise ValueError(f"seed must be None or an int, got {s!r}")
            if t is ENGINE_DEFAULT and k is ENGINE_DEFAULT and p is ENGINE_DEFAULT and s is None:
                out.append(None)
                continue
            t = eng.temperature if t is ENGINE_DEFAULT else t
            k = eng.top_k if k is ENGINE_DEFAULT else k
            p = eng.top_p if p is ENGINE_DEFAULT else p
            out.append(SeqSampling.seeded(t, k, p, s, eng.generator))  # checks the values (ValueError)
        return out

    def _row_samplings(self, seq_ids: list[int] | None = None) -> list[SeqSampling] | None:
        """The settings of sequences `seq_ids` (default: the active rows); None when every one of them uses the
        engine's (then the engine's own accept / sample run, as before per-sequence settings existed)."""
        own = [self.sequences[i].sampling for i in (self.rows if seq_ids is None else seq_ids)]
        if all(s is None for s in own):
            return None
        eng = self.engine
        default = SeqSampling(eng.temperature, eng.top_k, eng.top_p, eng.generator)
        return [default if s is None else s for s in own]

    def _sample(self, logits: torch.Tensor, seq_ids: list[int]) -> torch.Tensor:
        samplings = self._row_samplings(seq_ids)
        return self.engine.sample(logits) if samplings is None else sample_grouped(logits, samplings)

    @exclusive
    @torch.inference_mode()
    def add(self, prompts: list[torch.Tensor], *, max_new_tokens, eos_token_id=None, temperature=ENGINE_DEFAULT,
            top_k=ENGINE_DEFAULT, top_p=ENGINE_DEFAULT, seed=None) -> list[int]:
        """Prefill target and drafter on new prompts, emit their first token, and add them to the pool.

        max_new_tokens: one value for all, or a list with one entry per prompt. eos_token_id: stop ids, one id or a
        list for all, or per-sequence entries (see per_sequence_stops). temperature / top_k / top_p / seed: one value
        for all or a list with one entry per prompt; a setting left out takes the engine's; a seed gives the sequence
        a torch.Generator of its own (its tokens then do not depend on the other sequences of the batch), without one
        it draws from the engine's generator. Returns sequence ids."""
        eng = self.engine
        target = eng.target
        prompts, _ = normalize_prompts(list(prompts) if isinstance(prompts, (list, tuple)) else prompts,
                                       vocab_size=target.vocab_size)
        budgets = per_sequence(max_new_tokens, len(prompts), "max_new_tokens")
        stops = per_sequence_stops(eos_token_id, len(prompts))
        for m in budgets:
            check_generation_args(m, None)
        samplings = self._samplings(len(prompts), temperature, top_k, top_p, seed)
        all_ids = []
        for p, m, e, smp in zip(prompts, budgets, stops, samplings):
            self.sequences[self._next_id] = _Sequence(p.cpu().long(), m, e, done=m == 0, sampling=smp)
            all_ids.append(self._next_id)
            self._next_id += 1
        live = [r for r, m in enumerate(budgets) if m > 0]
        if not live:
            return all_ids
        prompts = [prompts[r].to(target.device).long() for r in live]
        ids = [all_ids[r] for r in live]
        need_hidden = getattr(eng.drafter, "needs_target_hidden", False)
        states, logits, hiddens = [], [], []
        same_len = len({p.numel() for p in prompts}) == 1
        groups = [prompts] if same_len else [[p] for p in prompts]
        for group in groups:
            ids_g = torch.stack(group)
            graphed = graph_prefill(target, ids_g)  # CUDA: one graph replay per (batch, length)
            if graphed is not None:
                st, lg, hs = graphed
            else:
                out = target(ids_g, logits_to_keep=1)
                st, lg, hs = out.state, out.logits[:, -1], out.hidden_states
            states.append(st)
            logits.append(lg)
            hiddens.extend(list(hs) if need_hidden else [])
        t_state = ModelState.cat(states) if len(states) > 1 else states[0]
        check_finite(torch.cat(logits))
        first = self._sample(torch.cat(logits), ids)
        d_state = eng.drafter.begin(prompts, target_hidden=hiddens if need_hidden else None)
        keep = []
        for r, (i, tok) in enumerate(zip(ids, first.tolist())):
            self.sequences[i].emit([tok])
            if not self.sequences[i].done:
                keep.append(r)
        if len(keep) != len(ids):
            t_state, d_state, first = t_state.select(keep), d_state.select(keep), first[keep]
        new_rows = [ids[r] for r in keep]
        if not new_rows:
            return all_ids
        if self.rows:
            self.target_state = ModelState.cat([self.target_state, t_state])
            self.draft_state = type(d_state).cat([self.draft_state, d_state])
            self.verified = torch.cat([self.verified, first])
        else:
            self.target_state, self.draft_state, self.verified = t_state, d_state, first
        self.rows.extend(new_rows)
        return all_ids

    @exclusive
    def drop(self, seq_ids: list[int]) -> None:
        """Stop sequences (they keep the tokens they have); seq_ids: ids returned by `add`."""
        if not isinstance(seq_ids, (list, tuple, set, range)):
            raise TypeError(f"seq_ids must be a list of sequence ids, got {type(seq_ids).__name__}")
        for s in [self._get(i) for i in seq_ids]:  # all checked before any is dropped
            s.done = True
        self._compact()

    def _compact(self) -> None:
        keep = self._live_rows()
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[r] for r in keep]
        if not keep:
            self.target_state = self.draft_state = self.verified = None
            return
        self.target_state = self.target_state.select(keep)
        self.draft_state = self.draft_state.select(keep)
        self.verified = self.verified[keep]

    def _live_rows(self) -> list[int]:
        """Indices into self.rows of the sequences not done."""
        return [r for r, i in enumerate(self.rows) if not self.sequences[i].done]

    def _emit(self, rows_tokens: list[list[int]], drafted: list[int], accepted: list[int], *,
              rows: list[int] | None = None) -> dict[int, list[int]]:
        """Emit each row's tokens and count the step in its sequence and the engine's stats (rows: only these row
        indices; the others made no step)."""
        if rows is not None:
            keep = set(rows)
            pick = [r for r in range(len(self.rows)) if r in keep]
            seq_ids = [self.rows[r] for r in pick]
            rows_tokens, drafted, accepted = ([v[r] for r in pick] for v in (rows_tokens, drafted, accepted))
        else:
            seq_ids = self.rows
        new, emitted_counts = {}, []
        for seq_id, toks, d, a in zip(seq_ids, rows_tokens, drafted, accepted):
            seq = self.sequences[seq_id]
            new[seq_id] = seq.emit(toks)
            emitted_counts.append(len(new[seq_id]))  # after eos / budget truncation
            seq.verify_steps += 1
            seq.draft_tokens += d
            seq.accepted_tokens += a
        self.engine.stats.record(drafted=drafted, accepted=accepted, emitted=emitted_counts)
        return new

    @exclusive
    @torch.inference_mode()
    def run_static(self, *, max_len: int) -> None:
        """Decode every active sequence to the end with static, graph-replayed steps (greedy or sampling). Rows that finish are
        moved out, and the rest continue in the smallest batch bucket that holds them."""
        own = [self.sequences[i].sampling for i in self.rows]
        if any(s is not None and not (s.greedy and self.engine.temperature == 0) for s in own):
            raise ValueError("run_static: static (CUDA graph) speculative steps sample every row with the engine's "
                             "settings; this session has sequences added with settings of their own (use step())")
        with static_lock(self.engine.target):  # cached runners (and CUDA graph capture) serve one caller at a time
            self._run_static(max_len)

    PLAIN_BURST = 16  # plain steps replayed back to back before the host reads their tokens (one sync per burst)

    def _run_static(self, max_len: int) -> None:
        from gdnspec.runtime import batch_bucket

        eng = self.engine
        policy = eng.policy  # None: every step speculative; else the adaptive choice per step (spec/policy.py)
        plain_drafter = policy is not None and bool(getattr(eng.drafter, "plain", False))
        # drafters that draft from Python lists (n-gram, oracle) get host tensors: no device sync or copy of their own
        on_host = bool(getattr(eng.drafter, "drafts_on_host", False))
        sampling = eng.temperature > 0
        if sampling:  # one stream per sequence: (seed of the run, sequence id), counter = steps taken in this run
            seeds = row_seeds(base_seed(None, eng.generator), self.rows).to(eng.target.device)
            counters = torch.zeros_like(seeds)
        kind = None  # the next step's kind when a plain burst (or the look-ahead) already chose it
        while self.rows:
            n = len(self.rows)
            runner = eng.runner(batch_bucket(n), max_len)
            runner.load(self.target_state, self.draft_state, self.verified)
            if sampling:
                runner.set_sampling(temperature=eng.temperature, top_k=eng.top_k, top_p=eng.top_p, seeds=seeds,
                                    counters=counters)
            W = runner.path_width
            verified_host = self.verified.cpu() if on_host else None
            pending = _StaticCatchUp(eng.drafter, runner, on_host)  # the drafter's debt from plain steps
            ahead = self._lookahead(runner)
            launched = False  # a speculative step was replayed ahead: the host has not read its tokens yet
            undo = None  # the policy's tentative choice of the step after the one being read
            t_last = 0.0
            while True:
                kind = kind if kind is not None else (True if policy is None else policy.choose(n))
                kind = kind and not plain_drafter  # a NullDrafter's steps are plain whatever a policy says
                if not kind:
                    kind, verified_host = self._plain_burst(runner, policy, pending, verified_host, n)
                else:
                    kind, no_drafts = None, False
                    if not launched:
                        if pending:  # the catch-up's time belongs to the plain steps
                            pending.settle(self, n, policy)
                        t_last = time.perf_counter()
                        tree = None
                        if not runner.in_graph_drafter:
                            tree = eng.drafter.propose(self.draft_state, verified_host if on_host else self.verified,
                                                       eng.config)
                            if tree.draft_probs is not None:
                                raise ValueError("a host-drafted tree with draft_probs cannot run in a static runner")
                            no_drafts = on_host and self.EMPTY_TREE_PLAIN and not bool(tree.valid[:n, 1:].any())
                        if no_drafts:  # recorded below as what choosing a speculative step cost this time
                            verified_host, emitted = self._host_plain_step(runner, verified_host, n)
                        else:
                            runner.step(tree)
                    if not no_drafts:
                        launched, undo = False, None
                        if ahead is None:
                            pk = runner.packed[:n].cpu()  # the one sync and copy per step
                        else:  # copy this step's tokens, replay the next step, then wait for the copy only
                            ahead.copy(runner.packed)
                            if self._budget_left() > W:  # no row can reach its budget in this step
                                kind, undo = (True, None) if policy is None else policy.choose_tentatively(n)
                                if kind:
                                    runner.step(None)
                                    launched, undo = True, None  # made: a row that ends now leaves it unread
                            pk = ahead.wait()[:n]
                        verified_host, emitted = self._static_spec_tokens(runner, pk, n, on_host, verified_host)
                    if policy is not None:
                        now = time.perf_counter()
                        policy.record(n, True, now - t_last, emitted)
                        t_last = now
                keep = self._live_rows()
                if len(keep) < n:
                    break
                undo = None  # the step chosen ahead is made
            if undo is not None:  # the look-ahead's choice for a step that is not made for these n rows
                policy.retract(undo)
                kind = None
            if launched and keep:  # the step replayed ahead ran for every row: its tokens go to the rows still running
                # (when none is, it changed nothing that is read again: the run ends)
                _, emitted = self._static_spec_tokens(runner, runner.packed[:n].cpu(), n, on_host, verified_host,
                                                      rows=keep)
                if policy is not None:
                    policy.record(n, True, time.perf_counter() - t_last, emitted)
                kind = None
                keep = self._live_rows()
            if pending and keep:  # the drafter's state must hold every committed token before its rows are selected
                pending.flush(self, n)
            self.verified = runner.verified[:n].clone()
            if sampling:
                seeds, counters = seeds[keep], runner.counters[:n][keep]
            self.rows = [self.rows[r] for r in keep]
            if not keep:
                self.target_state = self.draft_state = self.verified = None
                return
            self.target_state = runner.target_state.select(keep)
            self.draft_state = runner.draft_state.select(keep) if runner.in_graph_drafter else self.draft_state.select(keep)
            self.verified = self.verified[keep]

    LOOKAHEAD: bool | None = None  # replay the next speculative step before reading a step's tokens (None: on CUDA)

    def _lookahead(self, runner) -> "_AsyncTokens | None":
        """The look-ahead's copy buffer for in-graph drafters (their next step needs nothing from the host), or None.
        Replaying step k + 1 before the host reads step k's tokens keeps the GPU busy while the host emits them (an
        H200 sat idle ~60 us of each ~650 us EAGLE tree step, the host's per-step work)."""
        on = self.LOOKAHEAD if self.LOOKAHEAD is not None else runner.verified.device.type == "cuda"
        if not (on and runner.in_graph_drafter):
            return None
        return _AsyncTokens((runner.batch_size, runner.path_width + 3), runner.verified.device)

    EMPTY_TREE_PLAIN = True  # a host drafter's step without drafted tokens runs as a plain step (same tokens)

    def _host_plain_step(self, runner, verified_host: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """A host drafter (n-gram) proposed nothing for any row: a speculative step would verify a root-only tree
        at the price of the runner's N-node verify (~2.5x a decode step for the bundle's tree-4x5) to emit one token
        per row, the token a plain step emits (greedy: the argmax; sampling: the same law). Runs the runner's plain
        step instead and feeds the drafter the committed root. Returns (the host's verified tokens, tokens emitted)."""
        runner.prepare_plain()
        tok, _ = runner.plain_step()
        host = tok[:n].cpu()  # the step's one sync
        self.engine.drafter.advance(self.draft_state, tokens=verified_host[:, None],
                                    counts=torch.ones(n, dtype=torch.long), target_hidden=None)
        return host, self._emit_plain(host.tolist())

    def _emit_plain(self, column: list[int]) -> int:
        """One plain step's token per row (column[r] for row r) to the sequences not done; returns the tokens
        emitted."""
        emitted = 0
        for seq_id, t in zip(self.rows, column):
            seq = self.sequences[seq_id]
            if not seq.done:
                emitted += len(seq.emit([t]))
                seq.plain_steps += 1
        return emitted

    def _budget_left(self) -> int:
        """The fewest tokens any active row may still emit."""
        return min(self.sequences[i].max_new_tokens - len(self.sequences[i].new_tokens) for i in self.rows)

    def _static_spec_tokens(self, runner, pk: torch.Tensor, n: int, on_host: bool, verified_host, rows=None):
        """Emit a static speculative step's tokens from its packed output pk (n, W + 3) on the host (only to `rows`,
        row indices, when given: the rows still running after a step replayed ahead); advances drafters outside the
        graph. Returns (the host's verified tokens (host drafters), tokens emitted)."""
        W = runner.path_width
        pt, cn, bo, dr = pk[:, :W], pk[:, W], pk[:, W + 1], pk[:, W + 2]
        if not runner.in_graph_drafter:
            eng = self.engine
            if on_host:
                verified_host = bo
                eng.drafter.advance(self.draft_state, tokens=pt, counts=cn, target_hidden=None)
            else:
                path_tokens, counts, bonus, hidden, _ = runner.last_outputs
                eng.drafter.advance(self.draft_state, tokens=path_tokens[:n], counts=counts[:n],
                                    target_hidden=None if hidden is None else hidden[:n])
                self.verified = bonus[:n].clone()
        rows_tokens = [row[1:c] + [b] for row, c, b in zip(pt.tolist(), cn.tolist(), bo.tolist())]
        drafted, accepted = dr.tolist(), (cn - 1).tolist()
        new = self._emit(rows_tokens, drafted, accepted, rows=rows)
        return verified_host, sum(len(t) for t in new.values())

    def _plain_burst(self, runner, policy, pending: "_StaticCatchUp", verified_host, n: int):
        """Plain steps of the static runner (the policy chose plain): replayed back to back while the policy keeps
        choosing plain, at most PLAIN_BURST, never past the smallest remaining budget (no row outgrows the runner's
        KV room) nor past the drafter's pending limit; then ONE sync reads their tokens, each is emitted and recorded
        with the policy (the burst's seconds shared equally). Returns (the kind the policy chose for the step after
        the burst or None, the host's verified tokens for host drafters)."""
        left = self._budget_left()
        most = self.MAX_PENDING_GRAPH if runner.in_graph_drafter else self.MAX_PENDING
        if len(pending) >= most:
            pending.settle(self, n, policy)
        limit = max(1, min(self.PLAIN_BURST, left, most - len(pending)))
        runner.prepare_plain()  # the first calls capture their graphs: not part of any step's time
        if runner.in_graph_drafter:
            runner.prepare_catch_up()
        t0 = time.perf_counter()
        fed = runner.verified.clone()  # (B,) the token each plain step decodes: this, then the previous step's
        outs, hidden = [], []
        nxt_kind = undo = None
        while True:
            tok, hid = runner.plain_step()
            outs.append(tok.clone())
            if hid is not None:
                hidden.append(hid.clone())
            if len(outs) >= limit:
                break
            nxt_kind, undo = policy.choose_tentatively(n)  # the next step's kind, before this one's tokens are read
            if nxt_kind:
                break
            nxt_kind = None
        toks = torch.stack(outs, 1)  # (B, k)
        host = toks[:n].cpu()  # the one sync of the burst
        k = host.shape[1]
        pending.add(torch.cat([fed[:, None], toks[:, :-1]], 1), hidden,
                    torch.cat([verified_host[:, None], host[:, :-1]], 1) if verified_host is not None else None)
        seconds = (time.perf_counter() - t0) / k
        for column in host.t().tolist():
            policy.record(n, False, seconds, self._emit_plain(column))
        if not runner.in_graph_drafter and verified_host is None:  # device drafters outside the graph propose from it
            self.verified = runner.verified[:n].clone()
        if nxt_kind and any(self.sequences[i].done for i in self.rows):
            policy.retract(undo)  # rows finished: that step is not made for these n rows; the caller chooses again
            nxt_kind = None
        return nxt_kind, (host[:, -1] if verified_host is not None else None)

    @exclusive
    @torch.inference_mode()
    def step(self, *, speculate: bool = True) -> dict[int, list[int]]:
        """One draft -> verify -> accept -> commit step for every active sequence; returns the new tokens per sequence.

        speculate=False (and every step with a NullDrafter): one plain decode step instead, one token per sequence,
        as generate_autoregressive decodes; the drafter catches up on the token (a scheduler may switch between the
        two at any step, e.g. plain steps at large batch sizes where verifying trees costs more than it gains)."""
        if not self.rows:
            return {}
        eng = self.engine
        target, drafter = eng.target, eng.drafter
        if not speculate or getattr(drafter, "plain", False):
            return self._plain_step()
        draft = eng.draft_sampling(len(self.rows))
        sizer = eng.sizer if draft is None else None  # stochastic trees keep their draw order: not sized
        config = eng.config if sizer is None else sizer.step_config(eng.config, batch_size=len(self.rows))
        draft_state = self.draft_state  # a pending catch-up of plain steps runs here, outside the drafting time
        t0 = time.perf_counter()
        tree = propose_tree(drafter, draft_state, self.verified, config, draft=draft)
        tree.validate()
        if sizer is not None:
            _wait(target.device)
            draft_seconds = time.perf_counter() - t0
            tree, depth = sizer.cut(tree, draft_seconds=draft_seconds)
        if eng.trim_trees:
            tree = trim_tree(tree)
        layout = tree.layout()
        t1 = time.perf_counter()
        ver = target.forward_tree(tree.tokens, state=self.target_state, layout=layout)
        if sizer is not None:
            _wait(target.device)
            t2 = time.perf_counter()
        samplings = self._row_samplings()
        acc = eng.accept(tree, ver.logits, layout) if samplings is None else accept_grouped(tree, ver.logits, layout,
                                                                                           samplings)
        target.commit_tree(self.target_state, ver, path=acc.path, counts=acc.counts, all_rows_accept=True)  # counts >= 1
        path_tokens = acc.path_tokens(tree)
        hidden = None
        if getattr(drafter, "needs_target_hidden", False):
            H = ver.hidden_states.shape[-1]
            hidden = ver.hidden_states.gather(1, acc.path[..., None].expand(*acc.path.shape, H))
        drafter.advance(self.draft_state, tokens=path_tokens, counts=acc.counts, target_hidden=hidden)
        accepted = (acc.counts - 1).tolist()
        new = self._emit(acc.emitted(tree), tree.num_drafted().tolist(), accepted)
        self.verified = acc.bonus
        if sizer is not None:
            _wait(target.device)
            t3 = time.perf_counter()
            sizer.record(tree=tree, accepted=accepted, draft_seconds=draft_seconds, depth=depth, verify_seconds=t2 - t1,
                         rest_seconds=t3 - t2)
        self._compact()
        return new

    @exclusive
    def adaptive_step(self, policy) -> tuple[dict[int, list[int]], bool]:
        """One step of the kind `policy` (spec/policy.StepPolicy) chooses for the active rows, timed and recorded
        with it; returns (new tokens per sequence, speculative). Before a speculative step the drafter's pending
        catch-up (left by plain steps) runs on its own and is charged to those plain steps (`policy.charge`)."""
        if not self.rows:
            return {}, False
        n = len(self.rows)
        kind = policy.choose(n) and not getattr(self.engine.drafter, "plain", False)  # a NullDrafter only steps plainly
        if kind and self._pending_tokens:
            steps = len(self._pending_tokens)
            t0 = time.perf_counter()
            self._flush_drafter()
            _wait(self.engine.target.device)  # launched work is paid here, not by the next (speculative) step
            policy.charge(n, False, time.perf_counter() - t0, steps)
        t0 = time.perf_counter()
        new = self.step(speculate=kind)
        policy.record(n, kind, time.perf_counter() - t0, sum(len(t) for t in new.values()))
        return new, kind

    def _plain_step(self) -> dict[int, list[int]]:
        eng = self.engine
        drafter = eng.drafter
        out = eng.target(self.verified[:, None], self.target_state, logits_to_keep=1)
        nxt = self._sample(out.logits[:, -1], self.rows)
        if len(self._pending_tokens) >= self.MAX_PENDING:
            self._flush_drafter()
        self._pending_tokens.append(self.verified[:, None])  # the drafter catches up later, all at once
        if getattr(drafter, "needs_target_hidden", False):
            self._pending_hidden.append(out.hidden_states[:, -1:])
        new = {}
        for seq_id, tok in zip(self.rows, nxt.tolist()):
            seq = self.sequences[seq_id]
            new[seq_id] = seq.emit([tok])
            seq.plain_steps += 1
        self.verified = nxt
        self._compact()
        return new
