"""`gdnspec serve` as a client sees it: real server processes on 127.0.0.1 (free ports) with the embedded default model,
driven by the official `openai` client and by raw HTTP (httpx); every result is compared with offline decoding in this
process (generate_autoregressive for greedy requests, a SpeculativeEngine session alone for seeded sampled ones).

Two servers: `server` (n-gram drafter, adaptive steps off so that seeded sampling is reproducible) and `small`
(plain decoding, one slot, a queue of one, an API key) for 429, 401 and SIGTERM. The last test stops the main server
(SIGTERM with a request that outlasts its --shutdown-timeout)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import gdnspec  # noqa: E402
from gdnspec.serve.chat import ChatTemplate  # noqa: E402
from gdnspec.spec import SpeculativeEngine, TreeConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "gdnspec-default"
MAX_LEN = 512
KEY = "test-key-123"
PROMPTS = ["def add(a, b):", "import os\n\ndef walk(path):", "class Stack:\n    def __init__(self):",
           "def quicksort(items):", "for i in range(10):", "    return", "def read_file(name):\n    with open(",
           "import sys\n"]


class Server:
    def __init__(self, *flags: str):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("GDNSPEC_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "gdnspec", "serve", "--port", "0", *flags],
                                     stdout=subprocess.DEVNULL, stderr=self.log, env=env, cwd=REPO)
        self.url = None

    def wait(self, timeout: float = 120.0) -> "Server":
        deadline = time.monotonic() + timeout
        while self.url is None:
            text = Path(self.log.name).read_text()
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", text)
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{text}")
            time.sleep(0.1)
        return self

    def stderr(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def servers():
    """Both servers start together (each takes a few seconds to load)."""
    main = Server("--no-speculative-adaptive", "--max-batch-size", "8", "--max-model-len", str(MAX_LEN),
                  "--shutdown-timeout", "1")
    small = Server("--drafter", "none", "--max-batch-size", "1", "--max-queue-size", "1", "--max-model-len", "2048",
                   "--api-key", KEY, "--shutdown-timeout", "20")
    try:
        yield {"main": main.wait(), "small": small.wait()}
    finally:
        main.stop()
        small.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline():
    """The same model in this process, and the server's engine settings."""
    bundle = gdnspec.load()
    engine = SpeculativeEngine(bundle.model, bundle.drafters["ngram"], TreeConfig(topk=4, num_steps=5,
                                                                                  num_draft_tokens=16), static=False)
    return bundle, engine


def encode(bundle, text: str) -> list[int]:
    return bundle.tokenizer.encode(text).ids


def reference(offline, ids: list[int], n: int, *, temperature=0.0, top_k=None, top_p=None, seed=None,
              stops=()) -> list[int]:
    """The tokens the server must give: generate_autoregressive (greedy), or the engine alone with the seed."""
    bundle, engine = offline
    eos = [bundle.eos_token_id, *stops]
    if temperature == 0:
        out = gdnspec.generate_autoregressive(bundle.model, [torch.tensor(ids)], n, eos_token_id=eos)[0]
        return out[len(ids):].tolist()
    session = engine.session()
    (sid,) = session.add([torch.tensor(ids)], max_new_tokens=n, eos_token_id=[eos], temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed)
    while session.active:
        session.step()
    return session.sequences[sid].new_tokens


def text_of(bundle, tokens: list[int]) -> str:
    return bundle.tokenizer.decode([t for t in tokens if t != bundle.eos_token_id])


def metrics(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} of /metrics."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------------------------------------- happy paths
def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_greedy_completion_equals_offline_generate(client, offline):
    bundle, _ = offline
    ids = encode(bundle, PROMPTS[0])
    ref = reference(offline, ids, 24)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == ref
    assert choice.text == text_of(bundle, ref)
    assert choice.finish_reason == ("stop" if bundle.eos_token_id in ref else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    assert "spec_stats" not in (r.model_extra or {})  # the extension is off by default
    # token ids as the prompt give the same completion
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=24)
    assert r2.choices[0].text == choice.text


def test_stream_equals_whole_text(client):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=40, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it streamed


def test_chat_uses_the_plain_template_and_streams_the_same(client, offline):
    bundle, _ = offline
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def fib(n):"}]
    prompt = ChatTemplate.for_model(None, bundle.tokenizer).render(messages)
    assert prompt.endswith("### Assistant:\n")
    ids = bundle.tokenizer.encode(prompt, add_special_tokens=False).ids
    ref = reference(offline, ids, 30)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text_of(bundle, ref)
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def _settings(i: int) -> dict:
    """Request i of the concurrency test: prompt, length and sampling differ."""
    kinds = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 100 + i},
             {"temperature": 1.0, "top_k": 20, "seed": 7 * i}, {"temperature": 0.7, "top_p": 0.9, "seed": i}]
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6 + (i * 5) % 27, "stream": i % 3 == 0,
            **kinds[i % 4]}


def test_16_concurrent_requests_each_get_their_own_result(client, offline):
    bundle, _ = offline
    reqs = [_settings(i) for i in range(16)]

    def call(kw):
        kw = dict(kw)
        stream = kw.pop("stream")
        extra = {"return_token_ids": True, **({"top_k": kw.pop("top_k")} if "top_k" in kw else {})}
        r = client.completions.create(model=MODEL, stream=stream, extra_body=extra, **kw)
        if not stream:
            return r.choices[0].model_extra["token_ids"], r.choices[0].text
        ids, text = [], ""
        for c in r:
            ids += c.choices[0].model_extra.get("token_ids", [])
            text += c.choices[0].text
        return ids, text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, reqs))
    for i, (kw, (ids, text)) in enumerate(zip(reqs, results)):
        ref = reference(offline, encode(bundle, kw["prompt"]), kw["max_tokens"], temperature=kw["temperature"],
                        top_k=kw.get("top_k"), top_p=kw.get("top_p"), seed=kw.get("seed"))
        assert ids == ref, (i, kw)
        assert text == text_of(bundle, ref), (i, kw)


def test_stop_strings_and_stop_token_ids(client, offline):
    bundle, _ = offline
    ids = encode(bundle, PROMPTS[0])
    full = reference(offline, ids, 40)
    full_text = text_of(bundle, full)
    stop = full_text[12:16]  # a string that the greedy continuation contains
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, stop=[stop, "@@never@@"],
                                      stream=stream)
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == full_text[:full_text.index(stop)], stream
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40
    # a stop token id: the generation ends at it, its text is left out, it is counted
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=40,
                                  extra_body={"stop_token_ids": [full[5]], "return_token_ids": True})
    got = r.choices[0].model_extra["token_ids"]
    assert got == full[:full.index(full[5]) + 1] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text_of(bundle, got[:-1])


def test_spec_stats_extension_and_metrics_agree_with_responses(server, client):
    before = metrics(server.url)
    usages, stats = [], []
    for i in range(3):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=10 + 5 * i,
                                      extra_body={"return_spec_stats": True})
        usages.append(r.usage)
        stats.append(r.model_extra["spec_stats"])
    after = metrics(server.url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("gdnspec:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("gdnspec:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert sum(delta("gdnspec:request_success_total", finished_reason=r) for r in ("stop", "length")) == 3
    assert delta("gdnspec:time_to_first_token_seconds_count") == 3
    assert delta("gdnspec:inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    assert delta("gdnspec:spec_decode_num_drafts_total") == sum(s["verify_steps"] for s in stats) > 0
    assert delta("gdnspec:spec_decode_num_draft_tokens_total") == sum(s["draft_tokens"] for s in stats)
    accepted = delta("gdnspec:spec_decode_num_accepted_tokens_total")
    assert accepted == sum(s["accepted_tokens"] for s in stats)
    per_pos = sum(v for (name, _), v in after.items() if name == "gdnspec:spec_decode_num_accepted_tokens_per_pos_total")
    assert per_pos == metric(after, "gdnspec:spec_decode_num_accepted_tokens_total")
    drafts, acc = (metric(after, f"gdnspec:spec_decode_num_{k}_total") for k in ("drafts", "accepted_tokens"))
    assert metric(after, "gdnspec:spec_decode_mean_accept_length") == pytest.approx(1 + acc / drafts)
    assert metric(after, "gdnspec:num_requests_running") == 0 and metric(after, "gdnspec:num_requests_waiting") == 0
    for s, u in zip(stats, usages):
        assert s["verify_steps"] + s["plain_steps"] <= u.completion_tokens and s["accepted_tokens"] <= s["draft_tokens"]


def _wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if metric(m, "gdnspec:num_requests_running") == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_a_cancelled_stream_and_a_client_that_gives_up_free_their_slots(server):
    before = metrics(server.url)
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 400, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: ")
    m = _wait_idle(server.url)
    assert metric(m, "gdnspec:num_requests_running") == 0
    assert metric(m, "gdnspec:request_success_total", finished_reason="abort") == \
        metric(before, "gdnspec:request_success_total", finished_reason="abort") + 1
    assert metric(m, "gdnspec:generation_tokens_total") - metric(before, "gdnspec:generation_tokens_total") < 400
    # a non-streamed request whose client times out
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    m2 = _wait_idle(server.url)
    assert metric(m2, "gdnspec:request_success_total", finished_reason="abort") == \
        metric(m, "gdnspec:request_success_total", finished_reason="abort") + 1
    assert metric(m2, "gdnspec:generation_tokens_total") - metric(m, "gdnspec:generation_tokens_total") < 400


BAD = [  # (path, raw body or JSON, status, param)
    ("completions", b"{not json", 400, None),
    ("completions", [1, 2], 400, None),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("completions", {"prompt": "x " * 600}, 400, "prompt"),
    ("completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "top_k": "many"}, 400, "top_k"),
    ("completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("completions", {"prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ("completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("completions", {"prompt": "x", "max_token": 5}, 400, "max_token"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10 ** 6}, 400,
     "max_completion_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
]


def test_bad_requests_get_an_openai_error_naming_the_field(server, client):
    for path, body, status, param in BAD:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{server.url}/v1/{path}", content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (body, err)
        assert err["type"] in ("invalid_request_error", "not_found_error") and err["message"], err
        assert "Traceback" not in r.text
    # a body past the limit: 413
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (3 << 20))
    assert r.status_code == 413 and r.json()["error"]["message"]
    # the server keeps serving, and the openai client raises its error type with the message
    with pytest.raises(openai.BadRequestError, match="n: only n = 1"):
        client.completions.create(model=MODEL, prompt="x", n=2)
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4).choices[0].text
    assert httpx.get(server.url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------- the small server
def test_api_key_plain_decoding_and_full_queue(servers, offline):
    small = servers["small"]
    url = small.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    bundle, _ = offline
    ref = reference(offline, encode(bundle, PROMPTS[2]), 20)  # --drafter none: plain decoding
    r = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref
    # one slot and a queue of one: the third concurrent request is answered 429
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": PROMPTS[0], "max_tokens": 2000, "stream": True}  # runs until it is cancelled below
    first = httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60)
    resp = first.__enter__()
    try:
        lines = resp.iter_lines()  # kept: a dropped line iterator closes the response (the server cancels it)
        next(lines)  # running
        second = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json={
            **body, "stream": False, "max_tokens": 5}, headers=auth, timeout=60))
        second.start()
        deadline = time.monotonic() + 10
        while metric(metrics(url), "gdnspec:num_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error", r.text
    finally:
        first.__exit__(None, None, None)
    second.join(60)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(servers):
    small = servers["small"]
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": PROMPTS[1], "max_tokens": 60, "stream": True, "temperature": 0}
    with httpx.stream("POST", small.url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        small.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    events = [first] + rest
    assert events[-1] == "data: [DONE]"
    finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish[-1] in ("length", "stop") and all(f is None for f in finish[:-1])
    assert small.proc.wait(30) == 0
    err = small.stderr()
    assert "Traceback" not in err and "gdnspec serve: stopped" in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(small.url + "/health")


def test_sigterm_aborts_what_outlasts_the_shutdown_timeout(server):
    """Runs last: stops the main server (--shutdown-timeout 1) while a long stream runs; the stream ends cleanly with
    finish_reason "abort" and [DONE], and the process exits with 0."""
    body = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": MAX_LEN - 32, "stream": True, "temperature": 0,
            "stop_token_ids": [], "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    events = [json.loads(e[6:]) for e in [first] + rest[:-1]]
    assert rest[-1] == "data: [DONE]"
    finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finish[-1] == "abort" and all(f is None for f in finish[:-1])
    assert events[-1]["usage"]["completion_tokens"] < MAX_LEN - 32
    assert server.proc.wait(30) == 0 and time.monotonic() - t0 < 20
    assert "Traceback" not in server.stderr()
