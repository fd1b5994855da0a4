"""Small models shared by the speculative-decoding tests (float64 on CPU, random weights)."""
from __future__ import annotations

import copy

import torch

from gdnspec import GDNConfig, GDNForCausalLM


def tiny_config(*, vocab_size=48, hybrid=False, num_layers=2, hidden=32, ratio=1, **kw) -> GDNConfig:
    return GDNConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=num_layers,
        full_attention_interval=2 if hybrid else 0, intermediate_size=48,
        linear_num_key_heads=2, linear_num_value_heads=2 * ratio, linear_key_head_dim=8, linear_value_head_dim=8,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, partial_rotary_factor=0.5, **kw)


def tiny_model(seed=0, *, dtype=torch.float64, init_scale=1.0, **kw) -> GDNForCausalLM:
    torch.manual_seed(seed)
    model = GDNForCausalLM(tiny_config(**kw), dtype=dtype).eval()
    if init_scale != 1.0:  # sharper distributions -> longer agreement between near-copies
        with torch.no_grad():
            model.lm_head.weight.mul_(init_scale)
    return model


def noisy_copy(model, *, noise=0.02, seed=1):
    """A draft that mostly agrees with `model`: the same weights plus noise."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype) * (p.std() if p.numel() > 1 else 1.0))
    return draft


def prompts_of(lengths, vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer over ids 0..vocab_size-1: [UNK], <|endoftext|>, <|im_end|>, w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<|im_end|>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def tiny_folder(path, model=None, *, generation_config: dict | None = None):
    """A gdnspec checkpoint folder (float32 weights, word_tokenizer, optional generation_config.json) for CLI tests:
    `gdnspec generate --model <path> --prompt "w5 w9 w7"`."""
    import json
    from pathlib import Path

    from gdnspec.models.checkpoint import save_checkpoint

    model = tiny_model(seed=3, hybrid=True, init_scale=4.0) if model is None else model
    save_checkpoint(model, path, tokenizer=word_tokenizer(model.vocab_size), dtype=torch.float32)
    if generation_config is not None:
        (Path(path) / "generation_config.json").write_text(json.dumps(generation_config))
    return Path(path)


def run_main(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of gdnspec.cli.main(argv), argparse's own exits included."""
    from gdnspec.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
