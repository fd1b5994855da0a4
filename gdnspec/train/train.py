"""Train a GDN / hybrid target LM (GDNForCausalLM) on a token dataset folder (see data.py).

    python -m gdnspec.cli train --data runs/data --preset default-target --out runs/target --time-budget 240

Autograd path: `lm_train_forward` runs the model without inference state (the chunk op with autograd; fla is
never used when gradients are needed), bf16 autocast on CUDA. AdamW, linear warmup then cosine decay over
max(step / steps, elapsed / time_budget), grad-norm clipping, periodic held-out eval (the best checkpoint is kept
in --out) and a log line with loss, lr and tokens/s.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gdnspec.models.config import GDNConfig
from gdnspec.models.lm import GDNForCausalLM

PRESETS: dict[str, dict] = {
    # unit tests and CPU smoke runs
    "tiny": dict(hidden_size=64, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                 intermediate_size=128, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                 linear_value_head_dim=16, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                 tie_word_embeddings=True),
    # the shipped target: 8 layers, 3:1 GDN:attention (layers 4 and 8 attend), hidden 384, ~16.6M params
    "default-target": dict(hidden_size=384, num_hidden_layers=8, full_attention_interval=4, intermediate_size=1024,
                           linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=64,
                           linear_value_head_dim=64, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                           partial_rotary_factor=0.25, tie_word_embeddings=True),
    # the shipped small draft LM: 2 GDN layers, hidden 256, ~3.4M params (2.1M of them the tied embedding)
    "default-draft": dict(hidden_size=256, num_hidden_layers=2, full_attention_interval=0, intermediate_size=512,
                          linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                          linear_value_head_dim=64, tie_word_embeddings=True),
    # a tiny draft for tests
    "tiny-draft": dict(hidden_size=32, num_hidden_layers=1, full_attention_interval=0, intermediate_size=64,
                       linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       tie_word_embeddings=True),
}


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "," in v:
        return [x for x in v.split(",") if x]
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def make_config(preset: str, vocab_size: int, overrides: list[str] | dict | None = None) -> GDNConfig:
    """GDNConfig from a preset name, the tokenizer's vocab size and overrides ("key=value" strings or a dict)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    d = dict(PRESETS[preset], vocab_size=vocab_size)
    if isinstance(overrides, dict):
        d.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"config overrides must look like key=value, got {item!r}")
            k, v = item.split("=", 1)
            d[k.strip()] = _parse_value(v.strip())
    if "num_hidden_layers" in d and d.get("layer_types") is not None and len(d["layer_types"]) != d["num_hidden_layers"]:
        d["layer_types"] = None  # re-derive from full_attention_interval when the depth was overridden
    return GDNConfig.from_dict(d)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------- stateless forward
def lm_train_forward(model: GDNForCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, vocab), hidden (B, T, hidden) before the final norm), from an empty state, autograd-capable."""
    B, T = input_ids.shape
    h = model.embed_tokens(input_ids)
    layout = None
    if any(layer.layer_type == "full_attention" for layer in model.layers):
        from gdnspec.layers.layout import TokenLayout
        layout = TokenLayout.chain(B, T, device=input_ids.device)
    for layer in model.layers:
        h = layer.forward_train(h, layout)
    return model.lm_head(model.norm(h)), h


# ---------------------------------------------------------------------------------------------- loop helpers
@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    time_budget: float = 0.0  # seconds; > 0 ends training (schedule included) after that long
    eval_every: int = 0  # steps; 0 = only at the end
    eval_tokens: int = 200_000
    log_every: int = 10
    seed: int = 0
    save_dtype: str = "float16"
    autocast: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "none"
    extra: dict = field(default_factory=dict)


def autocast_context(device: torch.device, mode: str):
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if mode not in ("auto", "bf16"):
        raise ValueError(f"autocast must be 'auto', 'bf16' or 'none', got {mode!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (dim >= 2) only, not on norms, gates and biases."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    kw = dict(fused=True) if params and params[0].is_cuda else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def lr_at(step: int, progress: float, tc: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class Progress:
    """Step/time progress, the stop test and a one-line log."""

    def __init__(self, tc: TrainConfig, name: str):
        self.tc, self.name = tc, name
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.last_t, self.last_tokens = self.t0, 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fraction(self, step: int) -> float:
        f = step / max(self.tc.steps, 1)
        if self.tc.time_budget > 0:
            f = max(f, self.elapsed / self.tc.time_budget)
        return f

    def log(self, step: int, loss: float, lr: float, extra: str = "") -> None:
        now = time.perf_counter()
        tps = (self.tokens - self.last_tokens) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_tokens = now, self.tokens
        frac = min(self.fraction(step), 1.0)
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        print(f"[{self.name}] [{bar}] step {step} loss {loss:.4f} {extra}lr {lr:.2e} {tps / 1e3:.1f}k tok/s "
              f"{self.elapsed:.0f}s", flush=True)
        sys.stdout.flush()


@torch.no_grad()
def heldout_loss(model: GDNForCausalLM, data, *, seq_len: int, batch_size: int, max_tokens: int, device,
                 autocast: str = "auto") -> float:
    """Mean next-token cross-entropy (nats) over consecutive held-out windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.heldout_batches(batch_size, seq_len, max_tokens):
        x, y = x.to(device), y.to(device)
        with autocast_context(torch.device(device), autocast):
            logits, _ = lm_train_forward(model, x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _fmt_logs(logs: dict) -> str:
    parts = []
    for k, v in logs.items():
        if isinstance(v, (list, tuple)):
            parts.append(f"{k} [" + ",".join(f"{float(t):.3f}" for t in v) + "]")
        else:
            parts.append(f"{k} {float(v):.4f}")
    return "".join(p + " " for p in parts)


def train_lm(model: torch.nn.Module, data, tc: TrainConfig, *, out_dir=None, device=None, name: str = "train",
             loss_fn=None, tokenizer=None, eval_fn=None) -> dict:
    """Train `model` in place on random windows of data.train; returns a summary dict (losses, timings, tokens).

    loss_fn(model, x, y) -> (loss, logs: dict of scalar tensors or lists of them, printed on log steps) replaces
    the next-token CE (distillation uses this). eval_fn(model) -> (metric, info dict), lower is better, replaces
    the held-out CE. With out_dir, the checkpoint with the best held-out metric (checked every eval_every steps
    and at the end) is saved there.
    """
    from gdnspec.models.checkpoint import save_checkpoint

    device = resolve_device(device)
    model.to(device).train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(tc.seed)
    opt = make_optimizer(model, tc.lr, tc.weight_decay)
    prog = Progress(tc, name)
    save_dtype = getattr(torch, tc.save_dtype)
    history, best = [], {"heldout_loss": float("inf"), "step": -1}

    def default_loss(m, x, y):
        logits, _ = lm_train_forward(m, x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)), {}

    def default_eval(m):
        hl = heldout_loss(m, data, seq_len=tc.seq_len, batch_size=tc.batch_size, max_tokens=tc.eval_tokens,
                          device=device, autocast=tc.autocast)
        return hl, {"heldout_loss": hl, "heldout_ppl": math.exp(min(hl, 50))}

    loss_fn = loss_fn or default_loss
    eval_fn = eval_fn or default_eval

    def evaluate_and_save(step):
        t0 = time.perf_counter()
        metric, info = eval_fn(model)
        history.append({"step": step, "metric": metric, **info, "elapsed_s": round(prog.elapsed, 1)})
        print(f"[{name}] step {step} held-out {info} ({time.perf_counter() - t0:.1f}s)", flush=True)
        if metric < best["heldout_loss"]:
            best.update(heldout_loss=metric, step=step, info=info)
            if out_dir is not None:
                extra = dict(tc.extra, step=step, heldout=info, tokens_seen=prog.tokens, history=history,
                             params=count_params(model),
                             train_config={k: v for k, v in tc.__dict__.items() if k != "extra"})
                save_checkpoint(model, out_dir, tokenizer=tokenizer, extra=extra, dtype=save_dtype)
        return metric

    step, loss_val = 0, float("nan")
    while prog.fraction(step) < 1.0:
        lr = lr_at(step, prog.fraction(step), tc)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.sample_batch(tc.batch_size, tc.seq_len, generator=gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, tc.autocast):
            loss, extra_log = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
        opt.step()
        step += 1
        prog.tokens += x.numel()
        if step % tc.log_every == 0 or step == 1:
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"[{name}] loss became {loss_val} at step {step}")
            gn = f"gnorm {float(gnorm):.2f} " if gnorm is not None else ""
            prog.log(step, loss_val, lr, _fmt_logs(extra_log) + gn)
        if tc.eval_every and step % tc.eval_every == 0:
            evaluate_and_save(step)
    loss_val = loss.item() if step else float("nan")
    final = history[-1]["metric"] if history and history[-1]["step"] == step else evaluate_and_save(step)
    return {"steps": step, "tokens": prog.tokens, "train_seconds": round(prog.elapsed, 1), "final_train_loss": loss_val,
            "final_heldout": final, "best_heldout": best["heldout_loss"], "best_step": best["step"],
            "best_info": best.get("info", {}),
            "params": count_params(model), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
