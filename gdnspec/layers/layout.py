"""How the T new tokens of a forward relate to each other: a causal chain (prefill, decode) or a draft tree.

`TokenLayout` carries, per row, the parent of each new token (-1 for the first), the ancestor mask (token i sees
token j iff mask[i, j]; includes i itself) and the depth (distance from the first token), from which attention
positions are prefix length + depth. A chain is the tree whose parents are i - 1.

Chain layouts of up to CHAIN_CACHE_MAX tokens are views of tensors built once per (length, conv width, device) and
cached (`_chain_parts`): on the GPU the EAGLE catch-up builds one every speculative step, and building it took ~7
small kernels (arange, tril, ...) inside every replayed CUDA graph. Longer chains (prefill chunks, training) are built
per call, so the cache stays small. The cached tensors are shared: a layout's tensors are read, never written (a
B = 1 view would write through to every later layout of that length).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdnspec.ops import tree_index
from gdnspec.ops.conv1d.tree import tree_conv_window_index


@dataclass
class TokenLayout:
    parents: torch.Tensor  # (B, T) long, -1 for roots, parent index < own index
    ancestor_mask: torch.Tensor  # (B, T, T) bool, includes the diagonal
    depth: torch.Tensor  # (B, T) long
    is_chain: bool = False
    known_prefix: int | None = None  # host-known KV prefix length of every row (spares a device read; CUDA graphs)
    window_index: torch.Tensor | None = None  # (B, T, W) long: the tree conv's window index, when already computed

    def conv_window_index(self, width: int) -> torch.Tensor:
        """(B, T, width) long: `ops.conv1d.tree.tree_conv_window_index(parents, width)`, the one computed with the
        layout (from_parents(conv_width=width)) when there is one, else computed now and kept."""
        if self.window_index is None or self.window_index.shape[-1] != width:
            if self.is_chain:  # node i's window is positions i .. i + width - 1 of [window | nodes]
                B, T = self.parents.shape
                self.window_index = _chain_parts(T, self.parents.device, width)[3].expand(B, T, width)
            else:
                self.window_index = tree_conv_window_index(self.parents, width)
        return self.window_index

    @staticmethod
    def chain(batch_size: int, num_tokens: int, device=None, *, known_prefix: int | None = None) -> "TokenLayout":
        """A chain of num_tokens per row: expanded views of cached read-only tensors (module docstring)."""
        idx, parents, mask, _ = _chain_parts(num_tokens, device)
        B, T = batch_size, num_tokens
        return TokenLayout(parents=parents.expand(B, T), ancestor_mask=mask.expand(B, T, T), depth=idx.expand(B, T),
                           is_chain=True, known_prefix=known_prefix)

    @staticmethod
    def from_parents(parents: torch.Tensor, *, validate: bool = True, conv_width: int | None = None) -> "TokenLayout":
        """Build the mask and depths of a tree given parents (B, N) in topological order (checked unless
        validate=False, which makes the call free of host syncs for CUDA graphs). conv_width: also the tree conv's
        window index for that kernel width (`conv_window_index`). On CUDA (N <= 64) one Triton kernel computes all
        three (ops/tree_index.py); elsewhere the torch ops below, which it is tested against."""
        if parents.dim() != 2 or parents.dtype != torch.long:
            raise ValueError(f"parents must be a long tensor (B, N), got {parents.dtype} {tuple(parents.shape)}")
        B, N = parents.shape
        idx = torch.arange(N, device=parents.device)
        if validate and bool(((parents >= idx) | (parents < -1)).any()):
            raise ValueError("parents must be in topological order: -1 <= parents[b, i] < i for every node")
        if tree_index.runs_on(parents):
            mask, depth, window = tree_index.tree_layout(parents, conv_width=conv_width)
            return TokenLayout(parents=parents, ancestor_mask=mask, depth=depth, window_index=window)
        lay = TokenLayout._from_parents_torch(parents)
        if conv_width is not None:
            lay.conv_window_index(conv_width)
        return lay

    @staticmethod
    def _from_parents_torch(parents: torch.Tensor) -> "TokenLayout":
        """from_parents' torch form (no host sync)."""
        B, N = parents.shape
        idx = torch.arange(N, device=parents.device)
        # ancestor-or-self closure by repeated squaring of A0 = I + (edge to the parent): after s squarings A holds
        # every ancestor within 2^s steps, so ceil(log2(N)) squarings (no host sync) reach the whole path
        A = (parents[:, :, None] == idx).to(torch.float32)  # (B, N, N): A[b, i, parent(i)] = 1 (none for roots)
        A.diagonal(dim1=1, dim2=2).fill_(1.0)
        for _ in range(max(N - 1, 1).bit_length()):
            A = torch.bmm(A, A).clamp_(max=1.0)  # entries stay 0/1, exact in float32
        mask = A > 0.5
        depth = mask.sum(-1) - 1  # strict ancestors = distance from the root
        return TokenLayout(parents=parents, ancestor_mask=mask, depth=depth)

    @staticmethod
    def from_parents_reference(parents: torch.Tensor) -> "TokenLayout":
        """One node at a time (the definition); `from_parents` must agree with it."""
        B, N = parents.shape
        mask = torch.zeros(B, N, N, dtype=torch.bool, device=parents.device)
        depth = torch.zeros(B, N, dtype=torch.long, device=parents.device)
        rows = torch.arange(B, device=parents.device)
        mask.diagonal(dim1=1, dim2=2).fill_(True)
        for i in range(1, N):  # parents precede children, so row parent(i) is final when i is reached
            p = parents[:, i]
            has = p >= 0
            pc = p.clamp(min=0)
            mask[:, i] |= mask[rows, pc] & has[:, None]
            depth[:, i] = torch.where(has, depth[rows, pc] + 1, 0)
        return TokenLayout(parents=parents, ancestor_mask=mask, depth=depth)


CHAIN_CACHE_MAX = 64  # the longest chain whose layout tensors are cached (verify trees and catch-ups are <= 64 nodes)
_CHAINS: dict = {}


def _chain_parts(T: int, device, width: int | None = None):
    """(depth (T,), parents (T,), ancestor mask (T, T) tril, window index (T, width) or None) of a chain of T tokens.
    For T <= CHAIN_CACHE_MAX built once per (T, width, device) and cached, as normal tensors even under inference mode
    (so that training may use them too), and not while a CUDA graph is being captured (tensors made there live in the
    graph's private memory pool); longer chains are built per call."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (T, width, str(dev))
    hit = _CHAINS.get(key)
    if hit is not None:
        return hit
    if width is not None:  # the window index on top of the chain's own (cached) parts
        idx, parents, mask, _ = _chain_parts(T, dev)
        with torch.inference_mode(False):
            parts = (idx, parents, mask, idx[:, None] + torch.arange(width, device=dev))
    else:
        with torch.inference_mode(False):
            idx = torch.arange(T, device=dev)
            parts = (idx, idx - 1, torch.ones(T, T, dtype=torch.bool, device=dev).tril(), None)
    if T <= CHAIN_CACHE_MAX and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _CHAINS[key] = parts
    return parts
