"""ops/cpu_linear.py: the oneDNN packed-weight linear of the CPU fast path against F.linear (float32, the shapes where
it is taken and where it is not), its weight cache (in-place updates repack; inference tensors are never packed),
the GDNSPEC_CPU_ONEDNN switch and the process-wide packing budget.

Run: python -m pytest -q tests/test_cpu_linear.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdnspec.ops import cpu_linear as cl

pytestmark = pytest.mark.skipif(not cl.available(), reason="this torch build has no oneDNN packed linear")


class _Holder:
    pass


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("rows,N,K,bias", [(1, 2048, 384, False), (5, 1032, 384, True), (16, 8192, 96, False),
                                           (3, 600, 320, True), (1, 384, 256, False), (7, 17, 33, False)])
def test_matches_f_linear_and_takes_the_packed_path_where_it_pays(rows, N, K, bias, monkeypatch):
    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    g = torch.Generator().manual_seed(rows + N)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(2, rows, K, generator=g)[:1]  # (1, rows, K)
    h = _Holder()
    with torch.no_grad():
        y = cl.linear(x, w, b, holder=h, name="_p")
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (1, rows, N) and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-6
    assert ("_p" in h.__dict__) == cl.packed_pays(rows, N, K)


def test_in_place_update_repacks_and_float64_inference_grad_fall_back(monkeypatch):
    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    w = torch.randn(2048, 384)
    x = torch.randn(5, 384)
    h = _Holder()
    with torch.no_grad():
        cl.linear(x, w, holder=h, name="_p")
        w.mul_(2.0)  # in place: the version counter moves, the packed copy must follow
        y = cl.linear(x, w, holder=h, name="_p")
    assert _rel(y, F.linear(x.double(), w.double())) < 1e-6
    # float64: the reference precision, F.linear exactly
    y64 = cl.linear(x.double(), w.double(), holder=h, name="_p64")
    assert torch.equal(y64, F.linear(x.double(), w.double())) and "_p64" not in h.__dict__
    # inference tensors have no version counter: never packed
    with torch.inference_mode():
        wi = torch.randn(2048, 384)
        yi = cl.linear(x, wi, holder=h, name="_pi")
    assert "_pi" not in h.__dict__ and _rel(yi, F.linear(x.double(), wi.double())) < 1e-6
    # autograd: F.linear, gradients flow
    wg = torch.randn(2048, 384, requires_grad=True)
    cl.linear(x, wg, holder=h, name="_pg").sum().backward()
    assert wg.grad is not None and "_pg" not in h.__dict__


def test_switch_and_budget(monkeypatch):
    x, w = torch.randn(5, 384), torch.randn(2048, 384)
    monkeypatch.setenv("GDNSPEC_CPU_ONEDNN", "0")
    h = _Holder()
    with torch.no_grad():
        assert torch.equal(cl.linear(x, w, holder=h, name="_p"), F.linear(x, w)) and "_p" not in h.__dict__
    for bad in ("true", "2", " 1"):
        monkeypatch.setenv("GDNSPEC_CPU_ONEDNN", bad)
        with pytest.raises(ValueError, match="GDNSPEC_CPU_ONEDNN"):
            cl.enabled()
    monkeypatch.setenv("GDNSPEC_CPU_ONEDNN", "1")
    monkeypatch.setattr(cl, "_packed_bytes", cl.PACK_BUDGET_BYTES - 10)  # budget spent: F.linear, nothing packed
    with torch.no_grad():
        y = cl.linear(x, w, holder=h, name="_p")
    assert "_p" not in h.__dict__ and _rel(y, F.linear(x.double(), w.double())) < 1e-6


@pytest.mark.parametrize("rows,N,K", [(5, 1032, 384), (1, 1032, 384), (1, 2048, 384), (3, 40, 24)])
def test_out_perm_reorders_the_output_columns(rows, N, K, monkeypatch):
    """out_perm: the packed path packs the weight's rows in that order (no gather of the output), the F.linear path
    gathers; both must equal F.linear(...)[..., perm], bias included."""
    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    g = torch.Generator().manual_seed(N + rows)
    w, b, x = torch.randn(N, K, generator=g), torch.randn(N, generator=g), torch.randn(1, rows, K, generator=g)
    perm = torch.randperm(N, generator=g)
    h = _Holder()
    with torch.no_grad():
        y = cl.linear(x, w, b, holder=h, name="_p", out_perm=perm)
        y2 = cl.linear(x, w, b, holder=h, name="_p", out_perm=perm)  # cached packed copy
    want = F.linear(x.double(), w.double(), b.double())[..., perm]
    assert _rel(y, want) < 1e-6 and torch.equal(y, y2)
    assert ("_p" in h.__dict__) == cl.packed_pays(rows, N, K)


def test_modules_with_packed_weights_still_deepcopy_and_pickle(tmp_path, monkeypatch):
    """oneDNN's packed tensors are opaque (no storage); a module that cached one must still deepcopy and torch.save
    (the copy drops the cache and repacks on first use, with the same result)."""
    import copy

    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    from gdnspec.layers.linear import VocabProjection

    head = VocabProjection(384, 8192, bias=False)
    x = torch.randn(5, 384)
    with torch.no_grad():
        y = head(x)
    assert "_packed_w" in head.__dict__  # 8192 x 384 at 5 rows takes the packed path
    twin = copy.deepcopy(head)
    torch.save(head, tmp_path / "head.pt")
    loaded = torch.load(tmp_path / "head.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(twin(x), y) and torch.equal(loaded(x), y)


def test_new_tensor_at_the_same_address_repacks(monkeypatch):
    """A weight freed and replaced by another tensor at the same address (same data pointer, a fresh version counter
    at 0) must not reuse the old packed copy. Made deterministic with two tensors over one buffer, written outside
    torch in between (so neither version counter moves)."""
    import numpy as np

    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    N, K = 2048, 384
    buf = bytearray(N * K * 4)
    arr = np.frombuffer(buf, dtype=np.float32)
    arr[:] = np.random.default_rng(0).standard_normal(N * K)
    x, h = torch.randn(5, K), _Holder()
    with torch.no_grad():
        w1 = torch.frombuffer(buf, dtype=torch.float32).view(N, K)
        cl.linear(x, w1, holder=h, name="_p")
        assert "_p" in h.__dict__
        arr *= -1.0
        w2 = torch.frombuffer(buf, dtype=torch.float32).view(N, K)  # same pointer, same version, another storage
        assert w2.data_ptr() == w1.data_ptr() and w2._version == w1._version
        y = cl.linear(x, w2, holder=h, name="_p")
    assert _rel(y, F.linear(x.double(), w2.double())) < 1e-6


def test_out_perm_changed_in_place_or_replaced_repacks(monkeypatch):
    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(2048, 384, generator=g), torch.randn(5, 384, generator=g)
    perm, h = torch.randperm(2048, generator=g), _Holder()
    with torch.no_grad():
        cl.linear(x, w, holder=h, name="_p", out_perm=perm)
        perm.copy_(torch.randperm(2048, generator=g))  # same tensor, new order
        y = cl.linear(x, w, holder=h, name="_p", out_perm=perm)
        assert _rel(y, F.linear(x.double(), w.double())[..., perm]) < 1e-6
        y = cl.linear(x, w, holder=h, name="_p")  # no perm any more
    assert _rel(y, F.linear(x.double(), w.double())) < 1e-6


def test_fast_path_mlp_follows_updates_through_its_parameters(monkeypatch):
    """cpu_fast's MLP reads [gate | up] from the fused buffer (layers/fusion.py) whose Parameters are `.data` views
    with version counters of their own: load_state_dict / optimizer steps update them in place without moving the
    buffer's counter. The packed copy must follow."""
    from gdnspec.layers.mlp import SwiGLUMLP
    from gdnspec.models import cpu_fast

    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    torch.manual_seed(0)
    mlp = SwiGLUMLP(384, 512)
    x = torch.randn(1, 5, 384)
    with torch.no_grad():
        cpu_fast._mlp(mlp, x)
        assert cl.packed_pays(5, 1024, 384)
        sd = {k: torch.randn_like(v) for k, v in mlp.state_dict().items()}
        mlp.load_state_dict(sd)
        y = cpu_fast._mlp(mlp, x)
        ref = mlp(x)
        assert _rel(y, ref) < 1e-5
        mlp.up_proj.weight.mul_(-1.0)  # in place through the Parameter (an optimizer step does the same)
        y, ref = cpu_fast._mlp(mlp, x), mlp(x)
    assert _rel(y, ref) < 1e-5


def test_packed_pays_thresholds():
    """The measured thresholds (module table): >= 600k elements at one row, >= 180k at 2+ rows."""
    assert cl.packed_pays(1, 2048, 384) and not cl.packed_pays(1, 1032, 384)
    assert cl.packed_pays(2, 600, 320) and not cl.packed_pays(16, 384, 256) and not cl.packed_pays(5, 17, 33)


def test_replaced_and_freed_entries_give_their_bytes_back(monkeypatch):
    """The packing budget counts live packed copies only: repacking after an in-place update, or dropping the holder,
    returns the bytes (else every reload of the weights would eat the budget until packing silently stopped)."""
    import gc

    monkeypatch.delenv("GDNSPEC_CPU_ONEDNN", raising=False)
    gc.collect()
    base = cl._packed_bytes
    w, x = torch.randn(2048, 384), torch.randn(5, 384)
    h = _Holder()
    with torch.no_grad():
        cl.linear(x, w, holder=h, name="_p")
        assert cl._packed_bytes == base + w.numel() * 4
        for _ in range(3):
            w.add_(1.0)
            cl.linear(x, w, holder=h, name="_p")  # repacked: the old entry is replaced
        assert cl._packed_bytes == base + w.numel() * 4
    del h
    gc.collect()
    assert cl._packed_bytes == base
