"""Checkpoint -> edge weights file.

    load (gguf.py / safetensors.py) -> rename to our tensor names -> validate -> quantize -> write

A loader returns a Checkpoint: our config, metadata (tokenizer ids, chat template), the tokenizer
as tokenizer.json text, and a mapping of our tensor names to fp32 numpy arrays (loaded lazily, one
at a time, so memory stays near one tensor plus the output).

Quantization (--quant int8, the default): every linear layer's weight becomes int8 with one fp16
scale per group of 32 values along each row (NAME.weight i8 + NAME.scale f16, like llama.cpp's
Q8_0); a decoder's token embedding is quantized the same way (it doubles as the logits head when
tied); the int8 rows are stored in the interleaved layout the kernels read (see
docs/weights-format.md).  Chosen by measurement on SmolLM2-135M (botchan.txt, 1024 tokens): one scale per row cost
+0.87% perplexity from the weights alone, groups of 32 +0.19%.  Norms, biases, position
embeddings and an encoder's token embedding stay fp32.  Activations are quantized at run time
(one scale per 32 values), see core.kernels.  --quant f32 keeps everything fp32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from core.errors import ConversionError
from core.kernels.reference import pack_q8_rows, quantize_weights_q8
from core.wfile import write_weights
from models import CONVERTER_REVISION

REVISION = CONVERTER_REVISION     # see models/__init__.py

QUANT_SCHEMES = {
    "int8": {"weights": "int8, fp16 scale per 32-value group", "activations": "int8, fp32 scale per 32-value group",
             "group": 32},
    "f32": {"weights": "f32", "activations": "f32"},
}

LINEAR_SUFFIXES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class Checkpoint:
    arch: str                                 # llama | gpt2 | bert
    config: dict                              # our config keys, see models/<arch>.py
    meta: dict                                # bos/eos ids, chat_template, source, ...
    tokenizer_json: str
    tensors: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)  # name -> loader (fp32)


def is_quantized_linear(arch: str, name: str) -> bool:
    if not name.endswith(".weight"):
        return False
    stem = name[: -len(".weight")]
    if stem.split(".")[-1] in LINEAR_SUFFIXES or stem == "output":
        return True
    return stem == "token_embd" and arch in ("llama", "gpt2")


def required_tensors(arch: str, config: dict) -> list[str]:
    """The tensors a model of this architecture needs; checked before anything is written."""
    L = range(config["n_layers"])
    if arch == "llama":
        names = ["token_embd.weight", "output_norm.weight"]
        if not config["tied_embeddings"]:
            names.append("output.weight")
        for l in L:
            names += [f"blk.{l}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                        "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
            if config["attn_bias"]:
                names += [f"blk.{l}.attn_{n}.bias" for n in "qkv"]
        return names
    if arch == "gpt2":
        names = ["token_embd.weight", "pos_embd.weight", "output_norm.weight", "output_norm.bias"]
        for l in L:
            names += [f"blk.{l}.{n}.{p}" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                     "ffn_norm", "ffn_up", "ffn_down") for p in ("weight", "bias")]
        return names
    if arch == "bert":
        names = ["token_embd.weight", "pos_embd.weight", "type_embd.weight", "embd_norm.weight", "embd_norm.bias"]
        for l in L:
            names += [f"blk.{l}.{n}.{p}" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm",
                                                     "ffn_up", "ffn_down", "ffn_norm") for p in ("weight", "bias")]
        return names
    raise ConversionError(f"unsupported architecture {arch!r}")


def load_checkpoint(src: str) -> Checkpoint:
    if os.path.isdir(src):
        from models.convert.safetensors import load_hf_folder
        return load_hf_folder(src)
    if os.path.isfile(src):
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from models.convert.gguf import load_gguf
            return load_gguf(src)
        raise ConversionError(f"{src}: not a GGUF file (no GGUF magic); give a .gguf file or a Hugging Face folder")
    raise ConversionError(f"{src}: no such file or folder")


def convert(src: str, out: str, quant: str = "int8", progress: bool = True) -> dict:
    """Convert a Hugging Face folder or GGUF file into an edge weights file.  Returns a summary."""
    if quant not in QUANT_SCHEMES:
        raise ConversionError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_SCHEMES)}")
    ckpt = load_checkpoint(src)
    missing = [n for n in required_tensors(ckpt.arch, ckpt.config) if n not in ckpt.tensors]
    if missing:
        raise ConversionError(f"{src}: checkpoint lacks {len(missing)} tensors the {ckpt.arch} model needs, "
                              f"e.g. {missing[0]}")
    names = sorted(ckpt.tensors)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc=f"converting {os.path.basename(os.path.normpath(src))}", unit="tensor")
    tensors: list[tuple[str, np.ndarray]] = []
    n_params = 0
    for name in names:
        a = np.ascontiguousarray(ckpt.tensors[name](), dtype=np.float32)
        if not np.isfinite(a).all():
            raise ConversionError(f"{src}: tensor {name} holds NaN or infinite values")
        n_params += a.size
        if quant == "int8" and is_quantized_linear(ckpt.arch, name):
            try:
                q, scale = quantize_weights_q8(a)
            except ValueError as e:
                raise ConversionError(f"{src}: tensor {name}: {e}") from None
            tensors += [(name, pack_q8_rows(q)), (name[: -len(".weight")] + ".scale", scale)]
        else:
            tensors.append((name, a))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    extra_meta = {}
    try:    # byte-level BPE: flat tables that load in milliseconds (models/bpe.py)
        from models.bpe import Unsupported, build_tables
        bpe_tensors, extra_meta["tokenizer_bpe"] = build_tables(json.loads(ckpt.tokenizer_json))
        tensors += list(bpe_tensors.items())
    except Unsupported:
        pass
    tok = np.frombuffer(ckpt.tokenizer_json.encode(), dtype=np.uint8)
    tensors.append(("tokenizer.json", tok))
    meta = dict(ckpt.meta, arch=ckpt.arch, config=ckpt.config, quant=dict(QUANT_SCHEMES[quant], name=quant),
                n_params=n_params, converter_revision=REVISION, **extra_meta)
    size = write_weights(out, meta, tensors)
    return {"arch": ckpt.arch, "quant": quant, "n_params": n_params, "bytes": size, "path": out}
