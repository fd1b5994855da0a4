"""Per-sequence inference state of a GDN / hybrid model, with an explicit batch dimension (row = sequence).

    GDNLayerState : recurrent (B, HV, K, V) float32 (float64 for float64 models), conv (B, conv_dim, W-1)
    KVCache       : k, v (B, H_kv, capacity, head_dim), lengths (B,) long - row b holds lengths[b] valid positions
    ModelState    : one of the above per layer; rows can be selected, assigned and cloned, so the engine can
                    gather, scatter and commit the states of chosen sequences (slots).

Model forwards advance the state they are given in place (buffers keep their identity where the shape allows,
which CUDA graphs need); tree verification only reads it, and commit writes it explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _take_rows(t: torch.Tensor, rows) -> torch.Tensor:
    """A new tensor holding rows `rows` of t: index_select already copies (no extra clone) for long index tensors."""
    if isinstance(rows, torch.Tensor) and rows.dtype == torch.long and rows.dim() == 1 and rows.device == t.device:
        return t.index_select(0, rows)
    return t[rows].clone()


@dataclass
class GDNLayerState:
    """State of one Gated DeltaNet layer: recurrent (B, HV, K, V) and conv window (B, conv_dim, W-1).

    pending: (source state, rows or None) when this state's rows ARE source's rows `rows` (rows 0 .. B-1 for None)
    but have not been copied yet (`gathered`): the fused decode step reads them from the source while it writes
    this state (a tree expansion's state gather inside its GDN kernel, layers/gated_deltanet.decode_fused); anything
    else calls `materialize_` first, which the methods below do."""

    recurrent: torch.Tensor
    conv: torch.Tensor
    # not a dataclass field: a class default, set on an instance only while a gather is pending (so vars(state),
    # fields, repr and == see the two tensors as before); cleared by take_pending / materialize_
    pending = None

    @property
    def batch_size(self) -> int:
        return self.recurrent.shape[0]

    @staticmethod
    def gathered(source: "GDNLayerState", rows: torch.Tensor | None) -> "GDNLayerState":
        """A state of len(rows) rows (source's B for None) that equals source.select(rows) (source.clone()) once
        materialised, with uninitialised buffers and the copy left pending. source must not change before."""
        source.materialize_()
        B = source.batch_size if rows is None else rows.shape[0]
        state = GDNLayerState(source.recurrent.new_empty((B, *source.recurrent.shape[1:])),
                              source.conv.new_empty((B, *source.conv.shape[1:])))
        state.pending = (source, rows)
        return state

    def take_pending(self) -> tuple | None:
        """The pending (source, rows), now cleared (the caller reads the source rows itself), or None."""
        return self.__dict__.pop("pending", None)

    def materialize_(self) -> "GDNLayerState":
        """Copy a pending gather in (no-op without one); returns self. The gather stays pending if a copy raises."""
        pending = self.pending
        if pending is not None:
            src, rows = pending
            B = self.batch_size
            if rows is None:
                self.recurrent.copy_(src.recurrent[:B])
                self.conv.copy_(src.conv[:B])
            else:
                torch.index_select(src.recurrent, 0, rows, out=self.recurrent)
                torch.index_select(src.conv, 0, rows, out=self.conv)
            self.take_pending()
        return self

    def select(self, rows: torch.Tensor) -> "GDNLayerState":
        self.materialize_()
        return GDNLayerState(_take_rows(self.recurrent, rows), _take_rows(self.conv, rows))

    def assign_rows_(self, rows: torch.Tensor, other: "GDNLayerState") -> None:
        self.materialize_()
        other.materialize_()
        self.recurrent[rows] = other.recurrent.to(self.recurrent.dtype)
        self.conv[rows] = other.conv.to(self.conv.dtype)

    def clone(self) -> "GDNLayerState":
        self.materialize_()
        return GDNLayerState(self.recurrent.clone(), self.conv.clone())

    @staticmethod
    def cat(states: list["GDNLayerState"]) -> "GDNLayerState":
        states = [s.materialize_() for s in states]
        return GDNLayerState(torch.cat([s.recurrent for s in states]), torch.cat([s.conv for s in states]))


@dataclass
class KVCache:
    """Key/value cache of one attention layer; positions [0, lengths[b]) of row b are valid, the rest is free."""

    k: torch.Tensor  # (B, H_kv, capacity, D)
    v: torch.Tensor  # (B, H_kv, capacity, D)
    lengths: torch.Tensor  # (B,) long

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, needed: int) -> None:
        """Grow the capacity (doubling) so that every row can hold `needed` positions."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity, 16)
        B, H, cap, D = self.k.shape
        k = self.k.new_zeros(B, H, new_cap, D)
        v = self.v.new_zeros(B, H, new_cap, D)
        k[:, :, :cap] = self.k
        v[:, :, :cap] = self.v
        self.k, self.v = k, v

    def write_(self, k_new: torch.Tensor, v_new: torch.Tensor, counts: torch.Tensor, *, reserve: bool = True) -> None:
        """Append the first counts[b] entries of k_new/v_new (B, H_kv, L, D) to row b, at lengths[b].

        All L entries are written (positions lengths[b] .. lengths[b] + L - 1); those past counts[b] lie beyond the
        new length and are never read. No host sync with reserve=False (CUDA graphs): the caller guarantees
        lengths + L <= capacity.
        """
        B, H, L, D = k_new.shape
        if L == 0:
            return
        if reserve:
            self.reserve(int(self.lengths.max().item()) + L)
        pos = (self.lengths[:, None] + torch.arange(L, device=k_new.device)).clamp(max=self.capacity - 1)  # (B, L)
        idx = pos[:, None, :, None].expand(B, H, L, D)
        self.k.scatter_(2, idx, k_new if k_new.dtype == self.k.dtype else k_new.to(self.k.dtype))
        self.v.scatter_(2, idx, v_new if v_new.dtype == self.v.dtype else v_new.to(self.v.dtype))
        self.lengths += counts

    def select(self, rows: torch.Tensor) -> "KVCache":
        return KVCache(_take_rows(self.k, rows), _take_rows(self.v, rows), _take_rows(self.lengths, rows))

    def assign_rows_(self, rows: torch.Tensor, other: "KVCache") -> None:
        """Write other's rows (in order) into rows `rows`: lengths and the positions below them (those past a row's
        length are free and may be copied too). When other's capacity fits this cache's, its whole capacity moves
        with no host sync (a static runner's load right after a prefill then does not wait for the GPU); otherwise
        only the longest valid prefix, after growing this cache (one device read of the lengths)."""
        if other.capacity <= self.capacity:
            n = other.capacity
        else:
            n = int(other.lengths.max()) if other.lengths.numel() else 0  # only the valid prefix moves
            self.reserve(n)
        self.k[rows, :, :n] = other.k[:, :, :n].to(self.k.dtype)
        self.v[rows, :, :n] = other.v[:, :, :n].to(self.v.dtype)
        self.lengths[rows] = other.lengths

    def clone(self) -> "KVCache":
        return KVCache(self.k.clone(), self.v.clone(), self.lengths.clone())

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        cap = max(c.capacity for c in caches)
        for c in caches:
            c.reserve(cap)
        return KVCache(torch.cat([c.k[:, :, :cap] for c in caches]), torch.cat([c.v[:, :, :cap] for c in caches]),
                       torch.cat([c.lengths for c in caches]))


LayerState = GDNLayerState | KVCache


@dataclass
class ModelState:
    """All layer states of a model for a batch of sequences (`layers[i]` belongs to decoder layer i)."""

    layers: list

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def select(self, rows: torch.Tensor | list[int]) -> "ModelState":
        """A copy holding only `rows` (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self._device())
        return ModelState([layer.select(rows) for layer in self.layers])

    def select_deferred(self, rows: torch.Tensor | None) -> "ModelState":
        """select(rows) (clone() for rows None) with the GDN layers' copies left pending (GDNLayerState.gathered):
        the fused decode step of a model or EAGLE head reads them from this state while it writes the new one, so a
        drafter's tree expansion needs no gather kernels; attention layers are copied now. This state must not
        change until the new one has run its step (or been materialised). rows: (B',) long on the state's device."""
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=self._device()).contiguous()
        return ModelState([GDNLayerState.gathered(layer, rows) if isinstance(layer, GDNLayerState)
                           else (layer.clone() if rows is None else layer.select(rows)) for layer in self.layers])

    def materialize_(self) -> "ModelState":
        """Copy in every pending gather (select_deferred); returns self."""
        for layer in self.layers:
            if isinstance(layer, GDNLayerState):
                layer.materialize_()
        return self

    def assign_rows_(self, rows: torch.Tensor | list[int], other: "ModelState") -> None:
        """Write the rows of `other` (in order) into rows `rows` of this state; one row of `other` per entry of
        `rows` (ValueError otherwise: no broadcasting of one row into several)."""
        if len(other.layers) != len(self.layers):
            raise ValueError(f"other has {len(other.layers)} layers, this state has {len(self.layers)}")
        count = rows.numel() if isinstance(rows, torch.Tensor) else len(rows)
        if count != other.batch_size:
            raise ValueError(f"rows names {count} rows, other holds {other.batch_size}")
        if isinstance(rows, (list, range)) and list(rows) == list(range(count)) and count <= self.batch_size:
            rows = slice(0, count)  # the leading rows (a static runner's load): copies, not index_put
        else:
            rows = torch.as_tensor(rows, dtype=torch.long, device=self._device())
        for mine, theirs in zip(self.layers, other.layers):
            mine.assign_rows_(rows, theirs)

    def clone(self) -> "ModelState":
        return ModelState([layer.clone() for layer in self.layers])

    def copy_(self, other: "ModelState") -> None:
        """Overwrite every row with `other` (same batch size), keeping this state's buffers (CUDA graphs)."""
        if other.batch_size != self.batch_size:
            raise ValueError(f"other holds {other.batch_size} rows, this state {self.batch_size}")
        self.assign_rows_(torch.arange(self.batch_size, device=self._device()), other)

    def reserve_kv(self, needed: int) -> None:
        """Make every KV cache able to hold `needed` positions per row."""
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.reserve(needed)

    @staticmethod
    def cat(states: list["ModelState"]) -> "ModelState":
        """Rows of all `states`, in order (a new state)."""
        return ModelState([type(layers[0]).cat(list(layers)) for layers in zip(*(s.layers for s in states))])

    def _device(self) -> torch.device:
        first = self.layers[0]
        return first.recurrent.device if isinstance(first, GDNLayerState) else first.k.device
