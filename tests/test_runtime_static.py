"""Static (CUDA-graph) decode and speculative steps, run eagerly on the CPU: padding rows of a batch bucket must stay
harmless however long a cached runner is reused."""
from __future__ import annotations

import torch

from gdnspec.runtime import StaticDecoder

from spec_helpers import tiny_model


def test_padding_rows_of_a_reused_decoder_stay_in_range():
    model = tiny_model(seed=2, hybrid=True, dtype=torch.float32)
    dec = StaticDecoder(model, batch_size=2, max_len=16)
    prompt = torch.randint(0, model.vocab_size, (1, 3))
    state = model(prompt).state
    for _ in range(3):  # one live row, reused many times: the padding row's cache length keeps growing
        dec.load(state)
        ids = torch.zeros(2, dtype=torch.long)
        for _ in range(100):
            logits = dec.step(ids)
            ids = logits.argmax(-1)
        assert torch.isfinite(logits).all()
    live = model(prompt).state
    ref = model(torch.cat([prompt, torch.zeros(1, 1, dtype=torch.long)], 1)).logits[:, -1]
    dec.load(live)
    got = dec.step(torch.zeros(2, dtype=torch.long))[:1]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # the live row is unaffected by the padding row
