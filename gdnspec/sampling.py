"""Turning logits into the distribution we sample from: temperature, top-k, top-p (nucleus); drawing from it.

Plain decoding and speculative acceptance both use `logits_to_probs`, so the speculative output is distributed
exactly as plain sampling with the same settings. temperature == 0 means greedy (argmax).

Two forms of the settings:
    scalars (temperature: float, top_k: int | None, top_p: float | None): one setting for every row (eager API);
    per-row tensors (B,) (temperature float, 0 = greedy; top_k long, >= vocab = off; top_p float, 1 = off): what the
    static (CUDA-graph) steps keep in device buffers, so settings change without re-capture and rows differ
    (`RowSampling`). The tensor path has no data-dependent shapes: one sort over the vocabulary + masks.

Randomness enters only as explicit uniforms in [0, 1) (`sample_from_probs` is inverse-CDF sampling), from
    a torch.Generator (`generator_uniforms`: the eager paths), or
    a counter-based stream (`counter_uniforms`): u = hash(seed_row, counter_row, slot, index), a pure function of
    per-row device tensors computed with int64 torch ops (lowbias32 hash, C. Wellons), so a captured step draws
    fresh numbers at every replay with no host sync, the same (seed, counter) always gives the same numbers, and a
    row's numbers never depend on its batch neighbours. Slots keep the draws of one step apart (SLOT_*).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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


SEED_LIMIT = 1 << 63


def check_seed(seed, *, generator=None, name: str = "seed") -> None:
    """Raise naming `name` unless seed is None or an int in [0, 2**63) (TypeError for a non-int, e.g. 1.5, "7" or
    True; ValueError when out of range), and ValueError when both a seed and a generator are given."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be None or an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed!r}")
    if generator is not None:
        raise ValueError(f"give {name} or generator, not both")


# ---------------------------------------------------------------------------------------------- distributions
def _row_view(value, x: torch.Tensor, dtype) -> torch.Tensor:
    """A scalar or (B,) tensor as a tensor broadcasting per row against x (B, ..., V): shape (B, 1, ..., 1)."""
    t = torch.as_tensor(value, dtype=dtype, device=x.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"per-row sampling settings must have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.dim() - 1)))


def logits_to_probs(logits: torch.Tensor, *, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """logits (..., vocab) -> probabilities (..., vocab) in float32 (float64 for float64 logits).

    Scalars (temperature > 0; top_k None or int; top_p None or float): the same setting for every row.
    Per-row tensors (any of the three a (B,) tensor, logits (B, ..., vocab)): see `_logits_to_probs_rows`."""
    if any(isinstance(a, torch.Tensor) for a in (temperature, top_k, top_p)):
        return _logits_to_probs_rows(logits, temperature=temperature, top_k=top_k, top_p=top_p)
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


def _logits_to_probs_rows(logits: torch.Tensor, *, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """Per-row settings, no data-dependent shapes and no host sync (CUDA graphs).

    logits (B, ..., V); temperature scalar or (B,) float (a row with temperature 0 gets the one-hot of its argmax:
    sampling from it is greedy decoding, and tree rejection sampling against it is greedy acceptance); top_k None or
    (B,) long (values >= V, or <= 0, switch it off for the row); top_p None or (B,) float (1 switches it off). None
    skips the sort entirely. The same rule as the scalar path (ties at the k-th logit are kept; top-p keeps the
    smallest prefix of the sorted distribution whose mass reaches top_p), applied in sorted order: one sort of the
    vocabulary per row when top_k or top_p is given."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dt)
    V = x.shape[-1]
    t = _row_view(temperature, x, dt)
    greedy = t <= 0
    x = x / torch.where(greedy, torch.ones_like(t), t)
    if top_k is None and top_p is None:
        probs = torch.softmax(x, dim=-1)
    else:
        sorted_x, order = x.sort(dim=-1, descending=True)
        if top_k is not None:
            k = _row_view(top_k, x, torch.long)
            k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
            kth = sorted_x.gather(-1, (k - 1).expand(*x.shape[:-1], 1))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        sp = torch.softmax(sorted_x, dim=-1)
        if top_p is not None:
            p = _row_view(top_p, x, dt)
            before = sp.cumsum(-1) - sp
            sp = sp.masked_fill((before >= p) & (p < 1), 0.0)
            sp = sp / sp.sum(-1, keepdim=True)
        probs = torch.empty_like(sp).scatter_(-1, order, sp)
    if isinstance(temperature, torch.Tensor) or temperature <= 0:
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy, onehot, probs)
    return probs


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (..., V) (any non-negative weights, normalised here), uniforms (...) in [0, 1)
    -> token ids (...) long. The token is the first i with cdf[i] > u * total (float64 cumsum), so a token of zero
    weight is never drawn (clamped to the last token of positive weight against rounding); all-zero weights give 0.
    On CUDA, for float32 / float64 weights and uniforms of exactly probs' leading shape, one Triton kernel per call
    (ops/tree_accept.draw_from_probs, unless GDNSPEC_TREE_ACCEPT=0; these torch ops are its reference)."""
    from gdnspec.ops import tree_accept  # the kernels' layer sits below this module; imported on use

    if probs.dim() >= 1 and tuple(uniforms.shape) == tuple(probs.shape[:-1]) and tree_accept.runs_on(probs, 1):
        return tree_accept.draw_from_probs(probs, uniforms)
    cdf = probs.to(torch.float64).cumsum(-1)
    v = uniforms.to(torch.float64)[..., None] * cdf[..., -1:]
    idx = torch.searchsorted(cdf, v, right=True).squeeze(-1)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, positions, 0).amax(-1)
    return torch.minimum(idx, last)


# ---------------------------------------------------------------------------------------------- uniforms
SLOT_TOKEN = 0  # plain decoding's token, the first token after a prefill, the speculative bonus token
SLOT_ACCEPT = 1  # one uniform per tree node: its acceptance test
SLOT_DRAFT = 2  # SLOT_DRAFT + layer: the draws of a stochastic draft tree's layer
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for int64 x in [0, 2**32) without int64 overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * m + (((hi * m) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons): a bijective 32-bit mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, *, slot: int, n: int) -> torch.Tensor:
    """Counter-based uniforms: seeds (B,) int64 >= 0, counters (B,) int64 (the row's step), slot (0 <= slot < 2**15),
    n (<= 2**16) -> (B, n) float64 in [0, 1) with 53 random bits, a pure function of (seed, counter, slot, index).
    On CUDA, for (B,) seeds and counters, one Triton kernel computes the same bits (ops/uniforms.py, unless
    GDNSPEC_FUSED_UNIFORMS=0; these ~150 torch ops are its reference)."""
    from gdnspec.ops import uniforms as fused  # the kernels' layer sits below this module; imported on use

    if fused.runs_on(seeds) and tuple(counters.shape) == tuple(seeds.shape) and seeds.dim() == 1:
        return fused.counter_uniforms_fused(seeds, counters, slot=slot, n=n)
    s = seeds.to(torch.long)
    key = _hash32((s & _M32) ^ _hash32(((s >> 32) & _M32) ^ 0x2545F491))
    key = _hash32(key ^ (counters.to(torch.long) & _M32))[:, None]  # (B, 1)
    j = (slot << 16) + torch.arange(n, device=seeds.device, dtype=torch.long)  # (n,)
    w1 = _hash32(key ^ _hash32(2 * j))
    w2 = _hash32(key ^ _hash32(2 * j + 1))
    return ((w1 << 21) + (w2 >> 11)).to(torch.float64) * (1.0 / (1 << 53))


def row_seeds(seed: int, ids) -> torch.Tensor:
    """Per-row seeds (len(ids),) int64 from one seed and each row's own id (e.g. its sequence index), with the
    splitmix64 finaliser on host ints: a row's stream depends on (seed, id) only, never on the batch around it."""
    out = []
    for i in ids:
        z = (seed + 0x9E3779B97F4A7C15 * (int(i) + 1)) & ((1 << 64) - 1)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
        out.append((z ^ (z >> 31)) >> 1)  # 63 bits: a non-negative int64
    return torch.tensor(out, dtype=torch.long)


def base_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The one int seed of a static run: `seed`, else a draw from `generator`, else from torch's global RNG (so
    torch.manual_seed makes it reproducible)."""
    if seed is not None:
        return seed
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, SEED_LIMIT - 1, (1,), generator=generator, device=dev))


Uniforms = Callable[[int, int], torch.Tensor]  # (slot, n) -> (B, n) float64 in [0, 1)


def generator_uniforms(generator: torch.Generator | None, batch: int, device) -> Uniforms:
    """Fresh uniforms from a torch.Generator (or torch's global RNG) at every call; the slot is ignored."""
    def draw(slot: int, n: int) -> torch.Tensor:
        dev = generator.device if generator is not None else device
        return torch.rand(batch, n, generator=generator, dtype=torch.float64, device=dev).to(device)
    return draw


def stream_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> Uniforms:
    """`counter_uniforms` of the given per-row seeds and counters (read at call time: device buffers)."""
    return lambda slot, n: counter_uniforms(seeds, counters, slot=slot, n=n)


@dataclass
class RowSampling:
    """Per-row sampling settings (device tensors of shape (B,)) and the uniform source of one step.

    temperature float (0 = greedy row), top_k long or None (>= vocab: off), top_p float or None (1: off): None
    skips the top-k / top-p machinery (no sort) for every row."""

    temperature: torch.Tensor
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    uniforms: Uniforms

    @staticmethod
    def constant(batch: int, device, *, temperature: float, top_k: int | None, top_p: float | None,
                 uniforms: Uniforms) -> "RowSampling":
        """The same scalar settings for every row."""
        return RowSampling(torch.full((batch,), float(temperature), device=device),
                           None if top_k is None else torch.full((batch,), top_k, dtype=torch.long, device=device),
                           None if top_p is None else torch.full((batch,), float(top_p), device=device), uniforms)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, ..., V) -> the per-row processed distribution (greedy rows: one-hot of the argmax)."""
        return _logits_to_probs_rows(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> tokens (B,): greedy rows take the argmax exactly, the others draw from `probs` with one
        uniform of slot SLOT_TOKEN."""
        tok = sample_from_probs(self.probs(logits), self.uniforms(SLOT_TOKEN, 1)[:, 0])
        return torch.where(self.temperature > 0, tok, logits.argmax(-1))


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, vocab) -> token ids (B,). Greedy when temperature == 0. A generator on another device than the
    logits (the default torch.Generator() is a CPU one, with a CUDA model) draws one float64 uniform per row there,
    and the token comes from sample_from_probs on the logits' device (torch.multinomial refuses such a generator);
    same-device generators (and None) keep torch.multinomial."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if generator is not None and generator.device.type != probs.device.type:
        return sample_with_generator(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_with_generator(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs (..., V) -> token ids (...): one float64 uniform per row drawn from `generator` on ITS device, moved to
    probs' device, then sample_from_probs (inverse CDF). sample_next's path for a generator on another device."""
    u = torch.rand(probs.shape[:-1], generator=generator, dtype=torch.float64, device=generator.device)
    return sample_from_probs(probs, u.to(probs.device))
