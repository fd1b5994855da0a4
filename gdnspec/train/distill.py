"""Distil drafters from a trained target: a small GDN draft LM (kind "model") or an EAGLE head (kind "eagle").

    python -m gdnspec.cli distill --kind model --target runs/target --data runs/data --out runs/draft
    python -m gdnspec.cli distill --kind eagle --target runs/target --data runs/data --out runs/eagle

model: draft = GDNForCausalLM (same tokenizer and vocab), loss = KL(target || draft) on corpus windows (target
       logits computed on the fly under no_grad) + ce_weight * CE(data).
eagle: EagleHead (gdnspec/models/eagle.py) on target features f computed under no_grad, unrolled over k steps
       (EAGLE-3 style training-time test): step 1 reads (f_t, e_{t+1}) and predicts f_{t+1}; step j > 1 reads its own
       step j-1 prediction in place of f. Loss per step: KL(target next-token dist || draft) + reg_weight *
       smooth-L1 between RMS-normalised predicted and true features; step j weighted step_decay^(j-1).
       Approximation: in step j > 1 every position of the window reads predicted features, so the GDN state also
       holds predicted features (at draft time it holds real ones for the accepted prefix).
Held-out metrics: KL to the target and top-1 agreement with the target's argmax (a proxy for greedy acceptance).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdnspec.models.eagle import EagleHead
from gdnspec.models.lm import GDNForCausalLM
from gdnspec.train.train import TrainConfig, autocast_context, lm_train_forward, resolve_device, train_lm


def kl_to_target(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(target) || softmax(draft)); both (..., V), computed in float32."""
    t = F.log_softmax(target_logits.float(), dim=-1)
    d = F.log_softmax(draft_logits.float(), dim=-1)
    return (t.exp() * (t - d)).sum(-1).mean()


@torch.no_grad()
def target_outputs(target: GDNForCausalLM, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), features (B, T, H) before the final norm) of the frozen target."""
    return lm_train_forward(target, x)


# ---------------------------------------------------------------------------------------------- model drafter
def model_draft_loss(target: GDNForCausalLM, ce_weight: float):
    def loss_fn(draft, x, y):
        t_logits, _ = target_outputs(target, x)
        d_logits, _ = lm_train_forward(draft, x)
        kl = kl_to_target(t_logits, d_logits)
        loss = kl
        if ce_weight > 0:
            loss = loss + ce_weight * F.cross_entropy(d_logits.float().reshape(-1, d_logits.shape[-1]), y.reshape(-1))
        return loss, {"kl": kl.detach()}
    return loss_fn


@torch.no_grad()
def eval_model_draft(target, draft, data, *, seq_len, batch_size, max_tokens, device, autocast="auto") -> dict:
    kl_sum, agree, ce_sum, n = 0.0, 0, 0.0, 0
    for x, y in data.heldout_batches(batch_size, seq_len, max_tokens):
        x, y = x.to(device), y.to(device)
        with autocast_context(device, autocast):
            t_logits, _ = target_outputs(target, x)
            d_logits, _ = lm_train_forward(draft, x)
        m = y.numel()
        kl_sum += kl_to_target(t_logits, d_logits).item() * m
        ce_sum += F.cross_entropy(d_logits.float().reshape(-1, d_logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        agree += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        n += m
    return {"heldout_kl": kl_sum / n, "heldout_ce": ce_sum / n, "top1_agreement": agree / n}


def distill_model(target: GDNForCausalLM, draft: GDNForCausalLM, data, tc: TrainConfig, *, out_dir=None,
                  tokenizer=None, device=None, ce_weight: float = 0.1) -> dict:
    device = resolve_device(device)
    target.to(device).eval().requires_grad_(False)

    def eval_fn(model):
        model.eval()
        r = eval_model_draft(target, model, data, seq_len=tc.seq_len, batch_size=tc.batch_size,
                             max_tokens=tc.eval_tokens, device=device, autocast=tc.autocast)
        model.train()
        return r["heldout_kl"], r

    return train_lm(draft, data, tc, out_dir=out_dir, device=device, name="distill-model",
                    loss_fn=model_draft_loss(target, ce_weight), tokenizer=tokenizer, eval_fn=eval_fn)


# ---------------------------------------------------------------------------------------------- EAGLE head
def eagle_unrolled(head: EagleHead, target: GDNForCausalLM, x: torch.Tensor, *, steps: int):
    """Run the unrolled head on a window x (B, T). Returns per step j=1..steps: (pred features (B, T-j, H),
    target features h[:, j:], target logits[:, j:]); pred[:, t] predicts f_{t+j} from the window up to x_{t+j}."""
    t_logits, h = target_outputs(target, x)  # (B, T, V), (B, T, H)
    with torch.no_grad():
        e = target.embed_tokens(x)  # (B, T, H)
    T = x.shape[1]
    if T <= steps:
        raise ValueError(f"window length {T} must exceed the unroll steps {steps}")
    outs, feat = [], h[:, :-1]
    for j in range(1, steps + 1):
        pred = head.forward_train(feat, e[:, j:])  # (B, T-j, H)
        outs.append((pred, h[:, j:], t_logits[:, j:]))
        feat = pred[:, :-1]
    return outs


def _rms_norm(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return v.float() / ref.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def eagle_loss(target: GDNForCausalLM, *, steps: int, reg_weight: float, step_decay: float):
    def loss_fn(head, x, y):
        total, logs = 0.0, []
        for j, (pred, feat, t_logits) in enumerate(eagle_unrolled(head, target, x, steps=steps)):
            d_logits = EagleHead.draft_logits(target, pred)
            kl = kl_to_target(t_logits, d_logits)
            reg = F.smooth_l1_loss(_rms_norm(pred, feat), _rms_norm(feat, feat))
            total = total + step_decay**j * (kl + reg_weight * reg)
            logs.append(kl.detach())
        return total, {"kl": logs}
    return loss_fn


@torch.no_grad()
def eval_eagle(head, target, data, *, steps, seq_len, batch_size, max_tokens, device, autocast="auto") -> dict:
    kl_sum, agree, n = [0.0] * steps, [0] * steps, [0] * steps
    for x, _ in data.heldout_batches(batch_size, seq_len, max_tokens):
        x = x.to(device)
        with autocast_context(device, autocast):
            outs = eagle_unrolled(head, target, x, steps=steps)
            for j, (pred, feat, t_logits) in enumerate(outs):
                d_logits = EagleHead.draft_logits(target, pred)
                m = t_logits.shape[0] * t_logits.shape[1]
                kl_sum[j] += kl_to_target(t_logits, d_logits).item() * m
                agree[j] += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
                n[j] += m
    return {"heldout_kl": [k / c for k, c in zip(kl_sum, n)], "top1_agreement": [a / c for a, c in zip(agree, n)]}


def distill_eagle(target: GDNForCausalLM, head: EagleHead, data, tc: TrainConfig, *, out_dir=None, tokenizer=None,
                  device=None, steps: int = 3, reg_weight: float = 0.2, step_decay: float = 0.8) -> dict:
    device = resolve_device(device)
    target.to(device).eval().requires_grad_(False)

    def eval_fn(model):
        model.eval()
        r = eval_eagle(model, target, data, steps=steps, seq_len=tc.seq_len, batch_size=tc.batch_size,
                       max_tokens=tc.eval_tokens, device=device, autocast=tc.autocast)
        model.train()
        return r["heldout_kl"][0], r

    return train_lm(head, data, tc, out_dir=out_dir, device=device, name="distill-eagle",
                    loss_fn=eagle_loss(target, steps=steps, reg_weight=reg_weight, step_decay=step_decay),
                    tokenizer=tokenizer, eval_fn=eval_fn)


__all__ = ["distill_eagle", "distill_model", "eagle_unrolled", "eval_eagle", "eval_model_draft", "kl_to_target"]
