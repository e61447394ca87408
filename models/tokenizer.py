"""Text <-> token ids, and chat messages -> prompt text.

Byte-level BPE models (SmolLM2, Qwen2, Llama 3) use models.bpe over the flat tables the converter
stored in the weights file: nothing to parse, shared by every process mapping the file.  Others
(BERT's WordPiece) use the `tokenizers` library on the stored tokenizer.json.  This module adds the
model's special ids and its chat template (Jinja, rendered in a sandbox, imported only when a chat
is rendered).
"""

from __future__ import annotations

from core.errors import InvalidRequestError, UnsupportedTaskError

# Special tokens that end a turn in the families we convert; the file's eos id is always one.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")


class Tokenizer:
    def __init__(self, tokenizer_json: str | None, meta: dict, bpe=None):
        self._bpe = bpe
        if bpe is None:
            from tokenizers import Tokenizer as _Tokenizer

            self._tok = _Tokenizer.from_str(tokenizer_json)
            self._tok.no_padding()
            self._tok.no_truncation()
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        else:
            self.vocab_size = bpe.vocab_size
        self.bos_id = meta.get("bos_token_id")
        self.eos_id = meta.get("eos_token_id")
        self.chat_template = meta.get("chat_template")
        ends = {self.eos_id} if self.eos_id is not None else set()
        for name in END_TOKENS:
            i = self.token_to_id(name)
            if i is not None:
                ends.add(i)
        self.end_ids = frozenset(ends)
        self._template = None

    @classmethod
    def from_weights(cls, wf) -> "Tokenizer":
        """The tokenizer stored in an open weights file: the fast tables when present."""
        if "tokenizer_bpe" in wf.meta and "tokenizer.bpe.merges" in wf:
            from models.bpe import ByteLevelBPE, Unsupported
            try:
                return cls(None, wf.meta, bpe=ByteLevelBPE(wf, wf.meta["tokenizer_bpe"]))
            except Unsupported:
                pass
        return cls(wf.raw("tokenizer.json").decode("utf-8"), wf.meta)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a string, not {type(text).__name__}")
        if self._bpe is not None:     # (byte-level BPE files have no post-processor: nothing to add)
            return self._bpe.encode(text)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if self._bpe is not None:
            return [self.encode(t, add_special_tokens) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
        if self._bpe is not None:
            return self._bpe.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self) -> "TextStream":
        """An incremental decoder for ids that arrive one at a time (see TextStream)."""
        return TextStream(self)

    def token_to_id(self, token: str):
        if self._bpe is not None:
            return self._bpe.token_to_id(token)
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        if self._bpe is not None:
            return self._bpe.token_bytes(i).decode("utf-8", "replace")
        return self._tok.id_to_token(i)

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
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.id_to_token(self.eos_id) if self.eos_id is not None else "",
        )


class TextStream:
    """The text of a growing list of token ids at a constant cost per token.  Decoding all the ids
    again for every new one costs O(n) per token, O(n^2) over a long generation.  Instead each new
    token is decoded together with the tokens of the previous step (its context: a WordPiece
    continuation or a Metaspace space decodes differently at the start of a text), and the text
    they add beyond that context is appended.  While the new text ends inside a UTF-8 sequence
    (a character split over tokens) it is held back and the window grows until it completes.

        stream = tokenizer.stream()
        if stream.push(tok): ... stream.text ...     # True when the text is complete
        stream.final()                               # all of it, a held tail included
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0          # ids[_prefix:_read]: the context of the next decode
        self._read = 0            # ids[:_read] are in self.text

    def _added(self) -> str:
        decode = self._tokenizer.decode
        return decode(self.ids[self._prefix:])[len(decode(self.ids[self._prefix:self._read])):]

    def push(self, token: int) -> bool:
        """Add a token; False while the text ends inside a character (the tail is held back)."""
        self.ids.append(token)
        added = self._added()
        if added.endswith("\ufffd"):
            return False
        self.text += added
        self._prefix, self._read = self._read, len(self.ids)
        return True

    def final(self) -> str:
        """All the text, with a held incomplete tail as the decoder renders it (U+FFFD)."""
        return self.text + self._added() if self._read < len(self.ids) else self.text
