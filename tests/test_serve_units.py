"""The server's parts without a server: chat templates (a Hugging Face tokenizer_config.json's own, the plain one),
incremental text with stop strings, the speculative-or-plain step policy, and `gdnspec serve`'s one-line usage errors
(a missing extra, a port in use, a context longer than the model's) before anything is served."""
from __future__ import annotations

import json
import socket

import pytest

from spec_helpers import run_main, word_tokenizer

pytest.importorskip("jinja2")

from gdnspec.serve.chat import PLAIN_TEMPLATE, ChatTemplate, ChatTemplateError  # noqa: E402
from gdnspec.serve.loop import StepPolicy  # noqa: E402
from gdnspec.serve.text import TextOutput  # noqa: E402

QWEN_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")


def test_hf_folder_brings_its_own_template_and_end_of_turn(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": QWEN_TEMPLATE, "eos_token": {"content": "<|im_end|>"}, "bos_token": None}))
    tpl = ChatTemplate.for_model(tmp_path, word_tokenizer(16))
    text = tpl.render([{"role": "user", "content": "w5 w6"}])
    assert text == "<|im_start|>user\nw5 w6<|im_end|>\n<|im_start|>assistant\n"
    assert tpl.end_of_turn == "<|im_end|>" and "tokenizer_config.json" in tpl.origin


def test_named_templates_jinja_file_and_template_errors(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                                        "{% endif %}{{ messages[0]['content'] | tojson }}"}]}))
    tpl = ChatTemplate.for_model(tmp_path, None)
    assert tpl.render([{"role": "user", "content": "a\"b"}]) == '"a\\"b"'
    with pytest.raises(ChatTemplateError, match="user first"):
        tpl.render([{"role": "system", "content": "x"}])
    other = tmp_path / "jinja"
    other.mkdir()
    (other / "chat_template.jinja").write_text("{{ messages | length }}")
    assert ChatTemplate.for_model(other, None).render([{"role": "user", "content": "x"}]) == "1"
    # no template anywhere: the plain one, ended by <|endoftext|> where the tokenizer has it
    plain = ChatTemplate.for_model(tmp_path / "nothing", word_tokenizer(16))
    assert plain.source == PLAIN_TEMPLATE and plain.end_of_turn == "<|endoftext|>"
    assert plain.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "more"}]) == \
        "### User:\nhi\n\n### Assistant:\nyo<|endoftext|>\n\n### User:\nmore\n\n### Assistant:\n"


def test_template_sandbox_refuses_unsafe_code():
    tpl = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "test")
    with pytest.raises(ChatTemplateError):
        tpl.render([{"role": "user", "content": "x"}])


def _stream(tok, ids, tokens, **kw):
    out = TextOutput(tok, ids, **kw)
    parts = []
    for t in tokens:
        over = out.push(t)
        parts.append(out.take())
        if over:
            break
    out.finish()
    parts.append(out.take())
    return out, parts


def test_text_output_holds_back_possible_stop_strings():
    tok = word_tokenizer(16)
    words = [5, 6, 7, 8, 9, 10]
    # the text as it continues the prompt (this tokenizer joins words with spaces: " w5 w6 w7 ...")
    full = tok.decode([3, 4] + words)[len(tok.decode([3, 4])):]
    assert full.startswith(" w5")
    out, parts = _stream(tok, [3, 4], words, stop_strings=["w8 w9"])
    assert "".join(parts) == full[:full.index("w8 w9")] and out.finish_reason == "stop"
    assert out.token_ids == [5, 6, 7, 8, 9]  # the token that completed the stop string is the last counted
    assert all("w8" not in p for p in parts)  # never sent, even while it could still have been something else
    out, parts = _stream(tok, [3, 4], words, stop_ids={7})
    assert "".join(parts) == " w5 w6" and out.token_ids == [5, 6, 7] and out.finish_reason == "stop"
    out, parts = _stream(tok, [3, 4], words, stop_strings=["zz"])
    assert "".join(parts) == full and out.finish_reason is None


def test_step_policy_picks_the_faster_kind_per_batch_size():
    p = StepPolicy(explore_every=4)
    assert p.choose(1) is True  # speculative measured first, twice (the first one pays one-time costs)
    p.record(1, True, 1.0, 4)
    assert p.choose(1) is True
    p.record(1, True, 0.010, 4)  # 2.5 ms per token: replaces the warm-up measurement
    assert p.choose(1) is False  # plain not measured yet
    p.record(1, False, 0.005, 1)  # 5 ms per token
    p.record(1, False, 0.005, 1)
    picks = [p.choose(1) for _ in range(8)]
    # every 4th step starts a re-measurement of the other kind: a burst of explore_steps = 4 steps
    assert picks == [True] * 3 + [False] * 4 + [True]
    for _ in range(2):  # at batch 16: 10 ms per token speculative, 1 ms plain
        p.record(16, True, 0.2, 20)
        p.record(16, False, 0.016, 16)
    assert [p.choose(16) for _ in range(3)] == [False] * 3
    assert StepPolicy(disable_by_batch_size=8, adaptive=False).choose(8) is False
    assert StepPolicy(adaptive=False).choose(64) is True
    assert StepPolicy(speculative=False).choose(1) is False


def _assert_one_line(rc, out, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_serve_usage_errors_are_one_line(capsys, monkeypatch, keep_torch_threads):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        _assert_one_line(*run_main(["serve", "--port", str(port)], capsys), "--port", "cannot listen", str(port))
    finally:
        busy.close()
    _assert_one_line(*run_main(["serve", "--port", "70000"], capsys), "--port", "0 to 65535")
    _assert_one_line(*run_main(["serve", "--max-batch-size", "0"], capsys), "--max-batch-size")
    _assert_one_line(*run_main(["serve", "--host", "no.such.host.invalid", "--port", "0"], capsys), "--host")
    _assert_one_line(*run_main(["serve", "--speculative-num-steps", "20", "--port", "0"], capsys),
                     "--speculative-num-steps")
    _assert_one_line(*run_main(["serve", "--api-key", " ", "--port", "0"], capsys), "--api-key")
    _assert_one_line(*run_main(["serve", "--drafter", "mtp", "--port", "0"], capsys), "--drafter", "mtp")
    import gdnspec.serve

    monkeypatch.setattr(gdnspec.serve, "model_max_len", lambda folder: 1024)
    _assert_one_line(*run_main(["serve", "--max-model-len", "4096", "--port", "0"], capsys), "--max-model-len",
                     "1024")
    monkeypatch.setattr(gdnspec.serve, "missing_dependencies", lambda: ["fastapi", "uvicorn"])
    _assert_one_line(*run_main(["serve"], capsys), "fastapi, uvicorn", "gdnspec[serve]")


def test_bench_serve_smoke(tmp_path):
    """benchmarks/bench_serve.py runs end to end (two servers, a tiny sweep) and writes its JSON."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_serve.py"), "--quick", "--concurrency",
                           "1,2", "--requests-per-level", "2", "--max-tokens", "8", "--no-offline", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"speculative", "plain"}
    for rows in res["modes"].values():
        assert [r["concurrency"] for r in rows] == [1, 2]
        assert all(r["output_tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert "| speculative | 1 |" in proc.stdout


def test_chat_requests_stop_at_the_end_of_turn_token(tmp_path):
    from gdnspec.serve.app import ServeState

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN_TEMPLATE,
                                                                 "eos_token": "<|im_end|>"}))
    tok = word_tokenizer(16)  # <|endoftext|> = 1, <|im_end|> = 2
    state = ServeState(loop=None, tokenizer=tok, model_name="m", vocab_size=16, max_model_len=64, eos_ids=(1,),
                       chat_template=ChatTemplate.for_model(tmp_path, tok), sampling={})
    assert state.chat_stop_ids() == (1, 2)
    plain = ServeState(loop=None, tokenizer=tok, model_name="m", vocab_size=16, max_model_len=64, eos_ids=(1,),
                       chat_template=ChatTemplate.for_model(None, tok), sampling={})
    assert plain.chat_stop_ids() == (1,)  # the plain template's end of turn is the end-of-text token itself


def test_sized_speculative_steps_reach_the_tree_histograms():
    """The engine loop observes each sized speculative step's verified nodes and drafted depth
    (gdnspec:spec_decode_tree_nodes / spec_decode_draft_depth); plain steps and unsized engines observe nothing."""
    from prometheus_client import generate_latest

    from gdnspec.serve.loop import EngineLoop
    from gdnspec.serve.metrics import Metrics
    from gdnspec.spec import SpeculativeEngine, TreeConfig
    from gdnspec.spec.drafters import ModelDrafter
    from spec_helpers import noisy_copy, prompts_of, tiny_model

    target = tiny_model(seed=2)
    cfg = TreeConfig(topk=2, num_steps=3, num_draft_tokens=6)

    def histogram_counts(size_trees: bool, speculative: bool = True) -> tuple[int, int, list]:
        eng = SpeculativeEngine(target, ModelDrafter(noisy_copy(target)), cfg, static=False, size_trees=size_trees)
        metrics = Metrics()
        loop = EngineLoop(eng, max_batch_size=4, max_queue_size=4, metrics=metrics,
                          policy=StepPolicy(speculative=speculative, adaptive=False))
        loop.session.add(prompts_of([5, 7], target.vocab_size), max_new_tokens=12)
        steps = 0
        while loop.session.active:
            loop._step()  # the loop thread's step, called directly (no requests: the tokens go nowhere)
            steps += 1
        text = generate_latest(metrics.registry).decode()
        count = {name: float(line.split()[-1]) for line in text.splitlines() for name in
                 ("gdnspec:spec_decode_tree_nodes_count", "gdnspec:spec_decode_draft_depth_count")
                 if line.startswith(name + " ")}
        last = [] if eng.sizer is None else [eng.sizer.last]
        return count["gdnspec:spec_decode_tree_nodes_count"], count["gdnspec:spec_decode_draft_depth_count"], \
            [steps, eng.stats.total_steps] + last

    nodes, depth, (steps, spec_steps, last) = histogram_counts(True)
    assert nodes == depth == spec_steps == steps > 0 and 1 <= last[0] <= 6 and 0 <= last[1] <= 3
    assert histogram_counts(False)[:2] == (0, 0)  # not sized: nothing observed
    assert histogram_counts(True, speculative=False)[:2] == (0, 0)  # plain steps only
