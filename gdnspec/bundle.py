"""`gdnspec.load()`: a target model with its tokenizer and ready-made drafters.

    bundle = gdnspec.load()                      # the embedded default (gdnspec/assets/default, trained on Python code)
    bundle = gdnspec.load("path/to/folder")      # a gdnspec checkpoint folder, or a Hugging Face / fla folder
    worker = GDNSpeculativeWorker(target_model=bundle.model, drafter=bundle.drafters["eagle"])

A gdnspec folder is a target checkpoint (config.json with model_type "gdnspec", model.safetensors, tokenizer.json)
with optional sibling/child drafter folders "draft" and "eagle" (the layout of the embedded default: target/,
draft/, eagle/ side by side). Hugging Face folders (qwen3_next, qwen3_5*, fla gated_deltanet) load through
gdnspec.models.hf and get an "mtp" drafter when the checkpoint has MTP weights. Every bundle has "ngram".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdnspec.spec.drafters import EagleDrafter, ModelDrafter, NGramDrafter


@dataclass
class Bundle:
    model: torch.nn.Module
    tokenizer: object | None
    drafters: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def eos_token_id(self) -> int | None:
        if self.tokenizer is None:
            return None
        for name in ("<|endoftext|>", "</s>", "<|im_end|>"):
            tid = self.tokenizer.token_to_id(name)
            if tid is not None:
                return tid
        return None


def _gdnspec_folders(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(target, draft or None, eagle or None) for a gdnspec checkpoint layout."""
    target = path / "target" if (path / "target" / "config.json").exists() else path
    found = {}
    for name in ("draft", "eagle"):
        for cand in (target.parent / name, target / name):
            if (cand / "config.json").exists() and cand != target:
                found[name] = cand
                break
    return target, found.get("draft"), found.get("eagle")


def _model_type(folder: Path) -> str | None:
    cfg = folder / "config.json"
    return json.loads(cfg.read_text()).get("model_type") if cfg.exists() else None


def load(path: str | Path | None = None, *, dtype: torch.dtype | None = None, device=None) -> Bundle:
    """Load a bundle (see the module docstring). dtype None: float32 for gdnspec folders, the checkpoint's own for HF."""
    from gdnspec.models.checkpoint import DEFAULT_DIR, load_checkpoint

    folder = Path(path) if path is not None else DEFAULT_DIR
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    target_dir, draft_dir, eagle_dir = _gdnspec_folders(folder)
    mt = _model_type(target_dir)
    if mt is None:
        raise FileNotFoundError(f"{target_dir} has no config.json: not a model folder")
    if mt == "gdnspec":
        model, tok = load_checkpoint(target_dir, dtype=dtype, device=device)
        drafters = {"ngram": NGramDrafter()}
        if draft_dir is not None:
            drafters["model"] = ModelDrafter(load_checkpoint(draft_dir, dtype=dtype, device=device)[0])
        if eagle_dir is not None:
            drafters["eagle"] = EagleDrafter(load_checkpoint(eagle_dir, dtype=dtype, device=device)[0], model)
        return Bundle(model, tok, drafters, target_dir)
    from gdnspec.models.hf import load_hf

    model, tok, mtp = load_hf(target_dir, dtype=dtype, device=device)
    drafters = {"ngram": NGramDrafter()}
    if mtp is not None:
        from gdnspec.spec.drafters.mtp import MTPDrafter

        drafters["mtp"] = MTPDrafter(model, mtp)
    return Bundle(model, tok, drafters, target_dir)
