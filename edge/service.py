"""What the HTTP handlers and the RPC server share, so both fronts check requests and run them the
same way: the model a request names, the generation and embedding jobs for the engine thread, the
generated ids a chunk counts for, and the fields of tokenize/detokenize requests."""

from __future__ import annotations

from core.errors import ModelNotFoundError, UnsupportedTaskError
from edge import schemas
from edge.errors import HTTPError
from edge.keys import ModelState
from edge.settings import Settings


def require_ready(state: ModelState) -> None:
    if not state.ready:
        raise HTTPError(503, "model_loading", "models are still loading; retry shortly")


def get_model(state: ModelState, body: dict, task: str | None = None, required: bool = True):
    """(name, model) for the body's 'model'.  Where it is optional, the first loaded model able to
    do the task is used."""
    require_ready(state)
    name = schemas.field(body, "model", str, required=required)
    if name is None:
        name = next((n for n, m in state.models.items() if task is None or m.task == task
                     or (task == "embed" and m.task == "classify")), None)
        if name is None:
            raise ModelNotFoundError(f"no loaded model can do '{task}'")
    canon = state.aliases.get(name.lower(), name)
    model = state.models.get(canon)
    if model is None:
        raise ModelNotFoundError(f"the model '{name}' does not exist; list the models with GET /v1/models "
                                 "or the RPC method 'models'")
    if task == "generate" and model.task != "generate":
        raise UnsupportedTaskError(f"'{name}' is an encoder: it makes embeddings, not text")
    if task == "embed" and model.task == "generate":
        raise UnsupportedTaskError(f"'{name}' is a decoder: use an embedding model")
    return canon, model


def generation_job(settings: Settings, model, prompt=None, messages=None, kw=None):
    """A generator for the engine thread: first the prompt's token count (so that errors in the
    request surface before any response starts), then StreamChunks."""
    from models.api import SamplingParams

    def job():
        ids = model.chat_prompt(messages) if messages is not None else model.prompt_ids(prompt)
        args = dict(kw)
        if args["max_tokens"] is None:
            args["max_tokens"] = max(1, min(settings.max_new_tokens, model.context - len(ids)))
        params = SamplingParams(**args)
        model.check_fits(ids, params.max_tokens)
        yield len(ids)
        yield from model.generate_stream(ids, params=params, batched=True)   # the engine batches the passes
    return job


def check_capacity(settings: Settings, engine) -> None:
    """The bounded queue: refuse a new inference job (429, retry after 1 s) when settings.max_queue
    jobs are already waiting or running."""
    if engine.depth >= settings.max_queue:
        from edge.errors import ServerBusyError
        raise ServerBusyError(f"the server is busy ({engine.depth} requests in progress, at most "
                              f"{settings.max_queue}); retry after {ServerBusyError.retry_after} s")


def generated_ids(model, chunk) -> list:
    """The ids a StreamChunk adds to the completion: the end token that closes a generation is not
    part of it (as in DecoderModel.generate)."""
    ids = chunk.token_ids
    if chunk.finish_reason == "stop" and ids and ids[-1] in model.tokenizer.end_ids:
        return ids[:-1]
    return ids


def check_dimensions(body: dict, model) -> None:
    dims = schemas.field(body, "dimensions", int)
    if dims is not None and dims != model.config.dim:
        raise schemas.invalid("dimensions", f"this model's embeddings have {model.config.dim} dimensions")


def embedding_job(model, inputs: list):
    """A function for the engine thread: (vectors, prompt tokens) of texts or token-id lists."""
    def work():
        ids = [model.tokenize(t) if isinstance(t, str) else t for t in inputs]
        return model.embed_ids(ids), sum(min(len(i), model.config.max_tokens) for i in ids)
    return work


def tokenize_fields(body: dict) -> tuple[str, bool]:
    """(text, add_special_tokens) of a tokenize request; the text is 'content' or 'prompt'."""
    text = schemas.field(body, "content", str, schemas.field(body, "prompt", str))
    if text is None:
        raise HTTPError(400, "missing_parameter", "'content' is required", param="content")
    return text, schemas.field(body, "add_special_tokens", bool, True)


def detokenize_fields(body: dict) -> list:
    """The token ids of a detokenize request."""
    tokens = schemas.field(body, "tokens", list, required=True)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise schemas.invalid("tokens", "tokens must be a list of integers")
    return tokens
