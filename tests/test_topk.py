"""The fused log-softmax + top-k of the draft expansion (ops/fused/topk.py) against torch, on the CPU through the
Triton interpreter: one block and several blocks per row (V = 1, 7, 100, 8192, 8193, 20000), k = 1 .. 16, float32 /
bf16 / fp16 logits, leading dims, a strided view, -inf logits, exact ties (lowest id first), and the tree builder fed
DraftLogits (the kernel) against the same drafter returning log-probs (torch). Mutants of the kernel (the merge
ignoring a block's log-sum-exp, ties to the highest id) must fail the same checks.

Run: python -m pytest -q tests/test_topk.py   (skipped when triton is not installed)
"""
from __future__ import annotations

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import interpreter_modules  # noqa: E402

(tk,) = interpreter_modules(["gdnspec.ops.fused.topk"])
from gdnspec.spec.tree import DraftLogits, TreeConfig, build_tree  # noqa: E402

pytestmark = pytest.mark.usefixtures("interpret_env")


def _check(logits: torch.Tensor, k: int, fn=None) -> None:
    v, i = (fn or tk.log_softmax_topk)(logits, k)
    rv, ri = tk.log_softmax_topk_reference(logits, k)
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == rv.shape == i.shape
    # the same VALUES chosen (ids may differ only between exact ties), the same log-probs
    x = logits.float()
    assert torch.equal(x.gather(-1, i), x.gather(-1, ri))
    assert torch.allclose(v, rv, atol=1e-5, rtol=0), (v - rv).abs().max()  # fp32 sums over V in another order
    # ties: lowest id first
    same = x.gather(-1, i[..., 1:]) == x.gather(-1, i[..., :-1])
    assert bool((~same | (i[..., 1:] > i[..., :-1])).all())


@pytest.mark.parametrize("V,k", [(1, 1), (7, 7), (100, 3), (8192, 4), (8193, 8), (20000, 16), (300, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch(V, k, dtype):
    g = torch.Generator().manual_seed(V + k)
    _check((torch.randn(3, V, generator=g) * 4).to(dtype), k)


def test_leading_dims_strided_rows_inf_and_ties():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 3, 2 * 9000, generator=g)
    _check(base[..., ::2], 5)  # a strided view: copied to contiguous rows
    x = torch.randn(4, 9000, generator=g)
    x[0, :8000] = float("-inf")  # a block that is all -inf: its log-sum-exp must drop out, not poison the merge
    x[1] = 0.0  # every logit equal: ids 0..k-1
    x[2, 100], x[2, 8500], x[2, 50] = 9.0, 9.0, 9.0  # a tie across the two blocks
    x[3, -1] = 50.0  # the last column
    _check(x, 6)
    v, i = tk.log_softmax_topk(x, 6)
    assert i[1].tolist() == list(range(6)) and i[2, :3].tolist() == [50, 100, 8500] and i[3, 0] == 8999
    assert torch.allclose(v[1], torch.full((6,), -torch.log(torch.tensor(9000.0))), atol=1e-6)
    y = torch.full((1, 10), float("-inf"))
    y[0, 5], y[0, 2] = 0.0, 0.0  # fewer finite logits than k: -inf values after them
    v, i = tk.log_softmax_topk(y, 4)
    assert i[0, :2].tolist() == [2, 5] and torch.isinf(v[0, 2:]).all() and len(set(i[0].tolist())) == 4


def test_bad_arguments_name_them():
    x = torch.randn(2, 10)
    for k in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int in"):
            tk.log_softmax_topk(x, k)
    with pytest.raises(ValueError, match="logits must be a tensor"):
        tk.log_softmax_topk(torch.tensor(1.0), 1)


def test_float64_and_large_k_take_the_reference():
    x = torch.randn(2, 50, dtype=torch.float64)
    v, i = tk.log_softmax_topk(x, 3)
    rv, ri = tk.log_softmax_topk_reference(x, 3)
    assert v.dtype == torch.float32 and torch.equal(v, rv) and torch.equal(i, ri)
    v, i = tk.log_softmax_topk(x.float(), tk.MAX_K + 1)
    assert torch.equal(i, tk.log_softmax_topk_reference(x.float(), tk.MAX_K + 1)[1])


@pytest.mark.parametrize("builder,topk,steps,n", [("chain", 1, 4, 5), ("eagle2", 3, 3, 10), ("seed", 2, 3, 7)])
def test_tree_builder_with_draft_logits_equals_log_probs(builder, topk, steps, n, monkeypatch):
    """The builder fed DraftLogits (ranked by the kernel, as on CUDA; a reduced vocabulary mapped back) builds the
    same tree as the same drafter handing it log-probs over the full vocabulary (ranked by torch)."""
    import gdnspec.spec.tree as tree_mod

    calls = []

    def ranks(logits, k):  # the kernel on the CPU too (the interpreter), counted
        calls.append(k)
        return tk.kernel_applies(logits, k)

    monkeypatch.setattr(tree_mod, "_topk", tk)  # the interpreter-loaded module (interpreter_modules above)
    monkeypatch.setattr(tree_mod, "_kernel_ranks", ranks)
    V, B = 700, 3
    ids = torch.arange(V - 1, -1, -3)  # a reduced vocabulary, not sorted
    W = torch.randn(V, V, generator=torch.Generator().manual_seed(5)) * 3

    def expand_with(kind):
        def expand(frontier, parent_slot):
            logits = W[frontier][..., ids]  # (B, F, Vd)
            if kind == "logits":
                return DraftLogits(logits, V, ids)
            return DraftLogits(logits, V, ids).logprobs()
        return expand

    cfg = TreeConfig(builder=builder, topk=topk, num_steps=steps, num_draft_tokens=n)
    roots = torch.tensor([3, 77, 699])
    a, _ = build_tree(roots, expand_with("logits"), cfg, sync_free=True)
    b, _ = build_tree(roots, expand_with("logprobs"), cfg, sync_free=True)
    for name in ("tokens", "parents", "valid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    assert bool(torch.isin(a.tokens[:, 1:][a.valid[:, 1:]], ids).all())
    assert calls and all(tk.kernel_applies(torch.zeros(1, 3), k) for k in calls)  # the kernel really ranked them


def _mutant(old: str, new: str, tmp_path):
    """The topk module with `old` replaced by `new` in its source, loaded from a file under tmp_path (Triton's jit
    reads the kernels' source from it)."""
    import importlib.util
    import inspect

    src = inspect.getsource(tk)
    assert old in src, old
    path = tmp_path / "topk_mutant.py"
    path.write_text(src.replace(old, new))
    spec = importlib.util.spec_from_file_location("topk_mutant", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


@pytest.mark.parametrize("old,new", [
    ("lse = m_safe + tl.log(tl.sum(sc * tl.exp(mc - m_safe), 0))", "lse = m_safe + tl.log(tl.sum(sc, 0))"),
    ("| (0x7FFFFFFF - ids).to(tl.int64)", "| ids.to(tl.int64)"),  # ties to the highest id
])
def test_kernel_mutants_fail(old, new, tmp_path):
    m = _mutant(old, new, tmp_path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9000, generator=g) * 4
    x[1] = 0.0
    with pytest.raises(AssertionError):
        _check(x, 5, fn=m.log_softmax_topk)
        assert m.log_softmax_topk(x, 5)[1][1].tolist() == list(range(5))  # all equal: the lowest ids
