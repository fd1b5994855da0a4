"""Training corpus: Python standard-library sources (+ user files), split by file, tokenized into uint16 streams.

    docs = collect_documents(include_stdlib=True, extra_paths=["my_dir", "notes.txt"])   # sorted, deterministic
    train_docs, heldout_docs = split_documents(docs, heldout_fraction=0.05)            # by hash of the file's name
    build_dataset("runs/data", vocab_size=8192)                 # tokenizer.json + train.npy + heldout.npy + meta.json
    data = TokenData.load("runs/data"); x, y = data.sample_batch(8, 512, generator=g)  # random windows

A document's name is "stdlib/<path relative to the stdlib>" or "<given path's name>/<relative path>". Files are
joined with the end-of-text token between them. Run `python -m gdnspec.cli data --out runs/data` to build a folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
TEXT_SUFFIXES = (".py", ".pyi", ".txt", ".md", ".rst", ".toml", ".cfg", ".json", ".yaml", ".yml", ".c", ".h", ".sh")


@dataclass(frozen=True)
class Document:
    name: str  # stable relative name, e.g. "stdlib/json/decoder.py"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk_sorted(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(suffixes))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text if text.strip() else None


def collect_documents(*, include_stdlib: bool = True, extra_paths=(), suffixes: tuple[str, ...] = TEXT_SUFFIXES,
                      max_file_bytes: int = 1_000_000) -> list[Document]:
    """The stdlib's *.py files (test dirs and site-packages skipped) plus the given files/dirs, sorted by name."""
    docs: list[Document] = []
    if include_stdlib:
        root = stdlib_root()
        for p in _walk_sorted(root, (".py",)):
            if p.stat().st_size <= max_file_bytes and (t := _read(p)) is not None:
                docs.append(Document("stdlib/" + p.relative_to(root).as_posix(), t))
    for extra in extra_paths:
        extra = Path(extra)
        if not extra.exists():
            raise FileNotFoundError(f"extra_paths entry {str(extra)!r} does not exist")
        if extra.is_file():
            if (t := _read(extra)) is not None:
                docs.append(Document("user/" + extra.name, t))
            continue
        for p in _walk_sorted(extra, suffixes):
            if p.stat().st_size <= max_file_bytes and (t := _read(p)) is not None:
                docs.append(Document(f"user/{extra.resolve().name}/" + p.relative_to(extra).as_posix(), t))
    return sorted(docs, key=lambda d: d.name)


def is_heldout(name: str, heldout_fraction: float) -> bool:
    """Deterministic, machine-independent: the first 8 hex digits of sha1(name) against the fraction."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    h = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16)
    return h < heldout_fraction * 16**8


def split_documents(docs: list[Document], heldout_fraction: float = 0.05) -> tuple[list[Document], list[Document]]:
    """(train, held-out), split by file name hash; order kept."""
    train = [d for d in docs if not is_heldout(d.name, heldout_fraction)]
    held = [d for d in docs if is_heldout(d.name, heldout_fraction)]
    return train, held


def encode_documents(tokenizer, docs: list[Document], eos_id: int) -> np.ndarray:
    """Concatenate the token ids of each document followed by eos -> uint16 (N,)."""
    if tokenizer.get_vocab_size() > 65536:
        raise ValueError(f"vocab size {tokenizer.get_vocab_size()} does not fit uint16")
    parts = []
    for i in range(0, len(docs), 64):
        for enc in tokenizer.encode_batch([d.text for d in docs[i:i + 64]]):
            parts.append(np.asarray(enc.ids, dtype=np.uint16))
            parts.append(np.asarray([eos_id], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def build_dataset(out_dir, *, vocab_size: int = 8192, heldout_fraction: float = 0.05, include_stdlib: bool = True,
                  extra_paths=(), tokenizer_path=None, verbose: bool = True) -> Path:
    """Collect, split, train the tokenizer on the train split (or load `tokenizer_path`), encode; write out_dir."""
    from gdnspec.train.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer

    out = Path(out_dir)
    docs = collect_documents(include_stdlib=include_stdlib, extra_paths=extra_paths)
    if not docs:
        raise ValueError("no documents found: enable the stdlib or give extra paths with text files")
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    train, held = split_documents(docs, heldout_fraction)
    if verbose:
        print(f"[data] {len(docs)} files ({sum(len(d.text) for d in docs) / 1e6:.1f} MB): {len(train)} train, {len(held)} held-out")
    if tokenizer_path is None:
        tok = train_tokenizer((d.text for d in train), vocab_size=vocab_size)
    else:
        tok = load_tokenizer(tokenizer_path)
    tok.save(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS_TOKEN)
    arrays = {"train": encode_documents(tok, train, eos), "heldout": encode_documents(tok, held, eos)}
    for split, arr in arrays.items():
        np.save(out / f"{split}.npy", arr)
    meta = {"vocab_size": tok.get_vocab_size(), "eos_id": eos, "heldout_fraction": heldout_fraction,
            "train_files": [d.name for d in train], "heldout_files": [d.name for d in held],
            "train_tokens": int(arrays["train"].size), "heldout_tokens": int(arrays["heldout"].size),
            "train_bytes": sum(len(d.text.encode()) for d in train), "heldout_bytes": sum(len(d.text.encode()) for d in held)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if verbose:
        print(f"[data] vocab {meta['vocab_size']}, {meta['train_tokens']:,} train / {meta['heldout_tokens']:,} held-out tokens "
              f"-> {out}")
    return out


class TokenData:
    """The token streams of a dataset folder (see build_dataset)."""

    def __init__(self, folder, train: np.ndarray, heldout: np.ndarray, meta: dict):
        self.folder = Path(folder)
        self.train, self.heldout, self.meta = train, heldout, meta

    @classmethod
    def load(cls, folder) -> "TokenData":
        folder = Path(folder)
        for f in ("train.npy", "heldout.npy", "meta.json", "tokenizer.json"):
            if not (folder / f).exists():
                raise FileNotFoundError(f"{folder / f} is missing: build the folder with `gdnspec data --out {folder}`")
        return cls(folder, np.load(folder / "train.npy"), np.load(folder / "heldout.npy"),
                   json.loads((folder / "meta.json").read_text()))

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"

    def frequent_tokens(self, n: int) -> torch.Tensor:
        """The n most frequent token ids of the train split (ties: the smaller id first), as int64 (n,): the reduced
        draft vocabulary of an EAGLE head (`gdnspec distill --draft-vocab n`)."""
        V = self.vocab_size
        if not 1 <= n <= V:
            raise ValueError(f"n must be in [1, vocab_size={V}], got {n}")
        counts = torch.from_numpy(np.bincount(self.train.astype(np.int64), minlength=V)[:V])
        order = torch.argsort(-counts, stable=True)  # descending counts, ascending ids among equal counts
        return order[:n].clone()

    def sample_batch(self, batch_size: int, seq_len: int, *, generator: torch.Generator, split: str = "train"):
        """Random windows: input (B, seq_len) long and next-token targets (B, seq_len) long."""
        stream = self.train if split == "train" else self.heldout
        if stream.size < seq_len + 2:
            raise ValueError(f"the {split} stream has {stream.size} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        starts = torch.randint(0, stream.size - seq_len - 1, (batch_size,), generator=generator).numpy()
        win = np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64)  # (B, T+1)
        win = torch.from_numpy(win)
        return win[:, :-1], win[:, 1:]

    def heldout_batches(self, batch_size: int, seq_len: int, max_tokens: int | None = None):
        """Consecutive non-overlapping held-out windows (deterministic), as (input, target) long (b, seq_len)."""
        stream = self.heldout
        n = (stream.size - 1) // seq_len
        if max_tokens is not None:
            n = min(n, max(1, max_tokens // seq_len))
        starts = [i * seq_len for i in range(n)]
        for i in range(0, n, batch_size):
            win = np.stack([stream[s:s + seq_len + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
            win = torch.from_numpy(win)
            yield win[:, :-1], win[:, 1:]
