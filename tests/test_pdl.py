"""Programmatic dependent launch (gdnspec/ops/pdl.py): the rules its kernels must keep, checked on their source.

PDL itself needs a Hopper GPU (benchmarks/check_fused_gpu.py compares PDL on and off bitwise there); the interpreter
cannot run gdc_wait. What CI can check is the rule that makes PDL safe: every kernel launched with
`**pdl.launch_args(...)` takes the PDL constexpr and runs `enter(PDL)` before anything else (the GEMVs: `_pdl_prologue`,
which may only prefetch weights before its own `enter`). A kernel that loads an activation or stores before its
wait would read the previous kernel's output before it is written. Mutants of that rule must fail the check.

    python -m pytest -q tests/test_pdl.py
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from gdnspec.ops import pdl

OPS = Path(__file__).resolve().parent.parent / "gdnspec" / "ops"


def _is_pdl_args(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("pdl.launch_args", "_launch_args"))


def _launched_kernels(tree: ast.Module) -> set[str]:
    """Names of the kernels launched as NAME[grid](..., **pdl.launch_args(x)) or with gemv's **_launch_args(...), and
    gemv's `_launch(KERNEL, TUNED, ..., {..., **_launch_args(...)})` (both the kernel and its autotuned wrapper)."""
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Subscript):
            if any(k.arg is None and _is_pdl_args(k.value) for k in node.keywords):
                names.add(ast.unparse(node.func.value))
        elif ast.unparse(node.func) == "_launch" and len(node.args) >= 2:
            pdl_dict = any(isinstance(a, ast.Dict) and any(key is None and _is_pdl_args(v)
                                                           for key, v in zip(a.keys, a.values)) for a in node.args)
            if pdl_dict:
                for a in node.args[:2]:  # NAME, or `A if cond else B` (both launched)
                    names.update([ast.unparse(a.body), ast.unparse(a.orelse)] if isinstance(a, ast.IfExp)
                                 else [ast.unparse(a)])
    return names


def _tuned_targets(tree: ast.Module) -> dict[str, str]:
    """gemv's autotuned wrappers: NAME = triton.autotune(...)(KERNEL) -> {NAME: KERNEL}."""
    out = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args
                and isinstance(node.value.args[0], ast.Name) and "autotune" in ast.unparse(node.value.func)):
            out[node.targets[0].id] = node.value.args[0].id
    return out


def _body(fn: ast.FunctionDef) -> list[ast.stmt]:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    return body


def _is_call(stmt: ast.stmt, name: str) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and ast.unparse(stmt.value.func) == name


def _touches_memory(stmts: list[ast.stmt]) -> list[str]:
    """tl.load / tl.store / tl.atomic_* calls (and calls of other jit helpers, which may load) in `stmts`."""
    bad = []
    for s in stmts:
        for node in ast.walk(s):
            if isinstance(node, ast.Call):
                f = ast.unparse(node.func)
                if f.startswith("tl.") and (f.startswith(("tl.load", "tl.store", "tl.atomic")) or f == "tl.dot"):
                    bad.append(f)
                elif not f.startswith(("tl.", "prefetch_l2")) and f not in ("range",):
                    bad.append(f)
    return bad


def check_source(src: str) -> list[str]:
    """Violations of ops/pdl.py's rules in one module's source (empty list = none)."""
    tree = ast.parse(src)
    fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    tuned = _tuned_targets(tree)
    problems = []
    for name in sorted(_launched_kernels(tree)):
        kname = tuned.get(name, name)
        fn = fns.get(kname)
        if fn is None:
            if name == "tuned":  # gemv's linear_residual picks one of two autotuned wrappers
                continue
            problems.append(f"{name}: launched with PDL but not defined here")
            continue
        params = [a.arg for a in fn.args.args]
        if "PDL" not in params:
            problems.append(f"{kname}: no PDL parameter")
            continue
        body = _body(fn)
        idx = next((i for i, s in enumerate(body) if _is_call(s, "enter") or _is_call(s, "_pdl_prologue")), None)
        if idx is None:
            problems.append(f"{kname}: never calls enter(PDL) / _pdl_prologue at its top level")
            continue
        early = _touches_memory(body[:idx])
        if early:
            problems.append(f"{kname}: {early} before its PDL wait")
        if not any(isinstance(a, ast.Name) and a.id == "PDL" for a in body[idx].value.args):
            problems.append(f"{kname}: its PDL wait does not take the PDL constexpr")
    if "_pdl_prologue" in fns:  # gemv: only the weight prefetch may precede its enter
        body = _body(fns["_pdl_prologue"])
        idx = next((i for i, s in enumerate(body) if _is_call(s, "enter")), None)
        if idx is None:
            problems.append("_pdl_prologue: no enter(PDL)")
        else:
            early = [f for f in _touches_memory(body[:idx])]
            if early:
                problems.append(f"_pdl_prologue: {early} before enter")
    return problems


PDL_MODULES = ["fused/gemv.py", "fused/elementwise.py", "fused/gdn_decode.py", "fused/attention.py",
               "fused/gdn_tree.py", "fused/gdn_tree_proj.py", "gated_delta_rule/triton_commit.py",
               "gated_delta_rule/triton_tree.py"]


@pytest.mark.parametrize("rel", PDL_MODULES)
def test_every_pdl_kernel_waits_before_touching_memory(rel):
    src = (OPS / rel).read_text()
    assert _launched_kernels(ast.parse(src)), f"{rel}: no kernel launched with PDL (the list here is stale)"
    assert check_source(src) == []


def test_every_kernel_of_the_fused_steps_is_launched_with_pdl():
    """A plain launch inside the chain is safe but breaks the overlap; the decode / verify modules launch all their
    kernels with PDL."""
    for rel in PDL_MODULES:
        tree = ast.parse((OPS / rel).read_text())
        kernels = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")}
        tuned = _tuned_targets(tree)
        launched = {tuned.get(k, k) for k in _launched_kernels(tree)} | (set(tuned.values()) if "tuned" in
                                                                           _launched_kernels(tree) else set())
        assert kernels <= launched, f"{rel}: kernels launched without PDL: {sorted(kernels - launched)}"


MUTANTS = {
    "load before the wait": ("fused/elementwise.py", "        enter(PDL)  # ops/pdl.py: before any load or store\n"
                             "        row = tl.program_id(0)\n",
                             "        row = tl.program_id(0)\n        _x0 = tl.load(x + row * sx)\n"
                             "        enter(PDL)  # ops/pdl.py: before any load or store\n"),
    "no wait": ("fused/gdn_decode.py", "        enter(PDL)  # ops/pdl.py: before any load or store\n", ""),
    "wait without PDL": ("fused/attention.py", "    def _kv_commit_kernel(", None),
    "a load in the GEMV prologue": ("fused/gemv.py", "            prefetch_l2(w + ",
                                             "            _x0 = tl.load(w)\n            prefetch_l2(w + "),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_rule_mutants_fail_the_check(name):
    rel, old, new = MUTANTS[name]
    src = (OPS / rel).read_text()
    assert old in src, f"mutant anchor missing in {rel}: {old!r}"
    if new is None:  # drop the PDL parameter of the kernel defined at `old`
        head, tail = src.split(old, 1)
        sig_end = tail.index("):")
        sig = tail[:sig_end].replace(", PDL: tl.constexpr = False", "")
        src = head + old + sig + tail[sig_end:]
    else:
        src = src.replace(old, new, 1)
    assert check_source(src) != [], f"mutant {name!r} passed the PDL check"


def test_launch_args_off_the_gpu_and_under_the_switch(monkeypatch):
    x = torch.zeros(2)
    assert pdl.launch_args(x) == {"PDL": False}  # CPU tensor: plain launches, no launch_pdl option
    assert not pdl.enabled(x) and not pdl.prefetch_enabled(x)
    monkeypatch.setattr(pdl, "_device_ok", lambda index: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(pdl, "HAS_GDC", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("GDNSPEC_PDL", raising=False)
    monkeypatch.delenv("GDNSPEC_PDL_PREFETCH", raising=False)
    assert pdl.launch_args(x) == {"PDL": True, "launch_pdl": True}
    assert not pdl.prefetch_enabled(x)  # the prefetch is opt-in (measured slower)
    monkeypatch.setenv("GDNSPEC_PDL_PREFETCH", "1")
    assert pdl.prefetch_enabled(x)
    monkeypatch.setenv("GDNSPEC_PDL", "0")
    assert pdl.launch_args(x) == {"PDL": False} and not pdl.prefetch_enabled(x)
    monkeypatch.setenv("GDNSPEC_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.launch_args(x) == {"PDL": False}


@pytest.mark.parametrize("N,K,k_range,dtype", [(12288, 2048, 2048, torch.bfloat16), (2048, 2048, 2048, torch.bfloat16),
                                               (2048, 6144, 768, torch.bfloat16), (151936, 2048, 2048, torch.float16),
                                               (64, 100, 100, torch.float32)])
def test_gemv_prefetch_lines_fit_the_budget(monkeypatch, N, K, k_range, dtype):
    """PF_LINES: a power of two (or 0), within the program's K range, and all N rows' lines within PREFETCH_BYTES."""
    gemv = pytest.importorskip("gdnspec.ops.fused.gemv")
    x = torch.zeros(1, K, dtype=dtype)
    monkeypatch.setattr(pdl, "launch_args", lambda t: {"PDL": True, "launch_pdl": True})
    monkeypatch.setattr(pdl, "prefetch_enabled", lambda t: True)
    kw = gemv._launch_args(x, N, k_range)
    lines, line = kw["PF_LINES"], kw["LINE"]
    assert line * x.element_size() == 128
    assert lines == 0 or (lines & (lines - 1)) == 0
    assert lines * line <= k_range
    assert N * lines * 128 <= gemv.PREFETCH_BYTES
    if N * line * x.element_size() <= gemv.PREFETCH_BYTES and k_range >= line:
        assert lines >= 1  # something to prefetch when one line per row fits the budget
    monkeypatch.setattr(pdl, "prefetch_enabled", lambda t: False)
    assert gemv._launch_args(x, N, k_range)["PF_LINES"] == 0


def test_interpreted_kernels_ignore_pdl():
    """Under TRITON_INTERPRET the kernels run with PDL=False (gdc_wait cannot run there): the launch helper says so
    whatever GDNSPEC_PDL says."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        assert pdl.launch_args(torch.zeros(1)) == {"PDL": False}
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old

