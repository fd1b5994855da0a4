"""Plain autoregressive decoding: the baseline that every speculative speedup is measured against.

    out = generate_autoregressive(model, input_ids, max_new_tokens=32)                    # greedy
    out = generate_autoregressive(model, [p1, p2], 32, temperature=0.7, eos_token_id=2)   # prompts of any length

input_ids is a LongTensor (B, T) or a list of 1-D LongTensors; the result has the same form, each sequence being
its prompt followed by its new tokens, stopping after eos_token_id: one id or a list of stop ids (as in a Hugging Face
generation_config.json), a sequence ends at the first of them it emits (a tensor result pads stopped rows with the
first stop id). Finished sequences are dropped from the batch so they stop costing work.
"""
from __future__ import annotations

import os
import weakref

import torch

from gdnspec.concurrency import static_lock
from gdnspec.sampling import (RowSampling, base_seed, check_generator, check_sampling_args, check_seed, row_seeds,
                              sample_next, stream_uniforms)


_MODEL_API = ("vocab_size", "device", "new_state", "forward_tree", "commit_tree")


def check_model(model, name: str = "model") -> None:
    """Raise TypeError naming `name` unless `model` is a gdnspec causal LM (GDNForCausalLM or the like: vocab_size,
    device, new_state, forward_tree, commit_tree)."""
    if not isinstance(model, torch.nn.Module) or not all(hasattr(model, a) for a in _MODEL_API):
        raise TypeError(f"{name} must be a gdnspec language model (a GDNForCausalLM, e.g. gdnspec.load(...).model), "
                        f"got {type(model).__name__}")


def _as_prompt(p, i: int) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        return p
    if p is None or isinstance(p, (str, bytes, dict)):
        raise ValueError(f"prompt {i} must be a 1-D tensor or list of token ids, got {type(p).__name__}")
    try:
        return torch.as_tensor(p)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"prompt {i} must be a 1-D tensor or list of token ids, got {p!r:.80} ({e})") from None


def normalize_prompts(input_ids, *, vocab_size: int | None = None) -> tuple[list[torch.Tensor], bool]:
    """-> (list of 1-D long prompts, whether the input was a (B, T) tensor). Raises on empty or malformed prompts."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a LongTensor (B, T) or a list of 1-D LongTensors, got shape {tuple(input_ids.shape)}")
        prompts, as_tensor = list(input_ids), True
    elif isinstance(input_ids, (list, tuple)):
        prompts, as_tensor = [_as_prompt(p, i) for i, p in enumerate(input_ids)], False
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def stop_ids(eos_token_id, *, name: str = "eos_token_id") -> tuple[int, ...]:
    """None -> (), an int -> (id,), a list / tuple of ints -> those ids (generation stops at the first of them)."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, torch.Tensor) and eos_token_id.dim() <= 1 and not eos_token_id.is_floating_point():
        eos_token_id = eos_token_id.tolist()
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be None, a token id (int >= 0) or a list of token ids, got {eos_token_id!r}")
    return tuple(dict.fromkeys(ids))


def check_generation_args(max_new_tokens, eos_token_id) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    stop_ids(eos_token_id)


PREFILL_GRAPH_MAX_LEN = 4096  # longer prompts: eager (their kernels are long enough to hide the launches)
PREFILL_GRAPHS_PER_MODEL = 8
# model -> {(batch, seq_len): StaticPrefill}, most recent last; used under static_lock(model) only
_PREFILLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graph_prefill(model, ids: torch.Tensor):
    """On CUDA, prefill equal-length prompts ids (B, T), 2 <= T <= PREFILL_GRAPH_MAX_LEN, from a CUDA graph captured
    once per (B, T) (runtime.StaticPrefill; the few most recent shapes are kept per model). Returns (state, last
    logits (B, vocab), hidden states (B, T, hidden)), or None where it does not apply (CPU, other lengths, or
    GDNSPEC_PREFILL_GRAPH=0). The first call of a shape pays the capture (about three eager prefills)."""
    B, T = ids.shape
    if model.device.type != "cuda" or not 2 <= T <= PREFILL_GRAPH_MAX_LEN or os.environ.get("GDNSPEC_PREFILL_GRAPH") == "0":
        return None
    if torch.is_grad_enabled() and model.embed_tokens.weight.requires_grad:
        return None
    from gdnspec.runtime import StaticPrefill

    with static_lock(model):
        per_model = _PREFILLS.setdefault(model, {})
        pre = per_model.pop((B, T), None)
        if pre is not None and not pre.current():  # weights replaced or dtype changed since the capture
            pre = None
        if pre is None:
            if len(per_model) >= PREFILL_GRAPHS_PER_MODEL:
                per_model.pop(next(iter(per_model)))  # the least recently used shape
            pre = StaticPrefill(model, batch_size=B, seq_len=T)
        per_model[(B, T)] = pre
        return pre.run(ids)


@torch.inference_mode()
def prefill(model, prompts: list[torch.Tensor]):
    """Run each prompt (different lengths allowed) and return (state for all rows, last logits (B, vocab), last
    hidden (B, hidden)). Equal lengths run as one batch (from a CUDA graph on CUDA: `graph_prefill`)."""
    device = model.device
    lengths = {p.numel() for p in prompts}
    if len(lengths) == 1:
        ids = torch.stack(prompts).to(device)
        graphed = graph_prefill(model, ids)
        if graphed is not None:
            state, logits, hidden = graphed
            return state, logits, hidden[:, -1]
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


def check_finite(logits: torch.Tensor, *, where: str = "the prompt's") -> None:
    """Raise when logits hold NaN or inf (a broken checkpoint: decoding would silently emit token 0 forever).
    One reduction and one host sync; the entry points call it once per generation, on the prefill logits."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"the target model produced non-finite logits (NaN or inf) for {where} last token: "
                                 "its weights hold NaN / inf values or overflow in this dtype")


# model -> {(bucket, max_len): StaticDecoder}; used under static_lock(model) only
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _static_decoder(model, batch_size: int, max_len: int, *, sampling: bool = False, filtered: bool = False):
    """The cached StaticDecoder of `model` for (batch bucket, max_len) (and, sampling, whether it filters by top-k /
    top-p); the caller holds static_lock(model)."""
    from gdnspec.runtime import StaticDecoder

    per_model = _DECODERS.setdefault(model, {})
    key = (batch_size, max_len) if not sampling else (batch_size, max_len, filtered)
    if key not in per_model or not per_model[key].current():  # rebuilt when the weights changed since
        per_model.pop(key, None)
        per_model[key] = StaticDecoder(model, batch_size=batch_size, max_len=max_len, sampling=sampling,
                                       filtered=filtered)
    return per_model[key]


def _decode_static(model, prompts, new_tokens, max_new_tokens, stops: tuple[int, ...], sampling: dict | None) -> None:
    """Plain decoding with a fixed-shape decode step (a CUDA graph on the GPU). All live rows emit one token per
    step, so the budget ends them together; a stop id (checked with one small sync per token, only when there are
    stop ids) moves the remaining rows into the smallest batch bucket that holds them.

    sampling None: greedy. Else dict(temperature, top_k, top_p, generator): the tokens are sampled inside the step
    (no host sync), sequence i from its own counter-based stream seeded by row_seeds(one draw of the generator, [i])."""
    from gdnspec.runtime import batch_bucket

    state, logits, _ = prefill(model, prompts)
    check_finite(logits)
    stop_t = torch.tensor(stops, dtype=torch.long, device=logits.device)
    if sampling is None:
        nxt = logits.argmax(-1)  # (n,) emitted, not yet consumed by the model
    else:
        settings = {k: sampling[k] for k in ("temperature", "top_k", "top_p")}
        filtered = settings["top_k"] is not None or settings["top_p"] is not None
        seeds = row_seeds(base_seed(None, sampling["generator"]), range(len(prompts))).to(logits.device)
        counters = torch.zeros_like(seeds)
        first = RowSampling.constant(len(prompts), logits.device, **settings, uniforms=stream_uniforms(seeds, counters))
        nxt = first.sample(logits)  # the stream's counter 0; the decode steps continue from 1
        counters += 1
    active = list(range(len(prompts)))
    max_len = -(-(max(p.numel() for p in prompts) + max_new_tokens + 1) // 256) * 256
    produced = 1  # tokens emitted so far by every live row (nxt included)
    pending = [nxt]  # emitted tokens not yet written to new_tokens, each (n,)

    def finished_now(tok: torch.Tensor) -> bool:
        return produced >= max_new_tokens or (bool(stops) and bool(torch.isin(tok, stop_t).any()))

    while True:
        n = len(active)
        dec = _static_decoder(model, batch_bucket(n), max_len, sampling=sampling is not None,
                              filtered=sampling is not None and filtered)
        dec.load(state)
        if sampling is not None:
            dec.set_sampling(**settings, seeds=seeds, counters=counters)
        while not finished_now(nxt):
            ids = torch.nn.functional.pad(nxt, (0, dec.batch_size - n))
            if sampling is None:
                nxt = dec.step(ids)[:n].argmax(-1)
            else:
                nxt = dec.sample_step(ids)[:n].clone()  # a static buffer
            pending.append(nxt)
            produced += 1
        keep = []
        for r, (seq, row) in enumerate(zip(active, torch.stack(pending, 1).tolist())):
            new_tokens[seq].extend(row)
            if produced < max_new_tokens and row[-1] not in stops:
                keep.append(r)
        if not keep:
            return
        state, nxt, active = dec.state.select(keep), nxt[keep], [active[r] for r in keep]
        if sampling is not None:
            seeds, counters = seeds[keep], dec.counters[:n][keep]
        pending = []


@torch.inference_mode()
def generate_autoregressive(model, input_ids, max_new_tokens: int, temperature: float = 0.0,
                            eos_token_id: int | list[int] | None = None, top_k: int | None = None,
                            top_p: float | None = None, generator: torch.Generator | None = None,
                            static: bool | None = None, *, seed: int | None = None):
    """Plain decoding, one target forward per new token. See the module docstring.

    static=None: on CUDA the decode step is a fixed-shape step replayed from a CUDA graph (gdnspec.runtime); when
    sampling, the tokens are drawn inside the step, sequence i from its own counter-based stream seeded by one
    draw of the generator and i (so its tokens do not depend on the other sequences of the batch).
    seed: an int seeding a fresh generator (instead of `generator`): the same seed gives the same tokens.
    Safe to call from several threads on one model (static decoding of one model runs one call at a time).
    """
    check_model(model)
    check_generation_args(max_new_tokens, eos_token_id)
    stops = stop_ids(eos_token_id)
    check_sampling_args(temperature, top_k, top_p)
    check_generator(generator)
    check_seed(seed, generator=generator)
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    prompts, as_tensor = normalize_prompts(input_ids, vocab_size=model.vocab_size)
    device = model.device
    new_tokens: list[list[int]] = [[] for _ in prompts]
    static = model.device.type == "cuda" if static is None else static
    if static and max_new_tokens > 0:
        sampling = None if temperature == 0 else dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                      generator=generator)
        with static_lock(model):  # the cached static decoders are shared by every caller of this model
            _decode_static(model, prompts, new_tokens, max_new_tokens, stops, sampling)
    elif max_new_tokens > 0:
        state, logits, _ = prefill(model, prompts)
        check_finite(logits)
        active = list(range(len(prompts)))  # sequence index of each state row
        while active:
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            keep = []
            for row, seq in enumerate(active):
                tok = int(nxt[row])
                new_tokens[seq].append(tok)
                if not (len(new_tokens[seq]) >= max_new_tokens or tok in stops):
                    keep.append(row)
            if not keep:
                break
            if len(keep) != len(active):
                state = state.select(keep)
                nxt = nxt[keep]
                active = [active[r] for r in keep]
            logits = model(nxt[:, None].to(device), state, logits_to_keep=1).logits[:, -1]
    sequences = [torch.cat([p.to(device), torch.tensor(t, dtype=torch.long, device=device)]) for p, t in zip(prompts, new_tokens)]
    return pack_outputs(sequences, as_tensor, stops[0] if stops else None)
