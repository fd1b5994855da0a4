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
from gdnspec.models.hf import CheckpointError, check_shapes

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
    raise CheckpointError(f"config.json model_type must be one of {MODEL_TYPES}, got {model_type!r}")


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


def read_config_json(path) -> dict:
    """A config.json as a dict; raises CheckpointError naming the path when it is unreadable, not JSON, or not an
    object (empty, a list, null)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})" if text.strip() else f"{path} is empty") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object of config fields, got {type(data).__name__}: "
                              f"{text[:60]!r}")
    return data


def load_config(folder) -> GDNConfig:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a checkpoint folder")
    try:
        return GDNConfig.from_dict(read_config_json(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {e}") from None


def load_extra(folder) -> dict:
    path = Path(folder) / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated / corrupted file raises CheckpointError naming it."""
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError, ValueError...)
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from None


def check_float_weights(sd: dict[str, torch.Tensor], model: torch.nn.Module, where) -> None:
    """Raise CheckpointError naming the tensors that are stored as int / bool where the model holds float weights."""
    own = model.state_dict()
    bad = [f"{k} ({v.dtype})" for k, v in sd.items()
           if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"{where}: tensors stored with a non-float dtype where float weights belong: {bad}")


def load_tokenizer(path, *, vocab_size: int | None = None):
    """tokenizers.Tokenizer from a tokenizer.json; raises CheckpointError naming the file when it cannot be parsed or
    holds more tokens than the model's vocab_size (their ids would be out of range)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and n > vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size} "
                              f"(token ids >= {vocab_size} would be out of range)")
    return tok


def load_checkpoint(folder, dtype: torch.dtype | None = None, device=None):
    """-> (model in eval mode, tokenizers.Tokenizer or None). dtype None keeps float32."""
    folder = Path(folder)
    config = load_config(folder)
    cls = _model_class(config.model_type)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist")
    sd = read_safetensors(weights)
    model = cls(config, device=device)
    check_float_weights(sd, model, weights)
    check_shapes(sd, model.state_dict(), weights)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise CheckpointError(f"{weights} does not match the config: missing {sorted(set(missing) - allowed_missing)}, "
                              f"unexpected {sorted(unexpected)}")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    tok = None
    if (folder / "tokenizer.json").exists():
        tok = load_tokenizer(folder / "tokenizer.json", vocab_size=getattr(config, "vocab_size", None))
    return model, tok
