"""Load a Hugging Face folder (config.json, *.safetensors, tokenizer.json) into a Checkpoint.

Supported model_type values: llama, qwen2 (Llama with QKV biases), gpt2, bert.  Tensor names are
mapped to ours by the tables below; GPT-2's Conv1D weights are stored (in, out) and are
transposed, and its fused c_attn is split into q, k and v.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from core.errors import ConversionError
from models.convert import Checkpoint

LLAMA_NAMES = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": r"blk.\1.attn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)": r"blk.\1.attn_q.\2",
    r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)": r"blk.\1.attn_k.\2",
    r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)": r"blk.\1.attn_v.\2",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": r"blk.\1.attn_output.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": r"blk.\1.ffn_norm.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight": r"blk.\1.ffn_gate.weight",
    r"model\.layers\.(\d+)\.mlp\.up_proj\.weight": r"blk.\1.ffn_up.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": r"blk.\1.ffn_down.weight",
}
GPT2_NAMES = {  # after stripping "transformer."; Conv1D weights transposed (T)
    r"wte\.weight": "token_embd.weight",
    r"wpe\.weight": "pos_embd.weight",
    r"ln_f\.(weight|bias)": r"output_norm.\1",
    r"h\.(\d+)\.ln_1\.(weight|bias)": r"blk.\1.attn_norm.\2",
    r"h\.(\d+)\.attn\.c_attn\.(weight|bias)": r"blk.\1.attn_qkv.\2",       # split below
    r"h\.(\d+)\.attn\.c_proj\.(weight|bias)": r"blk.\1.attn_output.\2",
    r"h\.(\d+)\.ln_2\.(weight|bias)": r"blk.\1.ffn_norm.\2",
    r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)": r"blk.\1.ffn_up.\2",
    r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)": r"blk.\1.ffn_down.\2",
}
GPT2_IGNORED = (r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight")
BERT_NAMES = {  # after stripping "bert."
    r"embeddings\.word_embeddings\.weight": "token_embd.weight",
    r"embeddings\.position_embeddings\.weight": "pos_embd.weight",
    r"embeddings\.token_type_embeddings\.weight": "type_embd.weight",
    r"embeddings\.LayerNorm\.(weight|bias)": r"embd_norm.\1",
    r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)": r"blk.\1.attn_q.\2",
    r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)": r"blk.\1.attn_k.\2",
    r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)": r"blk.\1.attn_v.\2",
    r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)": r"blk.\1.attn_output.\2",
    r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)": r"blk.\1.attn_norm.\2",
    r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)": r"blk.\1.ffn_up.\2",
    r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)": r"blk.\1.ffn_down.\2",
    r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)": r"blk.\1.ffn_norm.\2",
    r"pooler\.dense\.(weight|bias)": r"pooler.\1",
    r"classifier\.(weight|bias)": r"classifier.\1",
}
BERT_IGNORED = (r"embeddings\.position_ids",)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read ({e})") from None


def _rename(table: dict, ignored: tuple, name: str) -> str | None:
    for pat, repl in table.items():
        if re.fullmatch(pat, name):
            return re.sub(pat, repl, name)
    if any(re.fullmatch(p, name) for p in ignored):
        return None
    raise ConversionError(f"tensor {name!r} has no counterpart in our model; refusing to drop it silently")


def _config(model_type: str, hf: dict) -> tuple[str, dict]:
    try:
        if model_type in ("llama", "qwen2", "mistral"):
            n_heads = hf["num_attention_heads"]
            head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
            if (hf.get("rope_scaling") or {}).get("rope_type", "default") not in ("default",):
                raise ConversionError(f"rope_scaling {hf['rope_scaling']} is not supported yet")
            rope = hf.get("rope_parameters") or {}
            return "llama", {
                "dim": hf["hidden_size"], "hidden_dim": hf["intermediate_size"],
                "n_layers": hf["num_hidden_layers"], "n_heads": n_heads,
                "n_kv_heads": hf.get("num_key_value_heads") or n_heads, "head_dim": head_dim,
                "vocab_size": hf["vocab_size"], "seq_len": hf.get("max_position_embeddings", 2048),
                "norm_eps": hf.get("rms_norm_eps", 1e-6),
                "rope_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                "rope_dim": head_dim, "rope_style": "neox",
                "attn_bias": bool(hf.get("attention_bias", model_type == "qwen2")),
                "tied_embeddings": bool(hf.get("tie_word_embeddings", False)),
            }
        if model_type == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ConversionError(f"GPT-2 activation {act!r} is not supported (gelu_new)")
            return "gpt2", {
                "dim": hf["n_embd"], "hidden_dim": hf.get("n_inner") or 4 * hf["n_embd"],
                "n_layers": hf["n_layer"], "n_heads": hf["n_head"], "vocab_size": hf["vocab_size"],
                "seq_len": hf["n_positions"], "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            }
        if model_type == "bert":
            if hf.get("hidden_act", "gelu") != "gelu":
                raise ConversionError(f"BERT activation {hf['hidden_act']!r} is not supported (gelu)")
            if hf.get("position_embedding_type", "absolute") != "absolute":
                raise ConversionError("only absolute position embeddings are supported for BERT")
            return "bert", {
                "dim": hf["hidden_size"], "hidden_dim": hf["intermediate_size"],
                "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
                "vocab_size": hf["vocab_size"], "seq_len": hf["max_position_embeddings"],
                "type_vocab_size": hf.get("type_vocab_size", 2), "norm_eps": hf.get("layer_norm_eps", 1e-12),
            }
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    raise ConversionError(f"model_type {model_type!r} is not supported (llama, qwen2, gpt2, bert)")


def load_hf_folder(folder: str) -> Checkpoint:
    hf = _read_json(os.path.join(folder, "config.json"))
    if not hf:
        raise ConversionError(f"{folder}: no config.json; not a Hugging Face model folder")
    arch, config = _config(hf.get("model_type", ""), hf)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ConversionError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise ConversionError(f"{folder}: no tokenizer.json")
    with open(tok_path, encoding="utf-8") as f:
        tokenizer_json = f.read()
    tok_cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    gen_cfg = _read_json(os.path.join(folder, "generation_config.json"))

    from safetensors import safe_open

    tensors: dict = {}
    table, ignored, prefix = {"llama": (LLAMA_NAMES, (), ""), "gpt2": (GPT2_NAMES, GPT2_IGNORED, "transformer."),
                              "bert": (BERT_NAMES, BERT_IGNORED, "bert.")}[arch]
    for path in files:
        handle = safe_open(path, framework="numpy")
        for hf_name in handle.keys():
            name = _rename(table, ignored, hf_name[len(prefix):] if hf_name.startswith(prefix) else hf_name)
            if name is None:
                continue

            conv1d = arch == "gpt2" and hf_name.endswith(".weight") and \
                any(k in hf_name for k in ("c_attn", "c_proj", "c_fc"))

            def load(h=handle, n=hf_name, transpose=conv1d):
                a = h.get_tensor(n).astype(np.float32)
                return a.T if transpose else a
            tensors[name] = load
    if arch == "llama" and config["tied_embeddings"]:
        tensors.pop("output.weight", None)
    if arch == "gpt2":
        _split_gpt2_qkv(tensors, config)

    st = _read_json(os.path.join(folder, "sentence_bert_config.json"))
    pooling = _read_json(os.path.join(folder, "1_Pooling", "config.json"))
    eos = hf.get("eos_token_id", gen_cfg.get("eos_token_id"))
    meta = {
        "source": {"format": "huggingface", "path": os.path.abspath(folder), "model_type": hf.get("model_type")},
        "bos_token_id": hf.get("bos_token_id", gen_cfg.get("bos_token_id")),
        "eos_token_id": eos[0] if isinstance(eos, list) else eos,
        "chat_template": tok_cfg.get("chat_template"),
    }
    if arch == "bert":
        config["max_tokens"] = min(int(st.get("max_seq_length") or config["seq_len"]), config["seq_len"])
        config["pooling"] = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        config["normalize"] = True
        if "classifier.weight" in tensors:
            config["labels"] = [hf.get("id2label", {}).get(str(i), f"LABEL_{i}")
                                for i in range(tensors["classifier.weight"]().shape[0])]
    return Checkpoint(arch, config, meta, tokenizer_json, tensors)


def _split_gpt2_qkv(tensors: dict, config: dict) -> None:
    dim = config["dim"]
    for l in range(config["n_layers"]):
        for part in ("weight", "bias"):
            fused = tensors.pop(f"blk.{l}.attn_qkv.{part}", None)
            if fused is None:
                continue
            for i, n in enumerate("qkv"):
                tensors[f"blk.{l}.attn_{n}.{part}"] = (lambda f=fused, i=i: f()[i * dim:(i + 1) * dim])
