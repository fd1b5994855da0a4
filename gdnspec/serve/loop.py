"""The engine loop: one thread owns the model and one SpecSession (the slot pool); requests join and leave it between
steps (continuous batching).

    loop = EngineLoop(engine, tokenizer=tok, max_batch_size=16, max_queue_size=64, metrics=Metrics(), policy=policy)
    loop.start()
    loop.submit(GenRequest(...))      # QueueFull when max_queue_size requests wait already; Unavailable when stopping
    loop.cancel(req)                  # a client that went away: its slot is freed before the next step
    loop.drain(seconds); loop.stop()  # SIGTERM: finish in-flight requests, abort what is left after `seconds`

One iteration: drop cancelled sequences, admit waiting requests while the batch has room (their prefill emits their
first token), run one step for the batch (speculative or plain, as `StepPolicy` decides), then hand every request
its new text (`GenRequest.deliver(Event)`, called on this thread: it must be thread-safe, e.g. the asyncio loop's
call_soon_threadsafe). Requests that finished (a stop id, a stop string, max_tokens) leave the pool at once.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from gdnspec.serve.text import TextOutput
from gdnspec.spec.policy import StepPolicy


class QueueFull(Exception):
    """The wait queue is at its bound (answered 429)."""


class Unavailable(Exception):
    """The server is shutting down (answered 503)."""


@dataclass
class Event:
    """What a request gets after a step: new text; the last event has finish_reason, usage and spec_stats."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop, length, abort, error
    usage: dict | None = None
    spec_stats: dict | None = None
    error: str | None = None


@dataclass(eq=False)
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    deliver: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    tokenizer: object = None
    arrival: float = field(default_factory=time.perf_counter)
    seq_id: int | None = None
    first_at: float | None = None
    last_at: float | None = None
    finished: bool = False
    out: TextOutput | None = None
    sent_ids: int = 0  # generated token ids handed out in events so far

    def new_ids(self) -> list[int]:
        ids = self.out.token_ids[self.sent_ids:]
        self.sent_ids += len(ids)
        return ids

    def __post_init__(self):
        self.out = TextOutput(self.tokenizer, self.prompt_ids, stop_strings=list(self.stop_strings),
                              stop_ids=self.stop_ids)


class EngineLoop:
    def __init__(self, engine, *, max_batch_size: int, max_queue_size: int, metrics, policy: StepPolicy):
        self.engine = engine
        self.session = engine.session()
        self.max_batch_size, self.max_queue_size = max_batch_size, max_queue_size
        self.metrics, self.policy = metrics, policy
        self._cond = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._cancel: set[GenRequest] = set()
        self._running: dict[int, GenRequest] = {}  # seq id -> request (read by other threads under _cond only)
        self._deadline: float | None = None  # drain: abort what is left at this time
        self._expired = False  # the deadline passed (and what was left was aborted)
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="gdnspec-engine-loop", daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ called from other threads
    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop

    def submit(self, req: GenRequest) -> None:
        with self._cond:
            if self._stop or self._deadline is not None:
                raise Unavailable("the server is shutting down")
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (--max-queue-size)")
            self._waiting.append(req)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, req: GenRequest) -> None:
        """The client went away: a waiting request leaves the queue, a running one is dropped before the next step."""
        with self._cond:
            if req.finished:
                return
            if req in self._waiting:
                self._waiting.remove(req)
                req.finished = True
                self.metrics.waiting.set(len(self._waiting))
                self.metrics.requests.labels("abort").inc()
                return
            self._cancel.add(req)
            self._cond.notify()

    def drain(self, seconds: float) -> None:
        """Stop admitting new requests; in-flight ones may finish for `seconds`, then the rest are aborted."""
        with self._cond:
            if self._deadline is None:
                self._deadline = time.monotonic() + seconds
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def counts(self) -> tuple[int, int]:
        with self._cond:
            return len(self._running), len(self._waiting)

    # ------------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._iteration():
                    pass
        except BaseException as e:  # noqa: BLE001 (reported, then every request is told)
            self.error = e
            traceback.print_exc(file=sys.stderr)
        finally:
            with self._cond:
                self._stop = True
                left = list(self._running.values()) + list(self._waiting)
                self._waiting.clear()
            for req in left:
                self._finish(req, "abort", drop=False)
            self.metrics.running.set(0)
            self.metrics.waiting.set(0)

    def _iteration(self) -> bool:
        with self._cond:
            while not (self._stop or self._waiting or self._cancel or self._running):
                timeout = None
                if self._deadline is not None and not self._expired:
                    timeout = self._deadline - time.monotonic()
                    if timeout <= 0:
                        break
                self._cond.wait(timeout)
            if self._stop:
                return False
            cancels, self._cancel = [r for r in self._cancel if not r.finished], set()
            room = self.max_batch_size - (len(self._running) - len(cancels))
            admit = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            self.metrics.waiting.set(len(self._waiting))
        if cancels:
            self._finish_many(cancels, "abort")
        if admit:
            self._guarded(self._admit, admit)
        if self.session.active:
            self._guarded(self._step)
        if self._deadline is not None and not self._expired and time.monotonic() >= self._deadline:
            with self._cond:
                self._expired = True
                left = list(self._running.values()) + list(self._waiting)
                self._waiting.clear()
            self._finish_many(left, "abort")
        self.metrics.running.set(len(self._running))
        return True

    def _guarded(self, fn, *args) -> None:
        """Run an engine call; if it fails, every running request ends with an error and the pool starts afresh
        (the server keeps serving)."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            with self._cond:
                failed = list(self._running.values()) + [r for r in (args[0] if args else []) if not r.finished
                                                         and r.seq_id is None]
                self._running.clear()
            for req in failed:
                self._finish(req, "error", drop=False, error=f"{type(e).__name__}: {e}")
            self.session = self.engine.session()

    def _admit(self, reqs: list[GenRequest]) -> None:
        prompts = [torch.tensor(r.prompt_ids, dtype=torch.long) for r in reqs]
        ids = self.session.add(prompts, max_new_tokens=[r.max_tokens for r in reqs],
                               eos_token_id=[list(r.stop_ids) for r in reqs],
                               temperature=[r.temperature for r in reqs], top_k=[r.top_k for r in reqs],
                               top_p=[r.top_p for r in reqs], seed=[r.seed for r in reqs])
        now = time.perf_counter()
        with self._cond:
            for r, sid in zip(reqs, ids):
                r.seq_id = sid
                self._running[sid] = r
        for r in reqs:
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        done = []
        for r in reqs:
            seq = self.session.sequences[r.seq_id]
            if self._tokens(r, seq.new_tokens, now) or seq.done:
                done.append(r)
        self._finish_many(done, None)

    def _step(self) -> None:
        rows = list(self.session.rows)
        seqs = [self.session.sequences[i] for i in rows]
        before = [(s.draft_tokens, s.accepted_tokens) for s in seqs]
        sizer = getattr(self.engine, "sizer", None)
        sized_before = None if sizer is None else sizer.steps
        new, speculate = self.session.adaptive_step(self.policy)
        now = time.perf_counter()
        if speculate and not getattr(self.engine.drafter, "plain", False):
            sized = sizer.last if sizer is not None and sizer.steps != sized_before else None
            self.metrics.record_spec(drafted=[s.draft_tokens - d for s, (d, _) in zip(seqs, before)],
                                     accepted=[s.accepted_tokens - a for s, (_, a) in zip(seqs, before)], sized=sized)
        else:
            self.metrics.steps.labels("plain").inc()
        done = []
        for sid, toks in new.items():
            req = self._running.get(sid)
            if req is None:
                continue
            if self._tokens(req, toks, now) or self.session.sequences[sid].done:
                done.append(req)
        self._finish_many(done, None)

    def _tokens(self, req: GenRequest, tokens: list[int], now: float) -> bool:
        """Hand a request its new tokens; True when its text says it is over (a stop string or id)."""
        before = req.out.num_tokens
        over = False
        for t in tokens:
            if req.out.push(t):
                over = True
                break
        n = req.out.num_tokens - before
        if n:
            self.metrics.generation_tokens.inc(n)
            if req.first_at is None:
                req.first_at = now
                self.metrics.ttft.observe(now - req.arrival)
                n -= 1
            if n > 0:
                per = (now - req.last_at) / n
                for _ in range(n):
                    self.metrics.itl.observe(per)
            req.last_at = now
        if not over:
            text = req.out.take()
            if text or n:
                req.deliver(Event(text=text, token_ids=req.new_ids()))
        return over

    def _finish_many(self, reqs: list[GenRequest], reason: str | None) -> None:
        live = [r.seq_id for r in reqs if r.seq_id is not None and r.seq_id in self.session.sequences
                and r.seq_id in self.session.rows]
        if live:
            self.session.drop(live)
        for r in reqs:
            self._finish(r, reason, drop=False)

    def _finish(self, req: GenRequest, reason: str | None, *, drop: bool, error: str | None = None) -> None:
        """The request's last event: the rest of its text, why it ended, usage, spec statistics."""
        if req.finished:
            return
        req.finished = True
        seq = self.session.sequences.get(req.seq_id) if req.seq_id is not None else None
        if drop and seq is not None and req.seq_id in self.session.rows:
            self.session.drop([req.seq_id])
        if reason is None:
            reason = req.out.finish_reason or ("length" if req.out.num_tokens >= req.max_tokens else "stop")
        req.out.finish()
        text = req.out.take()
        spec = seq.spec_summary() if seq is not None else None
        with self._cond:
            if req.seq_id is not None:
                self._running.pop(req.seq_id, None)
        if seq is not None:
            self.session.sequences.pop(req.seq_id, None)  # the pool keeps no finished sequence
        self.metrics.requests.labels(reason).inc()
        if req.last_at is not None:
            self.metrics.e2e.observe(req.last_at - req.arrival)
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": req.out.num_tokens,
                 "total_tokens": len(req.prompt_ids) + req.out.num_tokens}
        try:
            req.deliver(Event(text=text, token_ids=req.new_ids(), finish_reason=reason, usage=usage,
                              spec_stats=spec, error=error))
        except Exception:  # noqa: BLE001 (the receiving event loop is gone: nobody is waiting)
            pass
