"""Shared fixtures and helpers for the gdnspec CPU test suite.

Run the suite with `python -m pytest -q tests`. Helpers here build random gated-delta-rule inputs, random token trees
(topological parents), per-node root-to-node paths, and tiny model configs; they hold no assertions of their own.

Torch runs single-threaded in tests (override with GDNSPEC_TEST_THREADS): the shapes are tiny, and on a shared 2-core
machine OpenMP's busy-waiting threads made the op tests 4-6x slower whenever another process was busy.
"""
from __future__ import annotations

import os

# Triton >= 3.9 builds its language module for the interpreter only when TRITON_INTERPRET=1 is set while triton itself
# is first imported; the kernel tests (test_triton_kernels.py, test_fused_steps.py) set the variable and re-decorate
# gdnspec's kernels later, so import triton here under the variable, then restore it for the rest of the suite.
_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
except ImportError:  # triton is optional; the kernel tests skip themselves
    pass
finally:
    if _interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _interpret

import pytest
import torch
import torch.nn.functional as F

from gdnspec.models import GDNConfig

torch.set_num_threads(int(os.environ.get("GDNSPEC_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_each_test():
    torch.manual_seed(0)
    yield


def tol(dtype: torch.dtype) -> dict:
    """Default comparison tolerance between two exact-arithmetic-equivalent algorithms.

    float64: ~1e4 ulps, far below any real bug (a wrong term changes outputs at the 1e-2 level).
    float32: the chunk form reorders sums and solves a 64x64 unit-triangular system, so its error is a few 1e-6
    relative on O(1) outputs; 1e-4 leaves margin while still catching any algorithmic error.
    """
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-9)
    return dict(atol=1e-4, rtol=1e-4)


def gdr_inputs(B, T, H, HV, K, V, *, dtype=torch.float32, with_state=True, l2norm_in_op=True, seed=0):
    """Random gated delta rule inputs (q, k, v, g, beta, state).

    With l2norm_in_op=False, k is already unit-norm (the delta rule is only stable for beta*|k|^2 <= 2) and q is
    scaled down. g = logsigmoid(N(2, 1)) is mostly in [-0.5, 0], so the state keeps memory over 200 tokens and the
    initial state visibly matters.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    if not l2norm_in_op:
        k = F.normalize(k, dim=-1)
        q = F.normalize(q, dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, HV, generator=gen, dtype=torch.float64) + 2.0)
    beta = torch.sigmoid(torch.randn(B, T, HV, generator=gen, dtype=torch.float64))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    state = torch.randn(B, HV, K, V, generator=gen, dtype=torch.float64).to(sdt) if with_state else None
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), g.to(sdt), beta.to(sdt), state


def random_parents(B: int, N: int, kind: str = "random", seed: int = 0) -> torch.Tensor:
    """(B, N) long parents in topological order (parent < child, root 0 has parent -1).

    kind: "random" (each node picks a random earlier node), "chain", "star" (all nodes children of the root).
    """
    gen = torch.Generator().manual_seed(seed)
    parents = torch.empty(B, N, dtype=torch.long)
    parents[:, 0] = -1
    for i in range(1, N):
        if kind == "chain":
            parents[:, i] = i - 1
        elif kind == "star":
            parents[:, i] = 0
        elif kind == "random":
            parents[:, i] = torch.randint(0, i, (B,), generator=gen)
        else:
            raise ValueError(kind)
    return parents


def path_to(parents_row: torch.Tensor, node: int) -> list[int]:
    """Root-to-node list of node indices for one row of parents."""
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents_row[node])
    return path[::-1]


def tiny_config(**overrides) -> GDNConfig:
    """A small hybrid-capable config: fast on 2 CPU cores, but with HV = 2H, K != V, GQA and partial RoPE."""
    kw = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, intermediate_size=48,
              linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.5)
    kw.update(overrides)
    return GDNConfig(**kw)


def randomize_(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial random values (default inits leave norm weights at 0/1, which would hide
    offset/gate bugs). Keeps A_log and dt_bias in a sane range so gates stay well-conditioned."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 3 + 0.5).to(p.dtype))
            elif name.endswith("dt_bias"):
                p.copy_(noise * 0.5)
            elif "norm" in name:
                p.add_(noise * 0.2)
            else:
                p.copy_(noise * scale / max(1.0, p.shape[-1] ** 0.5) * 3)
    return module


# ---------------------------------------------------------------------------------------------- Triton interpreter
def interpreter_modules(names: list[str]) -> list:
    """Import (or re-import) gdnspec's kernel modules `names` with TRITON_INTERPRET=1, so that their kernels run on
    the CPU; kernels decorated before the variable was set would target a GPU. For kernel test modules, at import."""
    import importlib
    import sys

    os.environ["TRITON_INTERPRET"] = "1"
    mods = []
    if "gdnspec.ops.pdl" in sys.modules:  # the jit helpers every kernel module imports (enter, prefetch_l2)
        importlib.reload(sys.modules["gdnspec.ops.pdl"])
    for name in names:
        mods.append(importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name))
    return mods


@pytest.fixture(scope="module")
def interpret_env():
    """TRITON_INTERPRET=1 for a kernel test module's tests (another module may have restored it), restored after."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; non-finite values in a fail the calling test."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture
def keep_torch_threads():
    """generate / eval set torch's thread count for the process: give the rest of the suite its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def load_source_module(tmp_path, name: str, source: str):
    """`source` written to tmp_path / f"{name}.py" and imported as a module (mutant kernels: Triton reads a jit
    function's source from its file, so an edited kernel needs a file of its own)."""
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
