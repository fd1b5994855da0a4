"""Turning logits into the distribution we sample from: temperature, top-k, top-p (nucleus).

Plain decoding and speculative acceptance both use `logits_to_probs`, so the speculative output is distributed
exactly as plain sampling with the same settings. temperature == 0 means greedy (argmax).
"""
from __future__ import annotations

import math

import torch


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the argument: temperature a finite number >= 0, top_k None or an int >= 1 (not a
    bool), top_p None or a number in (0, 1]."""
    if not _is_real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (_is_real(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def check_generator(generator) -> None:
    """Raise TypeError unless generator is None or a torch.Generator (caught at the entry point, not at the first
    sampled token deep inside)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


def logits_to_probs(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float | None = None
                    ) -> torch.Tensor:
    """logits (..., vocab) -> probabilities (..., vocab) in float32 (float64 for float64 logits). temperature > 0."""
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, vocab) -> token ids (B,). Greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
