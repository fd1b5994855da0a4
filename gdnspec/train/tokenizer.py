"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on the corpus and saved as tokenizer.json.

    tok = train_tokenizer(texts, vocab_size=8192)   # special tokens: <|endoftext|> (eos between files), <|pad|>
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")
    ids = tok.encode(text).ids; text == tok.decode(ids)   # byte-level: every string round-trips

Run via `python -m gdnspec.cli data` (builds it with the corpus).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts, *, vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train on an iterable of strings; ids 0 and 1 are <|endoftext|> and <|pad|>, then the 256 byte symbols."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level BPE, got {vocab_size}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS_TOKEN)
    if i is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token")
    return i
