"""Checkpoint folders: config.json + model.safetensors (+ tokenizer.json, + training.json).

    save_checkpoint(model, "ckpt", tokenizer=tok, extra={"heldout_loss": 2.1}, dtype=torch.float16)
    model, tok = load_checkpoint("ckpt", dtype=torch.float32, device="cpu")   # tok is None without tokenizer.json

config.json holds the GDNConfig fields; its "model_type" picks the class: "gdnspec" -> GDNForCausalLM,
"gdnspec_eagle" -> EagleHead (which holds no embedding / lm_head: it reuses the target's). Tied lm_head weights
are stored once (as embed_tokens.weight). `extra` goes to training.json (read it back with `load_extra`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gdnspec.models.config import GDNConfig

MODEL_TYPES = ("gdnspec", "gdnspec_eagle")
WEIGHTS_NAME = "model.safetensors"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"  # target/, draft/, eagle/


def default_checkpoint_dir(name: str = "target") -> Path:
    """Folder of a shipped checkpoint: "target", "draft" (small GDN LM) or "eagle" (EAGLE head of the target)."""
    if name not in ("target", "draft", "eagle"):
        raise ValueError(f"name must be 'target', 'draft' or 'eagle', got {name!r}")
    return DEFAULT_DIR / name


def _model_class(model_type: str):
    if model_type == "gdnspec":
        from gdnspec.models.lm import GDNForCausalLM
        return GDNForCausalLM
    if model_type == "gdnspec_eagle":
        from gdnspec.models.eagle import EagleHead
        return EagleHead
    raise ValueError(f"config.json model_type must be one of {MODEL_TYPES}, got {model_type!r}")


def save_checkpoint(model: torch.nn.Module, folder, tokenizer=None, extra: dict | None = None, *,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` (GDNForCausalLM or EagleHead) to `folder`; dtype (e.g. torch.float16) casts float tensors."""
    config = getattr(model, "config", None)
    if not isinstance(config, GDNConfig):
        raise TypeError(f"model must have a GDNConfig .config, got {type(config).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" in sd:
        sd.pop("lm_head.weight")
    tensors = {}
    for name, t in sd.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.to("cpu").contiguous().clone()
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "model_type": config.model_type})
    tmp.chmod(0o644)
    tmp.replace(folder / WEIGHTS_NAME)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            (folder / "tokenizer.json").write_text(Path(tokenizer).read_text())
        else:
            tokenizer.save(str(folder / "tokenizer.json"))
    if extra is not None:
        (folder / "training.json").write_text(json.dumps(extra, indent=2))
    return folder


def load_config(folder) -> GDNConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a checkpoint folder")
    return GDNConfig.load(path)


def load_extra(folder) -> dict:
    path = Path(folder) / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_checkpoint(folder, dtype: torch.dtype | None = None, device=None):
    """-> (model in eval mode, tokenizers.Tokenizer or None). dtype None keeps float32."""
    folder = Path(folder)
    config = load_config(folder)
    cls = _model_class(config.model_type)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist")
    model = cls(config, device=device)
    sd = load_file(str(weights))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"{weights} does not match the config: missing {sorted(set(missing) - allowed_missing)}, "
                         f"unexpected {sorted(unexpected)}")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    tok = None
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return model, tok
