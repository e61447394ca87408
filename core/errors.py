"""Errors raised by core and models.  Each carries the HTTP status and a machine-readable code, so
the worker's one error helper can turn any of them into a client-facing error body."""


class EdgeError(Exception):
    status = 500
    code = "internal_error"


class WeightsFormatError(EdgeError):
    """A weights file is missing, truncated, damaged or of an unknown version."""
    status = 500
    code = "weights_format_error"


class ConversionError(EdgeError):
    """A checkpoint cannot be converted (unsupported architecture, tensor, or tokenizer)."""
    status = 400
    code = "conversion_error"


class InvalidRequestError(EdgeError):
    """A request's arguments are out of range or of the wrong kind."""
    status = 400
    code = "invalid_request_error"


class ContextOverflowError(InvalidRequestError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""
    code = "context_length_exceeded"


class UnsupportedTaskError(InvalidRequestError):
    """The model cannot do what was asked (generation from an encoder, embeddings from a head-less model...)."""
    code = "unsupported_task"


class ModelNotFoundError(EdgeError):
    status = 404
    code = "model_not_found"
