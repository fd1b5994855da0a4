"""Chat templates: messages -> prompt text, rendered with jinja2 in a sandbox, as transformers renders them.

A Hugging Face folder brings its own template (tokenizer_config.json's "chat_template", a string or a list of named
templates, or a chat_template.jinja file next to it); its end-of-turn token (tokenizer_config.json's eos_token, e.g.
<|im_end|>) is a stop id of every chat request. A model without a template (the embedded default, gdnspec folders)
gets PLAIN_TEMPLATE, whose end of turn is the model's end-of-text token:

    ### System:
    You are a helpful assistant.

    ### User:
    Write a function that adds two numbers.

    ### Assistant:
    <the answer><|endoftext|>        (earlier assistant turns end with the end-of-text token; the last prompt ends
                                      with "### Assistant:\n" and the model's answer stops at <|endoftext|>)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "### {{ {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant', "
    "'tool': 'Tool'}[m['role']] }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template failed on these messages (its raise_exception, or a jinja2 error)."""


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class ChatTemplate:
    source: str
    origin: str  # where it came from (for messages and the startup line)
    special: dict = field(default_factory=dict)  # bos_token / eos_token / ... for the template
    end_of_turn: str | None = None  # the token text that ends an assistant turn

    @staticmethod
    def for_model(folder: Path | None, tokenizer) -> "ChatTemplate":
        """The folder's own template (see the module docstring), else PLAIN_TEMPLATE."""
        config, source, origin = {}, None, None
        if folder is not None:
            cfg_path = Path(folder) / "tokenizer_config.json"
            if cfg_path.is_file():
                try:
                    config = json.loads(cfg_path.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
                if not isinstance(config, dict):
                    raise ValueError(f"{cfg_path} must hold a JSON object")
                tpl = config.get("chat_template")
                if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                    named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
                    tpl = named.get("default") or next(iter(named.values()), None)
                if isinstance(tpl, str) and tpl.strip():
                    source, origin = tpl, str(cfg_path)
            jinja = Path(folder) / "chat_template.jinja"
            if source is None and jinja.is_file():
                source, origin = jinja.read_text(), str(jinja)
        special = {k: _token_text(v) for k, v in config.items() if k.endswith("_token") and _token_text(v) is not None}
        if source is not None:
            return ChatTemplate(source, origin, special, special.get("eos_token"))
        eos = "<|endoftext|>" if tokenizer is not None and tokenizer.token_to_id("<|endoftext|>") is not None else ""
        special.setdefault("eos_token", eos)
        return ChatTemplate(PLAIN_TEMPLATE, "the plain template (### System / ### User / ### Assistant)", special,
                            special["eos_token"] or None)

    def _compiled(self):
        if getattr(self, "_template", None) is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ChatTemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.source)
        return self._template

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """messages: [{"role": ..., "content": str}] -> the prompt text. ChatTemplateError when the template fails."""
        import jinja2

        try:
            return self._compiled().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           tools=None, documents=None, **self.special)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, ValueError, IndexError) as e:
            raise ChatTemplateError(f"the chat template ({self.origin}) failed on these messages: {e}") from None
