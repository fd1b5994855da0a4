"""`gdnspec.load()`: a target model with its tokenizer and ready-made drafters.

    bundle = gdnspec.load()                      # the embedded default (gdnspec/assets/default, trained on Python code)
    bundle = gdnspec.load("path/to/folder")      # a gdnspec checkpoint folder, or a Hugging Face / fla folder
    worker = GDNSpeculativeWorker(target_model=bundle.model, drafter=bundle.drafters["eagle"])

A gdnspec folder is a target checkpoint (config.json with model_type "gdnspec", model.safetensors, tokenizer.json)
with optional sibling/child drafter folders "draft" and "eagle" (the layout of the embedded default: target/,
draft/, eagle/ side by side). Hugging Face folders (qwen3_next, qwen3_5*, fla gated_deltanet) load through
gdnspec.models.hf and get an "mtp" drafter when the checkpoint has MTP weights. Every bundle has "ngram".

A folder's generation_config.json (Hugging Face format) gives `bundle.eos_token_id` (an id or a list of stop ids)
and the sampling defaults of `bundle.sampling_args()`:

    out = generate_autoregressive(bundle.model, ids, 64, eos_token_id=bundle.eos_token_id, **bundle.sampling_args())
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdnspec.generate import stop_ids
from gdnspec.sampling import check_sampling_args
from gdnspec.spec.drafters import EagleDrafter, ModelDrafter, NGramDrafter


@dataclass
class Bundle:
    """A loaded model: `model`, `tokenizer` (tokenizers.Tokenizer or None), `drafters` by name, `path` (the target
    folder) and `generation_config` (the folder's generation_config.json as a dict, {} without one)."""

    model: torch.nn.Module
    tokenizer: object | None
    drafters: dict = field(default_factory=dict)
    path: Path | None = None
    generation_config: dict = field(default_factory=dict)

    @property
    def eos_token_id(self) -> int | list[int] | None:
        """Stop id(s) for generation: generation_config.json's eos_token_id (an int or a list; every entry point
        accepts both), else config.json's, else the tokenizer's <|endoftext|>, </s> or <|im_end|> (first found)."""
        ids = self._checkpoint_eos()
        if ids is not None:
            return ids
        if self.tokenizer is None:
            return None
        for name in ("<|endoftext|>", "</s>", "<|im_end|>"):
            tid = self.tokenizer.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def _checkpoint_eos(self) -> int | list[int] | None:
        eos = self.generation_config.get("eos_token_id")
        if eos is None and self.path is not None:
            from gdnspec.models.hf import hf_generation_info

            eos = hf_generation_info(self.path).get("eos_token_id")
        if eos is None or eos == []:
            return None
        ids = stop_ids(eos, name=f"eos_token_id of {self.path}")
        return list(ids) if isinstance(eos, list) else ids[0]

    def sampling_args(self, *, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None) -> dict:
        """{temperature, top_k, top_p} for the entry points: each one the caller gives, else generation_config.json's.

        As transformers: without `do_sample: true` the default is greedy (temperature 0); with it, fields the file
        leaves out take transformers' defaults (temperature 1.0, top_k 50, top_p 1.0 = off)."""
        gc = self.generation_config
        sampling = gc.get("do_sample") is True
        defaults = {"temperature": float(gc.get("temperature") or 1.0), "top_k": gc.get("top_k", 50),
                    "top_p": gc.get("top_p", 1.0)} if sampling else {"temperature": 0.0, "top_k": None, "top_p": None}
        if defaults["top_k"] in (0, None):
            defaults["top_k"] = None
        if defaults["top_p"] is not None and defaults["top_p"] >= 1.0:
            defaults["top_p"] = None
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        out = {k: defaults[k] if v is None else v for k, v in given.items()}
        check_sampling_args(out["temperature"], out["top_k"], out["top_p"])
        return out


def read_generation_config(folder: Path) -> dict:
    """folder/generation_config.json as a dict ({} when absent); a malformed file raises naming its path."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if data.get("eos_token_id") is not None:
        stop_ids(data["eos_token_id"], name=f"eos_token_id in {path}")
    return data


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
        return Bundle(model, tok, drafters, target_dir, read_generation_config(target_dir))
    from gdnspec.models.hf import load_hf

    model, tok, mtp = load_hf(target_dir, dtype=dtype, device=device)
    drafters = {"ngram": NGramDrafter()}
    if mtp is not None:
        from gdnspec.spec.drafters.mtp import MTPDrafter

        drafters["mtp"] = MTPDrafter(model, mtp)
    return Bundle(model, tok, drafters, target_dir, read_generation_config(target_dir))
