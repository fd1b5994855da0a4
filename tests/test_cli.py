"""The CLI through its real entry points (main(argv) and `python -m gdnspec`) on the embedded default model: generate
and eval output, speed reporting, Ctrl-C, and one-line usage errors (exit code 2) for everyday mistakes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import shutil

import pytest
import torch

from spec_helpers import run_main

import gdnspec
from gdnspec.cli import DRAFTERS, SMALL_MODEL_PARAMS, build_parser, choose_threads

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def add(a, b):"


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def default_sigint() -> None:
    """Popen preexec_fn: SIGINT back to its default in the child. A test run started in the background of a
    non-interactive shell (`cmd &`) inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_usage_error(rc, out, err, *needles):
    assert rc == 2, (rc, err)
    assert out == "", "nothing may be printed before the arguments are checked"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("drafter", ["eagle", "model", "ngram", "none"])
def test_generate_streams_and_reports(drafter, capsys):
    rc, out, err = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--drafter", drafter], capsys)
    assert rc == 0
    assert out.startswith(PROMPT) and len(out) > len(PROMPT)
    assert "tokens per target forward" in err and f"drafter {drafter}" in err
    assert re.search(r"12 new tokens \(prompt \d+\) \| first token \d+\.\d+ s \| decode \d+\.\d tokens/s", err), err
    assert "cpu, 1 thread" in err  # the 16.7M default model runs on one CPU thread by default
    assert "nan" not in err


def test_generate_plain_matches_generate_autoregressive(capsys):
    bundle = gdnspec.load()
    ids = torch.tensor(bundle.tokenizer.encode(PROMPT).ids)
    ref = gdnspec.generate_autoregressive(bundle.model, ids[None], 20, eos_token_id=bundle.eos_token_id)[0]
    rc, out, _ = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "20", "--drafter", "none"], capsys)
    assert rc == 0
    assert out.rstrip("\n") == bundle.tokenizer.decode(ref.tolist())


def test_plain_stream_static_steps_match_eager_decoding():
    """The static decode step (a CUDA graph on the GPU, forced here on the CPU) streams the same greedy tokens."""
    from gdnspec.cli import _plain_stream

    bundle = gdnspec.load()
    ids = torch.tensor(bundle.tokenizer.encode(PROMPT).ids)
    ref = gdnspec.generate_autoregressive(bundle.model, ids[None], 16, static=False)[0, ids.numel():].tolist()
    sampling = {"temperature": 0.0, "top_k": None, "top_p": None}
    with torch.inference_mode():
        for static in (False, True):
            *_, last = _plain_stream(bundle.model, ids, 16, None, sampling, None, static=static)
            assert last == ref, static


def test_generate_compare_reports_speedup(capsys):
    rc, out, err = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "16", "--compare"], capsys)
    assert rc == 0
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "drafter ngram" in lines[0]
    assert re.search(r"plain decoding: first token \d+\.\d+ s \| decode \d+\.\d tokens/s \| speculative \(ngram\) "
                     r"decode speedup over plain: \d+\.\d\dx, same output$", lines[1]), lines[1]


@pytest.mark.parametrize("drafter", ["ngram", "none"])
def test_generate_zero_new_tokens_says_so(drafter, capsys):
    rc, out, err = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "0", "--drafter", drafter], capsys)
    assert rc == 0 and out.strip() == PROMPT
    assert "no tokens generated (--max-new-tokens 0)" in err
    assert "nan" not in err and "0.00" not in err and "n/a" in err


def test_generate_threads_flag_and_dtype_auto(capsys):
    rc, _, err = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "3", "--threads", "2", "--dtype", "auto"],
                          capsys)
    assert rc == 0 and "cpu, 2 threads" in err


def test_choose_threads_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(3, "cpu", 10) == 3  # --threads wins
    assert choose_threads(None, "cpu", SMALL_MODEL_PARAMS - 1) == 1
    assert choose_threads(None, "cpu", SMALL_MODEL_PARAMS) is None  # large model: torch's default
    assert choose_threads(None, "cuda", 10) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(None, "cpu", 10) is None  # the user said otherwise


def test_generate_ctrl_c_in_process_prints_partial_output_and_stats(capsys, monkeypatch):
    from gdnspec import cli

    calls = []
    real = cli._Printer.__call__

    def interrupt_third(self, tokens):
        calls.append(len(tokens))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(self, tokens)

    monkeypatch.setattr(cli._Printer, "__call__", interrupt_third)
    rc, out, err = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "50"], capsys)
    assert rc == 130 and "Traceback" not in err
    assert out.startswith(PROMPT)
    assert err.strip().startswith("--- interrupted: ") and "drafter ngram" in err and "tokens per target forward" in err


def test_generate_ctrl_c_subprocess_ends_cleanly():
    """A real SIGINT while the text streams: exit code 130, the text so far, the statistics, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "gdnspec", "generate", "--prompt", PROMPT, "--max-new-tokens",
                             "3000", "--drafter", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(), cwd=REPO, preexec_fn=default_sigint)
    try:
        seen = b""
        while len(seen) <= len(PROMPT) + 8:  # wait until generated text streams
            chunk = os.read(proc.stdout.fileno(), 256)
            assert chunk, proc.stderr.read().decode()
            seen += chunk
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--- interrupted: " in err and "drafter none" in err
    assert (seen + rest).decode().startswith(PROMPT)


# ------------------------------------------------------------------------------------------ usage errors
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
GEN = ["generate", "--prompt", PROMPT, "--max-new-tokens", "2"]
EVAL = ["eval", "--num-prompts", "1", "--max-new-tokens", "2"]


@pytest.mark.parametrize("argv,needles", [
    (GEN + ["--model", "/nonexistent/path"], ["--model", "/nonexistent/path does not exist"]),
    pytest.param(GEN + ["--device", "cuda"], ["--device", "CUDA is not available"], marks=NO_CUDA),
    (GEN + ["--device", "bogus"], ["--device", "expected cpu, cuda or cuda:N"]),
    (GEN + ["--topk", "0"], ["--speculative-eagle-topk/--topk", "expected an integer >= 1, got '0'"]),
    (GEN + ["--speculative-eagle-topk", "x"], ["--speculative-eagle-topk/--topk", "expected an integer >= 1"]),
    (GEN + ["--num-steps", "-1"], ["--speculative-num-steps/--num-steps", "expected an integer >= 1, got '-1'"]),
    (GEN + ["--num-draft-tokens", "1"], ["--speculative-num-draft-tokens/--num-draft-tokens", ">= 2"]),
    (GEN + ["--temperature", "-1"], ["--temperature", "expected a number >= 0, got '-1'"]),
    (GEN + ["--temperature", "nan"], ["--temperature", "expected a number >= 0"]),
    (GEN + ["--top-p", "2"], ["--top-p", "expected a number in (0, 1], got '2'"]),
    (GEN + ["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (GEN + ["--top-k", "0"], ["--top-k", "expected an integer >= 1"]),
    (GEN + ["--max-new-tokens", "-1"], ["--max-new-tokens", "expected an integer >= 0"]),
    (GEN + ["--threads", "0"], ["--threads", "expected an integer from 1 to"]),
    (GEN + ["--dtype", "None"], ["--dtype", "invalid choice: 'None'", "auto"]),
    (GEN + ["--drafter", "bogus"], ["--drafter", "invalid choice: 'bogus'", "ngram"]),
    (GEN + ["--compare", "--drafter", "none"], ["--compare", "--drafter none"]),
    (GEN + ["--prompt", ""], ["--prompt", "encodes to no tokens"]),
    (EVAL + ["--shapes", "bogus"], ["--shapes", "bogus", "chain-4, chain-6, tree-2x5, tree-4x5, tree-8x6"]),
    (EVAL + ["--drafters", "ngram,bogus"], ["--drafters", "bogus", "ngram, eagle, model, mtp"]),
    (["eval", "--num-prompts", "0"], ["--num-prompts", "expected an integer >= 1, got '0'"]),
    (EVAL + ["--repeats", "0"], ["--repeats", "expected an integer >= 1"]),
    (EVAL + ["--sample-drafts"], ["--sample-drafts", "--temperature > 0"]),
    (EVAL + ["--sample-drafts", "--temperature", "0.7", "--drafters", "ngram,eagle"], ["--sample-drafts", "ngram",
                                                                                     "deterministically"]),
    (EVAL + ["--model", "/nonexistent/path"], ["--model", "does not exist"]),
    (EVAL + ["--drafters", "ngram,mtp"], ["--drafters", "'mtp' is not available for this model", "eagle, model, ngram"]),
    (["train", "--out", "x", "--steps", "0"], ["--steps", "expected an integer >= 1"]),
    (["train", "--out", "x", "--preset", "bogus"], ["--preset", "'bogus'", "default-target"]),
    (["train", "--out", "x", "--set", "hidden_size"], ["--set", "expected KEY=VALUE"]),
    (["train", "--out", "x", "--set", "bogus_field=1"], ["--set", "bogus_field"]),
    (["train", "--out", "x", "--device", "cuda:x"], ["--device", "expected cpu, cuda or cuda:N"]),
    (["train", "--out", "x", "--lr", "0"], ["--lr", "expected a number > 0, got '0'"]),
    (["distill", "--kind", "eagle", "--target", "/nonexistent/t", "--out", "x"], ["--target", "does not exist"]),
    ([], ["the following arguments are required: command"]),
    (["bogus"], ["invalid choice: 'bogus'"]),
])
def test_usage_errors_are_one_line_with_the_flag(argv, needles, capsys):
    assert_usage_error(*run_main(argv, capsys), *needles)


def test_num_draft_tokens_too_large_names_the_drafter_and_tree_flags(capsys):
    rc, out, err = run_main(GEN + ["--num-draft-tokens", "1000"], capsys)
    assert_usage_error(rc, out, err, "--speculative-num-draft-tokens", "1000", "ngram drafter",
                       "--speculative-eagle-topk 4", "--speculative-num-steps 5", "at most 69 nodes")
    assert "eagle2" not in err and "builder" not in err


def test_drafter_missing_from_model_is_a_usage_error_before_any_output(capsys):
    rc, out, err = run_main(GEN + ["--drafter", "mtp"], capsys)
    assert_usage_error(rc, out, err, "--drafter", "'mtp' is not available", "eagle, model, ngram, none")


def test_eval_out_that_is_a_file_fails_before_the_run(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert_usage_error(*run_main(EVAL + ["--out", str(tmp_path / "f")], capsys), "--out", str(tmp_path / "f"))


def test_model_folder_that_cannot_load_is_a_model_error(tmp_path, capsys):
    assert_usage_error(*run_main(GEN + ["--model", str(tmp_path)], capsys), "--model", str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    assert_usage_error(*run_main(GEN + ["--model", str(tmp_path)], capsys), "--model", str(tmp_path))


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--prompt", "x", "--model", "/nonexistent/path"], "--model"),
    (["generate", "--prompt", "x", "--topk", "0"], "--speculative-eagle-topk/--topk"),
])
def test_usage_errors_through_python_m_gdnspec(argv, needle):
    res = subprocess.run([sys.executable, "-m", "gdnspec", *argv], capture_output=True, text=True, env=cli_env(),
                         cwd=REPO, timeout=120)
    assert_usage_error(res.returncode, res.stdout, res.stderr, needle, "gdnspec generate: error:")


def test_help_shows_defaults_and_both_tree_flag_names(capsys):
    rc, out, _ = run_main(["generate", "--help"], capsys)
    assert rc == 0
    flat = " ".join(out.split())
    for text in ["--speculative-eagle-topk K, --topk K", "--speculative-num-steps",
                 "--speculative-num-draft-tokens", "--top-k", "--top-p", "--threads", "--compare", "(default: 4)",
                 "(default: 200)", "0 = greedy (default: the model's", "ngram (default: the fastest",
                 "{auto,float32,float16,bfloat16}", "(default: auto)"]:
        assert text in flat, text
    assert "None" not in out
    rc, out, _ = run_main(["eval", "--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0 and "(default: 3)" in flat and "(default: eval)" in flat and "<out>/<tag>.json" in flat


def test_readme_cli_flags_exist():
    """Every --flag the README shows for generate / eval is a real flag of that subcommand."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    readme = (REPO / "README.md").read_text()
    checked = 0
    for command in ("generate", "eval"):
        flags = {s for a in sub[command]._actions for s in a.option_strings}
        for line in readme.splitlines():
            spans = re.findall(r"`([^`]*)`", line) if "`" in line else [line]  # code spans, or a code block's line
            for use in (s.split(f"gdnspec {command}", 1)[1] for s in spans if re.search(rf"gdnspec {command}\b", s)):
                for flag in re.findall(r"(--[a-z][a-z0-9-]*)", use):
                    assert flag in flags, (command, flag, line)
                    checked += 1
    assert checked > 30
    assert set(DRAFTERS) <= set(sub["generate"]._option_string_actions["--drafter"].choices)


# ------------------------------------------------------------------------------------------ eval
def test_eval_writes_json_with_identical_greedy_outputs_and_spread(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without the plot extra
    rc, out, _ = run_main(["eval", "--num-prompts", "1", "--max-new-tokens", "10", "--prompt-tokens", "32",
                           "--drafters", "ngram,eagle", "--shapes", "chain-4,tree-2x5", "--repeats", "2",
                           "--out", str(tmp_path)], capsys)
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())  # the default tag: eval.json (and eval.png), as --help says
    assert len(res["rows"]) == 4 and res["repeats"] == 2
    for r in res["rows"]:
        assert r["identical_to_plain"] and r["tokens_per_forward"] >= 1
        assert len(r["speedups"]) == 2 and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    assert re.search(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", out), out
    assert out.startswith("[eval] 1 held-out prompt(s) of 32 tokens")
    assert f"wrote {tmp_path / 'eval.json'}" in out
    assert "plot skipped: matplotlib is not installed (pip install matplotlib, or the plot extra" in out
    assert not (tmp_path / "eval.png").exists()


def test_eval_adaptive_reports_plain_steps_and_tree_sizing(tmp_path, capsys, monkeypatch):
    """--adaptive on the CPU: the fall-back and per-step tree sizing; the JSON rows carry the sizer's summary and the
    table its mean nodes / depth, and greedy output stays identical."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, out, _ = run_main(["eval", "--num-prompts", "1", "--max-new-tokens", "24", "--prompt-tokens", "32",
                           "--drafters", "eagle", "--shapes", "tree-2x5", "--repeats", "1", "--adaptive",
                           "--out", str(tmp_path)], capsys)
    assert rc == 0
    row = json.loads((tmp_path / "eval.json").read_text())["rows"][0]
    sizing = row["tree_sizing"]
    assert row["identical_to_plain"] and 0.0 <= row["plain_step_share"] <= 1.0
    assert sizing["steps"] == sum(sizing["nodes"].values()) > 0 and max(map(int, sizing["nodes"])) <= 10
    assert "| plain steps | nodes / depth" in out
    assert re.search(rf"\| {sizing['mean_nodes']:.1f} / {sizing['mean_depth']:.1f}$", out, re.M), out


def test_eval_plot_draws_the_spread(tmp_path):
    pytest.importorskip("matplotlib")
    from gdnspec.evaluate import plot

    row = {"drafter": "ngram", "shape": "chain-4", "tokens_per_forward": 1.5, "speedup": 1.1, "speedup_min": 0.9,
           "speedup_max": 1.3}
    assert plot({"rows": [row, dict(row, shape="tree-4x5")], "title": "t"}, str(tmp_path / "eval.png"))
    assert (tmp_path / "eval.png").stat().st_size > 0


@pytest.mark.parametrize("var,value", [("GDNSPEC_CPU_COMPILE", "true"), ("GDNSPEC_CPU_ONEDNN", "bogus"),
                                       ("GDNSPEC_GEMV_AUTOTUNE", "true"),
                                       ("GDNSPEC_NORM_GEMV", "2"), ("GDNSPEC_SILU_GEMV", "on"),
                                       ("GDNSPEC_TREE_BLOCKED_SOLVE", "yes"),
                                       ("GDNSPEC_TREE_BUILD", "off"), ("GDNSPEC_TREE_FUSION", "fused"),
                                       ("GDNSPEC_TREE_INDEX", "on"),
                                       ("GDNSPEC_TREE_PROJ", "2"), ("GDNSPEC_TREE_PROJ_MAX_ROWS", "65"),
                                       ("GDNSPEC_TRITON_PRECISION", "bf16")])
def test_bad_env_switch_is_one_usage_line(var, value, capsys, monkeypatch):
    """A GDNSPEC_* switch with a value it does not take ends the command before any work with one line naming the
    variable and exit code 2 (the switches are otherwise read on the first step that reaches their path)."""
    monkeypatch.setenv(var, value)
    rc, out, err = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "2"], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gdnspec generate: error:") and var in err, err


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_enable_torch_compile_flag_compiles_the_drafter_steps(capsys, monkeypatch):
    """--enable-torch-compile (SGLang's flag) turns GDNSPEC_CPU_COMPILE on for the run: the draft model's expansions
    go through the compiled step (models/cpu_compiled.py) and generation gives the same text as without it."""
    from gdnspec.models import cpu_compiled

    # main() sets GDNSPEC_CPU_COMPILE=1 for the process: setenv records the original value (unset) for teardown
    # (delenv of an unset variable records nothing, and the "1" leaked into every later test)
    monkeypatch.setenv("GDNSPEC_CPU_COMPILE", "0")
    monkeypatch.setitem(cpu_compiled._STATE, "failed", None)
    calls = []
    real = cpu_compiled._run
    monkeypatch.setattr(cpu_compiled, "_run", lambda name, fn, args: calls.append(name) or real(name, fn, args))
    argv = ["generate", "--prompt", PROMPT, "--max-new-tokens", "6", "--drafter", "model", "--threads", "2"]
    rc0, out0, _ = run_main(argv, capsys)
    assert rc0 == 0 and not calls
    rc, out, err = run_main(argv + ["--enable-torch-compile"], capsys)
    assert rc == 0 and out == out0, err
    assert "model_step" in calls and cpu_compiled._STATE["failed"] is None


def test_mamba_ssm_cache_dtype_flag_stores_the_target_states_in_16_bits(capsys, monkeypatch):
    """--mamba-ssm-cache-dtype bfloat16 (vLLM's flag) makes the target's GDN states bf16 and generation still runs;
    a value it does not take is one usage line naming the flag."""
    import gdnspec.cli as cli

    seen = []
    real = cli._load_bundle

    def spy(args):
        b = real(args)
        seen.append({s.recurrent.dtype for s in b.model.new_state(1).layers if hasattr(s, "recurrent")})
        return b

    monkeypatch.setattr(cli, "_load_bundle", spy)
    rc, out, err = run_main(["generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--mamba-ssm-cache-dtype",
                             "bfloat16"], capsys)
    assert rc == 0 and out.strip(), err
    assert seen == [{torch.bfloat16}]
    rc, out, err = run_main(["generate", "--prompt", PROMPT, "--mamba-ssm-cache-dtype", "int8"], capsys)
    assert rc == 2 and "--mamba-ssm-cache-dtype" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("gdnspec generate: error:")


def test_mamba_ssm_cache_dtype_property_refuses_what_it_cannot_store():
    from gdnspec.models.lm import GDNForCausalLM

    from conftest import tiny_config

    m = GDNForCausalLM(tiny_config())
    for bad in ("bf16", "auto", torch.bfloat16, None):
        with pytest.raises(ValueError, match="mamba_ssm_cache_dtype"):
            m.mamba_ssm_cache_dtype = bad
    m.mamba_ssm_cache_dtype = "float16"
    assert m.mamba_ssm_cache_dtype == "float16"
    m64 = GDNForCausalLM(tiny_config(), dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 model"):
        m64.mamba_ssm_cache_dtype = "bfloat16"
    m64.mamba_ssm_cache_dtype = "float32"  # the default: allowed, states stay float64
    assert {s.recurrent.dtype for s in m64.new_state(1).layers if hasattr(s, "recurrent")} == {torch.float64}
