"""Request bodies of the OpenAI-compatible API, checked field by field before anything runs.

Each parse_* returns plain values or raises HTTPError(400) naming the offending parameter.
Extensions beyond OpenAI's fields (as vLLM and llama.cpp accept them): top_k, repetition_penalty,
ignore_eos.
"""

from __future__ import annotations

import json

from edge.errors import HTTPError

_NUMBER = (int, float)


def invalid(param: str, message: str) -> HTTPError:
    return HTTPError(400, "invalid_value", message, param=param)


def load_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise HTTPError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "invalid_json", "the request body must be a JSON object")
    return body


def field(body: dict, name: str, types, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise HTTPError(400, "missing_parameter", f"'{name}' is required", param=name)
        return default
    v = body[name]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise HTTPError(400, "invalid_type", f"'{name}' has the wrong type", param=name)
    if not isinstance(v, types):
        raise HTTPError(400, "invalid_type", f"'{name}' has the wrong type", param=name)
    return v


def sampling(body: dict, default_max_tokens: int | None) -> dict:
    """Keyword arguments for models.api.SamplingParams (its own checks cover the ranges)."""
    max_tokens = field(body, "max_completion_tokens", int, field(body, "max_tokens", int, default_max_tokens))
    if max_tokens is not None and max_tokens < 1:
        raise invalid("max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
    if field(body, "n", int, 1) != 1:
        raise invalid("n", "only n=1 is supported")
    if field(body, "logprobs", (bool, int), False) or field(body, "echo", bool, False) \
            or field(body, "best_of", int, 1) != 1:
        raise HTTPError(400, "unsupported_parameter", "logprobs, echo and best_of are not supported")
    stop = field(body, "stop", (str, list), [])
    if isinstance(stop, list) and (len(stop) > 16 or not all(isinstance(s, str) for s in stop)):
        raise invalid("stop", "stop must be a string or a list of at most 16 strings")
    kw = dict(
        max_tokens=max_tokens,
        temperature=field(body, "temperature", _NUMBER, 1.0),
        top_p=field(body, "top_p", _NUMBER, 1.0),
        top_k=field(body, "top_k", int, 0),
        repetition_penalty=field(body, "repetition_penalty", _NUMBER, 1.0),
        frequency_penalty=field(body, "frequency_penalty", _NUMBER, 0.0),
        presence_penalty=field(body, "presence_penalty", _NUMBER, 0.0),
        seed=field(body, "seed", int),
        stop=stop,
        ignore_eos=field(body, "ignore_eos", bool, False),
        priority=field(body, "priority", int, 0),
    )
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2 <= kw[name] <= 2:
            raise invalid(name, f"{name} must be between -2 and 2")
    if not 0 <= kw["temperature"] <= 2:
        raise invalid("temperature", "temperature must be between 0 and 2")
    return kw


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = field(body, "stream", bool, False)
    opts = field(body, "stream_options", dict, {})
    return stream, bool(opts.get("include_usage")) if stream else False


def prompt(body: dict):
    """A completion prompt: a string, a list of token ids, or a one-element list of either."""
    p = field(body, "prompt", (str, list), required=True)
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise invalid("prompt", "the prompt is empty")
        return p
    if not p:
        raise invalid("prompt", "the prompt is empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        raise invalid("prompt", "prompt must be a string, a list of token ids, or a one-element list of either")
    return p


def messages(body: dict) -> list[dict]:
    """Chat messages with string content (text parts of a content list are joined)."""
    msgs = field(body, "messages", list, required=True)
    if not msgs:
        raise invalid("messages", "messages is empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid("messages", f"message {i} must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid("messages", f"message {i}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise invalid("messages", f"message {i} has non-text content")
        out.append({"role": m["role"], "content": content})
    return out


def embedding_input(body: dict):
    """A list of strings or a list of token-id lists."""
    x = field(body, "input", (str, list), required=True)
    if isinstance(x, str):
        x = [x]
    if not x:
        raise invalid("input", "input is empty")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        x = [x]
    if all(isinstance(s, str) for s in x):
        if not all(x):
            raise invalid("input", "input contains an empty string")
        return x
    if all(isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in x):
        return x
    raise invalid("input", "input must be a string, a list of strings, or token ids")
