"""`gdnspec serve`: an OpenAI-compatible HTTP server with continuous batching and speculative decoding.

    protocol.py  request bodies (pydantic) and OpenAI error bodies
    chat.py      chat templates (the checkpoint's own, jinja2, else a plain documented one)
    text.py      incremental detokenization and stop strings
    loop.py      the engine loop thread: one SpecSession slot pool, requests join / leave between steps
    metrics.py   Prometheus metrics (prometheus-client)
    app.py       FastAPI routes + server-sent events, served by uvicorn

The top layer of the package (with cli.py): nothing below imports it. Its dependencies are the `serve` extra
(`pip install "gdnspec[serve]"`): fastapi, uvicorn, prometheus-client, jinja2 (pydantic comes with fastapi).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REQUIRED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
            "jinja2": "jinja2", "pydantic": "pydantic"}


def missing_dependencies() -> list[str]:
    """The pip names of the serve extra's packages that are not installed."""
    return [pip for mod, pip in REQUIRED.items() if importlib.util.find_spec(mod) is None]


def model_max_len(folder: Path | None) -> int | None:
    """config.json's max_position_embeddings (or its text_config's), None when the folder does not say."""
    if folder is None:
        return None
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("max_position_embeddings") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def build(bundle, drafter, tree_config, *, model_name: str, max_model_len: int, max_batch_size: int,
          max_queue_size: int, api_key: str | None, policy_args: dict, sampling: dict):
    """The engine loop (started) and the FastAPI app for a loaded bundle. drafter None = plain decoding."""
    from gdnspec.serve.app import ServeState, create_app
    from gdnspec.serve.chat import ChatTemplate
    from gdnspec.serve.loop import EngineLoop
    from gdnspec.spec.policy import StepPolicy
    from gdnspec.serve.metrics import Metrics
    from gdnspec.spec import SpeculativeEngine, TreeConfig
    from gdnspec.spec.drafters import NullDrafter

    # the adaptive policy's eager steps also size each tree (spec/sizing.py) unless --no-speculative-adaptive
    engine = SpeculativeEngine(bundle.model, drafter if drafter is not None else NullDrafter(),
                               tree_config or TreeConfig(), static=False,
                               size_trees=drafter is not None and bool(policy_args.get("adaptive", True)))
    policy = StepPolicy(speculative=drafter is not None, **policy_args)
    loop = EngineLoop(engine, max_batch_size=max_batch_size, max_queue_size=max_queue_size, metrics=Metrics(),
                      policy=policy)
    eos = bundle.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    state = ServeState(loop=loop, tokenizer=bundle.tokenizer, model_name=model_name,
                       vocab_size=bundle.model.vocab_size, max_model_len=max_model_len, eos_ids=eos_ids,
                       chat_template=ChatTemplate.for_model(bundle.path, bundle.tokenizer), sampling=sampling,
                       api_key=api_key, max_body_bytes=(1 << 20) + 32 * max_model_len)
    app = create_app(state)
    loop.start()
    return loop, app, state


def serve_forever(app, loop, sock, *, shutdown_timeout: float) -> None:
    from gdnspec.serve.app import run

    run(app, loop, sock, shutdown_timeout=shutdown_timeout)
    if loop.error is not None:
        print(f"gdnspec serve: the engine loop failed: {loop.error}", file=sys.stderr)
