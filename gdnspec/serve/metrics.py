"""Prometheus metrics of one server (its own registry), named as vLLM's with a `gdnspec:` prefix.

    gdnspec:request_success_total{finished_reason}      finished requests by reason (stop, length, abort, error)
    gdnspec:prompt_tokens_total / generation_tokens_total
    gdnspec:num_requests_running / num_requests_waiting (gauges)
    gdnspec:time_to_first_token_seconds                  arrival -> first token (histogram)
    gdnspec:inter_token_latency_seconds                  per generated token after the first: the step's wall time
                                                         over the tokens it gave the request (histogram)
    gdnspec:e2e_request_latency_seconds                  arrival -> last token (histogram)
    gdnspec:spec_decode_num_drafts_total                 speculative (sequence, step) pairs: one draft tree each
    gdnspec:spec_decode_num_draft_tokens_total           drafted tree nodes offered to the target
    gdnspec:spec_decode_num_accepted_tokens_total        drafted tokens accepted
    gdnspec:spec_decode_num_accepted_tokens_per_pos_total{position}   drafts whose accepted path reached position p
    gdnspec:spec_decode_mean_accept_length               tokens per target forward of speculative steps, since start
    gdnspec:spec_decode_steps_total{kind}                engine steps by kind (speculative, plain)
    gdnspec:spec_decode_tree_nodes                       node columns (root included) verified per sized speculative
                                                         step (histogram; spec/sizing.py, eager steps)
    gdnspec:spec_decode_draft_depth                      levels drafted per sized speculative step (histogram)
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # no *_created series: they double the output and nobody reads them

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0)

_NODES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
_DEPTH = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "gdnspec:"
        self.requests = Counter(p + "request_success", "Finished requests by finish reason", ["finished_reason"],
                                registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens (counted in responses)",
                                         registry=r)
        self.running = Gauge(p + "num_requests_running", "Sequences in the engine's batch", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued for a slot", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Latency per generated token after the first",
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY, registry=r)
        self.drafts = Counter(p + "spec_decode_num_drafts", "Speculative (sequence, step) pairs", registry=r)
        self.draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Drafted tokens offered to the target",
                                    registry=r)
        self.accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "Drafted tokens accepted", registry=r)
        self.accepted_per_pos = Counter(p + "spec_decode_num_accepted_tokens_per_pos",
                                        "Drafts whose accepted path reached this draft position (0 = first)",
                                        ["position"], registry=r)
        self.mean_accept_length = Gauge(p + "spec_decode_mean_accept_length",
                                        "Tokens per target forward of speculative steps (accepted + 1), since start",
                                        registry=r)
        self.steps = Counter(p + "spec_decode_steps", "Engine steps by kind", ["kind"], registry=r)
        self.tree_nodes = Histogram(p + "spec_decode_tree_nodes", "Node columns verified per sized speculative step",
                                    buckets=_NODES, registry=r)
        self.draft_depth = Histogram(p + "spec_decode_draft_depth", "Levels drafted per sized speculative step",
                                     buckets=_DEPTH, registry=r)
        self._drafts = self._accepted = 0

    def record_spec(self, *, drafted: list[int], accepted: list[int], sized: tuple[int, int] | None = None) -> None:
        """One speculative step: drafted nodes and accepted draft tokens per sequence; sized: (node columns verified,
        levels drafted) when the step's tree was sized (TreeSizer.last)."""
        self.steps.labels("speculative").inc()
        if sized is not None:
            self.tree_nodes.observe(sized[0])
            self.draft_depth.observe(sized[1])
        self.drafts.inc(len(drafted))
        self.draft_tokens.inc(sum(drafted))
        self.accepted_tokens.inc(sum(accepted))
        for a in accepted:
            for pos in range(a):
                self.accepted_per_pos.labels(str(pos)).inc()
        self._drafts += len(drafted)
        self._accepted += sum(accepted)
        if self._drafts:
            self.mean_accept_length.set(1 + self._accepted / self._drafts)
