"""The CLI's generate and eval subcommands on the embedded default model (short runs)."""
from __future__ import annotations

import json

import pytest

from gdnspec.cli import main


@pytest.mark.parametrize("drafter", ["eagle", "model", "ngram", "none"])
def test_generate_streams_and_reports(drafter, capsys):
    assert main(["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--drafter", drafter]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def add(a, b):") and len(out) > len("def add(a, b):")
    assert "tokens per target forward" in err and f"drafter {drafter}" in err


def test_generate_rejects_unknown_drafter():
    with pytest.raises(SystemExit, match="mtp"):
        main(["generate", "--prompt", "x", "--max-new-tokens", "2", "--drafter", "mtp"])


def test_eval_writes_json_with_identical_greedy_outputs(tmp_path, capsys):
    rc = main(["eval", "--num-prompts", "1", "--max-new-tokens", "10", "--prompt-tokens", "32", "--drafters", "ngram,eagle",
               "--shapes", "chain-4,tree-2x5", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert len(res["rows"]) == 4
    assert all(r["identical_to_plain"] and r["speedup"] > 0 and r["tokens_per_forward"] >= 1 for r in res["rows"])
