"""Causal depthwise conv1d ops: prefill == naive reference == repeated one-token update (output AND conv state),
state continuity over split sequences, and the tree-aware conv vs the reference run along each node's path.

Run: python -m pytest -q tests/test_ops_conv1d.py
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import path_to, random_parents, tol
from gdnspec.ops.conv1d import (
    causal_conv1d,
    causal_conv1d_update,
    naive_causal_conv1d,
    tree_causal_conv1d,
    tree_conv_commit_state,
)


def conv_inputs(B, T, D, W, dtype, *, bias, state, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(B, T, D), r(D, W), (r(D) if bias else None), (r(B, D, W - 1) if state else None)


@pytest.mark.parametrize("W,bias,with_state,act,dtype", list(itertools.product(
    (2, 4), (False, True), (False, True), ("silu", None), (torch.float32, torch.float64))))
def test_prefill_naive_update_agree(W, bias, with_state, act, dtype):
    B, T, D = 2, 9, 6
    x, w, b, s0 = conv_inputs(B, T, D, W, dtype, bias=bias, state=with_state, seed=W)
    s0_copy = None if s0 is None else s0.clone()
    y_ref, s_ref = naive_causal_conv1d(x, weight=w, bias=b, initial_state=s0, activation=act, output_final_state=True)
    y, s = causal_conv1d(x, weight=w, bias=b, initial_state=s0, activation=act, output_final_state=True)
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    torch.testing.assert_close(s, s_ref, **tol(dtype))
    assert s.shape == (B, D, W - 1) and y.dtype == dtype
    st = torch.zeros(B, D, W - 1, dtype=dtype) if s0 is None else s0.clone()
    ys = torch.stack([causal_conv1d_update(x[:, t], weight=w, state=st, bias=b, activation=act) for t in range(T)], dim=1)
    torch.testing.assert_close(ys, y_ref, **tol(dtype))
    torch.testing.assert_close(st, s_ref, **tol(dtype))
    if s0 is not None:
        assert torch.equal(s0, s0_copy), "prefill must not modify initial_state"


def test_reference_semantics_against_nn_conv1d():
    """naive == nn.functional.conv1d with left zero padding (a depthwise causal conv), and the state is the last
    W-1 inputs, oldest first."""
    x, w, b, _ = conv_inputs(1, 7, 5, 4, torch.float64, bias=True, state=False)
    y, s = naive_causal_conv1d(x, weight=w, bias=b, activation=None, output_final_state=True)
    y_ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None], b, groups=5).transpose(1, 2)
    torch.testing.assert_close(y, y_ref, **tol(torch.float64))
    torch.testing.assert_close(s, x[:, -3:].transpose(1, 2), rtol=0, atol=0)
    # T < W-1: the state mixes the old state and the new inputs
    x2, w2, _, s2 = conv_inputs(1, 2, 5, 4, torch.float64, bias=False, state=True)
    _, s = naive_causal_conv1d(x2, weight=w2, initial_state=s2, output_final_state=True)
    torch.testing.assert_close(s, torch.cat([s2[:, :, 2:], x2.transpose(1, 2)], dim=-1), rtol=0, atol=0)


@pytest.mark.parametrize("W,split", [(2, 1), (4, 1), (4, 2), (4, 5), (4, 8)])
def test_state_continuity_split_sequence(W, split):
    """Prefill of x[:split] then prefill of x[split:] from the returned state == one prefill over x (incl. splits
    shorter than the window)."""
    x, w, b, s0 = conv_inputs(2, 9, 4, W, torch.float64, bias=True, state=True, seed=split)
    y, s = causal_conv1d(x, weight=w, bias=b, initial_state=s0, output_final_state=True)
    y1, s1 = causal_conv1d(x[:, :split], weight=w, bias=b, initial_state=s0, output_final_state=True)
    y2, s2 = causal_conv1d(x[:, split:], weight=w, bias=b, initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **tol(torch.float64))
    torch.testing.assert_close(s2, s, **tol(torch.float64))


def test_bf16_conv_vs_fp32_reference():
    """bf16 prefill/update against the float32 reference on the same values: W=4 products summed in bf16 give
    ~3 roundings of 2^-8 relative; 3e-2 absolute on O(1) outputs."""
    x, w, b, s0 = conv_inputs(2, 6, 8, 4, torch.bfloat16, bias=True, state=True)
    y_ref, s_ref = naive_causal_conv1d(x.float(), weight=w.float(), bias=b.float(), initial_state=s0.float(), output_final_state=True)
    y, s = causal_conv1d(x, weight=w, bias=b, initial_state=s0, output_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(s.float(), s_ref, rtol=0, atol=0)  # the state is a copy of inputs: exact
    st = s0.clone()
    y1 = causal_conv1d_update(x[:, 0], weight=w, bias=b, state=st)
    torch.testing.assert_close(y1.float(), y_ref[:, 0], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind,N,W", [("random", 12, 4), ("random", 10, 2), ("chain", 7, 4), ("star", 6, 4), ("random", 1, 4)])
def test_tree_conv_matches_path_reference(kind, N, W):
    """Node i of the tree conv == the last output of naive_causal_conv1d over node i's root-to-node path (from the
    committed window), and tree_conv_commit_state(node) == that path's final conv state."""
    B, D = 2, 5
    x, w, b, s0 = conv_inputs(B, N, D, W, torch.float64, bias=True, state=True, seed=N)
    parents = random_parents(B, N, kind, seed=N + 1)
    s0_copy = s0.clone()
    y, widx = tree_causal_conv1d(x, weight=w, bias=b, parents=parents, state=s0)
    assert y.shape == (B, N, D) and widx.shape == (B, N, W)
    for bb in range(B):
        for node in range(N):
            p = path_to(parents[bb], node)
            yp, sp = naive_causal_conv1d(x[bb:bb + 1, p], weight=w, bias=b, initial_state=s0[bb:bb + 1], output_final_state=True)
            torch.testing.assert_close(y[bb, node], yp[0, -1], **tol(torch.float64))
            nodes = torch.full((B,), node, dtype=torch.long)
            sc = tree_conv_commit_state(x=x, state=s0, window_index=widx, node=nodes)
            torch.testing.assert_close(sc[bb], sp[0], rtol=0, atol=0)
    assert torch.equal(s0, s0_copy)


def test_conv_bad_inputs_name_the_argument():
    x, w, b, s0 = conv_inputs(2, 5, 4, 4, torch.float32, bias=True, state=True)
    for fn in (causal_conv1d, naive_causal_conv1d):
        with pytest.raises(ValueError, match="weight"):
            fn(x, weight=w[:3])
        with pytest.raises(ValueError, match="bias"):
            fn(x, weight=w, bias=b[:2])
        with pytest.raises(ValueError, match="conv state"):
            fn(x, weight=w, initial_state=s0[:, :, :2])
        with pytest.raises(ValueError, match="activation"):
            fn(x, weight=w, activation="relu")
        with pytest.raises(ValueError, match="x must"):
            fn(x[0], weight=w)
    with pytest.raises(ValueError, match="conv state"):
        causal_conv1d_update(x[:, 0], weight=w, state=s0[:1])
