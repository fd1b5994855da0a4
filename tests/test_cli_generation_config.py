"""`gdnspec generate` takes the sampling defaults of the checkpoint's generation_config.json: --temperature, --top-k
and --top-p left out mean "the model's default" (bundle.sampling_args), flags given win, and the stats line says what
was used. Through the real entry point (main(argv)) on a tiny gdnspec checkpoint folder."""
from __future__ import annotations

import json

import pytest
import torch

import gdnspec
from gdnspec.cli import main
from spec_helpers import tiny_folder

PROMPT = "w5 w9 w5 w9 w7"
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny gdnspec target folder (random weights, sharp distributions) whose generation_config.json samples."""
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "target", generation_config=SAMPLING)


def run(folder, capsys, *flags, new_tokens=12):
    try:
        rc = main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", str(new_tokens),
                   *flags])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def reference(folder, new_tokens=12, **sampling) -> str:
    """generate_autoregressive with the given sampling (seed 0, as the CLI's default --seed), decoded."""
    bundle = gdnspec.load(folder)
    ids = torch.tensor(bundle.tokenizer.encode(PROMPT).ids)
    gen = torch.Generator().manual_seed(0) if sampling.get("temperature", 0) > 0 else None
    out = gdnspec.generate_autoregressive(bundle.model, ids[None], new_tokens, eos_token_id=bundle.eos_token_id,
                                          generator=gen, **sampling)[0]
    return bundle.tokenizer.decode(out.tolist())


def stats_line(err: str) -> str:
    """The statistics line of the chosen decoding (--compare's plain run adds a second '--- plain decoding' line)."""
    lines = [line for line in err.splitlines() if line.startswith("--- ") and "plain decoding:" not in line]
    assert len(lines) == 1, err
    return lines[0]


def test_flags_left_out_take_the_models_sampling_defaults(folder, capsys):
    rc, out, err = run(folder, capsys, "--drafter", "none")
    assert rc == 0, err
    line = stats_line(err)
    assert ("temperature 0.6, top-k 20, top-p 0.95 (--temperature, --top-k, --top-p from the model's "
            "generation_config.json)") in line, line
    assert out.rstrip("\n") == reference(folder, temperature=0.6, top_k=20, top_p=0.95)
    assert out.rstrip("\n") != reference(folder)  # not greedy: the file's sampling was used


def test_flags_given_win_over_the_models_defaults(folder, capsys):
    rc, out, err = run(folder, capsys, "--drafter", "none", "--temperature", "1.5", "--top-k", "7")
    assert rc == 0, err
    assert "temperature 1.5, top-k 7, top-p 0.95 (--top-p from the model's generation_config.json)" in stats_line(err)
    assert out.rstrip("\n") == reference(folder, temperature=1.5, top_k=7, top_p=0.95)


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_temperature_0_is_greedy_whatever_the_model_says(folder, capsys, drafter):
    rc, out, err = run(folder, capsys, "--drafter", drafter, "--temperature", "0")
    assert rc == 0, err
    assert "| greedy |" in stats_line(err)
    assert out.rstrip("\n") == reference(folder)


def test_speculative_decoding_samples_with_the_models_defaults(folder, capsys):
    rc, out, err = run(folder, capsys, "--drafter", "ngram", "--compare")
    assert rc == 0, err
    line = stats_line(err)
    assert "temperature 0.6, top-k 20, top-p 0.95 (--temperature, --top-k, --top-p from" in line
    assert "drafter ngram" in line and line.endswith("thread")
    assert "OUTPUTS DIFFER" not in err and "same output" not in err  # sampled: outputs are not compared


def test_without_generation_config_the_default_is_greedy(folder, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in folder.iterdir():
        if f.name != "generation_config.json":
            (plain / f.name).write_bytes(f.read_bytes())
    rc, out, err = run(plain, capsys, "--drafter", "none")
    assert rc == 0, err
    assert "| greedy | drafter none |" in stats_line(err)
    assert out.rstrip("\n") == reference(plain)
    rc, _, err = run(plain, capsys, "--drafter", "none", "--top-k", "5")
    assert rc == 0 and "| greedy (--top-k unused at temperature 0) |" in stats_line(err)
    rc, _, err = run(plain, capsys, "--drafter", "none", "--temperature", "0.8")
    assert rc == 0 and "| temperature 0.8, top-k off, top-p off | drafter none" in stats_line(err)


@pytest.mark.parametrize("config, needle", [
    ({"do_sample": True, "temperature": "hot"}, "temperature"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"do_sample": True, "top_k": 2.5}, "top_k"),
])
def test_bad_sampling_defaults_are_a_model_error_naming_the_file(folder, tmp_path, capsys, config, needle):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "generation_config.json").write_text(json.dumps(config))
    rc, out, err = run(bad, capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--model" in err and "generation_config.json" in err and needle in err and "Traceback" not in err


def test_help_says_the_sampling_flags_default_to_the_models(capsys):
    try:
        main(["generate", "--help"])
    except SystemExit:
        pass
    flat = " ".join(capsys.readouterr().out.split())
    assert "a flag left out takes the model's default: its generation_config.json's value with do_sample true" in flat
    for text in ["0 = greedy (default: the model's; greedy unless its generation_config.json sets do_sample)",
                 "(default: the model's; off unless its generation_config.json sets do_sample)"]:
        assert text in flat, text


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_generation_config_stop_list_ends_the_cli_output(folder, tmp_path, capsys, drafter):
    """generation_config.json's eos_token_id list: the CLI stops at the first of them (it ran on past <|im_end|>)."""
    bundle = gdnspec.load(folder)
    ids = torch.tensor(bundle.tokenizer.encode(PROMPT).ids)
    new = gdnspec.generate_autoregressive(bundle.model, ids[None], 12)[0, ids.numel():].tolist()
    stop = new[3]
    cut = new.index(stop) + 1
    stops = tmp_path / "stops"
    stops.mkdir()
    for f in folder.iterdir():
        (stops / f.name).write_bytes(f.read_bytes())
    (stops / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, 1]}))
    rc, out, err = run(stops, capsys, "--drafter", drafter)
    assert rc == 0, err
    assert out.rstrip("\n") == bundle.tokenizer.decode(ids.tolist() + new[:cut])
    assert f"--- {cut} new token{'s' if cut > 1 else ''} (prompt {ids.numel()})" in stats_line(err)
    assert "| greedy |" in stats_line(err)
