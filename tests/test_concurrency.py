"""Several threads calling the public entry points on ONE model must each get the single-threaded result.

static=True is forced on the CPU: the cached static decoders / runners (shared per model, resp. per engine) are what
two threads used to overwrite (both got wrong tokens a few steps after the prompt). A SpecSession belongs to one
thread: a concurrent call from another thread raises.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gdnspec import GDNSpeculativeWorker, ModelDrafter, NGramDrafter, generate_autoregressive
from gdnspec.spec import SpeculativeEngine, TreeConfig

from spec_helpers import noisy_copy, prompts_of, tiny_model

THREADS = 4


@pytest.fixture(scope="module")
def models():
    target = tiny_model(seed=5, hybrid=True, init_scale=8.0, dtype=torch.float32)
    return target, noisy_copy(target, noise=0.05)


def in_threads(fn, inputs):
    """fn(x) for every x, THREADS at a time, all released together."""
    barrier = threading.Barrier(THREADS)

    def run(x):
        barrier.wait()
        return fn(x)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, inputs))


def prompts(model):
    return [prompts_of([3 + 2 * i], model.vocab_size, seed=100 + i)[0][None] for i in range(THREADS)]


@pytest.mark.parametrize("static", [True, False])
def test_plain_decoding_in_threads(models, static):
    target, _ = models
    ps = prompts(target)
    ref = [generate_autoregressive(target, p, 64, static=static) for p in ps]
    for _ in range(3):
        got = in_threads(lambda p: generate_autoregressive(target, p, 64, static=static), ps)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert torch.equal(a, b), f"thread {i}"


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_one_engine_in_threads(models, static, drafter):
    target, draft = models
    d = ModelDrafter(draft) if drafter == "model" else NGramDrafter()
    eng = SpeculativeEngine(target, d, TreeConfig(topk=2, num_steps=3), static=static)
    ps = prompts(target)
    ref = [generate_autoregressive(target, p, 40) for p in ps]
    got = in_threads(lambda p: eng.generate(p, 40), ps)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"thread {i}"


def test_one_seed_worker_in_threads(models):
    target, draft = models
    worker = GDNSpeculativeWorker(draft_model=draft, target_model=target, topk=2, num_steps=3)
    ps = prompts(target)
    ref = [generate_autoregressive(target, p, 40) for p in ps]
    got = in_threads(lambda p: worker.generate(p, 40), ps)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert worker.get_statistics()["total_emitted_tokens"] == THREADS * 39  # no update lost


def test_a_session_refuses_a_second_thread(models):
    target, draft = models
    session = SpeculativeEngine(target, ModelDrafter(draft), TreeConfig(topk=2, num_steps=3)).session()
    session.add(prompts(target)[0], max_new_tokens=8)
    session._busy.acquire()  # as if another thread were inside session.step()
    try:
        with pytest.raises(RuntimeError, match="in use by another thread"):
            session.step()
    finally:
        session._busy.release()
    while session.active:
        session.step()
