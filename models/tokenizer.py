"""Text <-> token ids, and chat messages -> prompt text.

The tokenizer itself is the `tokenizers` library, loaded from the tokenizer.json that the converter
stored in the weights file; this module adds the model's special ids and its chat template (Jinja,
rendered in a sandbox, imported only when a chat is rendered).
"""

from __future__ import annotations

from core.errors import InvalidRequestError, UnsupportedTaskError

# Special tokens that end a turn in the families we convert; the file's eos id is always one.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")


class Tokenizer:
    def __init__(self, tokenizer_json: str, meta: dict):
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_str(tokenizer_json)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = meta.get("bos_token_id")
        self.eos_id = meta.get("eos_token_id")
        self.chat_template = meta.get("chat_template")
        ends = {self.eos_id} if self.eos_id is not None else set()
        for name in END_TOKENS:
            i = self._tok.token_to_id(name)
            if i is not None:
                ends.add(i)
        self.end_ids = frozenset(ends)
        self._template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a string, not {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages ([{"role": ..., "content": ...}]) with the model's template."""
        if not self.chat_template:
            raise UnsupportedTaskError("this model has no chat template; use a plain completion")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError("each message must be an object with string 'role' and 'content'")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message):
                raise InvalidRequestError(f"chat template: {message}")

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        tok = self._tok
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tok.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=tok.id_to_token(self.eos_id) if self.eos_id is not None else "",
        )
