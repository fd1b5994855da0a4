"""What a new user broke in the CLI of issue 12 (fresh venv, README commands, every flag with bad values, Ctrl-C),
each through the real entry point (main(argv) or `python -m gdnspec`): one line naming the flag, exit code 2, no
traceback, nothing printed before; Ctrl-C at any moment ends with exit code 130 and no traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gdnspec.models.checkpoint import save_checkpoint

from spec_helpers import run_main, tiny_folder, tiny_model

REPO = Path(__file__).resolve().parents[1]
GEN = ["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "2"]
EVAL = ["eval", "--num-prompts", "1", "--max-new-tokens", "2", "--prompt-tokens", "16", "--drafters", "ngram",
        "--shapes", "chain-4", "--repeats", "1"]
TINY = ["generate", "--prompt", "w5 w9 w7", "--max-new-tokens", "4"]


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def assert_one_line_error(rc, out, err, *needles, printed: str = ""):
    assert rc == 2, (rc, err)
    assert out.strip() == printed.strip(), out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def default_sigint() -> None:
    """Popen preexec_fn: SIGINT back to its default in the child. A test run started in the background of a
    non-interactive shell (`cmd &`) inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("argv,needles", [
    # torch.set_num_threads(100000) crashed the process (segmentation fault)
    (GEN + ["--threads", "100000"], ["--threads", f"an integer from 1 to {os.cpu_count()}"]),
    (EVAL + ["--threads", "100000"], ["--threads", "the CPUs of this machine"]),
    # seeds outside torch's range ended in an 'Overflow when unpacking long long' traceback
    (GEN + ["--seed", "99999999999999999999"], ["--seed", "expected an integer from -2**63 to 2**64 - 1"]),
    (GEN + ["--seed", "x"], ["--seed", "expected an integer"]),
    (["train", "--out", "x", "--seed", str(2 ** 64)], ["--seed", "2**64 - 1"]),
    # a tree deeper than its node budget can keep: EAGLE/model drafting ran for minutes per token
    (GEN + ["--num-steps", "100000", "--drafter", "eagle"],
     ["--speculative-num-steps", "100000", "--speculative-num-draft-tokens 16", "at most 15"]),
    # children per node beyond the vocabulary: 'selected index k out of range' from deep inside the drafter
    (GEN + ["--topk", "100000", "--drafter", "eagle"],
     ["--speculative-eagle-topk", "100000", "vocabulary (8192 tokens)"]),
    # an empty path silently meant the current folder ('. has no config.json', eval.json written into it)
    (GEN + ["--model", ""], ["--model", "expected a model folder, got ''"]),
    (EVAL + ["--out", ""], ["--out", "expected a folder path"]),
    (["train", "--out", "x", "--data", ""], ["--data", "expected a folder path"]),
    # --tag with a folder failed with a FileNotFoundError traceback after the whole run; '' and '.' wrote hidden files
    (EVAL + ["--tag", "a/b"], ["--tag", "no folders", "'a/b'"]),
    (EVAL + ["--tag", ""], ["--tag", "expected a file name"]),
    (EVAL + ["--tag", "."], ["--tag", "expected a file name"]),
    # unknown flags were reported by the top-level parser ('gdnspec: error: ...') without a hint
    (GEN + ["--tempreature", "0.5"], ["gdnspec generate: error:", "--tempreature (did you mean --temperature?)"]),
    (EVAL + ["--bogus"], ["gdnspec eval: error:", "unrecognized arguments: --bogus", "gdnspec eval --help"]),
])
def test_bad_flag_values_found_by_a_new_user(argv, needles, capsys):
    assert_one_line_error(*run_main(argv, capsys), *needles)


@pytest.mark.parametrize("argv,needles", [
    # each of these ended in a traceback (FileNotFoundError, ValueError, FileExistsError)
    (["data", "--out", "{tmp}/d", "--extra", "/nonexistent/x"], ["--extra", "'/nonexistent/x' does not exist"]),
    (["data", "--out", "{tmp}/d", "--tokenizer", "/nonexistent.json"], ["--tokenizer", "is not a file"]),
    (["data", "--out", "{tmp}/d", "--no-stdlib"], ["--no-stdlib", "--extra PATH"]),
    (["data", "--out", "{tmp}/d", "--no-stdlib", "--extra", "{tmp}/empty"], ["--extra", "no documents found"]),
    (["data", "--out", "{tmp}/file"], ["--out", "is a file (expected a folder)"]),
    (["train", "--out", "{tmp}/t", "--data", "{tmp}/file"], ["--data", "is a file (expected a folder)"]),
    (["train", "--out", "{tmp}/file"], ["--out", "is a file"]),
    # the vocabulary comes from the data's tokenizer: overriding it crashed training with an IndexError
    (["train", "--out", "{tmp}/t", "--data", "{tmp}/none", "--set", "vocab_size=5"], ["--set", "vocab_size comes from"]),
    (["train", "--out", "{tmp}/t", "--data", "{tmp}/none", "--set", "draft_vocab_size=5"], ["--set", "--draft-vocab"]),
])
def test_data_and_training_mistakes(argv, needles, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_one_line_error(*run_main(argv, capsys), *needles)
    assert not (tmp_path / "d").exists() and not (tmp_path / "none").exists()


@pytest.mark.parametrize("kind, override, needle", [("eagle", "bogus=1", "unknown GDNConfig fields: ['bogus']"),
                                                     ("model", "num_hidden_layers=0", "num_hidden_layers must be >= 1"),
                                                     # an EAGLE head then drafted over token ids 0..49 (the placeholder
                                                     # ids), not the most frequent ones; a draft model kept a field
                                                     # that nothing reads
                                                     ("eagle", "draft_vocab_size=50", "--draft-vocab"),
                                                     ("model", "draft_vocab_size=50", "--draft-vocab")])
def test_distill_set_is_checked_before_the_data_folder_is_built(kind, override, needle, tmp_path, capsys):
    """A bad --set for an EAGLE head was found only after the data folder had been built (minutes)."""
    target = tiny_folder(tmp_path / "target")
    argv = ["distill", "--kind", kind, "--target", str(target), "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "out"), "--set", override]
    assert_one_line_error(*run_main(argv, capsys), "--set", needle)
    assert not (tmp_path / "data").exists()


def test_eval_defaults_to_the_drafters_the_model_has(tmp_path, capsys):
    """The default --drafters was 'ngram,model,eagle': eval on a folder without a draft model (any Hugging Face
    checkpoint) ended in a usage error unless --drafters was given."""
    folder = tiny_folder(tmp_path / "target")
    rc, out, err = run_main(["eval", "--model", str(folder), *EVAL[1:7], "--shapes", "chain-4", "--repeats", "1",
                             "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())["rows"]
    assert [r["drafter"] for r in rows] == ["ngram"] and "1 drafter(s) x 1 tree shape(s)" in out


def test_eval_tag_error_comes_before_the_run(tmp_path, capsys):
    assert_one_line_error(*run_main(EVAL + ["--out", str(tmp_path), "--tag", "a/b"], capsys), "--tag")
    assert list(tmp_path.iterdir()) == []


def test_eval_without_matplotlib_points_at_an_install_that_works(tmp_path, capsys, monkeypatch):
    """The hint said `pip install 'gdnspec[plot]'` (a PyPI name; the README installs from the source folder)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, out, _ = run_main(EVAL + ["--out", str(tmp_path)], capsys)
    assert rc == 0 and (tmp_path / "eval.json").exists()
    assert "plot skipped: matplotlib is not installed (pip install matplotlib, or the plot extra: pip install " \
           "'.[plot]' in the gdnspec source folder" in out
    assert "gdnspec[plot]" not in out


# ------------------------------------------------------------------------------------------ broken models
@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory):
    model = tiny_model(seed=3, hybrid=True)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    return tiny_folder(tmp_path_factory.mktemp("nan") / "target", model)


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_non_finite_logits_are_a_one_line_model_error(nan_folder, drafter, capsys):
    """Plain decoding streamed one silent token (the CLI's own plain loop skipped the check); speculative decoding
    ended in a FloatingPointError traceback."""
    rc, out, err = run_main(TINY + ["--model", str(nan_folder), "--drafter", drafter], capsys)
    assert_one_line_error(rc, out, err, "--model", str(nan_folder), "non-finite logits", "try --dtype float32",
                          printed="w5 w9 w7")


def test_non_finite_logits_in_eval_are_a_model_error(tmp_path, capsys, monkeypatch):
    import gdnspec.evaluate

    def broken(*args, **kwargs):
        raise FloatingPointError("the target model produced non-finite logits (NaN or inf)")

    monkeypatch.setattr(gdnspec.evaluate, "evaluate", broken)
    rc, out, err = run_main(EVAL + ["--out", str(tmp_path)], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("gdnspec eval: error: --model: the embedded default model: the "
                                                   "target model produced non-finite logits")


def test_weights_of_the_wrong_shape_are_a_one_line_model_error(tmp_path, capsys):
    """A weights file from another config raised torch's multi-line RuntimeError (a traceback in the CLI)."""
    folder = tiny_folder(tmp_path / "target")
    save_checkpoint(tiny_model(seed=1, hidden=48), tmp_path / "other")
    (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    rc, out, err = run_main(TINY + ["--model", str(folder)], capsys)
    assert_one_line_error(rc, out, err, "--model", "model.safetensors", "tensors whose shape does not match "
                          "config.json", "embed_tokens.weight (48, 48) (the config makes (48, 32))")


def test_the_shipped_draft_model_runs_as_a_model_of_its_own(capsys):
    """--model .../default/draft failed to load (its sibling EAGLE head belongs to the target); .../default/eagle was
    reported as an 'unsupported model_type' of Hugging Face folders."""
    from gdnspec.models.checkpoint import DEFAULT_DIR

    rc, out, err = run_main(GEN + ["--model", str(DEFAULT_DIR / "draft")], capsys)
    assert rc == 0 and "drafter ngram" in err, err
    rc, out, err = run_main(GEN + ["--model", str(DEFAULT_DIR / "draft"), "--drafter", "eagle"], capsys)
    assert_one_line_error(rc, out, err, "--drafter", "'eagle' is not available for this model", "does not fit this "
                          "model: its hidden size (384) differs from the target's (256)", "choose from ngram, none")
    rc, out, err = run_main(GEN + ["--model", str(DEFAULT_DIR / "eagle")], capsys)
    assert_one_line_error(rc, out, err, "--model", "holds an EAGLE head (a drafter), not a language model")


# ------------------------------------------------------------------------------------------ Ctrl-C at any moment
def test_importing_the_cli_does_not_import_torch():
    """So that flags are parsed and Ctrl-C is handled before the slow imports (torch takes a second or more)."""
    res = subprocess.run([sys.executable, "-c", "import sys, gdnspec, gdnspec.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, env=cli_env(), timeout=60)
    assert res.stdout.strip() == "False", res.stderr


def test_lazy_package_attributes():
    import gdnspec

    assert gdnspec.TreeConfig.__name__ == "TreeConfig" and callable(gdnspec.load)
    assert gdnspec.generate.__name__ == "gdnspec.generate"  # submodules as before
    assert set(gdnspec.__all__) <= set(dir(gdnspec))
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        gdnspec.bogus  # noqa: B018


@pytest.mark.parametrize("first_signal_s", [0.8, 1.6])
def test_ctrl_c_while_starting_ends_cleanly(first_signal_s):
    """Ctrl-C while torch is imported or the model loads gave a KeyboardInterrupt traceback (the package imported
    torch before main() could catch it). SIGINT is repeated every second until the process ends (torch's own import
    swallows one that lands at a certain moment)."""
    proc = subprocess.Popen([sys.executable, "-m", "gdnspec", *GEN[:3], "--max-new-tokens", "3000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=REPO,
                            preexec_fn=default_sigint)
    try:
        time.sleep(first_signal_s)
        for _ in range(30):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    # 130, or killed by SIGINT (-2; the shell shows 130 too): CPython ends that way when torch's C++ code saw the
    # KeyboardInterrupt first, even though gdnspec caught it
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and "interrupted" in err, err


def test_interrupt_before_the_first_token_says_nothing_was_generated(capsys, monkeypatch):
    import gdnspec

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gdnspec, "load", interrupted_load)
    rc, out, err = run_main(GEN, capsys)
    assert rc == 130 and out == "" and "Traceback" not in err
    assert err.strip() == "gdnspec generate: interrupted before the first token (while loading the model or warming " \
                          "up): nothing was generated"


def test_readme_python_example_runs_as_printed():
    """The README's Python example, verbatim, prints the text and then a labelled figure."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Use it from Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = block.split("# Hugging Face", 1)[0]  # the last lines need a Qwen3-Next folder and CUDA
    code = code.replace("max_new_tokens=128", "max_new_tokens=16")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("tokens per target forward: ") and float(last.split(": ")[1]) >= 1, last


# ------------------------------------------------------------------------------------------ streamed text
@pytest.mark.parametrize("text", ["🙂 ok 日本語 é", "Привет", "a\ufffdb"])
def test_characters_split_across_tokens_stream_intact(text, capsys, monkeypatch):
    """Byte-level BPE splits emoji / CJK / Cyrillic over several tokens: the stream printed U+FFFD for each partial
    character and then lost the real one ('x = � ok ��� �')."""
    import gdnspec
    from gdnspec import cli

    tok = gdnspec.load().tokenizer
    new = tok.encode(text).ids
    assert len(new) > len(text.split())  # some character spans several tokens

    def scripted(self):
        return iter([new[:k] for k in range(1, len(new) + 1)])

    monkeypatch.setattr(cli._Generation, "chosen", scripted)
    rc, out, err = run_main(["generate", "--prompt", "x = ", "--max-new-tokens", str(len(new)), "--drafter", "none"],
                            capsys)
    assert rc == 0, err
    assert out == tok.decode(tok.encode("x = ").ids + new) + "\n"


def test_a_character_cut_by_the_end_of_generation_is_still_shown(capsys, monkeypatch):
    import gdnspec
    from gdnspec import cli

    tok = gdnspec.load().tokenizer
    new = tok.encode("ok 🙂").ids[:-1]  # the emoji's last byte never comes
    monkeypatch.setattr(cli._Generation, "chosen", lambda self: iter([new[:k] for k in range(1, len(new) + 1)]))
    rc, out, _ = run_main(["generate", "--prompt", "x = ", "--max-new-tokens", "9", "--drafter", "none"], capsys)
    assert rc == 0 and out == tok.decode(tok.encode("x = ").ids + new) + "\n" and out.rstrip("\n").endswith("\ufffd")


def test_distill_init_continues_from_a_checkpoint_and_checks_it(tmp_path, capsys):
    """`gdnspec distill --init FOLDER` continues a distillation from that drafter's weights (the retrain of the
    default EAGLE head stopped while its held-out KL was still falling); a checkpoint of the wrong kind or --set next
    to --init is a usage error naming --init."""
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\nclass C{i}:\n    pass\n" * 8)
    common = ["--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--warmup-steps", "0", "--log-every", "1"]
    steps = [["data", "--out", f"{tmp_path}/d", "--no-stdlib", "--extra", str(corpus), "--vocab-size", "300"],
             ["train", "--data", f"{tmp_path}/d", "--preset", "tiny", "--out", f"{tmp_path}/t", "--steps", "2", *common],
             ["distill", "--kind", "eagle", "--target", f"{tmp_path}/t", "--data", f"{tmp_path}/d", "--out",
              f"{tmp_path}/e1", "--steps", "2", *common],
             ["distill", "--kind", "eagle", "--target", f"{tmp_path}/t", "--data", f"{tmp_path}/d", "--out",
              f"{tmp_path}/e2", "--init", f"{tmp_path}/e1", "--steps", "1", "--lr", "1e-12", *common]]
    for argv in steps:
        rc, out, err = run_main(argv, capsys)
        assert rc == 0, (argv, err[-2000:])
    w1 = load_file(str(tmp_path / "e1" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "e2" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:  # lr 1e-12: the continued head is the --init head (a fresh head would be re-initialised)
        assert torch.allclose(w1[k].float(), w2[k].float(), atol=1e-3), k
    assert json.loads((tmp_path / "e2" / "training.json").read_text()).get("init") == f"{tmp_path}/e1"
    base = ["distill", "--kind", "eagle", "--target", f"{tmp_path}/t", "--data", f"{tmp_path}/d", "--out",
            f"{tmp_path}/e3"]
    assert_one_line_error(*run_main(base + ["--init", f"{tmp_path}/t"], capsys), "--init", "GDNForCausalLM",
                          "EagleHead")
    assert_one_line_error(*run_main(base + ["--init", f"{tmp_path}/e1", "--set", "hidden_size=8"], capsys),
                          "--init", "--set")
    assert not (tmp_path / "e3").exists()
    # --draft-vocab N: the continued head drafts over the N most frequent tokens of --data; saved and reloaded
    from gdnspec.models.checkpoint import load_checkpoint
    from gdnspec.train.data import TokenData

    rc, out, err = run_main(base + ["--init", f"{tmp_path}/e1", "--draft-vocab", "50", "--steps", "1", *common], capsys)
    assert rc == 0, err[-2000:]
    head, _ = load_checkpoint(tmp_path / "e3")
    assert head.config.draft_vocab_size == 50
    assert torch.equal(head.draft_ids, TokenData.load(tmp_path / "d").frequent_tokens(50))
    assert json.loads((tmp_path / "e3" / "training.json").read_text()).get("draft_vocab") == 50
    assert_one_line_error(*run_main(["distill", "--kind", "model", "--target", f"{tmp_path}/t", "--data",
                                     f"{tmp_path}/d", "--out", f"{tmp_path}/m9", "--draft-vocab", "50"], capsys),
                          "--draft-vocab", "--kind eagle")
    assert_one_line_error(*run_main(base + ["--draft-vocab", "100000"], capsys), "--draft-vocab", "at most")


def test_a_data_folder_without_held_out_text_is_a_usage_error(tmp_path, capsys):
    """A small corpus (or --heldout-fraction 0) gave a data folder with no held-out file: `gdnspec train` reported a
    held-out loss of 0.0 (and kept only its first evaluation's checkpoint: nothing beats 0.0), `gdnspec distill` ended
    in a ZeroDivisionError traceback after training. Both now say so before training, naming --data."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    common = ["--batch-size", "2", "--device", "cpu", "--steps", "1"]
    rc, _, err = run_main(["data", "--out", f"{tmp_path}/d", "--no-stdlib", "--extra", str(corpus), "--vocab-size",
                           "300", "--heldout-fraction", "0"], capsys)
    assert rc == 0, err
    assert_one_line_error(*run_main(["train", "--data", f"{tmp_path}/d", "--preset", "tiny", "--out", f"{tmp_path}/t",
                                     "--seq-len", "16", *common], capsys), "--data", "0 held-out tokens",
                          "--heldout-fraction")
    assert not (tmp_path / "t").exists()
    assert_one_line_error(*run_main(["train", "--data", f"{tmp_path}/d", "--preset", "tiny", "--out", f"{tmp_path}/t",
                                     "--seq-len", "100000", *common], capsys), "--data", "train tokens", "--seq-len")
    target = tiny_folder(tmp_path / "target", tiny_model(seed=0, vocab_size=300))
    (target / "tokenizer.json").write_text((tmp_path / "d" / "tokenizer.json").read_text())
    assert_one_line_error(*run_main(["distill", "--kind", "eagle", "--target", str(target), "--data", f"{tmp_path}/d",
                                     "--out", f"{tmp_path}/e", "--seq-len", "16", *common], capsys),
                          "--data", "held-out tokens")
    assert not (tmp_path / "e").exists()
