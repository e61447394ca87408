"""edge: a serverless edge inference worker for small language models.

    import edge
    model = edge.load_model("model.edge")          # or edge.from_pretrained("smollm2-135m-instruct")
    model.generate("Once upon a time", max_tokens=32).text
    model.predict("Once upon a time")              # a model's natural task
    model.encode_text("Once upon a time")          # token ids

Attributes are imported on first use, so `import edge` stays cheap.
"""

__all__ = ["load_model", "from_pretrained", "fetch_default_models"]


def __getattr__(name):
    if name == "load_model":
        from models.api import load_model
        return load_model
    if name in ("from_pretrained", "fetch_default_models"):
        from edge import registry
        return getattr(registry, name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
