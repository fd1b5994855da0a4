"""Incremental detokenization with stop strings: the text of a generation as its tokens arrive.

    out = TextOutput(tokenizer, prompt_ids, stop_strings=["\\n\\n"], stop_ids={0})
    for tok in tokens:
        if out.push(tok): break          # True once the generation is over (a stop string or a stop id)
    delta = out.take()                   # text safe to send now (what may still be the start of a stop string
                                         # or of a multi-byte character is held back)
    out.finish(); out.take()             # the rest

The text is decoded in windows (vLLM's prefix / read offsets, starting from the prompt's last tokens for context), so
that merges and leading spaces come out as in the full decode while each token costs a short decode. Stop ids end
the generation without appearing in the text; a stop string ends it and is cut off with what follows (as OpenAI).
The token that completed a stop string is the last one counted (`num_tokens`, `token_ids`).
"""
from __future__ import annotations

_CONTEXT = 5  # prompt tokens decoded before the first new token (leading-space handling of some decoders)


class TextOutput:
    def __init__(self, tokenizer, prompt_ids: list[int], *, stop_strings: list[str] = (), stop_ids=()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_ids = set(stop_ids)
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._prefix, self._read = 0, len(self._ids)
        self.text = ""  # decoded text of the generation so far (cut at a stop string)
        self.token_ids: list[int] = []  # the generated tokens counted (up to the one that ended the generation)
        self.finish_reason: str | None = None  # "stop" once a stop string / id ended it
        self._sent = 0
        self._over = False  # finish() was called or a stop ended the generation: nothing is held back
        self._holdback = max((len(s) for s in self.stop_strings), default=1) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool = False) -> None:
        full = self._decode(self._ids[self._prefix:])
        if not final and full.endswith("\ufffd"):  # a character whose remaining bytes come with the next token(s)
            return
        before = self._decode(self._ids[self._prefix:self._read])
        new = full[len(before):] if full.startswith(before) else full
        self._prefix, self._read = self._read, len(self._ids)
        if not new:
            return
        start = max(0, len(self.text) - self._holdback)
        self.text += new
        cut = min((i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def push(self, token: int) -> bool:
        """Count one generated token; True when the generation is over (this token is a stop id or completed a
        stop string). Tokens pushed after that are ignored."""
        if self.finish_reason is not None:
            return True
        self.token_ids.append(token)
        if token in self.stop_ids:
            self._advance(final=True)
            if self.finish_reason is None:
                self.finish_reason = "stop"
            return True
        self._ids.append(token)
        self._advance()
        return self.finish_reason is not None

    def finish(self) -> None:
        """The generation ended (budget or cancel): decode what was held back for a partial character."""
        if self.finish_reason is None:
            self._advance(final=True)
        self._over = True

    def take(self) -> str:
        """Text not sent yet that can be sent: everything once the generation is over, else all but the tail that may
        still grow into a stop string."""
        end = len(self.text)
        if not self._over and self.finish_reason is None and self._holdback:
            end = max(self._sent, end - self._holdback)
        out = self.text[self._sent:end]
        self._sent = end
        return out
