"""Plain autoregressive decoding: the baseline that every speculative speedup is measured against.

    out = generate_autoregressive(model, input_ids, max_new_tokens=32)                    # greedy
    out = generate_autoregressive(model, [p1, p2], 32, temperature=0.7, eos_token_id=2)   # prompts of any length

input_ids is a LongTensor (B, T) or a list of 1-D LongTensors; the result has the same form, each sequence being
its prompt followed by its new tokens, stopping after eos_token_id (a tensor result pads stopped rows with the
eos id). Finished sequences are dropped from the batch so they stop costing work.
"""
from __future__ import annotations

import torch

from gdnspec.sampling import check_sampling_args, sample_next


def normalize_prompts(input_ids, *, vocab_size: int | None = None) -> tuple[list[torch.Tensor], bool]:
    """-> (list of 1-D long prompts, whether the input was a (B, T) tensor). Raises on empty or malformed prompts."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a LongTensor (B, T) or a list of 1-D LongTensors, got shape {tuple(input_ids.shape)}")
        prompts, as_tensor = list(input_ids), True
    elif isinstance(input_ids, (list, tuple)):
        prompts, as_tensor = [torch.as_tensor(p) for p in input_ids], False
    else:
        raise TypeError(f"input_ids must be a LongTensor (B, T) or a list of 1-D LongTensors, got {type(input_ids).__name__}")
    if not prompts:
        raise ValueError("input_ids holds no sequence")
    for i, p in enumerate(prompts):
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prompt {i} must be a non-empty 1-D tensor of token ids, got shape {tuple(p.shape)}")
        if p.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"prompt {i} must hold integer token ids, got {p.dtype}")
        if vocab_size is not None and (int(p.min()) < 0 or int(p.max()) >= vocab_size):
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size})")
    return [p.long() for p in prompts], as_tensor


def pack_outputs(sequences: list[torch.Tensor], as_tensor: bool, pad_id: int | None):
    if not as_tensor:
        return sequences
    width = max(s.numel() for s in sequences)
    pad = 0 if pad_id is None else pad_id
    out = torch.full((len(sequences), width), pad, dtype=torch.long, device=sequences[0].device)
    for i, s in enumerate(sequences):
        out[i, : s.numel()] = s
    return out


def check_generation_args(max_new_tokens, eos_token_id) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if eos_token_id is not None and not isinstance(eos_token_id, int):
        raise ValueError(f"eos_token_id must be None or an int, got {eos_token_id!r}")


@torch.inference_mode()
def prefill(model, prompts: list[torch.Tensor]):
    """Run each prompt (different lengths allowed) and return (state for all rows, last logits (B, vocab))."""
    device = model.device
    lengths = {p.numel() for p in prompts}
    if len(lengths) == 1:
        ids = torch.stack(prompts).to(device)
        out = model(ids, logits_to_keep=1)
        return out.state, out.logits[:, -1], out.hidden_states[:, -1]
    state = model.new_state(len(prompts))
    logits, hidden = [], []
    for i, p in enumerate(prompts):
        out = model(p.to(device)[None], logits_to_keep=1)
        state.assign_rows_([i], out.state)
        logits.append(out.logits[0, -1])
        hidden.append(out.hidden_states[0, -1])
    return state, torch.stack(logits), torch.stack(hidden)


_DECODERS = None  # weakref.WeakKeyDictionary: model -> {(bucket, max_len): StaticDecoder}


def _static_decoder(model, batch_size: int, max_len: int):
    global _DECODERS
    import weakref

    from gdnspec.runtime import StaticDecoder

    if _DECODERS is None:
        _DECODERS = weakref.WeakKeyDictionary()
    per_model = _DECODERS.setdefault(model, {})
    key = (batch_size, max_len)
    if key not in per_model:
        per_model[key] = StaticDecoder(model, batch_size=batch_size, max_len=max_len)
    return per_model[key]


def _decode_static(model, prompts, new_tokens, max_new_tokens, eos_token_id, sample) -> None:
    """Plain decoding with a fixed-shape decode step (a CUDA graph on the GPU). All live rows emit one token per
    step, so the budget ends them together; eos (checked with one small sync per token, only when eos_token_id is
    set) moves the remaining rows into the smallest batch bucket that holds them."""
    from gdnspec.runtime import batch_bucket

    state, logits, _ = prefill(model, prompts)
    nxt = sample(logits)  # (n,) emitted, not yet consumed by the model
    active = list(range(len(prompts)))
    max_len = -(-(max(p.numel() for p in prompts) + max_new_tokens + 1) // 256) * 256
    produced = 1  # tokens emitted so far by every live row (nxt included)
    pending = [nxt]  # emitted tokens not yet written to new_tokens, each (n,)

    def finished_now(tok: torch.Tensor) -> bool:
        return produced >= max_new_tokens or (eos_token_id is not None and bool((tok == eos_token_id).any()))

    while True:
        n = len(active)
        dec = _static_decoder(model, batch_bucket(n), max_len)
        dec.load(state)
        while not finished_now(nxt):
            logits = dec.step(torch.nn.functional.pad(nxt, (0, dec.batch_size - n)))[:n]
            nxt = sample(logits)
            pending.append(nxt)
            produced += 1
        keep = []
        for r, (seq, row) in enumerate(zip(active, torch.stack(pending, 1).tolist())):
            new_tokens[seq].extend(row)
            if produced < max_new_tokens and not (eos_token_id is not None and row[-1] == eos_token_id):
                keep.append(r)
        if not keep:
            return
        state, nxt, active = dec.state.select(keep), nxt[keep], [active[r] for r in keep]
        pending = []


@torch.inference_mode()
def generate_autoregressive(model, input_ids, max_new_tokens: int, temperature: float = 0.0,
                            eos_token_id: int | None = None, top_k: int | None = None, top_p: float | None = None,
                            generator: torch.Generator | None = None, static: bool | None = None):
    """Plain decoding, one target forward per new token. See the module docstring.

    static=None: on CUDA the decode step is a fixed-shape step replayed from a CUDA graph (gdnspec.runtime).
    """
    check_generation_args(max_new_tokens, eos_token_id)
    check_sampling_args(temperature, top_k, top_p)
    prompts, as_tensor = normalize_prompts(input_ids, vocab_size=model.vocab_size)
    device = model.device
    new_tokens: list[list[int]] = [[] for _ in prompts]
    static = model.device.type == "cuda" if static is None else static
    if static and max_new_tokens > 0:
        def sample(lg):
            return sample_next(lg, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

        _decode_static(model, prompts, new_tokens, max_new_tokens, eos_token_id, sample)
    elif max_new_tokens > 0:
        state, logits, _ = prefill(model, prompts)
        active = list(range(len(prompts)))  # sequence index of each state row
        while active:
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            keep = []
            for row, seq in enumerate(active):
                tok = int(nxt[row])
                new_tokens[seq].append(tok)
                if not (len(new_tokens[seq]) >= max_new_tokens or (eos_token_id is not None and tok == eos_token_id)):
                    keep.append(row)
            if not keep:
                break
            if len(keep) != len(active):
                state = state.select(keep)
                nxt = nxt[keep]
                active = [active[r] for r in keep]
            logits = model(nxt[:, None].to(device), state, logits_to_keep=1).logits[:, -1]
    sequences = [torch.cat([p.to(device), torch.tensor(t, dtype=torch.long, device=device)]) for p, t in zip(prompts, new_tokens)]
    return pack_outputs(sequences, as_tensor, eos_token_id)
